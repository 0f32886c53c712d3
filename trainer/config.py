"""`TrainConfig`: everything a run depends on, as typed and validated data.

A configuration is stored in every checkpoint and run directory as JSON (`TrainConfig.to_dict`)
and read back with `TrainConfig.from_dict`, so a resumed run trains exactly as it started.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from dagc.cost_table import FLOPS, LATENCY_TARGETS
from dagc.errors import ConfigError
from dagc.network_file import Network
from dagc.precision_table import FP16
from dagc.spec import PRESETS, preset_network
from dagc.trainer import datasets
from dagc.trainer.baselines import check_protocol
from dagc.trainer.budget import check_budget, read_budget
from dagc.trainer.losses import DENSE_LOSSES
from dagc.trainer.recipes import LR_SCHEDULES, RECIPES
from dagc.trainer.stages import AMP_MODES, REDUCTIONS

# The stages of a run, in order (paper Sec. 3.2); reduction and rewinding open fine-tuning.
STAGES = ("warmup", "search", "finetune")
# Where a stored configuration's network comes from, in messages (`Network.source`).
STORED_NETWORK = "config.network"


@dataclass(frozen=True)
class TrainConfig:
    """Everything a run depends on. The schedule, batch size and learning rates left None come
    from ``recipe`` (`dagc.trainer.recipes`; the iteration counts once the training split's size
    is known, `resolved`); λ_sq defaults to the paper's Table 9 (NYU-v2 / Omniglot row);
    ``kappa=None`` sets the squeeze budget κ to N, about one incoming
    edge per hidden state. Raises ConfigError naming the first invalid field.

    ``network`` replaces the preset by a network file (FORMAT.md, "Network files"): given as its
    path (or a `Network`, or a network's JSON data), it is read once, here, and held as the
    `Network` itself; `to_dict` records the network, not the path, so a resumed run trains the
    network it started with even if the file has since changed or gone."""

    dataset: str = "synthetic"
    data_root: str | None = None  # the directory of an on-disk dataset (datasets.ON_DISK)
    preset: str | None = None  # None: the dataset's own (its registered `Dataset.preset`), unless network is given
    network: Network | None = None  # given as a path (str or PathLike), a Network or its JSON data
    tasks: tuple[str, ...] | None = None
    flow_constant: int | None = None
    # The schedule and optimisation: whatever is left None comes from the recipe (`RECIPES`):
    # batch size, learning rates and schedule at construction, the iteration counts from the
    # training split's size when the data is known (`resolved`, at the start of a run).
    recipe: str | None = None  # None: the dataset's own (its registered `Dataset.recipe`, "measured" for most)
    warmup_iters: int | None = None
    search_iters: int | None = None
    finetune_iters: int | None = None
    batch_size: int | None = None
    weight_lr: float | None = None
    arch_lr: float | None = None
    lr_schedule: str | None = None
    squeeze_weight: float = 0.05
    kappa: float | None = None
    # λ of `dagc.trainer.losses.select_loss` (0: the paper's), from this fraction of the search on, so the
    # task, not the order of equal logits, names the leader (from the start: read-in v_1 for every task).
    select_weight: float = 0.0
    select_after: float = 1 / 3
    dense_loss: str = "l2"
    reduction: str = "fbr"
    target_sparsity: float | None = None
    # A budget, "30MFLOPs" or "2ms" (dagc.trainer.budget), priced on cost_target (dagc.cost_table; a
    # latency at cost_batch samples a call, cost_threads threads: 1 unless given), for each task's
    # model (budget_scope "task") or for the compiled shared model of all tasks ("shared").
    budget: str | None = None
    budget_scope: str = "task"
    cost_target: str = FLOPS
    cost_batch: int | None = None
    cost_threads: int | None = None
    seed: int = 0
    device: str = "cpu"
    save_every: int = 100
    log_every: int = 10
    n_train: int | None = None
    n_test: int | None = None
    input_size: tuple[int, int] | None = None  # (H, W) of the data; None: the dataset's own
    # Speed only; the defaults train exactly as before. amp: autocast dtype of the forward pass
    # (bf16 on CPU or CUDA, fp16 with gradient scaling on CUDA only).
    amp: str = "none"
    channels_last: bool = False
    compile: bool = False
    # The paper's baselines and ablations (dagc.trainer.baselines): a baseline trains fixed chain
    # masks without search, for the iterations of `baseline_protocol`; ablations combine.
    baseline: str | None = None
    baseline_protocol: str = "finetune"
    ablations: tuple[str, ...] = ()
    # Batch-norm statistics per task once the structure is final (dagc.trainer.recalibrate):
    # re-estimated over this many training batches (0: keep fine-tuning's running averages), then
    # each task's eval-mode metric is checked against its batch-statistics one on a training slice,
    # with a warning past this gap: 2 points of a score in [0, 1] (every higher-is-better primary
    # metric is one: accuracy, mIoU, F), 2% of an error (depth, angle).
    stats_batches: int = 32
    stats_tolerance: float = 0.02
    # Starting weights (dagc.trainer.init_weights): θ from a dagc run or checkpoint, or a VGG-16
    # state_dict in safetensors, applied once when the run starts. Recorded as given; a resumed run
    # continues from its own state and never reads the file again.
    init: str | None = None
    # A validation slice of the training split (dagc.trainer.validation), so that a user sees where
    # each stage gains or loses accuracy without ever looking at the test split, which only the
    # final report reads. val_fraction: its share of the training split (0: no slice, no stage
    # metrics, no early stopping); patience: fine-tuning ends after this many validation
    # evaluations without improvement (0: never); val_every: fine-tune iterations between them
    # (None: once per epoch of the training split).
    val_fraction: float = 0.1
    patience: int = 0
    val_every: int | None = None

    def __post_init__(self) -> None:
        if self.recipe is None:  # the dataset's own (its registered `Dataset.recipe`)
            ds = datasets.REGISTRY.get(self.dataset) if self.dataset in datasets.registry() else None
            object.__setattr__(self, "recipe", ds.recipe if ds is not None else "measured")
        recipe = RECIPES.get(self.recipe)
        if recipe is not None:
            for name in ("batch_size", "weight_lr", "arch_lr", "lr_schedule"):
                if getattr(self, name) is None:
                    object.__setattr__(self, name, getattr(recipe, name))
            if recipe.iters is not None:
                for name, v in zip(("warmup_iters", "search_iters", "finetune_iters"), recipe.iters):
                    if getattr(self, name) is None:
                        object.__setattr__(self, name, v)
        if self.tasks is not None:
            object.__setattr__(self, "tasks", tuple(self.tasks))
        if isinstance(self.input_size, list):  # JSON gives a list
            object.__setattr__(self, "input_size", tuple(self.input_size))
        if isinstance(self.ablations, (list, tuple)):
            object.__setattr__(self, "ablations", tuple(self.ablations))
        if isinstance(self.init, os.PathLike):  # stored as text, as data_root
            object.__setattr__(self, "init", os.fspath(self.init))
        if isinstance(self.data_root, os.PathLike):  # stored as text: the config is JSON metadata
            object.__setattr__(self, "data_root", os.fspath(self.data_root))
        if self.network is not None and not isinstance(self.network, Network):
            object.__setattr__(self, "network", Network.read(self.network, stored=STORED_NETWORK))
        for name in ("cost_batch", "cost_threads") if self.cost_target in LATENCY_TARGETS else ():  # 1 unless given
            object.__setattr__(self, name, 1 if getattr(self, name) is None else getattr(self, name))
        if self.preset is None and self.network is None and self.dataset in datasets.registry():
            ds = datasets.REGISTRY[self.dataset]
            chosen = ds.preset
            if ds.choose_preset is not None and isinstance(self.data_root, str) and os.path.isdir(self.data_root):
                chosen = ds.choose_preset(self.data_root, self.input_size)  # from the files (folder: their size)
            object.__setattr__(self, "preset", chosen)
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError naming the first invalid field."""
        self._validate_data()
        self._validate_schedule()
        self._validate_optimisation()
        self._validate_speed()
        self._validate_protocol()

    def _validate_data(self) -> None:
        if self.dataset not in datasets.registry():
            raise ConfigError(f"unknown dataset {self.dataset!r}; choose one of {list(datasets.REGISTRY)}")
        on_disk = [name for name, d in datasets.REGISTRY.items() if d.on_disk]
        if self.dataset in on_disk:
            if self.data_root is None:
                raise ConfigError(f"dataset {self.dataset!r} is read from disk; give its directory as "
                                  "data_root (--data-root DIR)")
            if not isinstance(self.data_root, str) or not os.path.isdir(self.data_root):
                raise ConfigError(f"data_root {self.data_root!r} is not a directory; give the folder that "
                                  f"holds the {self.dataset} dataset")
        elif self.data_root is not None:
            raise ConfigError(f"data_root is only for the on-disk datasets {on_disk}; "
                              f"the built-in {self.dataset!r} needs none")
        if self.network is not None and self.preset is not None:
            raise ConfigError(f"give a preset ({self.preset!r}) or a network file, not both: --network replaces "
                              "--preset")
        if self.network is None and self.preset not in PRESETS:
            raise ConfigError(f"unknown preset {self.preset!r}; choose one of {list(PRESETS)}")
        if self.tasks is not None:
            valid = datasets.task_names(self.dataset, self.data_root)
            bad = [t for t in self.tasks if t not in valid]
            if bad or not self.tasks:
                raise ConfigError(f"unknown task(s) {bad} for dataset {self.dataset!r}; choose from {list(valid)}")
            if len(set(self.tasks)) != len(self.tasks):
                raise ConfigError(f"tasks: each task at most once, got {list(self.tasks)}")
        for name in ("n_train", "n_test"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 2):
                raise ConfigError(f"{name} must be an integer >= 2, got {v!r}")
        if self.init is not None and (not isinstance(self.init, str) or not self.init):
            raise ConfigError(f"init must be the path of a safetensors file or a run directory, got {self.init!r}")
        size = self.input_size
        if size is not None and (not isinstance(size, tuple) or len(size) != 2
                                 or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in size)):
            raise ConfigError(f"input_size must be two positive integers (H, W), e.g. 64x64, got {size!r}")

    def _validate_schedule(self) -> None:
        # Paper Sec. 3.1: hidden edges i -> j with j - i <= M among N states, so 1 <= M <= N - 1
        # (M = N - 1 is the complete DAG; a larger M is the same network recorded as something else).
        n = self.central_network().n_states
        if self.flow_constant is not None and (isinstance(self.flow_constant, bool) or not isinstance(
                self.flow_constant, int) or not 1 <= self.flow_constant <= max(1, n - 1)):
            raise ConfigError(f"flow_constant (M) must be an integer in 1..{max(1, n - 1)} for "
                              f"{self.network_name()} (N = {n} hidden states, edges i -> j with j - i <= M; "
                              f"M = {max(1, n - 1)} is the complete DAG), got {self.flow_constant!r}")
        if self.recipe not in RECIPES:
            raise ConfigError(f"unknown recipe {self.recipe!r}; choose one of {list(RECIPES)}")
        for name in ("warmup_iters", "search_iters", "finetune_iters", "batch_size", "save_every", "log_every"):
            v = getattr(self, name)
            if v is None and name.endswith("_iters"):  # set from the recipe's epochs by `resolved`
                continue
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name} must be a positive integer, got {v!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ConfigError(f"lr_schedule must be one of {list(LR_SCHEDULES)}, got {self.lr_schedule!r}")
        if self.batch_size < 2:
            raise ConfigError("batch_size must be at least 2 (batch norm needs per-task batch statistics)")
        if isinstance(self.stats_batches, bool) or not isinstance(self.stats_batches, int) or self.stats_batches < 0:
            raise ConfigError(f"stats_batches must be an integer >= 0 (0: no re-estimation), got {self.stats_batches!r}")
        if isinstance(self.stats_tolerance, bool) or not isinstance(self.stats_tolerance, (int, float)) or not (
                math.isfinite(self.stats_tolerance) and self.stats_tolerance >= 0):
            raise ConfigError(f"stats_tolerance must be a number >= 0, got {self.stats_tolerance!r}")
        if isinstance(self.val_fraction, bool) or not isinstance(self.val_fraction, (int, float)) or not (
                0 <= self.val_fraction < 0.5):
            raise ConfigError(f"val_fraction must be a number in [0, 0.5) (0: no validation slice), "
                              f"got {self.val_fraction!r}")
        if isinstance(self.patience, bool) or not isinstance(self.patience, int) or self.patience < 0:
            raise ConfigError(f"patience must be an integer >= 0 (0: never stop early), got {self.patience!r}")
        if self.val_every is not None and (isinstance(self.val_every, bool) or not isinstance(self.val_every, int)
                                           or self.val_every < 1):
            raise ConfigError(f"val_every must be a positive integer (or None: once per epoch), got {self.val_every!r}")

    def _validate_optimisation(self) -> None:
        for name in ("weight_lr", "arch_lr"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ConfigError(f"{name} must be a positive number, got {v!r}")
        for name in ("squeeze_weight", "select_weight"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and v >= 0):
                raise ConfigError(f"{name} must be a number >= 0, got {v!r}")
        if isinstance(self.select_after, bool) or not isinstance(self.select_after, (int, float)) or not (
                0 <= self.select_after < 1):
            raise ConfigError(f"select_after must be a fraction of the search in [0, 1), got {self.select_after!r}")
        if self.kappa is not None:
            # Eq. 9: κ bounds Σ σ(γ_ij) over a task's searchable hidden edges, each σ < 1, so a
            # budget above their number never binds (the no-squeeze ablation says that plainly).
            net = self.central_network()
            n, m = net.n_states, net.flow_constant
            m = max(1, n - 1) if "no-flow-restriction" in self.ablations else self.flow_constant or m
            edges = sum(n - d for d in range(1, m + 1))
            if isinstance(self.kappa, bool) or not isinstance(self.kappa, (int, float)) or not (
                    math.isfinite(self.kappa) and 0 <= self.kappa <= edges):
                raise ConfigError(f"kappa must be a number in [0, {edges}] (the searchable hidden edges of a task "
                                  f"with N = {n}, M = {m}; a larger budget never binds, use --ablation no-squeeze), "
                                  f"got {self.kappa!r}")
        if self.dense_loss not in DENSE_LOSSES:
            raise ConfigError(f"dense_loss must be one of {list(DENSE_LOSSES)}, got {self.dense_loss!r}")
        if self.reduction not in REDUCTIONS:
            raise ConfigError(f"reduction must be one of {list(REDUCTIONS)}, got {self.reduction!r}")
        if self.target_sparsity is not None and not 0 < self.target_sparsity <= 1:
            raise ConfigError(f"target_sparsity must be in (0, 1], got {self.target_sparsity!r}")
        check_budget(self.budget, self.cost_target, self.cost_batch, self.cost_threads,
                     alone=self.target_sparsity is None and self.baseline is None and "no-fbr" not in self.ablations,
                     scope=self.budget_scope)

    def _validate_speed(self) -> None:
        if self.device != "cpu" and not self.device.startswith("cuda"):
            raise ConfigError(f"device must be 'cpu' or 'cuda[:N]', got {self.device!r}")
        if self.amp not in AMP_MODES:
            raise ConfigError(f"amp must be one of {list(AMP_MODES)}, got {self.amp!r}")
        if self.amp == FP16 and not self.device.startswith("cuda"):
            raise ConfigError("amp 'fp16' needs a CUDA GPU (it trains with gradient scaling); "
                              "use --amp bf16 on CPU, or --device cuda")
        for name in ("channels_last", "compile"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")

    def _validate_protocol(self) -> None:
        check_protocol(self)

    # ------------------------------------------------------------------ what the stages use
    def central_network(self) -> Network:
        """The run's central network without its tasks: the network file's, else the preset's.
        Raises SpecError for an unknown preset (which `validate` refuses first)."""
        return self.network if self.network is not None else preset_network(self.preset)

    def network_name(self) -> str:
        """The network in messages: ``preset 'tiny'``, or ``network 'custom' (net.json)`` (the file
        only while it is the one just read)."""
        if self.network is None:
            return f"preset {self.preset!r}"
        source = self.network.source
        return f"network {self.network.name!r}" + (f" ({source})" if source and source != STORED_NETWORK else "")

    def resolved(self, n_train: int) -> TrainConfig:
        """This configuration with the iteration counts it leaves None set from its recipe's
        epochs for a training split of ``n_train`` samples (the largest task's with one input per
        task); unchanged when all are set. Raises ConfigError for n_train < 1."""
        if isinstance(n_train, bool) or not isinstance(n_train, int) or n_train < 1:
            raise ConfigError(f"the training split must hold at least one sample, got {n_train!r}")
        iters = RECIPES[self.recipe].stage_iters(n_train, self.batch_size)
        names = ("warmup_iters", "search_iters", "finetune_iters")
        missing = {name: v for name, v in zip(names, iters) if getattr(self, name) is None}
        return replace(self, **missing) if missing else self

    def iters(self, stage: str) -> int:
        """Iterations of a stage (`STAGES`). A baseline has no search: its fine-tuning trains the
        fixed backbone for finetune_iters (protocol ``finetune``, the paper's) or for the whole
        run's warmup + search + finetune (protocol ``total``). Raises ConfigError before
        `resolved` set the counts a recipe gives in epochs."""
        if any(getattr(self, f"{s}_iters") is None for s in STAGES):
            raise ConfigError(f"the {self.recipe!r} recipe sets the iteration counts from the training split's size; "
                              "call TrainConfig.resolved(n_train) first, or give warmup/search/finetune iterations")
        if self.baseline is not None and stage == "finetune" and self.baseline_protocol == "total":
            return self.warmup_iters + self.search_iters + self.finetune_iters
        return getattr(self, f"{stage}_iters")

    @property
    def budget_value(self) -> float | None:
        """The budget (per task model, or for the shared model: `budget_scope`) in its cost table's
        unit (FLOPs, or ms a call), or None."""
        return None if self.budget is None else read_budget(self.budget).value

    def squeeze_budget(self, n_states: int) -> float:
        """κ of the squeeze loss for a network of ``n_states`` hidden states (default: N)."""
        return self.kappa if self.kappa is not None else float(n_states)

    @property
    def reduction_method(self) -> str:
        """The reduction after the search (``none`` under the ``no-fbr`` ablation)."""
        return "none" if "no-fbr" in self.ablations else self.reduction

    @property
    def frozen_logits(self) -> tuple[str, ...]:
        """Architecture logits kept out of the search (A and B under ``no-read-in-out``)."""
        return ("arch_alpha", "arch_beta") if "no-read-in-out" in self.ablations else ()

    def search_select_weight(self, step: int) -> float:
        """λ of the select squeeze at search iteration ``step`` (0 before `select_after`)."""
        return self.select_weight if step >= self.select_after * self.iters("search") else 0.0

    @property
    def search_squeeze_weight(self) -> float:
        """λ_sq in the search (0 under the ``no-squeeze`` ablation)."""
        return 0.0 if "no-squeeze" in self.ablations else self.squeeze_weight

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> dict[str, Any]:
        """The configuration as JSON-ready data (tuples as lists)."""
        d = asdict(self)
        d["tasks"] = list(self.tasks) if self.tasks is not None else None
        d["ablations"] = list(self.ablations)
        d["input_size"] = None if self.input_size is None else list(self.input_size)
        d["network"] = None if self.network is None else self.network.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """Takes `to_dict` output (unknown keys are ignored; ``network`` is the network's JSON data,
        not read from any file); returns the configuration. Raises ConfigError for an invalid field,
        TypeError for a malformed entry."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    @classmethod
    def from_stored(cls, d: dict[str, Any]) -> TrainConfig:
        """Like `from_dict`, for the configuration a run stored when it started: a field added
        since takes the value that trains as that run did (`STORED_DEFAULTS`), not today's
        default, so a resumed run trains on exactly the data it started with."""
        return cls.from_dict({**STORED_DEFAULTS, **d})


# Fields whose default changed what a run trains on when they were added: a stored configuration
# without them is read with these values (`TrainConfig.from_stored`). Before val_fraction, every
# training sample was trained on; before recipes, every schedule field was explicit and the rates
# constant.
STORED_DEFAULTS: dict[str, Any] = {"val_fraction": 0.0, "recipe": "paper", "lr_schedule": "constant"}
