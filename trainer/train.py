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

Under torchrun (``torchrun --nproc-per-node N -m dagc train ...``) every process trains one
DistributedDataParallel replica (`dagc.trainer.distributed`): each rank takes its own slice of
every batch (``batch_size`` is per process; the global batch is ``batch_size * world size``),
gradients are averaged over ranks, and only rank 0 writes the run directory. Batch norm uses each
rank's own batch statistics (no SyncBatchNorm: a lane's statistics come from that rank's shard);
its running statistics are rank 0's: DDP broadcasts buffers from rank 0 before every forward and
every stage end broadcasts them once more, so all ranks save, evaluate and reduce the same model.
At every stage end the ranks also compare a digest of their parameters, logits and masks; a
mismatch (which would be a bug) is logged and repaired by broadcasting rank 0's values, so the
ranks can never drift apart.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel

from dagc.checkpoint import Checkpoint, load_checkpoint, save_checkpoint, write_atomic
from dagc.errors import CheckpointError, ConfigError, DataError, SpecError
from dagc.spec import PRESETS, Spec, TaskSpec, preset
from dagc.trainer import datasets, distributed
from dagc.trainer.baselines import (
    ABLATIONS,
    BASELINES,
    chain_masks,
    complete_dag,
    fix_read_in_out,
    parameter_ratio,
)
from dagc.trainer.losses import DENSE_LOSSES
from dagc.trainer.metrics import PRIMARY, TaskMeter, constant_prediction
from dagc.trainer.network import CentralNetwork, count_parameters, load_network_tensors, network_tensors
from dagc.trainer.stages import (
    AMP_MODES,
    REDUCTIONS,
    Precision,
    finetune_step,
    make_optimizer,
    make_precision,
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
# The paper's presets for its real benchmarks (appendix Table 7): VGG-16's 12 states for the
# dense ones, 8 states for Omniglot.
DEFAULT_PRESET.update({name: "vgg16" for name in datasets.ON_DISK}, omniglot="omniglot")
log = logging.getLogger("dagc.train")


@dataclass(frozen=True)
class TrainConfig:
    """Everything a run depends on. Learning rates and λ_sq default to the paper's Table 9
    (NYU-v2 / Omniglot row); ``kappa=None`` sets the squeeze budget κ to N, about one incoming
    edge per hidden state."""

    dataset: str = "synthetic"
    data_root: str | None = None  # the directory of an on-disk dataset (datasets.ON_DISK)
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
    # Speed only; the defaults train exactly as before. amp: autocast dtype of the forward pass
    # (bf16 on CPU or CUDA, fp16 with gradient scaling on CUDA only).
    amp: str = "none"
    channels_last: bool = False
    compile: bool = False
    # The paper's baselines and ablations (dagc.trainer.baselines): a baseline trains fixed chain
    # masks for warmup + search + finetune iterations, without search; ablations combine.
    baseline: str | None = None
    ablations: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.tasks is not None:
            object.__setattr__(self, "tasks", tuple(self.tasks))
        if isinstance(self.ablations, (list, tuple)):
            object.__setattr__(self, "ablations", tuple(self.ablations))
        if isinstance(self.data_root, os.PathLike):  # stored as text: the config is JSON metadata
            object.__setattr__(self, "data_root", os.fspath(self.data_root))
        if self.preset is None and self.dataset in DEFAULT_PRESET:
            object.__setattr__(self, "preset", DEFAULT_PRESET[self.dataset])
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError naming the first invalid field."""
        if self.dataset not in datasets.DATASETS:
            raise ConfigError(f"unknown dataset {self.dataset!r}; choose one of {list(datasets.DATASETS)}")
        if self.dataset in datasets.ON_DISK:
            if self.data_root is None:
                raise ConfigError(f"dataset {self.dataset!r} is read from disk; give its directory as "
                                  "data_root (--data-root DIR)")
            if not isinstance(self.data_root, str) or not os.path.isdir(self.data_root):
                raise ConfigError(f"data_root {self.data_root!r} is not a directory; give the folder that "
                                  f"holds the {self.dataset} dataset")
        elif self.data_root is not None:
            raise ConfigError(f"data_root is only for the on-disk datasets {list(datasets.ON_DISK)}; "
                              f"the built-in {self.dataset!r} needs none")
        if self.preset not in PRESETS:
            raise ConfigError(f"unknown preset {self.preset!r}; choose one of {list(PRESETS)}")
        if self.tasks is not None:
            valid = datasets.task_names(self.dataset, self.data_root)
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
        if self.amp not in AMP_MODES:
            raise ConfigError(f"amp must be one of {list(AMP_MODES)}, got {self.amp!r}")
        if self.amp == "fp16" and not self.device.startswith("cuda"):
            raise ConfigError("amp 'fp16' needs a CUDA GPU (it trains with gradient scaling); "
                              "use --amp bf16 on CPU, or --device cuda")
        for name in ("channels_last", "compile"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")
        self._validate_protocol()

    def _validate_protocol(self) -> None:
        if self.baseline is not None and self.baseline not in BASELINES:
            raise ConfigError(f"baseline must be one of {list(BASELINES)}, got {self.baseline!r}")
        if not isinstance(self.ablations, tuple) or not all(isinstance(a, str) for a in self.ablations):
            raise ConfigError(f"ablations must be a list of names from {list(ABLATIONS)}, got {self.ablations!r}")
        bad = [a for a in self.ablations if a not in ABLATIONS]
        if bad:
            raise ConfigError(f"unknown ablation(s) {bad}; choose from {list(ABLATIONS)}")
        if len(set(self.ablations)) != len(self.ablations):
            raise ConfigError(f"ablations: name each at most once, got {list(self.ablations)}")
        if self.baseline is not None and self.ablations:
            raise ConfigError(f"baseline {self.baseline!r} has no search to ablate; drop the ablations "
                              f"{list(self.ablations)} or the baseline")
        if self.baseline is not None and (self.reduction != "fbr" or self.target_sparsity is not None):
            raise ConfigError(f"baseline {self.baseline!r} is not reduced; drop --reduction/--target-sparsity")
        if "no-fbr" in self.ablations and (self.reduction != "fbr" or self.target_sparsity is not None):
            raise ConfigError("ablation 'no-fbr' keeps every edge; drop --reduction/--target-sparsity")
        if "no-flow-restriction" in self.ablations and self.flow_constant is not None:
            raise ConfigError("ablation 'no-flow-restriction' searches the complete DAG (M = N - 1); "
                              "drop --flow-constant")

    def iters(self, stage: str) -> int:
        if self.baseline is not None and stage == "finetune":
            # No search: the whole budget trains the fixed backbone.
            return self.warmup_iters + self.search_iters + self.finetune_iters
        return getattr(self, f"{stage}_iters")

    @property
    def reduction_method(self) -> str:
        """The reduction after the search (``none`` under the ``no-fbr`` ablation)."""
        return "none" if "no-fbr" in self.ablations else self.reduction

    @property
    def frozen_logits(self) -> tuple[str, ...]:
        """Architecture logits kept out of the search (A and B under ``no-read-in-out``)."""
        return ("arch_alpha", "arch_beta") if "no-read-in-out" in self.ablations else ()

    @property
    def search_squeeze_weight(self) -> float:
        """λ_sq in the search (0 under the ``no-squeeze`` ablation)."""
        return 0.0 if "no-squeeze" in self.ablations else self.squeeze_weight

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["tasks"] = list(self.tasks) if self.tasks is not None else None
        d["ablations"] = list(self.ablations)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


# ---------------------------------------------------------------------- data
def load_data(cfg: TrainConfig) -> datasets.MultiTaskData:
    """The configured dataset (built in, or read from ``cfg.data_root``). Raises DataError for
    unknown names and for missing or malformed files of an on-disk dataset."""
    try:
        return datasets.load_dataset(cfg.dataset, tasks=cfg.tasks, seed=cfg.seed, n_train=cfg.n_train,
                                     n_test=cfg.n_test, root=cfg.data_root)
    except ValueError as e:
        raise DataError(str(e)) from None


def build_spec(cfg: TrainConfig, data: datasets.MultiTaskData) -> Spec:
    tasks = [TaskSpec(t.name, t.kind, t.classes) for t in data.tasks]
    try:
        spec = preset(cfg.preset, tasks, flow_constant=cfg.flow_constant, in_channels=data.in_channels,
                      input_size=tuple(data.input_size), shared_input=data.shared_input)
        return complete_dag(spec) if "no-flow-restriction" in cfg.ablations else spec
    except SpecError as e:
        raise ConfigError(f"preset {cfg.preset!r} does not fit dataset {cfg.dataset!r}: {e}") from None


def batch_at(split: datasets.Split, spec: Spec, batch_size: int, seed: int, stage: str, step: int,
             device: torch.device, rank: int = 0, world: int = 1) -> tuple[Tensor, dict[str, Tensor]]:
    """The training batch of (stage, step) for process ``rank`` of ``world``: a pure function of
    (seed, stage, step), so a resumed run sees the same batches. The ``batch_size * world``
    samples of the global batch are drawn at once and each rank takes its own ``batch_size``
    slice (with one process, exactly the batch it always was). Shared input: x (B, C, H, W);
    per-task inputs: x (K, B, C, H, W)."""
    rng = np.random.default_rng([seed, STAGE_ORDER.index(stage), step])
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
    precision: Precision = field(default_factory=Precision)  # autocast and fp16 gradient scaler
    # Under torchrun: each rank's digest at the last stage end, and the stages whose end found
    # the ranks' parameters different (repaired from rank 0). Not saved: they describe this process.
    replica_digests: list[str] | None = None
    resynced: list[str] = field(default_factory=list)

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
    if run.precision.scaler is not None:
        meta["grad_scaler"] = run.precision.scaler.state_dict()
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
        progress = ck.json("progress")
        stage, step = progress["stage"], int(progress["step"])
        if stage not in (*STAGE_ORDER, "done"):
            raise KeyError(stage)
    except (TypeError, KeyError, ConfigError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is a dagc checkpoint but not a training state ({e}); "
                              "only run directories written by dagc train can be resumed") from None
    if device is not None:
        # Outside the try: a device that does not fit the run (fp16 on CPU) is a ConfigError.
        cfg = replace(cfg, device=device)
    dev = _device(cfg.device)
    net = CentralNetwork(ck.spec)
    load_network_tensors(net, ck.tensors)
    net.to(dev)
    if cfg.channels_last:
        net.to(memory_format=torch.channels_last)
    precision = make_precision(cfg.amp, dev)
    if precision.scaler is not None and ck.json("grad_scaler") is not None:
        precision.scaler.load_state_dict(ck.json("grad_scaler"))
    rewind_theta = ck.group("rewind") or None
    opt = None
    if stage != "done":
        opt = _optimizer(cfg, net, stage)
        # Adam's load_state_dict moves the state to its parameters' device.
        optim_t = {k: v for k, v in ck.tensors.items() if k.startswith("optim.")}
        if optim_t:
            load_optimizer(opt, optim_t, ck.json("optimizer", {}))
    return Run(cfg=cfg, spec=ck.spec, net=net, stage=stage, step=step, opt=opt, rewind_theta=rewind_theta,
               history=ck.json("history", {}), topology=ck.json("topology"), seconds=ck.json("seconds", 0.0),
               precision=precision)


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

    Under torchrun (more than one process; `dagc.trainer.distributed`) every rank calls this with
    the same arguments: it joins the process group unless already joined (`distributed.init`),
    trains a DistributedDataParallel replica on its slice of each batch, and only rank 0 writes
    files, logs and shows progress. Every rank returns rank 0's metrics, which then also hold
    ``distributed``: world size, backend, and each rank's digest of its final tensors
    (`tensor_digest` of `network_tensors`; equal on all ranks, and equal to the digest of
    checkpoint.safetensors). ``--resume`` reads ``out_dir`` on every rank (on several nodes it must
    be on a shared filesystem or copied to each).
    """
    out = Path(out_dir)
    main = distributed.is_main()
    if resume and (out / SINGLE_TASK_FILE).is_file():
        return _train_single_task(None, out, resume=True, device=cfg.device if cfg is not None else None,
                                  progress=progress, on_step=on_step)
    if not resume and cfg is not None and cfg.baseline == "single-task":
        if len(cfg.tasks or datasets.task_names(cfg.dataset, cfg.data_root)) > 1:
            return _train_single_task(cfg, out, resume=False, device=None, progress=progress, on_step=on_step)
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
    if main:  # only rank 0 writes (and on one filesystem, two probes would race)
        _writable_dir(out)
    if run is None:
        torch.manual_seed(cfg.seed)
        net = CentralNetwork(spec).to(device)
        if cfg.channels_last:
            net.to(memory_format=torch.channels_last)
        stage = "warmup"
        if cfg.baseline is not None:  # no search: the backbone's fixed chain, trained from the start
            net.set_masks(*(torch.from_numpy(m) for m in chain_masks(spec)))
            stage = "finetune"
        if "no-read-in-out" in cfg.ablations:
            fix_read_in_out(net)
        run = Run(cfg=cfg, spec=spec, net=net, stage=stage, step=0,
                  opt=_optimizer(cfg, net, stage),
                  rewind_theta=None, history={s: [] for s in STAGE_ORDER}, precision=make_precision(cfg.amp, device))
    elif run.spec != spec:
        raise CheckpointError(f"{out}/state.safetensors does not match its own configuration's spec")

    distributed.init(device)
    handler = None
    if main:
        handler = logging.FileHandler(out / "train.log")
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        log.info("run %s: %s", "resumed" if resume else "started", json.dumps(cfg.to_dict()))
        if distributed.world_size() > 1:
            log.info("distributed: %d processes, backend %s, batch_size %d per process",
                     distributed.world_size(), distributed.backend(), cfg.batch_size)
        kappa = cfg.kappa if cfg.kappa is not None else float(spec.n_states)
        while run.stage != "done":
            _run_stage(run, data, out, device, kappa, progress, on_step)
        metrics = _finish(run, data, out, device)
        log.info("run finished: %s", json.dumps(metrics["final"]))
        return metrics
    finally:
        if handler is not None:
            log.removeHandler(handler)
            handler.close()


SINGLE_TASK_FILE = "single_task.json"


def _train_single_task(cfg: TrainConfig | None, out: Path, *, resume: bool, device: str | None,
                       progress: bool, on_step) -> dict[str, Any]:
    """The single-task baseline: one run of one task each, in ``out/<task>/``, then one aggregate
    metrics.json in ``out`` (the tasks' metrics side by side; parameters add up). Resuming
    finishes the unfinished task runs and skips the finished ones."""
    main = distributed.is_main()
    if resume:
        try:
            meta = json.loads((out / SINGLE_TASK_FILE).read_text())
            cfg = TrainConfig.from_dict(meta["config"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{out / SINGLE_TASK_FILE} is unreadable ({e}); start the baseline again "
                                  "with another --out") from None
        if device is not None:
            cfg = replace(cfg, device=device)
    else:
        if (out / SINGLE_TASK_FILE).exists() or (out / "state.safetensors").exists():
            raise ConfigError(f"{out} already holds a run; continue it with --resume {out} or choose another --out")
        if main:
            _writable_dir(out)
            text = json.dumps({"config": cfg.to_dict()}, indent=2)
            write_atomic(out / SINGLE_TASK_FILE, lambda tmp: Path(tmp).write_text(text))
    tasks = cfg.tasks or datasets.task_names(cfg.dataset, cfg.data_root)
    runs: dict[str, dict[str, Any]] = {}
    for task in tasks:
        sub = out / task  # task names are letters, digits, '_' and '-' (the spec checks)
        if (sub / "metrics.json").is_file():
            runs[task] = json.loads((sub / "metrics.json").read_text())
        elif (sub / "state.safetensors").is_file():
            runs[task] = train(replace(cfg, tasks=(task,)), sub, resume=True, progress=progress, on_step=on_step)
        else:
            runs[task] = train(replace(cfg, tasks=(task,)), sub, progress=progress, on_step=on_step)
    metrics = {
        "config": cfg.to_dict(),
        "spec": {"tasks": [m["spec"]["tasks"][0] for m in runs.values()]},
        "final": {t: m["final"][t] for t, m in runs.items()},
        "constant_baseline": {t: m["constant_baseline"][t] for t, m in runs.items()},
        "primary": {t: m["primary"][t] for t, m in runs.items()},
        "topology": {t: (m.get("topology") or {}).get(t, {}) for t, m in runs.items()},
        "parameters": {"supernet": sum(m["parameters"]["supernet"] for m in runs.values()),
                       "relative_to_backbone": sum(m["parameters"]["relative_to_backbone"] for m in runs.values())},
        "train_seconds": sum(m["train_seconds"] for m in runs.values()),
        "runs": {t: t for t in runs},
    }
    if main:
        text = json.dumps(metrics, indent=2, sort_keys=True)
        write_atomic(out / "metrics.json", lambda tmp: Path(tmp).write_text(text))
    return metrics


def _optimizer(cfg: TrainConfig, net: CentralNetwork, stage: str) -> torch.optim.Optimizer:
    """The stage's optimizer with the run's learning rates and frozen logits."""
    return make_optimizer(net, stage, cfg.weight_lr, cfg.arch_lr, cfg.frozen_logits)


def _device(name: str) -> torch.device:
    """This process's device; under torchrun with CUDA, ``cuda:LOCAL_RANK``."""
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device cuda asked for, but no CUDA GPU is available; use --device cpu")
    return distributed.local_device(name)


def _training_model(net: CentralNetwork, device: torch.device, use_compile: bool):
    """The callable that runs a stage's forward pass: ``net`` itself for one process; under
    torchrun a DistributedDataParallel replica of it, built anew at every stage start because DDP
    registers the parameters that need gradients when it is built (`make_optimizer` switches the
    logits on for search only); after reduction, edges that a task switches off get no gradient,
    hence ``find_unused_parameters`` in fine-tuning. ``use_compile`` wraps the result in
    torch.compile."""
    model = net
    if distributed.world_size() > 1:
        model = DistributedDataParallel(net, device_ids=[device] if device.type == "cuda" else None,
                                        find_unused_parameters=net.hard)
    if use_compile:
        model = torch.compile(model)
    return model


def _run_stage(run: Run, data, out: Path, device, kappa: float, progress: bool, on_step) -> None:
    cfg, stage = run.cfg, run.stage
    main, rank, world = distributed.is_main(), distributed.rank(), distributed.world_size()
    if stage == "finetune" and not run.net.hard:
        # Reduction, then rewinding θ to the end of warm-up (appendix A), then a fresh optimizer.
        # Every rank reduces: the logits are equal on all of them (checked at the search's end)
        # and reduce_network is deterministic, so all ranks get the same masks.
        run.topology = reduce_network(run.net, cfg.reduction_method, seed=cfg.seed,
                                      target_sparsity=cfg.target_sparsity)
        rewind(run.net, run.rewind_theta)
        run.opt = _optimizer(cfg, run.net, "finetune")
        log.info("reduced: %s", json.dumps(run.topology))
        if main:
            save_state(run, out)
    model = _training_model(run.net, device, cfg.compile)
    step_kw = {"model": model, "precision": run.precision}
    n_iters = cfg.iters(stage)
    bar = _progress(stage, n_iters, run.step, progress and main)
    t0 = time.perf_counter()
    acc: dict[str, float] = {}
    n_acc = 0  # iterations in acc (after a resume, not necessarily log_every)
    try:
        while run.step < n_iters:
            x, targets = batch_at(data.train, run.spec, cfg.batch_size, cfg.seed, stage, run.step, device,
                                  rank=rank, world=world)
            if cfg.channels_last and x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            if stage == "search":
                losses = search_step(run.net, run.opt, x, targets, cfg.search_squeeze_weight, kappa, cfg.dense_loss,
                                     **step_kw)
            elif stage == "warmup":
                losses = warmup_step(run.net, run.opt, x, targets, cfg.dense_loss, **step_kw)
            else:
                losses = finetune_step(run.net, run.opt, x, targets, cfg.dense_loss, **step_kw)
            # The global batch's losses (mean over ranks), so every rank logs and checks the same.
            losses = distributed.all_reduce_mean(losses)
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
                if main:
                    save_state(run, out)
            if on_step is not None:
                on_step(run)
    finally:
        if bar is not None:
            bar.close()
    run.seconds += time.perf_counter() - t0
    _end_stage(run, out)


def tensor_digest(tensors: dict[str, Tensor]) -> str:
    """SHA-256 (hex) of named tensors: names, dtypes, shapes and exact bytes, in name order.
    Takes e.g. `network_tensors` of a network or a loaded checkpoint's tensors."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _sync_replicas(run: Run) -> None:
    """Make every rank hold the same model at a stage end (no-op for one process).

    Batch-norm running statistics legitimately differ (each rank updates them from its own
    shard): rank 0's are broadcast. Parameters, logits and masks must already agree (averaged
    gradients, deterministic updates); the ranks compare digests, and a mismatch is logged and
    repaired from rank 0 so that reduction and the saved model never depend on the rank.
    """
    if distributed.world_size() == 1:
        return
    distributed.broadcast_tensors(list(run.net.buffers()))
    digests = [d.hex() for d in distributed.all_gather_bytes(bytes.fromhex(tensor_digest(network_tensors(run.net))))]
    run.replica_digests = digests
    if len(set(digests)) > 1:
        log.warning("%s: the replicas' parameters differ across ranks (digests %s); continuing with rank 0's",
                    run.stage, digests)
        distributed.broadcast_tensors(list(run.net.parameters()))
        run.resynced.append(run.stage)


def _end_stage(run: Run, out: Path) -> None:
    stage = run.stage
    main = distributed.is_main()
    _sync_replicas(run)
    if stage == "warmup":
        run.rewind_theta = theta_snapshot(run.net)
    if stage != "finetune" and main:  # the fine-tuned model is written as checkpoint.safetensors by _finish
        save_checkpoint(out / f"{stage}.safetensors", network_tensors(run.net), run.spec, stage,
                        config=run.cfg.to_dict())
    nxt = STAGE_ORDER.index(stage) + 1
    run.stage = STAGE_ORDER[nxt] if nxt < len(STAGE_ORDER) else "done"
    run.step = 0
    # The fine-tune optimizer is made after reduction, in _run_stage.
    run.opt = _optimizer(run.cfg, run.net, "search") if run.stage == "search" else None
    if main:
        save_state(run, out)


def _progress(stage: str, total: int, initial: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=f"{stage:>8}", unit="it", dynamic_ncols=True, leave=True)


def _finish(run: Run, data, out: Path, device) -> dict[str, Any]:
    if not distributed.is_main():
        # Rank 0 evaluates and writes; the others wait for its metrics.
        return distributed.broadcast_json(None)
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
        "parameters": {"supernet": supernet_params,
                       "relative_to_backbone": parameter_ratio(spec, network_tensors(net))},
        "train_seconds": run.seconds,
        "test_samples": {t.name: data.test.size(t.name) for t in spec.tasks},
    }
    save_checkpoint(out / "checkpoint.safetensors", network_tensors(net), spec, "finetune",
                    config=run.cfg.to_dict(), metrics={"final": final, "topology": run.topology},
                    preprocessing=data.preprocessing)
    if distributed.world_size() > 1:
        metrics["distributed"] = {"world_size": distributed.world_size(), "backend": distributed.backend(),
                                  "global_batch_size": run.cfg.batch_size * distributed.world_size(),
                                  "replica_digests": run.replica_digests, "resynced": run.resynced}
    text = json.dumps(metrics, indent=2, sort_keys=True)
    write_atomic(out / "metrics.json", lambda tmp: Path(tmp).write_text(text))
    return distributed.broadcast_json(metrics)
