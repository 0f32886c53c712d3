"""`dagc train`: the whole search of one run — warm-up, search, reduction, rewind, fine-tune —
with resumable checkpoints, held-out evaluation and a metrics report.

A run directory holds:
    state.safetensors       resumable training state (model, optimizer, rewind snapshot, progress),
                            rewritten atomically every `save_every` iterations and at stage ends
    warmup.safetensors      the model at the end of warm-up
    search.safetensors      the searched supernet (soft, before reduction)
    checkpoint.safetensors  the final reduced and fine-tuned model (the compiler's input)
    metrics.json            losses per stage, held-out metrics, constant baselines, topology
    train.log               a line per logged iteration
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from dagc.checkpoint import Checkpoint, load_checkpoint, save_checkpoint, write_atomic
from dagc.errors import CheckpointError, ConfigError, DataError, SpecError
from dagc.spec import PRESETS, Spec, TaskSpec, preset
from dagc.trainer import datasets
from dagc.trainer.losses import DENSE_LOSSES
from dagc.trainer.metrics import PRIMARY, TaskMeter, constant_prediction
from dagc.trainer.network import CentralNetwork, count_parameters, load_network_tensors, network_tensors
from dagc.trainer.stages import (
    REDUCTIONS,
    finetune_step,
    make_optimizer,
    reduce_network,
    rewind,
    search_step,
    theta_snapshot,
    warmup_step,
)

STAGE_ORDER = ("warmup", "search", "finetune")
# The paper's homogeneous classification setting uses 8 states (Omniglot); `tiny` keeps the dense
# synthetic tasks within minutes on a CPU.
DEFAULT_PRESET = {"synthetic": "tiny", "digits": "omniglot"}
log = logging.getLogger("dagc.train")


@dataclass(frozen=True)
class TrainConfig:
    """Everything a run depends on. Learning rates and λ_sq default to the paper's Table 9
    (NYU-v2 / Omniglot row); ``kappa=None`` sets the squeeze budget κ to N, about one incoming
    edge per hidden state."""

    dataset: str = "synthetic"
    preset: str | None = None  # None: the dataset's own (DEFAULT_PRESET)
    tasks: tuple[str, ...] | None = None
    flow_constant: int | None = None
    warmup_iters: int = 150
    search_iters: int = 250
    finetune_iters: int = 400
    batch_size: int = 16
    weight_lr: float = 1e-4
    arch_lr: float = 0.01
    squeeze_weight: float = 0.05
    kappa: float | None = None
    dense_loss: str = "l2"
    reduction: str = "fbr"
    target_sparsity: float | None = None
    seed: int = 0
    device: str = "cpu"
    save_every: int = 100
    log_every: int = 10
    n_train: int | None = None
    n_test: int | None = None

    def __post_init__(self) -> None:
        if self.tasks is not None:
            object.__setattr__(self, "tasks", tuple(self.tasks))
        if self.preset is None and self.dataset in DEFAULT_PRESET:
            object.__setattr__(self, "preset", DEFAULT_PRESET[self.dataset])
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError naming the first invalid field."""
        if self.dataset not in datasets.DATASETS:
            raise ConfigError(f"unknown dataset {self.dataset!r}; choose one of {list(datasets.DATASETS)}")
        if self.preset not in PRESETS:
            raise ConfigError(f"unknown preset {self.preset!r}; choose one of {list(PRESETS)}")
        if self.tasks is not None:
            valid = datasets.task_names(self.dataset)
            bad = [t for t in self.tasks if t not in valid]
            if bad or not self.tasks:
                raise ConfigError(f"unknown task(s) {bad} for dataset {self.dataset!r}; choose from {list(valid)}")
            if len(set(self.tasks)) != len(self.tasks):
                raise ConfigError(f"tasks: each task at most once, got {list(self.tasks)}")
        if self.flow_constant is not None and (not isinstance(self.flow_constant, int) or self.flow_constant < 1):
            raise ConfigError(f"flow_constant (M) must be an integer >= 1, got {self.flow_constant!r}")
        for name in ("warmup_iters", "search_iters", "finetune_iters", "batch_size", "save_every", "log_every"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name} must be a positive integer, got {v!r}")
        if self.batch_size < 2:
            raise ConfigError("batch_size must be at least 2 (batch norm needs per-task batch statistics)")
        for name in ("weight_lr", "arch_lr"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ConfigError(f"{name} must be a positive number, got {v!r}")
        if not (math.isfinite(self.squeeze_weight) and self.squeeze_weight >= 0):
            raise ConfigError(f"squeeze_weight must be >= 0, got {self.squeeze_weight!r}")
        if self.kappa is not None and not (math.isfinite(self.kappa) and self.kappa >= 0):
            raise ConfigError(f"kappa must be >= 0, got {self.kappa!r}")
        if self.dense_loss not in DENSE_LOSSES:
            raise ConfigError(f"dense_loss must be one of {list(DENSE_LOSSES)}, got {self.dense_loss!r}")
        if self.reduction not in REDUCTIONS:
            raise ConfigError(f"reduction must be one of {list(REDUCTIONS)}, got {self.reduction!r}")
        if self.target_sparsity is not None and not 0 < self.target_sparsity <= 1:
            raise ConfigError(f"target_sparsity must be in (0, 1], got {self.target_sparsity!r}")
        if self.device != "cpu" and not self.device.startswith("cuda"):
            raise ConfigError(f"device must be 'cpu' or 'cuda[:N]', got {self.device!r}")
        for name in ("n_train", "n_test"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 2):
                raise ConfigError(f"{name} must be an integer >= 2, got {v!r}")

    def iters(self, stage: str) -> int:
        return getattr(self, f"{stage}_iters")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["tasks"] = list(self.tasks) if self.tasks is not None else None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


# ---------------------------------------------------------------------- data
def load_data(cfg: TrainConfig) -> datasets.MultiTaskData:
    """The configured built-in dataset. Raises DataError for unknown names."""
    try:
        return datasets.load_dataset(cfg.dataset, tasks=cfg.tasks, seed=cfg.seed, n_train=cfg.n_train,
                                     n_test=cfg.n_test)
    except ValueError as e:
        raise DataError(str(e)) from None


def build_spec(cfg: TrainConfig, data: datasets.MultiTaskData) -> Spec:
    tasks = [TaskSpec(t.name, t.kind, t.classes) for t in data.tasks]
    try:
        return preset(cfg.preset, tasks, flow_constant=cfg.flow_constant, in_channels=data.in_channels,
                      input_size=tuple(data.input_size), shared_input=data.shared_input)
    except SpecError as e:
        raise ConfigError(f"preset {cfg.preset!r} does not fit dataset {cfg.dataset!r}: {e}") from None


def batch_at(split: datasets.Split, spec: Spec, batch_size: int, seed: int, stage: str, step: int,
             device: torch.device) -> tuple[Tensor, dict[str, Tensor]]:
    """The training batch of (stage, step): a pure function of the seed, so a resumed run sees the
    same batches. Shared input: x (B, C, H, W); per-task inputs: x (K, B, C, H, W)."""
    rng = np.random.default_rng([seed, STAGE_ORDER.index(stage), step])
    targets: dict[str, Tensor] = {}
    if spec.shared_input:
        idx = rng.integers(0, split.size(spec.tasks[0].name), batch_size)
        x = torch.from_numpy(np.ascontiguousarray(split.inputs[idx]))
        for t in spec.tasks:
            targets[t.name] = torch.from_numpy(np.ascontiguousarray(split.targets[t.name][idx]))
    else:
        xs = []
        for t in spec.tasks:
            idx = rng.integers(0, split.size(t.name), batch_size)
            xs.append(torch.from_numpy(np.ascontiguousarray(split.inputs[t.name][idx])))
            targets[t.name] = torch.from_numpy(np.ascontiguousarray(split.targets[t.name][idx]))
        x = torch.stack(xs)
    return x.to(device), {k: v.to(device) for k, v in targets.items()}


@torch.no_grad()
def evaluate(net: CentralNetwork, split: datasets.Split, batch_size: int = 256,
             device: torch.device | str = "cpu") -> dict[str, dict[str, float]]:
    """Metrics of every task on ``split`` (task -> metric -> value), the network in eval mode."""
    net.eval()
    spec = net.spec
    meters = {t.name: TaskMeter(t) for t in spec.tasks}
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


def constant_baselines(spec: Spec, data: datasets.MultiTaskData) -> dict[str, dict[str, float]]:
    """Held-out metrics of each task's best constant predictor fitted on the training split."""
    out = {}
    for t in spec.tasks:
        target = data.test.targets[t.name]
        shape = (len(target), t.out_channels, *target.shape[-2:]) if t.dense else (len(target), t.classes)
        meter = TaskMeter(t)
        meter.update(np.asarray(constant_prediction(t, data.train.targets[t.name], shape)), target)
        out[t.name] = meter.result()
    return out


# ---------------------------------------------------------------------- run state and checkpoints
@dataclass
class Run:
    """Explicit state of a run between iterations."""

    cfg: TrainConfig
    spec: Spec
    net: CentralNetwork
    stage: str                    # the stage in progress (or "done")
    step: int                     # iterations done in that stage
    opt: torch.optim.Optimizer | None
    rewind_theta: dict[str, Tensor] | None
    history: dict[str, list[dict[str, float]]]
    topology: dict[str, dict[str, float]] | None = None
    seconds: float = 0.0

    @property
    def completed(self) -> str:
        """The last completed stage, in the checkpoint's vocabulary."""
        if self.stage == "done":
            return "finetune"
        if self.stage == "finetune":
            return "reduced"
        return {"warmup": "init", "search": "warmup"}[self.stage]


def optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict[str, Any]]:
    sd = opt.state_dict()
    tensors = {}
    for pid, st in sd["state"].items():
        for key, val in st.items():
            tensors[f"optim.{pid}.{key}"] = torch.as_tensor(val)
    return tensors, {"param_groups": sd["param_groups"]}


def load_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, Tensor], groups_meta: dict[str, Any]) -> None:
    state: dict[int, dict[str, Tensor]] = {}
    for name, val in tensors.items():
        _, pid, key = name.split(".", 2)
        state.setdefault(int(pid), {})[key] = val
    try:
        opt.load_state_dict({"state": state, "param_groups": groups_meta["param_groups"]})
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"optimizer state does not match the model: {e}") from None


def save_state(run: Run, out: Path) -> None:
    """Write the resumable state atomically."""
    tensors = network_tensors(run.net)
    meta: dict[str, Any] = {"config": run.cfg.to_dict(), "progress": {"stage": run.stage, "step": run.step},
                            "history": run.history, "seconds": run.seconds}
    if run.opt is not None:
        opt_t, opt_meta = optimizer_tensors(run.opt)
        tensors.update(opt_t)
        meta["optimizer"] = opt_meta
    if run.rewind_theta is not None:
        tensors.update({f"rewind.{k}": v for k, v in run.rewind_theta.items()})
    if run.topology is not None:
        meta["topology"] = run.topology
    save_checkpoint(out / "state.safetensors", tensors, run.spec, run.completed, **meta)


def resume_run(run_dir: Path, device: str | None = None) -> Run:
    """Rebuild a run from ``run_dir/state.safetensors``, on its own device or on ``device``.
    Raises CheckpointError if the state is missing, truncated, foreign, or not a training state."""
    path = run_dir / "state.safetensors"
    if not path.exists():
        raise CheckpointError(f"{run_dir} holds no resumable run (no state.safetensors); start one with dagc train --out {run_dir}")
    ck: Checkpoint = load_checkpoint(path)
    try:
        cfg = TrainConfig.from_dict(ck.json("config"))
        if device is not None:
            cfg = replace(cfg, device=device)
        progress = ck.json("progress")
        stage, step = progress["stage"], int(progress["step"])
        if stage not in (*STAGE_ORDER, "done"):
            raise KeyError(stage)
    except (TypeError, KeyError, ConfigError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is a dagc checkpoint but not a training state ({e}); "
                              "only run directories written by dagc train can be resumed") from None
    net = CentralNetwork(ck.spec)
    load_network_tensors(net, ck.tensors)
    net.to(_device(cfg.device))
    rewind_theta = ck.group("rewind") or None
    opt = None
    if stage != "done":
        opt = make_optimizer(net, stage, cfg.weight_lr, cfg.arch_lr)
        # Adam's load_state_dict moves the state to its parameters' device.
        optim_t = {k: v for k, v in ck.tensors.items() if k.startswith("optim.")}
        if optim_t:
            load_optimizer(opt, optim_t, ck.json("optimizer", {}))
    return Run(cfg=cfg, spec=ck.spec, net=net, stage=stage, step=step, opt=opt, rewind_theta=rewind_theta,
               history=ck.json("history", {}), topology=ck.json("topology"), seconds=ck.json("seconds", 0.0))


def _writable_dir(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"cannot write to {out} ({e.strerror or e}); choose a writable --out") from None


# ---------------------------------------------------------------------- the run
def train(cfg: TrainConfig | None, out_dir: str | os.PathLike, *, resume: bool = False,
          progress: bool = True, on_step: Callable[[Run], None] | None = None) -> dict[str, Any]:
    """Run (or resume) the three-stage search and write the run directory.

    Takes: the configuration (when resuming, only its device is used: the run's own configuration
    holds), the run directory, ``resume`` to continue ``out_dir/state.safetensors``, ``progress``
    for progress bars, and an optional callback after every iteration (tests use it to interrupt).
    Returns the metrics written to metrics.json.
    Raises ConfigError (bad configuration or unwritable directory), DataError, CheckpointError.
    """
    out = Path(out_dir)
    if resume:
        if not out.is_dir():
            raise CheckpointError(f"{out} is not a run directory; give the --out of an earlier dagc train")
        # Only the device may differ from the run's own configuration.
        run = resume_run(out, device=cfg.device if cfg is not None else None)
        device = _device(run.cfg.device)
    else:
        if cfg is None:
            raise ConfigError("a configuration is needed to start a run")
        device = _device(cfg.device)
        if (out / "state.safetensors").exists():
            raise ConfigError(f"{out} already holds a run; continue it with --resume {out} or choose another --out")
        run = None
    cfg = run.cfg if run is not None else cfg
    data = load_data(cfg)
    spec = build_spec(cfg, data)
    _writable_dir(out)
    if run is None:
        torch.manual_seed(cfg.seed)
        net = CentralNetwork(spec).to(device)
        run = Run(cfg=cfg, spec=spec, net=net, stage="warmup", step=0,
                  opt=make_optimizer(net, "warmup", cfg.weight_lr, cfg.arch_lr), rewind_theta=None,
                  history={s: [] for s in STAGE_ORDER})
    elif run.spec != spec:
        raise CheckpointError(f"{out}/state.safetensors does not match its own configuration's spec")

    handler = logging.FileHandler(out / "train.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        log.info("run %s: %s", "resumed" if resume else "started", json.dumps(cfg.to_dict()))
        kappa = cfg.kappa if cfg.kappa is not None else float(spec.n_states)
        while run.stage != "done":
            _run_stage(run, data, out, device, kappa, progress, on_step)
        metrics = _finish(run, data, out, device)
        log.info("run finished: %s", json.dumps(metrics["final"]))
        return metrics
    finally:
        log.removeHandler(handler)
        handler.close()


def _device(name: str) -> torch.device:
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device cuda asked for, but no CUDA GPU is available; use --device cpu")
    return torch.device(name)


def _run_stage(run: Run, data, out: Path, device, kappa: float, progress: bool, on_step) -> None:
    cfg, stage = run.cfg, run.stage
    if stage == "finetune" and not run.net.hard:
        # Reduction, then rewinding θ to the end of warm-up (appendix A), then a fresh optimizer.
        run.topology = reduce_network(run.net, cfg.reduction, seed=cfg.seed, target_sparsity=cfg.target_sparsity)
        rewind(run.net, run.rewind_theta)
        run.opt = make_optimizer(run.net, "finetune", cfg.weight_lr, cfg.arch_lr)
        log.info("reduced: %s", json.dumps(run.topology))
        save_state(run, out)
    n_iters = cfg.iters(stage)
    bar = _progress(stage, n_iters, run.step, progress)
    t0 = time.perf_counter()
    acc: dict[str, float] = {}
    n_acc = 0  # iterations in acc (after a resume, not necessarily log_every)
    try:
        while run.step < n_iters:
            x, targets = batch_at(data.train, run.spec, cfg.batch_size, cfg.seed, stage, run.step, device)
            if stage == "search":
                losses = search_step(run.net, run.opt, x, targets, cfg.squeeze_weight, kappa, cfg.dense_loss)
            elif stage == "warmup":
                losses = warmup_step(run.net, run.opt, x, targets, cfg.dense_loss)
            else:
                losses = finetune_step(run.net, run.opt, x, targets, cfg.dense_loss)
            if not math.isfinite(losses["loss"]):
                raise ConfigError(f"{stage} loss became {losses['loss']} at step {run.step}; lower the learning rates")
            run.step += 1
            for k, v in losses.items():
                acc[k] = acc.get(k, 0.0) + v
            n_acc += 1
            if run.step % cfg.log_every == 0 or run.step == n_iters:
                entry = {"step": run.step, **{k: v / n_acc for k, v in acc.items()}}
                run.history.setdefault(stage, []).append(entry)
                log.info("%s %s", stage, json.dumps(entry))
                acc, n_acc = {}, 0
                if bar is not None:
                    bar.set_postfix(loss=f"{entry['loss']:.4f}")
            if bar is not None:
                bar.update(1)
            if run.step % cfg.save_every == 0 and run.step < n_iters:
                run.seconds += time.perf_counter() - t0
                t0 = time.perf_counter()
                save_state(run, out)
            if on_step is not None:
                on_step(run)
    finally:
        if bar is not None:
            bar.close()
    run.seconds += time.perf_counter() - t0
    _end_stage(run, out)


def _end_stage(run: Run, out: Path) -> None:
    stage = run.stage
    if stage == "warmup":
        run.rewind_theta = theta_snapshot(run.net)
    if stage != "finetune":  # the fine-tuned model is written as checkpoint.safetensors by _finish
        save_checkpoint(out / f"{stage}.safetensors", network_tensors(run.net), run.spec, stage,
                        config=run.cfg.to_dict())
    nxt = STAGE_ORDER.index(stage) + 1
    run.stage = STAGE_ORDER[nxt] if nxt < len(STAGE_ORDER) else "done"
    run.step = 0
    # The fine-tune optimizer is made after reduction, in _run_stage.
    run.opt = make_optimizer(run.net, "search", run.cfg.weight_lr, run.cfg.arch_lr) if run.stage == "search" else None
    save_state(run, out)


def _progress(stage: str, total: int, initial: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=f"{stage:>8}", unit="it", dynamic_ncols=True, leave=True)


def _finish(run: Run, data, out: Path, device) -> dict[str, Any]:
    net, spec = run.net, run.spec
    final = evaluate(net, data.test, device=device)
    baselines = constant_baselines(spec, data)
    supernet_params = count_parameters(net) - sum(p.numel() for p in net.arch_parameters())
    metrics = {
        "config": run.cfg.to_dict(),
        "spec": spec.to_dict(),
        "losses": run.history,
        "final": final,
        "constant_baseline": baselines,
        "primary": {t.name: {"metric": PRIMARY[t.kind][0], "higher_is_better": PRIMARY[t.kind][1],
                             "model": final[t.name][PRIMARY[t.kind][0]],
                             "constant": baselines[t.name][PRIMARY[t.kind][0]]} for t in spec.tasks},
        "topology": run.topology,
        "parameters": {"supernet": supernet_params},
        "train_seconds": run.seconds,
        "test_samples": {t.name: data.test.size(t.name) for t in spec.tasks},
    }
    save_checkpoint(out / "checkpoint.safetensors", network_tensors(net), spec, "finetune",
                    config=run.cfg.to_dict(), metrics={"final": final, "topology": run.topology},
                    preprocessing=data.preprocessing)
    text = json.dumps(metrics, indent=2, sort_keys=True)
    write_atomic(out / "metrics.json", lambda tmp: Path(tmp).write_text(text))
    return metrics
