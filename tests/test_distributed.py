"""Multi-process training (DDP over gloo, launched by torchrun) and mixed precision.

The 2-process test launches one real torchrun job running this file's `_worker` (see the bottom):
on each rank it runs `dagc train` through the CLI, an interrupted run through `train()`, and a
CLI `--resume` of it. Each rank works in its own current directory for the runs given relative
paths, the way ranks on different machines see different disks, so a file written by rank 1 would
show up in rank 1's directory.
"""

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dagc.checkpoint import load_checkpoint
from dagc.errors import ConfigError
from dagc.trainer import distributed
from dagc.trainer.batches import batch_at, build_spec, load_data
from dagc.trainer.distributed import tensor_digest
from dagc.trainer.train import TrainConfig, train

# Tiny runs: digits (per-task inputs) through the CLI; synthetic (shared input) through train().
DIGITS_ARGS = ["--dataset", "digits", "--warmup-iters", "2", "--search-iters", "3", "--finetune-iters", "2",
               "--batch-size", "2", "--save-every", "2", "--quiet"]
DIGITS = dict(dataset="digits", warmup_iters=2, search_iters=3, finetune_iters=2, batch_size=2, save_every=2)
SYNTH = dict(warmup_iters=2, search_iters=4, finetune_iters=2, batch_size=2, n_train=16, n_test=4,
             save_every=2, log_every=1)
STOP_AT = ("search", 3)  # the interrupted run stops here; its last state is from search step 2
RUN_FILES = {"checkpoint.safetensors", "state.safetensors", "warmup.safetensors", "search.safetensors",
             "metrics.json", "train.log"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ddp_job(tmp_path_factory):
    """Run the 2-process torchrun job once; returns its base directory."""
    base = tmp_path_factory.mktemp("ddp")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(_free_port()), __file__, str(base)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return base


def _losses_finite(metrics: dict) -> bool:
    return all(math.isfinite(v) for stage in metrics["losses"].values() for entry in stage
               for k, v in entry.items() if k != "step")


def test_two_ranks_end_identical_and_only_rank_0_writes(ddp_job):
    run0, run1 = ddp_job / "cwd0" / "run", ddp_job / "cwd1" / "run"
    assert RUN_FILES <= set(os.listdir(run0))
    # Rank 1 wrote nothing at all: no run directory, no stray temporary files in its cwd.
    assert not run1.exists() and os.listdir(ddp_job / "cwd1") == []
    metrics = json.loads((run0 / "metrics.json").read_text())
    dist = metrics["distributed"]
    assert dist["world_size"] == 2 and dist["backend"] == "gloo" and dist["global_batch_size"] == 4
    # Each rank's digest of its own final weights, BN statistics, logits and masks: equal, with no
    # repair from rank 0 needed at any stage end, and equal to what rank 0 saved.
    digests = dist["replica_digests"]
    assert len(digests) == 2 and digests[0] == digests[1]
    assert dist["resynced"] == []
    ck = load_checkpoint(run0 / "checkpoint.safetensors")
    assert ck.reduced and tensor_digest(ck.tensors) == digests[0]
    assert _losses_finite(metrics)
    # Only rank 0 printed the summary.
    results = [json.loads((ddp_job / f"result{r}.json").read_text()) for r in (0, 1)]
    assert "checkpoint.safetensors" in results[0]["stdout"] and results[1]["stdout"] == ""


def test_every_rank_returns_rank_0s_metrics(ddp_job):
    results = [json.loads((ddp_job / f"result{r}.json").read_text()) for r in (0, 1)]
    saved = json.loads((ddp_job / "cwd0" / "synth" / "metrics.json").read_text())
    assert results[0]["digests"] == results[1]["digests"] == saved["distributed"]["replica_digests"]


def test_two_ranks_mix_both_shards(ddp_job, tmp_path):
    # Rank 0's shard is exactly the batch a single process draws, so had rank 1's gradients not
    # been averaged in, rank 0 would have trained exactly like this single-process run.
    single = train(TrainConfig(**DIGITS), tmp_path / "single", progress=False)
    assert "distributed" not in single
    a = load_checkpoint(ddp_job / "cwd0" / "run" / "checkpoint.safetensors").tensors
    b = load_checkpoint(tmp_path / "single" / "checkpoint.safetensors").tensors
    assert a.keys() == b.keys()
    assert not torch.equal(a["theta.heads.low.fc.weight"], b["theta.heads.low.fc.weight"])


def test_resume_under_torchrun_is_exact(ddp_job):
    full, part = ddp_job / "cwd0" / "synth", ddp_job / "part"
    assert not (ddp_job / "cwd1" / "synth").exists()
    assert json.loads((ddp_job / "result0.json").read_text())["stopped"]
    a = load_checkpoint(full / "checkpoint.safetensors").tensors
    b = load_checkpoint(part / "checkpoint.safetensors").tensors
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    m = json.loads((part / "metrics.json").read_text())
    assert m["distributed"]["replica_digests"][0] == m["distributed"]["replica_digests"][1]
    assert m["losses"] == json.loads((full / "metrics.json").read_text())["losses"]


def test_bf16_trains_on_cpu(tmp_path):
    metrics = train(TrainConfig(**SYNTH, amp="bf16"), tmp_path / "bf16", progress=False)
    assert _losses_finite(metrics)
    assert all(len(metrics["losses"][s]) > 0 for s in ("warmup", "search", "finetune"))
    ck = load_checkpoint(tmp_path / "bf16" / "checkpoint.safetensors")
    assert ck.reduced and all(v.dtype != torch.bfloat16 for v in ck.tensors.values())
    assert json.loads(ck.meta["config"])["amp"] == "bf16"


def test_channels_last_trains_like_the_default(tmp_path):
    base = train(TrainConfig(**SYNTH), tmp_path / "a", progress=False)
    cl = train(TrainConfig(**SYNTH, channels_last=True), tmp_path / "b", progress=False)
    # Another memory layout: other conv kernels, so equal up to rounding, not bit for bit.
    first = [base["losses"]["warmup"][0]["loss"], cl["losses"]["warmup"][0]["loss"]]
    assert first[0] == pytest.approx(first[1], rel=1e-4)
    assert _losses_finite(cl)


def test_rank_slices_partition_the_global_batch():
    cfg = TrainConfig(**SYNTH)
    data = load_data(cfg)
    spec = build_spec(cfg, data)
    cpu = torch.device("cpu")
    whole_x, whole_t = batch_at(data.train, spec, 4, 0, "search", 7, cpu)
    parts = [batch_at(data.train, spec, 2, 0, "search", 7, cpu, rank=r, world=2) for r in (0, 1)]
    assert torch.equal(torch.cat([x for x, _ in parts]), whole_x)
    for task in whole_t:
        assert torch.equal(torch.cat([t[task] for _, t in parts]), whole_t[task])
    assert not torch.equal(parts[0][0], parts[1][0])


def test_launch_is_detected_from_torchrun_variables(monkeypatch):
    for var in distributed.ENV_VARS:
        monkeypatch.delenv(var, raising=False)
    assert not distributed.launched() and distributed.rank() == 0 and distributed.world_size() == 1
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")  # torchrun with one process: plain single-process training
    assert not distributed.launched()
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ConfigError, match="WORLD_SIZE"):
        distributed.launched()


@pytest.mark.parametrize("kw, match", [
    (dict(amp="fp16"), "needs a CUDA GPU"),
    (dict(amp="fp8"), "amp must be one of"),
    (dict(channels_last="yes"), "channels_last"),
    (dict(compile=1), "compile"),
])
def test_bad_precision_options_are_refused(kw, match):
    with pytest.raises(ConfigError, match=match):
        TrainConfig(**kw)


def test_cli_fp16_on_cpu_is_one_line_exit_2(tmp_path, capsys):
    from dagc.tools.cli import main

    with pytest.raises(SystemExit) as e:
        main(["train", "--out", str(tmp_path / "run"), "--amp", "fp16", "--quiet"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("dagc: error: amp 'fp16' needs a CUDA GPU")
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "run").exists()


@pytest.mark.slow
def test_compiled_forward_trains(tmp_path):
    # One task keeps the traced graphs (one per stage: shared, soft, masked) small; inductor's
    # C++ compilation still takes minutes on a small CPU.
    metrics = train(TrainConfig(**SYNTH, tasks=("depth",), compile=True), tmp_path / "c", progress=False)
    assert _losses_finite(metrics)


@pytest.mark.gpu
@pytest.mark.parametrize("amp", ["fp16", "bf16"])
def test_cuda_mixed_precision_trains(tmp_path, amp):
    metrics = train(TrainConfig(**SYNTH, device="cuda", amp=amp, channels_last=True), tmp_path / amp,
                    progress=False)
    assert _losses_finite(metrics)


@pytest.mark.gpu
def test_nccl_two_ranks(tmp_path):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA GPUs")
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(_free_port()), "-m", "dagc", "train", "--out", str(out), "--device", "cuda",
           "--amp", "fp16", *DIGITS_ARGS]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-5000:]
    dist = json.loads((out / "metrics.json").read_text())["distributed"]
    assert dist["backend"] == "nccl" and dist["replica_digests"][0] == dist["replica_digests"][1]


# ---------------------------------------------------------------------- the torchrun worker
def _worker(base: Path) -> None:
    """One rank of the job `ddp_job` launches (torchrun sets RANK, WORLD_SIZE, LOCAL_RANK)."""
    import contextlib
    import io

    from dagc.tools.cli import main

    rank = int(os.environ["RANK"])
    cwd = base / f"cwd{rank}"
    cwd.mkdir()
    os.chdir(cwd)
    result = {}

    def cli(argv):
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf), pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 0, f"rank {rank}: dagc {' '.join(argv)} exited {e.value.code}"
        return buf.getvalue()

    # 1. The digits run, through the CLI, into a relative --out (this rank's own directory).
    result["stdout"] = cli(["train", "--out", "run", *DIGITS_ARGS])
    # 2. A full synthetic run, and the same run interrupted in the search, then resumed by the CLI
    # (the shared directory: every rank reads the state on --resume).
    full = train(TrainConfig(**SYNTH), "synth", progress=False)
    # Every rank returns rank 0's metrics.
    result["digests"] = full["distributed"]["replica_digests"]

    class Stop(Exception):
        pass

    def stop(run):
        if (run.stage, run.step) == STOP_AT:
            raise Stop

    try:
        train(TrainConfig(**SYNTH), base / "part", progress=False, on_step=stop)
    except Stop:
        result["stopped"] = True
    cli(["train", "--resume", str(base / "part"), "--quiet"])
    (base / f"result{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
