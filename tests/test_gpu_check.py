"""benchmarks/gpu_check.sh, the one script that runs every GPU check on the GPU machine: its syntax,
and its dry run on this (GPU-less) machine, where the GPU parts are skipped with a clear line and
the CPU side of each step runs instead. The script never installs anything in these tests
(DAGC_GPU_CHECK_NO_INSTALL=1)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
STEPS = ("pytest_gpu", "gpu_train", "train_cuda", "gpu_table")

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and coreutils' timeout")


def _run(out: Path, steps: str | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, "DAGC_GPU_CHECK_DRY_RUN": "1",
           "DAGC_GPU_CHECK_NO_INSTALL": "1", "OMP_NUM_THREADS": "1"}
    env.pop("DAGC_GPU_CHECK_STEPS", None)
    if steps is not None:
        env["DAGC_GPU_CHECK_STEPS"] = steps
    return subprocess.run(["bash", str(SCRIPT)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _summary(out: Path) -> dict[str, str]:
    lines = (out / "summary.txt").read_text().splitlines()
    return dict(line.split(": ", 1) for line in lines if ": " in line and not line.startswith(" "))


def test_script_is_valid_bash():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_dry_run_reports_the_environment_and_checks_the_cuda_refusal(tmp_path):
    """The quick part of the dry run: environment report, the skip lines, and `dagc train
    --device cuda` refused in one line with exit 2 where there is no GPU."""
    res = _run(tmp_path / "out", steps="train_cuda")
    assert res.returncode == 0, res.stdout + res.stderr
    summary = _summary(tmp_path / "out")
    assert summary["mode"].startswith("dry run")
    assert summary["train_cuda"].startswith("passed")
    assert all(summary[s] == "skipped (not in DAGC_GPU_CHECK_STEPS)" for s in STEPS if s != "train_cuda")
    assert "GPU parts skipped" in res.stdout and "training steps on CUDA: skipped (no GPU)" in res.stdout
    env = json.loads((tmp_path / "out" / "environment.json").read_text())
    assert env["torch"] == torch.__version__ and isinstance(env["missing"], list)
    assert env["cuda_available"] == torch.cuda.is_available()
    if not torch.cuda.is_available():
        assert (tmp_path / "out" / "train_cuda.log").read_text().startswith("dagc: error: ")


@pytest.mark.slow
def test_full_dry_run_exercises_every_step_on_the_cpu(tmp_path):
    """Every step's CPU side: the CPU tests of tests/test_gpu.py, the training-step benchmark and
    the GPU table's code path with CPU sizes (about 70 s measured on the loaded 2-core machine)."""
    out = tmp_path / "out"
    res = _run(out)
    assert res.returncode == 0, res.stdout + res.stderr
    summary = _summary(out)
    assert all(summary[s].startswith("passed") for s in STEPS), summary
    train = json.loads((out / "gpu_train.json").read_text())
    assert train["dry_run"] and {(r["stage"], r["precision"]) for r in train["results"]} == {
        (s, p) for s in ("warmup", "search") for p in ("fp32", "bf16")}
    table = json.loads((out / "runtime_tiny_gpu.json").read_text())
    assert table["dry_run"] and set(table["batches"]["1"]) == {"supernet", "masked"}
    assert (out / "pytest_gpu.xml").exists()
