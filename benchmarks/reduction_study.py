"""Reduction study (paper Sec. 4.4, Fig. 5): flow-based vs threshold vs random reduction.

    python benchmarks/reduction_study.py                 # full study (about 20 min on 2 busy CPU cores)
    python benchmarks/reduction_study.py --quick         # smoke run: 1 seed, a few iterations
    python benchmarks/reduction_study.py --finetune-iters 100   # also rewind + fine-tune each net

For each dataset (`synthetic` with the `tiny` preset, `digits` with its default `omniglot` preset)
and each seed, the script trains warm-up + search once, exactly as `dagc train` does (its own loop,
`dagc.trainer.loop.run_stage`, with the same batches and seeds; see `search_network`), evaluates the unreduced soft supernet on the
held-out split, then, for each reduction method (fbr, threshold, random) and each target sparsity
(a grid plus each method's own automatic stop), reduces a copy of the searched network with
`dagc.trainer.stages.reduce_network` and evaluates the pruned network.

Variants of "the pruned network", all without fine-tuning unless said (a record's ``variant``):

- ``soft``: the searched soft network with the removed edges' weights set to 0; kept edges keep
  their σ weight and the search's structural 1/In_j (`SoftMaskedNetwork`). The unreduced network
  minus the removed edges: it measures the choice of edges alone.
- ``hard``: the network `reduce_network` returns, as `dagc train` fine-tunes it: binary masks, no
  sigmoid, 1/(active in-degree), the searched weights and batch-norm statistics.
- ``hard_bn``: ``hard`` with the batch-norm running statistics re-estimated on ``bn_batches``
  training batches (train-mode forward passes, no weight update). Binarising changes the scale of
  the states (weights 1 and 1/active in-degree instead of σ and 1/structural in-degree), so the
  search's running statistics no longer fit; this variant shows how much of ``hard``'s loss that
  mismatch explains. Off with ``--bn-batches 0``.
- ``finetune`` (only with ``--finetune-iters N``): θ rewound to the end of warm-up, then N
  fine-tune iterations with the binary masks, as `dagc train` does.

Definitions (also written into the JSON):

- achieved sparsity S: `dagc.trainer.topology.topology_metrics`' S of the closed masks (active edges
  / all edges of the central network, read-ins and read-outs included).
- retained performance of a task: pruned / unreduced for a higher-is-better primary metric,
  unreduced / pruned for a lower-is-better one (`dagc.trainer.kinds.PRIMARY`); 1 = no loss, the
  paper's degradation rate is 1 - retained. A record's ``retained_mean`` is the mean over tasks.
- target sparsity ``null`` (shown as "auto"): no target, the method's own stopping rule; target
  1.0 stops before any removal, i.e. only Algorithm 1's set-up (truncation to [N_α, N_β]) and
  binarisation, the same for every method.
- random reduction: ``random_draws`` draws per (seed, target), the draw's generator seeded with
  ``100 * seed + 10 * draw`` (plus the task index, inside `reduce_network`); the same draw at every
  target, so a smaller target continues the same removal sequence. Draws are averaged within a
  seed before the mean ± std over seeds.

Writes the JSON (all raw numbers, configuration, machine, versions, date) and a PNG (retained
performance vs achieved sparsity, one column per dataset, one row per variant, mean ± std over
seeds, one line per method), both atomically.
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dagc.errors import ConfigError, DagcError
from dagc.trainer.batches import batch_at, build_spec, load_data
from dagc.trainer.config import TrainConfig
from dagc.trainer.datasets import REGISTRY
from dagc.trainer.evaluation import constant_baselines, evaluate
from dagc.trainer.kinds import PRIMARY
from dagc.trainer.loop import run_stage, settle_statistics
from dagc.trainer.network import CentralNetwork
from dagc.trainer.recalibrate import reestimate_statistics
from dagc.trainer.recipes import RECIPES
from dagc.trainer.stages import REDUCTIONS, reduce_network, rewind
from dagc.trainer.state import Run, advance, new_run, optimizer

DEFAULT_TARGETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
EVAL_BATCH = 64  # held-out batches: larger ones were slower on the 2-core machine
DATASETS = tuple(name for name, d in REGISTRY.items() if not d.on_disk)  # the built-in ones
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from reduction_report import VARIANTS, machine_info, plot, summarise, table, write_json  # noqa: E402


@dataclass(frozen=True)
class StudyConfig:
    """What the study runs. Everything not set here (learning rates, λ_sq, κ, M, ...) is the
    `dagc train` default (`TrainConfig`)."""

    # The study's protocol (RESULTS): synthetic and digits; any other built-in with --datasets.
    datasets: tuple[str, ...] = ("synthetic", "digits")
    seeds: tuple[int, ...] = (0, 1, 2)
    methods: tuple[str, ...] = REDUCTIONS
    targets: tuple[float, ...] = DEFAULT_TARGETS
    warmup_iters: int = RECIPES["paper"].iters[0]  # the protocol RESULTS measured: the paper's recipe
    # 150 rather than dagc train's 250 search iterations and 256 rather than 512 held-out scenes
    # (for digits: at most 256 images per task, which cuts parity's 359) keep the whole study
    # near 20 minutes on 2 shared CPU cores.
    search_iters: int = 150
    batch_size: int = RECIPES["paper"].batch_size
    random_draws: int = 2
    bn_batches: int = 10
    finetune_iters: int = 0
    n_train: int | None = None
    n_test: int | None = 256

    def __post_init__(self) -> None:
        for name in ("datasets", "seeds", "methods", "targets"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError naming the first invalid field."""
        if not self.datasets or any(d not in DATASETS for d in self.datasets):
            raise ConfigError(f"datasets must be a non-empty subset of {list(DATASETS)}, got {list(self.datasets)}")
        if not self.seeds or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in self.seeds):
            raise ConfigError(f"seeds must be a non-empty list of integers >= 0, got {list(self.seeds)}")
        if len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"seeds must not repeat, got {list(self.seeds)}")
        if not self.methods or any(m not in REDUCTIONS for m in self.methods):
            raise ConfigError(f"methods must be a non-empty subset of {list(REDUCTIONS)}, got {list(self.methods)}")
        for t in self.targets:
            if not (isinstance(t, (int, float)) and not isinstance(t, bool) and 0 < t <= 1):
                raise ConfigError(f"every target sparsity must be a number in (0, 1], got {t!r}")
        for name in ("warmup_iters", "search_iters", "random_draws"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name} must be an integer >= 1, got {v!r}")
        for name in ("bn_batches", "finetune_iters"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ConfigError(f"{name} must be an integer >= 0, got {v!r}")
        # The rest (batch size, sample counts) is checked by TrainConfig.
        self.train_config(self.datasets[0], self.seeds[0])

    def train_config(self, dataset: str, seed: int) -> TrainConfig:
        """The `dagc train` configuration of one (dataset, seed) run. Raises ConfigError."""
        return TrainConfig(dataset=dataset, seed=seed, recipe="paper", val_fraction=0.0, warmup_iters=self.warmup_iters,
                           search_iters=self.search_iters, finetune_iters=max(1, self.finetune_iters),
                           batch_size=self.batch_size, n_train=self.n_train, n_test=self.n_test)

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


# The smoke run: one seed, a few iterations, two targets, small splits.
QUICK = dict(seeds=(0,), targets=(0.2, 0.3), warmup_iters=3, search_iters=4, batch_size=4, random_draws=1,
             bn_batches=2, n_train=24, n_test=16)


def quick_config(**overrides: Any) -> StudyConfig:
    """The `--quick` configuration (overrides win). Raises ConfigError."""
    return StudyConfig(**{**QUICK, **overrides})


# ---------------------------------------------------------------------- training and evaluation
def search_network(cfg: TrainConfig, data, spec, device: torch.device | str = "cpu"
                   ) -> tuple[CentralNetwork, dict[str, torch.Tensor], dict[str, float]]:
    """Warm-up + search exactly as `dagc train`: its run start (`new_run`: seeding, optimisers) and
    its loop (`run_stage`: batches, stage steps), stage after stage (`advance`).

    Takes the run's TrainConfig, its loaded data and spec. Returns the searched (soft) network, the
    θ snapshot at the end of warm-up (for rewinding) and the seconds each stage took.
    Raises ConfigError if a loss becomes non-finite.
    """
    device = torch.device(device)
    run = new_run(cfg, spec, device)
    seconds: dict[str, float] = {}
    for stage in ("warmup", "search"):
        t0 = time.perf_counter()
        run_stage(run, data, device)
        seconds[stage] = time.perf_counter() - t0
        advance(run)
    for p in run.net.arch_parameters():
        p.requires_grad_(False)
    return run.net, run.rewind_theta, seconds


def reestimate_batchnorm(net: CentralNetwork, data, cfg: TrainConfig, n_batches: int,
                         device: torch.device | str = "cpu") -> None:
    """Re-estimate every task's batch-norm statistics of ``net`` in place
    (`dagc.trainer.recalibrate.reestimate_statistics`) on the fine-tune stage's first ``n_batches``
    training batches, no weight update: none of the search's statistics survive. Heads have no
    batch norm, so the read-out's change of scale under binarisation stays."""
    batches = (batch_at(data.train, net.spec, cfg.batch_size, cfg.seed, "finetune", b, device)[0]
               for b in range(n_batches))
    reestimate_statistics(net, batches)


def finetune(net: CentralNetwork, snapshot: dict[str, torch.Tensor], data, cfg: TrainConfig,
             device: torch.device | str = "cpu") -> None:
    """Rewind θ of a reduced ``net`` to ``snapshot`` and fine-tune it in place for
    ``cfg.finetune_iters`` iterations, then re-estimate each task's batch-norm statistics, as
    `dagc train` does after reduction (its loop, `run_stage`, and `settle_statistics`).
    Raises ConfigError if the loss becomes non-finite."""
    rewind(net, snapshot)
    run = Run(cfg=cfg, spec=net.spec, net=net, stage="finetune", step=0, opt=optimizer(cfg, net, "finetune"),
              rewind_theta=snapshot, history={})
    run_stage(run, data, torch.device(device))
    settle_statistics(run, data, torch.device(device))


def retained(pruned: float, unreduced: float, higher_is_better: bool) -> float:
    """Retained performance: pruned/unreduced (higher is better) or unreduced/pruned (lower is
    better); 1 means no loss. NaN when the ratio is undefined (a zero denominator)."""
    num, den = (pruned, unreduced) if higher_is_better else (unreduced, pruned)
    return float(num / den) if den != 0 else float("nan")


def _primary(spec) -> dict[str, tuple[str, bool]]:
    return {t.name: PRIMARY[t.kind] for t in spec.tasks}


def _record(method: str, target: float | None, draw: int, variant: str, topo: dict, metrics: dict,
            unreduced: dict, primary: dict) -> dict[str, Any]:
    values = {t: metrics[t][m] for t, (m, _) in primary.items()}
    kept = {t: retained(values[t], unreduced[t][m], hib) for t, (m, hib) in primary.items()}
    return {
        "method": method, "target": target, "draw": draw, "variant": variant,
        "topology": topo, "primary": values, "retained": kept,
        "retained_mean": float(np.mean(list(kept.values()))),
        "sparsity_mean": float(np.mean([topo[t]["S"] for t in primary])),
    }


class SoftMaskedNetwork(CentralNetwork):
    """The searched soft network restricted to the kept edges of a reduction: each kept edge keeps
    its searched weight σ(logit) and the structural 1/In_j of the search, removed edges weigh 0.

    It is the unreduced network minus the removed edges and nothing else, so it measures the
    choice of edges alone. Built on hard mode only so that removed edges are not computed.
    """

    def edge_weights(self, task_idx: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        idx = torch.as_tensor(list(task_idx), dtype=torch.long, device=self.band.device)
        g = torch.sigmoid(self.arch_gamma[idx]) * self.band * self.mask_gamma[idx]
        a = torch.sigmoid(self.arch_alpha[idx]) * self.mask_alpha[idx]
        b = torch.sigmoid(self.arch_beta[idx]) * self.mask_beta[idx]
        indeg = self.in_degree.expand_as(a)
        return g[:, self.edge_src, self.edge_dst] / indeg[:, self.edge_dst], a / indeg, b


def soft_masked(searched: CentralNetwork, reduced: CentralNetwork) -> SoftMaskedNetwork:
    """A `SoftMaskedNetwork` with the weights and logits of ``searched`` (soft) and the closed
    masks of ``reduced`` (``searched`` after `reduce_network`). Raises SpecError on bad masks."""
    net = SoftMaskedNetwork(searched.spec).to(searched.band.device)
    net.load_state_dict(searched.state_dict())
    net.set_masks(reduced.mask_gamma, reduced.mask_alpha, reduced.mask_beta)
    return net.eval()


def _mask_key(net: CentralNetwork) -> bytes:
    return b"".join(t.cpu().numpy().astype(np.int8).tobytes() for t in (net.mask_gamma, net.mask_alpha, net.mask_beta))


def _measure(study: StudyConfig, searched: CentralNetwork, reduced: CentralNetwork, snapshot, data,
             cfg: TrainConfig, device) -> dict[str, dict]:
    """Held-out metrics of every variant for one reduced network (which is modified in place)."""
    def ev(net):
        return evaluate(net, data.test, batch_size=EVAL_BATCH, device=device)

    out = {"soft": ev(soft_masked(searched, reduced)), "hard": ev(reduced)}
    if study.bn_batches:
        reestimate_batchnorm(reduced, data, cfg, study.bn_batches, device)
        out["hard_bn"] = ev(reduced)
    if study.finetune_iters:
        finetune(reduced, snapshot, data, cfg, device)  # rewinds θ first; cfg.finetune_iters = study's
        out["finetune"] = ev(reduced)
    return out


def run_one(study: StudyConfig, dataset: str, seed: int, log: Callable[[str], None] = lambda s: None,
            device: torch.device | str = "cpu") -> dict[str, Any]:
    """One (dataset, seed) run of the study: search once, then every method × target × variant.

    Identical masks give identical networks, so each distinct set of masks (many targets lie
    above what Algorithm 1's set-up keeps) is evaluated once and shared by its records.
    Returns a dict with the training configuration, timings, the unreduced and constant-predictor
    metrics, the total edge count per task and ``records`` (one per method, target, draw, variant).
    Raises ConfigError or DataError for a bad configuration.
    """
    cfg = study.train_config(dataset, seed)
    data = load_data(cfg)
    spec = build_spec(cfg, data)
    net, snapshot, seconds = search_network(cfg, data, spec, device)
    log(f"{dataset} seed {seed}: warm-up {seconds['warmup']:.0f}s, search {seconds['search']:.0f}s")
    primary = _primary(spec)
    t0 = time.perf_counter()
    unreduced = evaluate(net, data.test, batch_size=EVAL_BATCH, device=device)
    records, cache = [], {}
    for method in study.methods:
        for target in (None, *study.targets):
            for draw in range(study.random_draws if method == "random" else 1):
                reduced = copy.deepcopy(net)
                topo = reduce_network(reduced, method, seed=100 * seed + 10 * draw, target_sparsity=target)
                key = _mask_key(reduced)
                if key not in cache:
                    cache[key] = _measure(study, net, reduced, snapshot, data, cfg, device)
                for variant, metrics in cache[key].items():
                    records.append(_record(method, target, draw, variant, topo, metrics, unreduced, primary))
        log(f"{dataset} seed {seed}: {method} done ({time.perf_counter() - t0:.0f}s of reductions so far, "
            f"{len(cache)} distinct networks)")
    seconds["reductions"] = time.perf_counter() - t0
    return {
        "dataset": dataset, "seed": seed, "preset": cfg.preset, "train_config": cfg.to_dict(),
        "tasks": {t: {"metric": m, "higher_is_better": hib} for t, (m, hib) in primary.items()},
        "total_edges": spec.n_edges(),
        "distinct_networks": len(cache), "seconds": seconds, "unreduced": unreduced,
        "constant_baseline": constant_baselines(spec, data), "records": records,
    }


DEFINITIONS = {
    "retained": "per task: pruned/unreduced primary metric if higher is better, unreduced/pruned if lower is "
                "better; 1 = no loss; degradation rate = 1 - retained. retained_mean: mean over tasks.",
    "unreduced": "the searched soft supernet (sigmoid weights, structural in-degree), held-out split",
    "S": "topology_metrics S of the closed masks: active edges / all edges of the central network",
    "target": "null = the method's own stopping rule (auto); 1.0 = set-up only (truncation to [N_alpha, "
              "N_beta]) and binarisation",
    "variants": {"soft": "searched soft network, removed edges weighted 0, kept edges keep sigmoid weight and "
                         "structural 1/In_j; no fine-tuning (the choice of edges alone)",
                 "hard": "binary masks, no sigmoid, 1/active in-degree, searched weights and BN statistics; "
                         "no fine-tuning (the network reduce_network returns)",
                 "hard_bn": "hard, then batch-norm running statistics re-estimated on training batches "
                            "(no weight update)",
                 "finetune": "theta rewound to the end of warm-up, then fine-tuned with the masks"},
    "summary": "draws averaged within a seed, then mean and sample std over seeds",
    "random_seed": "reduce_network seed = 100*seed + 10*draw (+ task index)",
}


def run_study(study: StudyConfig, log: Callable[[str], None] = lambda s: None,
              device: torch.device | str = "cpu") -> dict[str, Any]:
    """Run the whole study and return the result (what the JSON holds): config, definitions, runs,
    summary, machine, versions, date, seconds. Raises ConfigError or DataError."""
    t0 = time.perf_counter()
    runs = [run_one(study, d, s, log, device) for d in study.datasets for s in study.seeds]
    return {"study": "reduction (paper Sec. 4.4, Fig. 5)", "config": study.to_dict(),
            "presets": {d: REGISTRY[d].preset for d in study.datasets}, "definitions": DEFINITIONS,
            **machine_info(), "seconds": time.perf_counter() - t0, "runs": runs, "summary": summarise(runs)}


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _names(text: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in text.split(",") if v.strip())


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 seed, few iterations, 2 targets")
    ap.add_argument("--datasets", type=_names, help="comma-separated, default synthetic,digits")
    ap.add_argument("--seeds", type=_ints, help="comma-separated, default 0,1,2")
    ap.add_argument("--targets", type=_floats, help="comma-separated target sparsities in (0, 1]")
    ap.add_argument("--methods", type=_names, help="comma-separated subset of fbr,threshold,random")
    ap.add_argument("--warmup-iters", type=int)
    ap.add_argument("--search-iters", type=int)
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--random-draws", type=int)
    ap.add_argument("--bn-batches", type=int, help="batches for the BN re-estimation variant; 0 disables it")
    ap.add_argument("--finetune-iters", type=int, help="also rewind + fine-tune each pruned network N iterations")
    ap.add_argument("--n-train", type=int)
    ap.add_argument("--n-test", type=int)
    ap.add_argument("--json", default=None, help="default benchmarks/reduction_study.json "
                    "(with --quick: reduction_study_quick.json in the temporary directory)")
    ap.add_argument("--plot", default=None, help="default benchmarks/reduction_study.png (--quick: as --json)")
    args = ap.parse_args(argv)
    given = {k: v for k, v in vars(args).items() if v is not None and k not in ("quick", "json", "plot")}
    # A smoke run must not overwrite the recorded results, nor leave files in the repository.
    out_dir, stem = (Path(tempfile.gettempdir()), "reduction_study_quick") if args.quick else (HERE, "reduction_study")
    json_path = Path(args.json or out_dir / f"{stem}.json")
    png_path = Path(args.plot or out_dir / f"{stem}.png")
    try:
        study = quick_config(**given) if args.quick else StudyConfig(**given)
        for p in (json_path, png_path):
            if not p.parent.is_dir():
                raise ConfigError(f"directory {p.parent} does not exist; create it or choose another path")

        def log(msg: str) -> None:
            print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

        result = run_study(study, log)
        write_json(result, json_path)
        plot(result, png_path)
    except DagcError as e:
        print(f"reduction_study: error: {e}", file=sys.stderr)
        return 2
    for variant in VARIANTS:
        print(table(result, variant))
    print(f"wrote {json_path} and {png_path} ({result['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
