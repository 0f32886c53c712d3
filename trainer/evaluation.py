"""Held-out evaluation: every task's metrics on a split, and those of each task's best constant
predictor (the floor every metric is compared with)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch

from dagc.spec import Spec
from dagc.trainer.datasets import MultiTaskData, Split
from dagc.trainer.kinds import constant_prediction, task_meter
from dagc.trainer.network import CentralNetwork

# What `score` runs: (task names, a batch of their input) -> task -> prediction (numpy).
Predict = Callable[[Sequence[str], np.ndarray], Mapping[str, np.ndarray]]


def score(spec: Spec, split: Split, predict: Predict, tasks: Sequence[str] | None = None,
          batch_size: int = 256) -> dict[str, dict[str, float]]:
    """Metrics of ``tasks`` (default: all) on ``split`` (task -> metric -> value) of any model:
    ``predict(task_names, x)`` returns the predictions for a batch ``x`` of the split's inputs
    (the shared input, or with one input per task the named task's). The network (`evaluate`),
    the compiled models and their reduced-precision forms (`dagc.compiler.precision`) are all
    scored through this one loop. Raises DataError when a task has nothing valid to score."""
    names = list(spec.task_names if tasks is None else tasks)
    meters = {t: task_meter(spec.task(t)) for t in names}
    if spec.shared_input:
        n = split.size(names[0])
        for s in range(0, n, batch_size):
            out = predict(names, split.inputs[s:s + batch_size])
            for t in names:
                meters[t].update(np.asarray(out[t], dtype=np.float32), split.targets[t][s:s + batch_size])
    else:
        for t in names:
            for s in range(0, split.size(t), batch_size):
                out = predict([t], split.inputs[t][s:s + batch_size])
                meters[t].update(np.asarray(out[t], dtype=np.float32), split.targets[t][s:s + batch_size])
    return {t: meters[t].result() for t in names}


@torch.no_grad()
def evaluate(net: CentralNetwork, split: Split, batch_size: int = 256,
             device: torch.device | str = "cpu") -> dict[str, dict[str, float]]:
    """Metrics of every task on ``split`` (task -> metric -> value), the network in eval mode.
    Raises DataError when a task has nothing valid to score."""
    net.eval()
    spec = net.spec

    def predict(tasks: Sequence[str], x: np.ndarray) -> dict[str, np.ndarray]:
        xt = torch.from_numpy(x).to(device)
        out = net(xt) if spec.shared_input else net(xt[None], tasks=list(tasks))
        return {t: out[t].float().cpu().numpy() for t in tasks}

    return score(spec, split, predict, batch_size=batch_size)


def constant_baselines(spec: Spec, data: MultiTaskData) -> dict[str, dict[str, float]]:
    """Held-out metrics of each task's best constant predictor fitted on the training split
    (task -> metric -> value)."""
    out = {}
    for t in spec.tasks:
        target = data.test.targets[t.name]
        shape = (len(target), t.out_channels, *target.shape[-2:]) if t.dense else (len(target), t.out_channels)
        meter = task_meter(t)
        meter.update(np.asarray(constant_prediction(t, data.train.targets[t.name], shape)), target)
        out[t.name] = meter.result()
    return out
