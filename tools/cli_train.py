"""`dagc train` and `dagc recalibrate`: the commands that run the trainer (registered on the group in
tools/cli.py)."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import click

from dagc.errors import DagcError
from dagc.spec import PRESETS
from dagc.trainer.budget import budget_warning
from dagc.trainer.datasets import ON_DISK, REGISTRY
from dagc.trainer.decisiveness import warning_line
from dagc.trainer.report import near_constant_line

BUILT_IN = tuple(name for name, d in REGISTRY.items() if not d.on_disk)
# "tiny for synthetic; omniglot for digits, omniglot; ...": each preset with the datasets it is the default of.
# A dataset that chooses its preset from its files (folder: by the image size) says so instead.
_FIXED = {n: d for n, d in REGISTRY.items() if d.choose_preset is None}
DEFAULT_PRESETS = "; ".join(
    [f"{p} for {', '.join(n for n, d in _FIXED.items() if d.preset == p)}"
     for p in PRESETS if any(d.preset == p for d in _FIXED.values())]
    + [f"{n}: by the image size" for n in REGISTRY if n not in _FIXED])


def int_list(option: str, text: str) -> tuple[int, ...]:
    """Parse OPTION's comma-separated positive integers; raises DagcError naming the option."""
    try:
        values = tuple(int(b) for b in text.split(","))
    except ValueError:
        raise DagcError(f"{option} takes comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise DagcError(f"{option} takes positive integers, got {text!r}")
    return values


@click.command()
@click.option("--out", "out", type=click.Path(file_okay=False, path_type=Path), help="Run directory to write.")
@click.option("--resume", "resume", type=click.Path(file_okay=False, path_type=Path),
              help="Continue the interrupted run in this directory (its own configuration is used).")
@click.option("--dataset", type=str, default=None,
              help=f"{', '.join(BUILT_IN)} (built in; default synthetic) or {', '.join(ON_DISK)} (read from "
                   "--data-root).")
@click.option("--data-root", "data_root", type=str, default=None,
              help="Directory of an on-disk dataset (see the README for each layout).")
@click.option("--preset", type=str, default=None,
              help=f"Central network preset: {', '.join(PRESETS)} (default: the dataset's: {DEFAULT_PRESETS}).")
@click.option("--network", type=str, default=None,
              help="A network file (JSON, FORMAT.md \"Network files\") in place of --preset; the run records the network.")
@click.option("--tasks", type=str, default=None, help="Comma-separated task names (default: all the dataset's).")
@click.option("--flow-constant", "flow_constant", type=int, default=None, help="Flow constant M >= 1.")
@click.option("--input-size", "input_size", type=str, default=None,
              help="HxW of the data (e.g. 64x64; default: the dataset's own, 32x32 for synthetic).")
@click.option("--recipe", type=str, default=None, help="measured (epochs, Adam 1e-3, cosine) or paper (default: the dataset's; paper for digits).")
@click.option("--lr-schedule", "lr_schedule", type=str, default=None, help="cosine or constant (default: the recipe's).")
@click.option("--warmup-iters", type=int, default=None)
@click.option("--search-iters", type=int, default=None)
@click.option("--finetune-iters", type=int, default=None)
@click.option("--batch-size", type=int, default=None)
@click.option("--weight-lr", type=float, default=None, help="Adam learning rate of θ.")
@click.option("--arch-lr", type=float, default=None, help="Adam learning rate of Γ, A, B.")
@click.option("--squeeze-weight", type=float, default=None, help="λ_sq of the squeeze loss.")
@click.option("--select-weight", "select_weight", type=float, default=None,
              help="λ of the one-read-in, one-read-out squeeze in the search (default 0: the paper's loss).")
@click.option("--select-after", "select_after", type=float, default=None,
              help="Fraction of the search before that squeeze starts (default 1/3).")
@click.option("--kappa", type=float, default=None, help="Squeeze budget κ (default: N, the number of states).")
@click.option("--dense-loss", type=str, default=None, help="l2 (default) or l1 for dense regression tasks.")
@click.option("--save-every", type=int, default=None, help="Write resumable state every N iterations.")
@click.option("--device", type=str, default=None, help="cpu (default) or cuda.")
@click.option("--seed", type=int, default=None)
@click.option("--amp", type=str, default=None,
              help="Mixed precision of the forward pass: none (default), bf16 (CPU or CUDA), fp16 (CUDA, with gradient scaling).")
@click.option("--channels-last", "channels_last", is_flag=True, default=None, help="Weights and activations NHWC.")
@click.option("--compile", "compile", is_flag=True, default=None, help="torch.compile the training forward.")
@click.option("--baseline", type=str, default=None, help="A paper baseline, no search: single-task or shared-bottom.")
@click.option("--baseline-protocol", "baseline_protocol", type=str, default=None,
              help="A baseline's iterations: finetune (default, the paper's: --finetune-iters) or total "
                   "(warmup + search + finetune iterations, as many as a search run).")
@click.option("--ablation", "ablations", multiple=True,
              help="Drop a component (repeatable): no-flow-restriction, no-read-in-out, no-fbr, no-squeeze.")
@click.option("--reduction", type=str, default=None,
              help="Reduction after the search: fbr (default, Algorithm 1), threshold or random.")
@click.option("--target-sparsity", "target_sparsity", type=float, default=None, help="Stop the reduction at sparsity S in (0, 1].")
@click.option("--budget", type=str, default=None,
              help="FLOPs (30MFLOPs) or a latency (2ms, with a latency --cost-target) per task model or for the shared "
                   "model (--budget-scope): priced search, reduction stops once it fits.")
@click.option("--budget-scope", "budget_scope", type=str, default=None,
              help="What --budget prices: task (default: each task's model) or shared (the compiled shared model, "
                   "shared states once, every head, one call).")
@click.option("--cost-target", "cost_target", type=str, default=None,
              help="What prices the blocks: flops (default, counted) or a latency measured on onnxruntime-cpu, "
                   "openvino-cpu (a cost table, cached).")
@click.option("--cost-batch", "cost_batch", type=int, default=None, help="Latency target: samples per call (default 1).")
@click.option("--cost-threads", "cost_threads", type=int, default=None, help="Latency target: intra-op threads (default 1).")
@click.option("--stats-batches", "stats_batches", type=int, default=None,
              help="Training batches each task's batch-norm statistics are re-estimated on at the end (default 32; "
                   "0: keep fine-tuning's running averages).")
@click.option("--stats-tolerance", "stats_tolerance", type=float, default=None,
              help="Warn when a task's eval-mode metric and its batch-statistics metric on training data differ by "
                   "more than this (default 0.02: 2 points of a score in [0, 1], 2% of an error).")
@click.option("--val-fraction", "val_fraction", type=float, default=None, help="Share of the training split held out to score each stage (default 0.1; 0: none).")
@click.option("--patience", type=int, default=None, help="Stop fine-tuning after this many validation scores without improvement (default 0: never).")
@click.option("--val-every", "val_every", type=int, default=None, help="Fine-tune iterations between validation scores (default: one epoch).")
@click.option("--init", "init", type=str, default=None,
              help="Starting θ: a dagc run directory or checkpoint, or a VGG-16 state_dict (.safetensors) for vgg16.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def train(out, resume, quiet, **options) -> None:
    """Run warm-up, search, flow-based reduction and fine-tuning; write RUN_DIR.

    Several processes: torchrun --nproc-per-node N -m dagc train ... (one DDP replica per process,
    --batch-size per process; rank 0 writes RUN_DIR)."""
    from dagc.compiler.measure import measure_table
    from dagc.tools.evaluate import train_summary
    from dagc.trainer import distributed
    from dagc.trainer.init_weights import report_lines
    from dagc.trainer.recalibrate import failed_checks
    from dagc.trainer.train import TrainConfig
    from dagc.trainer.train import train as run_training

    if (out is None) == (resume is None):
        raise DagcError("give exactly one of --out RUN_DIR (a new run) or --resume RUN_DIR (continue one)")
    given = {k: v for k, v in options.items() if v is not None and v != ()}
    announce = partial(click.echo, err=False)  # the expected wall time, before training starts (stdout: not a warning)
    if resume is not None:
        if set(given) - {"device"}:
            raise DagcError(f"--resume uses the run's own configuration; drop {sorted(given)}")
        cfg = TrainConfig(device=given["device"]) if "device" in given else None
        metrics = run_training(cfg, resume, resume=True, progress=not quiet, announce=announce)
        out = resume
    else:
        if "tasks" in given:
            given["tasks"] = tuple(t.strip() for t in given["tasks"].split(",") if t.strip())
        if "input_size" in given:
            given["input_size"] = int_list("--input-size", given["input_size"].lower().replace("x", ","))
        metrics = run_training(TrainConfig(**given), out, progress=not quiet, announce=announce,
                               measure_costs=measure_table)
    if distributed.is_main():  # under torchrun every rank returns the metrics; one summary
        for line in report_lines(metrics["init"]) if metrics.get("init") else ():
            click.echo(line)
        click.echo(train_summary(metrics, out))
        for warning in (warning_line(metrics.get("decisiveness")), budget_warning(metrics.get("budget")),
                        near_constant_line(metrics.get("primary"))):
            if warning is not None:
                click.echo(f"dagc: {warning}", err=True)
        for line in failed_checks(metrics.get("statistics_check") or {}):
            click.echo(f"dagc: warning: batch-norm statistics: {line}", err=True)


@click.command()
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--out", "out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Checkpoint to write (default: CHECKPOINT's name with .recalibrated before .safetensors); "
                   "never an existing file.")
@click.option("--data-root", "data_root", type=str, default=None,
              help="Directory of the run's on-disk dataset (default: the one its configuration records).")
@click.option("--batches", type=int, default=None,
              help="Training batches each task's statistics are averaged over (default 32, as dagc train).")
@click.option("--batch-size", "batch_size", type=int, default=None, help="Their size (default: the run's).")
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda.")
def recalibrate(checkpoint, out, data_root, batches, batch_size, device) -> None:
    """Re-estimate each task's batch-norm statistics of CHECKPOINT on its training data (also
    migrates a version-1 checkpoint, whose statistics were shared by all tasks)."""
    from dagc.trainer.recalibrate import failed_checks, recalibrate_checkpoint

    if out is None:
        out = checkpoint.with_name(checkpoint.name.removesuffix(".safetensors") + ".recalibrated.safetensors")
    if batches is not None and batches < 1:
        raise DagcError(f"--batches must be a positive integer, got {batches}")
    done = recalibrate_checkpoint(checkpoint, out, data_root=data_root, batch_size=batch_size, device=device,
                                  **({"batches": batches} if batches is not None else {}))
    if done["migrated_from"] is not None:
        click.echo(f"migrated from checkpoint format {done['migrated_from']}")
    for task, c in done["check"].items():
        click.echo(f"{task}: {c['metric']} {c['eval']:.4g} (running statistics) vs {c['batch_statistics']:.4g} "
                   f"(batch statistics) on training data; held-out {done['final'][task][c['metric']]:.4g}")
    for line in failed_checks(done["check"]):
        click.echo(f"dagc: warning: batch-norm statistics: {line}", err=True)
    click.echo(f"wrote {out} (statistics from {done['batches']} batches)")
