"""A run's expected wall time, measured before it starts: a few iterations of every stage timed on a
throwaway copy of the network, times the iterations each stage has left."""

from __future__ import annotations

import copy
import time

import torch

from dagc.trainer.batches import batch_at
from dagc.trainer.config import STAGES
from dagc.trainer.datasets import MultiTaskData
from dagc.trainer.loop import stage_step, training_model
from dagc.trainer.stages import make_precision
from dagc.trainer.state import Run, optimizer, reduce_network

# Iterations timed per stage; the first of them (allocation, caches) is not counted.
TIMED = 3


def estimate_seconds(run: Run, data: MultiTaskData, device: torch.device) -> dict[str, float]:
    """Seconds per iteration of each stage still to run and the expected total (``total``), from
    `TIMED` iterations per stage on a copy of ``run``'s network (the run itself is untouched).
    Fine-tuning is timed on the copy reduced from its current Γ/A/B (at the start of a run all
    ties, so a typical reduced size, not the one the search will find). Single-process timing
    (under torchrun every rank must call it: the iterations all-reduce their losses)."""
    cfg = run.cfg
    probe = copy.copy(run)
    probe.net = copy.deepcopy(run.net)
    probe.history = {}
    probe.precision = make_precision(cfg.amp, device)  # its own fp16 gradient scaler, not the run's
    rates: dict[str, float] = {}
    total = 0.0
    start = STAGES.index(run.stage) if run.stage in STAGES else len(STAGES)
    for stage in STAGES[start:]:
        left = cfg.iters(stage) - (run.step if stage == run.stage else 0)
        if left <= 0:
            continue
        if stage == "finetune" and not probe.net.hard:
            reduce_network(probe.net, cfg.reduction_method, seed=cfg.seed, target_sparsity=cfg.target_sparsity,
                           budget=cfg.budget_value, table=run.cost_table, scope=cfg.budget_scope)
        probe.stage, probe.step = stage, 0
        probe.opt = optimizer(cfg, probe.net, stage)
        model = training_model(probe.net, device, cfg.compile)
        times = []
        for i in range(TIMED):
            x, targets = batch_at(data.train, run.spec, cfg.batch_size, cfg.seed, stage, i, device)
            t0 = time.perf_counter()
            stage_step(probe, model, x, targets)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - t0)
        rates[stage] = min(times[1:])
        total += rates[stage] * left
    return {**rates, "total": total}


def format_estimate(est: dict[str, float], run: Run) -> str:
    """One line: the expected wall time and each stage's iterations and seconds per iteration."""
    parts = [f"{s} {run.cfg.iters(s)} x {est[s]:.2f} s" for s in STAGES if s in est]
    return f"expected wall time: about {est['total'] / 60:.1f} min ({', '.join(parts)})"
