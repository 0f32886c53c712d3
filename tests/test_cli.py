"""`dagc train` from the command line: bad input gives one line and exit code 2, never a traceback."""

import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from dagc.spec import PRESETS
from dagc.tools.cli import cli, main
from dagc.trainer.datasets import DATASETS

FAST = ["--warmup-iters", "2", "--search-iters", "2", "--finetune-iters", "2", "--batch-size", "4", "--quiet"]


def _run(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    out, err = capsys.readouterr()
    return e.value.code, out, err


@pytest.mark.parametrize("args, words", [
    (["--dataset", "imagenet"], "unknown dataset"),
    (["--preset", "resnet"], "unknown preset"),
    (["--tasks", "segmentation,colour"], "unknown task"),
    (["--flow-constant", "0"], "flow_constant"),
    (["--warmup-iters", "0"], "warmup_iters"),
    (["--finetune-iters", "-1"], "finetune_iters"),
    (["--search-iters", "many"], "not a valid integer"),
    (["--device", "tpu"], "device"),
])
def test_bad_options_give_one_line_and_exit_2(tmp_path, capsys, args, words):
    code, out, err = _run(["train", "--out", str(tmp_path / "run"), *args], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dagc: error:") and words in lines[0], err
    assert "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_unwritable_output_directory(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, _, err = _run(["train", "--out", str(blocker / "run"), *FAST], capsys)
    assert code == 2 and "cannot write" in err and len(err.strip().splitlines()) == 1


def test_resume_refuses_missing_truncated_and_foreign_runs(tmp_path, capsys):
    code, _, err = _run(["train", "--resume", str(tmp_path / "none")], capsys)
    assert code == 2 and "not a run directory" in err
    (tmp_path / "empty").mkdir()
    code, _, err = _run(["train", "--resume", str(tmp_path / "empty")], capsys)
    assert code == 2 and "no resumable run" in err
    trunc = tmp_path / "trunc"
    trunc.mkdir()
    (trunc / "state.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{")
    code, _, err = _run(["train", "--resume", str(trunc)], capsys)
    assert code == 2 and "truncated" in err
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    save_file({"w": torch.zeros(1)}, str(foreign / "state.safetensors"))
    code, _, err = _run(["train", "--resume", str(foreign)], capsys)
    assert code == 2 and "not a dagc checkpoint" in err
    for e in (err,):
        assert len(e.strip().splitlines()) == 1


def test_out_and_resume_are_exclusive(tmp_path, capsys):
    code, _, err = _run(["train"], capsys)
    assert code == 2 and "exactly one of --out" in err
    code, _, err = _run(["train", "--resume", str(tmp_path), "--preset", "tiny"], capsys)
    assert code == 2 and "own configuration" in err


def test_console_script_trains_and_prints_a_summary(tmp_path):
    run = tmp_path / "run"
    res = subprocess.run([sys.executable, "-m", "dagc", "train", "--out", str(run), *FAST],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "segmentation" in res.stdout and "checkpoint.safetensors" in res.stdout
    res = subprocess.run([sys.executable, "-m", "dagc", "train", "--out", str(run), *FAST],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "already holds a run" in res.stderr and "Traceback" not in res.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without a GPU")
def test_cuda_without_a_gpu_is_one_line(tmp_path, capsys):
    code, _, err = _run(["train", "--out", str(tmp_path / "run"), "--device", "cuda", *FAST], capsys)
    assert code == 2 and "no CUDA GPU" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_train_choices_in_the_help_come_from_the_registries():
    helps = {p.name: p.help for p in cli.commands["train"].params}
    assert all(name in helps["dataset"] for name in DATASETS)
    assert all(name in helps["preset"] for name in PRESETS)
