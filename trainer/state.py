"""The state of a run between iterations (`Run`): how a run starts, how it moves from one stage to
the next (the warm-up snapshot, reduction and rewinding), and how it is saved to and resumed from
``state.safetensors``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from dagc.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from dagc.cost_table import CostTable
from dagc.errors import CheckpointError, ConfigError, CostTableError
from dagc.outputs import check_writable_dir
from dagc.spec import Spec
from dagc.trainer import distributed
from dagc.trainer.baselines import chain_masks, fix_read_in_out
from dagc.trainer.config import STAGES, TrainConfig
from dagc.trainer.init_weights import apply_init
from dagc.trainer.network import CentralNetwork, load_network_tensors, network_tensors
from dagc.trainer.stages import (
    Precision,
    make_optimizer,
    make_precision,
    reduce_network,
    rewind,
    theta_snapshot,
)

STATE_FILE = "state.safetensors"
# The stages the validation slice is scored after (`dagc.trainer.validation`), in order: the soft
# supernet after warm-up and after the search, the reduced network with the searched θ, the final one.
VALIDATION_STAGES = ("warmup", "search", "reduced", "finetune")


@dataclass
class Validation:
    """What a run knows from its validation slice, saved with the state so a resumed run keeps it."""

    stages: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)  # stage -> task -> metric -> value
    best: dict[str, float] | None = None  # fine-tuning's best primary metric of each task so far
    stale: int = 0  # fine-tuning's validation evaluations since the last improvement
    stopped_early_at: int | None = None  # the fine-tuning step early stopping ended the stage at


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
    init_report: dict[str, Any] | None = None  # what --init loaded (`init_weights.apply_init`), kept in the state
    validation: Validation = field(default_factory=Validation)
    # What a budget prices blocks with (`dagc.cost_table`): set when a budgeted run starts, saved with
    # the state so a resumed run prices with the same measurement. None: no budget.
    cost_table: CostTable | None = None
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


def training_device(name: str) -> torch.device:
    """This process's device for a configured device name; under torchrun with CUDA,
    ``cuda:LOCAL_RANK``. Raises ConfigError when CUDA is asked for but missing."""
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device cuda asked for, but no CUDA GPU is available; use --device cpu")
    return distributed.local_device(name)


def optimizer(cfg: TrainConfig, net: CentralNetwork, stage: str) -> torch.optim.Optimizer:
    """The stage's optimizer with the run's learning rates and frozen logits."""
    return make_optimizer(net, stage, cfg.weight_lr, cfg.arch_lr, cfg.frozen_logits)


# ---------------------------------------------------------------------- starting and moving on
def new_run(cfg: TrainConfig, spec: Spec, device: torch.device) -> Run:
    """A run at its start: the network initialised from ``cfg.seed`` (then θ from ``cfg.init``, if
    given: every rank of a torchrun job reads the same file, so all start equal), at warm-up -- or,
    for a baseline (no search), at fine-tuning with the backbone's fixed chain masks. Raises
    CheckpointError when ``cfg.init`` cannot be applied."""
    torch.manual_seed(cfg.seed)
    net = CentralNetwork(spec).to(device)
    init_report = apply_init(net, cfg.init) if cfg.init is not None else None
    if cfg.channels_last:
        net.to(memory_format=torch.channels_last)
    stage = "warmup"
    if cfg.baseline is not None:
        net.set_masks(*(torch.from_numpy(m) for m in chain_masks(spec)))
        stage = "finetune"
    if "no-read-in-out" in cfg.ablations:
        fix_read_in_out(net)
    return Run(cfg=cfg, spec=spec, net=net, stage=stage, step=0, opt=optimizer(cfg, net, stage),
               rewind_theta=None, history={s: [] for s in STAGES}, precision=make_precision(cfg.amp, device),
               init_report=init_report)


def advance(run: Run) -> None:
    """Move a run whose stage is complete to the next stage: θ is snapshot at the end of warm-up
    (for rewinding), the search gets its optimizer; fine-tuning gets its own after reduction
    (`reduce_and_rewind`). After fine-tuning the stage is ``done``."""
    if run.stage == "warmup":
        run.rewind_theta = theta_snapshot(run.net)
    nxt = STAGES.index(run.stage) + 1
    run.stage = STAGES[nxt] if nxt < len(STAGES) else "done"
    run.step = 0
    run.opt = optimizer(run.cfg, run.net, "search") if run.stage == "search" else None


def reduce_and_rewind(run: Run, on_reduced: Callable[[Run], None] | None = None) -> None:
    """Open fine-tuning (appendix A): reduce the searched network to binary masks, call
    ``on_reduced`` (if given) on the reduced network with the searched θ, rewind θ to the end of
    warm-up, and make a fresh optimizer. Every rank of a torchrun job does it: the logits are
    equal on all of them (checked at the search's end) and the reduction is deterministic, so all
    ranks get the same masks."""
    cfg = run.cfg
    run.topology = reduce_network(run.net, cfg.reduction_method, seed=cfg.seed, target_sparsity=cfg.target_sparsity,
                                  budget=cfg.budget_value, table=run.cost_table, scope=cfg.budget_scope)
    if on_reduced is not None:
        on_reduced(run)
    rewind(run.net, run.rewind_theta)
    run.opt = optimizer(cfg, run.net, "finetune")


def writable_dir(out: Path) -> None:
    """Check that ``out`` can be written (`dagc.outputs.check_writable_dir`, the check every command
    makes of its output) and create it; ConfigError if not."""
    check_writable_dir(out, option="--out", error=ConfigError)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot write to --out {out} ({e.strerror or e}); choose a writable --out") from None


# ---------------------------------------------------------------------- saving and resuming
def optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """An optimizer's state as named tensors (``optim.<param id>.<key>``) and its parameter
    groups as JSON-ready metadata."""
    sd = opt.state_dict()
    tensors = {}
    for pid, st in sd["state"].items():
        for key, val in st.items():
            tensors[f"optim.{pid}.{key}"] = torch.as_tensor(val)
    return tensors, {"param_groups": sd["param_groups"]}


def load_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, Tensor], groups_meta: Any,
                   source: str = "the state") -> None:
    """Load `optimizer_tensors` output into ``opt``. Every tensor is checked against the parameter
    it belongs to first (fused Adam reads a state tensor of the wrong shape out of bounds: a
    crash, not an error). Raises CheckpointError naming the tensor if it does not fit."""
    params = [p for g in opt.param_groups for p in g["params"]]
    state: dict[int, dict[str, Tensor]] = {}
    for name, val in sorted(tensors.items()):
        _, pid, key = (name.split(".", 2) + ["", ""])[:3]
        if not pid.isdigit() or int(pid) >= len(params) or not key:
            raise CheckpointError(f"{source}: optimizer tensor {name} names no parameter of the model "
                                  f"(expected optim.<0..{len(params) - 1}>.<key>); the state is corrupted")
        p = params[int(pid)]
        want_shape, want_dtype = ((), val.dtype if val.is_floating_point() else torch.float32) if key == "step" \
            else (tuple(p.shape), p.dtype)
        if tuple(val.shape) != want_shape or val.dtype != want_dtype:
            raise CheckpointError(f"{source}: optimizer tensor {name} is {str(val.dtype).removeprefix('torch.')} "
                                  f"{tuple(val.shape)}, its parameter needs {str(want_dtype).removeprefix('torch.')} "
                                  f"{want_shape}; the state is corrupted")
        if key == "step" and not float(val) >= 0:
            raise CheckpointError(f"{source}: optimizer tensor {name} is {float(val)}, a step count >= 0 is needed")
        state.setdefault(int(pid), {})[key] = val
    groups = groups_meta.get("param_groups") if isinstance(groups_meta, dict) else None
    if not isinstance(groups, list) or not all(isinstance(g, dict) for g in groups):
        raise CheckpointError(f"{source}: metadata 'optimizer' has no list of param_groups; the state is corrupted")
    try:
        opt.load_state_dict({"state": state, "param_groups": groups})
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"optimizer state does not match the model: {e}") from None


def resume_hint(out: Path) -> str:
    """What a failed write of a run's file tells the user to do once fixed: the run continues from
    its last state (every write is atomic, so that state is whole)."""
    return f"continue the run with: dagc train --resume {out}"


def save_state(run: Run, out: Path) -> None:
    """Write the resumable state to ``out/state.safetensors``, atomically. Raises CheckpointError
    (one line; a full device says so) when the system fails the write; the previous state stays."""
    tensors = network_tensors(run.net)
    meta: dict[str, Any] = {"config": run.cfg.to_dict(), "progress": {"stage": run.stage, "step": run.step},
                            "history": run.history, "seconds": run.seconds, "validation": asdict(run.validation)}
    if run.opt is not None:
        opt_t, opt_meta = optimizer_tensors(run.opt)
        tensors.update(opt_t)
        meta["optimizer"] = opt_meta
    if run.rewind_theta is not None:
        tensors.update({f"rewind.{k}": v for k, v in run.rewind_theta.items()})
    if run.topology is not None:
        meta["topology"] = run.topology
    if run.init_report is not None:
        meta["init"] = run.init_report
    if run.cost_table is not None:
        meta["cost_table"] = run.cost_table.to_dict()
    if run.precision.scaler is not None:
        meta["grad_scaler"] = run.precision.scaler.state_dict()
    save_checkpoint(out / STATE_FILE, tensors, run.spec, run.completed, then=resume_hint(out), **meta)


def _read_progress(path: Path, ck: Checkpoint) -> tuple[TrainConfig, str, int]:
    """The configuration and progress (stage, step) of a training state; CheckpointError if the
    checkpoint is not one, or its step lies outside its stage (0 .. the stage's iterations)."""
    try:
        cfg = TrainConfig.from_stored(ck.json("config"))
        progress = ck.json("progress")
        stage, step = progress["stage"], progress["step"]
    except (TypeError, KeyError, AttributeError, ConfigError) as e:
        raise CheckpointError(f"{path} is a dagc checkpoint but not a training state ({e}); "
                              "only run directories written by dagc train can be resumed") from None
    if not isinstance(stage, str) or stage not in (*STAGES, "done"):
        raise CheckpointError(f"{path} is a dagc checkpoint but not a training state (stage {stage!r}); "
                              "only run directories written by dagc train can be resumed")
    last = 0 if stage == "done" else cfg.iters(stage)
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step <= last:
        raise CheckpointError(f"{path}: progress step {step!r} is outside stage {stage!r}, which has steps "
                              f"0..{last}; the state is corrupted, resume from a copy or start again")
    return cfg, stage, step


def _read_meta(path: Path, ck: Checkpoint) -> tuple[dict, dict | None, float]:
    """History, topology and seconds of a training state, checked; CheckpointError if malformed."""
    history, topology, seconds = ck.json("history", {}), ck.json("topology"), ck.json("seconds", 0.0)
    if not (isinstance(history, dict) and set(history) <= set(STAGES)
            and all(isinstance(v, list) and all(isinstance(e, dict) for e in v) for v in history.values())):
        raise CheckpointError(f"{path}: metadata 'history' must map stages {list(STAGES)} to lists of log "
                              "entries; the state is corrupted")
    if topology is not None and not (isinstance(topology, dict) and all(isinstance(v, dict) for v in topology.values())):
        raise CheckpointError(f"{path}: metadata 'topology' must map tasks to topology records")
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not seconds >= 0:
        raise CheckpointError(f"{path}: metadata 'seconds' must be a number >= 0, got {seconds!r}")
    if not isinstance(ck.json("init", {}), dict):
        raise CheckpointError(f"{path}: metadata 'init' must be a JSON object (the --init load report)")
    return {s: history.get(s, []) for s in STAGES}, topology, float(seconds)


def _read_validation(path: Path, ck: Checkpoint) -> Validation:
    """The run's `Validation` (an empty one for a state written before it existed), checked;
    CheckpointError if malformed."""
    v = ck.json("validation", {})
    try:
        out = Validation(**v)
        ok = (set(out.stages) <= set(VALIDATION_STAGES)
              and all(isinstance(m, dict) and all(isinstance(x, dict) for x in m.values()) for m in out.stages.values())
              and (out.best is None or isinstance(out.best, dict))
              and isinstance(out.stale, int) and out.stale >= 0
              and (out.stopped_early_at is None or isinstance(out.stopped_early_at, int)))
    except (TypeError, AttributeError):
        ok = False
    if not ok:
        raise CheckpointError(f"{path}: metadata 'validation' must hold stages {list(VALIDATION_STAGES)} -> task -> "
                              "metrics, best, stale and stopped_early_at; the state is corrupted")
    return out


def _read_rewind(path: Path, ck: Checkpoint, net: CentralNetwork, stage: str) -> dict[str, Tensor] | None:
    """The warm-up snapshot of θ, checked against the network (names, shapes, dtypes); the search
    needs it to rewind. CheckpointError if it does not fit."""
    snap = ck.group("rewind") or None
    if snap is None:
        if stage == "search":
            raise CheckpointError(f"{path}: a state in the search stage needs the warm-up snapshot (rewind.*), "
                                  "which it lacks; the state is corrupted")
        return None
    want = theta_snapshot(net)
    if set(snap) != set(want):
        raise CheckpointError(f"{path}: the rewind.* tensors do not match the network (missing "
                              f"{sorted(set(want) - set(snap))[:3]}, unexpected {sorted(set(snap) - set(want))[:3]})")
    for k, v in sorted(snap.items()):
        if tuple(v.shape) != tuple(want[k].shape) or v.dtype != want[k].dtype:
            raise CheckpointError(f"{path}: tensor rewind.{k} is {str(v.dtype).removeprefix('torch.')} "
                                  f"{tuple(v.shape)}, the network needs {str(want[k].dtype).removeprefix('torch.')} "
                                  f"{tuple(want[k].shape)}")
    return snap


def _read_cost_table(path: Path, ck: Checkpoint, cfg: TrainConfig) -> CostTable | None:
    """The cost table a budgeted run prices with (None without a budget, or for a FLOPs budget saved
    before tables were: the FLOPs are counted again), checked against the run; CheckpointError if it
    is malformed, missing for a latency budget or for another network or target."""
    data = ck.json("cost_table")
    if cfg.budget is None:
        return None
    if data is None:
        if cfg.cost_target == "flops":
            return None
        raise CheckpointError(f"{path}: a run with a latency budget needs its cost table (metadata 'cost_table'), "
                              "which the state lacks; the state is corrupted")
    source = f"{path}: metadata 'cost_table'"
    try:
        table = CostTable.from_dict(data, source=source, then="the state is corrupted")
        table.check(ck.spec, cfg.cost_target, 1 if cfg.cost_batch is None else cfg.cost_batch, cfg.cost_threads,
                    source=source)
    except CostTableError as e:
        raise CheckpointError(str(e)) from None
    return table


def resume_run(run_dir: Path, device: str | None = None) -> Run:
    """Rebuild a run from ``run_dir/state.safetensors``, on its own device or on ``device``.
    Raises CheckpointError if the state is missing, truncated, foreign, or not a training state;
    ConfigError if the device does not fit the run (fp16 on CPU)."""
    path = run_dir / STATE_FILE
    if not path.exists():
        raise CheckpointError(f"{run_dir} holds no resumable run (no {STATE_FILE}); start one with "
                              f"dagc train --out {run_dir}")
    ck: Checkpoint = load_checkpoint(path)
    cfg, stage, step = _read_progress(path, ck)
    history, topology, seconds = _read_meta(path, ck)
    if device is not None:
        cfg = replace(cfg, device=device)
    dev = training_device(cfg.device)
    net = CentralNetwork(ck.spec)
    load_network_tensors(net, ck.tensors)
    rewind_theta = _read_rewind(path, ck, net, stage)
    net.to(dev)
    if cfg.channels_last:
        net.to(memory_format=torch.channels_last)
    precision = make_precision(cfg.amp, dev)
    if precision.scaler is not None and ck.json("grad_scaler") is not None:
        if not isinstance(ck.json("grad_scaler"), dict):
            raise CheckpointError(f"{path}: metadata 'grad_scaler' must be a JSON object; the state is corrupted")
        precision.scaler.load_state_dict(ck.json("grad_scaler"))
    opt = None
    if stage != "done":
        opt = optimizer(cfg, net, stage)
        # Adam's load_state_dict moves the state to its parameters' device.
        optim_t = {k: v for k, v in ck.tensors.items() if k.startswith("optim.")}
        if optim_t:
            load_optimizer(opt, optim_t, ck.json("optimizer", {}), source=str(path))
    return Run(cfg=cfg, spec=ck.spec, net=net, stage=stage, step=step, opt=opt, rewind_theta=rewind_theta,
               history=history, topology=topology, seconds=seconds, precision=precision, init_report=ck.json("init"),
               validation=_read_validation(path, ck), cost_table=_read_cost_table(path, ck, cfg))
