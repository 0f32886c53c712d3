"""What a run trains on: the configured dataset, the network spec that fits it, and the training
batch of every (stage, step) -- a pure function of the seed, so a resumed run sees the same batches."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch
from torch import Tensor

from dagc.errors import CheckpointError, ConfigError, DataError, SpecError
from dagc.spec import Spec
from dagc.trainer import datasets
from dagc.trainer.baselines import complete_dag
from dagc.trainer.config import STAGES, TrainConfig


def load_data(cfg: TrainConfig) -> datasets.MultiTaskData:
    """The configured dataset (built in, or read from ``cfg.data_root``). Raises DataError for
    unknown names and for missing or malformed files of an on-disk dataset."""
    try:
        return datasets.load_dataset(cfg.dataset, tasks=cfg.tasks, seed=cfg.seed, n_train=cfg.n_train,
                                     n_test=cfg.n_test, root=cfg.data_root, input_size=cfg.input_size)
    except ValueError as e:  # DataError, or a stray ValueError of numpy / Pillow: one line for the user
        raise DataError(str(e)) from None


def training_size(data: datasets.MultiTaskData) -> int:
    """The samples of an epoch: the training split's size (the largest task's, with one input per
    task)."""
    return max(data.train.size(t.name) for t in data.tasks)


def split_validation(data: datasets.MultiTaskData, fraction: float,
                     seed: int) -> tuple[datasets.MultiTaskData, datasets.Split | None]:
    """Carve a validation slice out of ``data``'s training split: ``fraction`` of it (at least one
    sample), drawn by ``seed``, per task for per-task inputs and once for a shared input. Returns
    the data with the rest as its training split (the test split untouched) and the slice; for
    ``fraction`` 0, ``data`` itself and None. Raises DataError when fewer than 2 training samples
    of a task would remain (batch norm needs 2). The inputs' standardisation was computed by the
    loader over the whole training split, slice included: a per-channel mean and deviation of
    inputs, never a label, so no validation target leaks into training."""
    if fraction == 0:
        return data, None
    rng = np.random.default_rng([seed, 0x7A11D])

    def cut(n: int, what: str) -> tuple[np.ndarray, np.ndarray]:
        n_val = max(1, round(n * fraction))
        if n - n_val < 2:
            raise DataError(f"{what} has {n} training samples; holding out {n_val} for validation "
                            f"(val_fraction {fraction}) leaves fewer than 2; lower val_fraction or use more data")
        order = rng.permutation(n)
        return np.sort(order[n_val:]), np.sort(order[:n_val])

    split = data.train
    names = list(split.targets)
    if data.shared_input:
        keep, held = cut(split.size(names[0]), "the dataset")
        train = datasets.Split(split.inputs[keep], {t: v[keep] for t, v in split.targets.items()})
        val = datasets.Split(split.inputs[held], {t: v[held] for t, v in split.targets.items()})
    else:
        cuts = {t: cut(split.size(t), f"task {t!r}") for t in names}
        train = datasets.Split({t: split.inputs[t][k] for t, (k, _) in cuts.items()},
                               {t: split.targets[t][k] for t, (k, _) in cuts.items()})
        val = datasets.Split({t: split.inputs[t][h] for t, (_, h) in cuts.items()},
                             {t: split.targets[t][h] for t, (_, h) in cuts.items()})
    return replace(data, train=train), val


def run_data(ck, data_root: str | None = None) -> datasets.MultiTaskData:
    """The dataset a checkpoint (`dagc.checkpoint.Checkpoint`) was trained on, rebuilt from its
    recorded configuration, with ``data_root`` in place of the recorded root for on-disk datasets.
    Raises CheckpointError when it records no (or a malformed) configuration, ConfigError /
    DataError when the data cannot be read."""
    cfg = ck.json("config", None)
    if not isinstance(cfg, dict) or "dataset" not in cfg:
        raise CheckpointError(f"{ck.source} records no training configuration, so the data it was trained on "
                              "cannot be rebuilt")
    if data_root is not None:
        cfg = {**cfg, "data_root": str(data_root)}
    try:
        config = TrainConfig.from_dict(cfg)
    except ConfigError as e:
        raise ConfigError(f"the checkpoint's training data: {e} (give --data-root for an on-disk dataset)") from None
    except TypeError as e:
        raise CheckpointError(f"{ck.source}: its training configuration is malformed ({e})") from None
    data = load_data(config)
    mismatch = _misfit(ck.spec, data)
    if mismatch:
        # An edited configuration (or another dataset under --data-root) would otherwise reach the
        # models as a shape error or a missing task deep inside calibration or scoring.
        raise DataError(f"{ck.source}: the data its training configuration names ({data.name}"
                        f"{'' if data_root is None else f' under {data_root}'}) does not fit its network: {mismatch}; "
                        "give the --data-root of the run's own data, or retrain")
    return data


def _misfit(spec: Spec, data: datasets.MultiTaskData) -> str | None:
    """How ``data`` disagrees with the network ``spec`` it is to feed, or None."""
    if (data.in_channels, tuple(data.input_size)) != (spec.in_channels, tuple(spec.input_size)):
        return (f"its inputs are {data.in_channels}x{'x'.join(map(str, data.input_size))}, the network takes "
                f"{spec.in_channels}x{'x'.join(map(str, spec.input_size))}")
    if data.shared_input != spec.shared_input:
        return "one of them has one input per task, the other one shared input"
    have = {t.name: t for t in data.tasks}
    for t in spec.tasks:
        d = have.get(t.name)
        if d is None:
            return f"it has no task {t.name!r} (its tasks: {sorted(have)})"
        if (d.kind, d.classes) != (t.kind, t.classes):
            return f"its task {t.name!r} is {d.kind} with {d.classes} classes, the network's is {t.kind} with {t.classes}"
    return None


def build_spec(cfg: TrainConfig, data: datasets.MultiTaskData) -> Spec:
    """The central network of the run: the configured network file's or preset's network
    (`TrainConfig.central_network`) with the data's tasks and input (the complete DAG under the
    ``no-flow-restriction`` ablation). Raises ConfigError when the network does not fit the data."""
    try:
        spec = Spec.from_network(cfg.central_network(), data.tasks, flow_constant=cfg.flow_constant,
                                 in_channels=data.in_channels, input_size=tuple(data.input_size),
                                 shared_input=data.shared_input)
        return complete_dag(spec) if "no-flow-restriction" in cfg.ablations else spec
    except SpecError as e:
        raise ConfigError(f"{cfg.network_name()} does not fit dataset {cfg.dataset!r}: {e}") from None


def batch_at(split: datasets.Split, spec: Spec, batch_size: int, seed: int, stage: str, step: int,
             device: torch.device, rank: int = 0, world: int = 1) -> tuple[Tensor, dict[str, Tensor]]:
    """The training batch of (stage, step) for process ``rank`` of ``world``: a pure function of
    (seed, stage, step), so a resumed run sees the same batches. The ``batch_size * world``
    samples of the global batch are drawn at once and each rank takes its own ``batch_size``
    slice (with one process, exactly the batch it always was). Shared input: x (B, C, H, W);
    per-task inputs: x (K, B, C, H, W). Returns x and the targets by task, on ``device``."""
    rng = np.random.default_rng([seed, STAGES.index(stage), step])
    targets: dict[str, Tensor] = {}
    mine = slice(rank * batch_size, (rank + 1) * batch_size)
    if spec.shared_input:
        idx = rng.integers(0, split.size(spec.tasks[0].name), batch_size * world)[mine]
        x = torch.from_numpy(np.ascontiguousarray(split.inputs[idx]))
        for t in spec.tasks:
            targets[t.name] = torch.from_numpy(np.ascontiguousarray(split.targets[t.name][idx]))
    else:
        xs = []
        for t in spec.tasks:
            idx = rng.integers(0, split.size(t.name), batch_size * world)[mine]
            xs.append(torch.from_numpy(np.ascontiguousarray(split.inputs[t.name][idx])))
            targets[t.name] = torch.from_numpy(np.ascontiguousarray(split.targets[t.name][idx]))
        x = torch.stack(xs)
    return x.to(device), {k: v.to(device) for k, v in targets.items()}
