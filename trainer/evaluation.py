"""Held-out evaluation: every task's metrics on a split, and those of each task's best constant
predictor (the floor every metric is compared with)."""

from __future__ import annotations

import numpy as np
import torch

from dagc.spec import Spec
from dagc.trainer.datasets import MultiTaskData, Split
from dagc.trainer.kinds import constant_prediction, task_meter
from dagc.trainer.network import CentralNetwork


@torch.no_grad()
def evaluate(net: CentralNetwork, split: Split, batch_size: int = 256,
             device: torch.device | str = "cpu") -> dict[str, dict[str, float]]:
    """Metrics of every task on ``split`` (task -> metric -> value), the network in eval mode.
    Raises DataError when a task has nothing valid to score."""
    net.eval()
    spec = net.spec
    meters = {t.name: task_meter(t) for t in spec.tasks}
    if spec.shared_input:
        n = split.size(spec.tasks[0].name)
        for s in range(0, n, batch_size):
            out = net(torch.from_numpy(split.inputs[s:s + batch_size]).to(device))
            for t in spec.tasks:
                meters[t.name].update(out[t.name].float().cpu().numpy(), split.targets[t.name][s:s + batch_size])
    else:
        for t in spec.tasks:
            for s in range(0, split.size(t.name), batch_size):
                x = torch.from_numpy(split.inputs[t.name][s:s + batch_size]).to(device)
                out = net(x[None], tasks=[t.name])[t.name]
                meters[t.name].update(out.float().cpu().numpy(), split.targets[t.name][s:s + batch_size])
    return {k: m.result() for k, m in meters.items()}


def constant_baselines(spec: Spec, data: MultiTaskData) -> dict[str, dict[str, float]]:
    """Held-out metrics of each task's best constant predictor fitted on the training split
    (task -> metric -> value)."""
    out = {}
    for t in spec.tasks:
        target = data.test.targets[t.name]
        shape = (len(target), t.out_channels, *target.shape[-2:]) if t.dense else (len(target), t.classes)
        meter = task_meter(t)
        meter.update(np.asarray(constant_prediction(t, data.train.targets[t.name], shape)), target)
        out[t.name] = meter.result()
    return out
