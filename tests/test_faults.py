"""Faults from the machine (issue 25): a full device, legal but long names, a server log aimed at
the artifact, `kill -9` of `dagc serve`, export options beyond what Triton's format holds. Each
keeps the error contract: exit 2 and one `dagc: error:` line (or the documented exception), no
traceback, nothing half-written, nothing the user had lost.

A full device is a real tmpfs of a few KiB where this machine lets the test mount one, and
everywhere a write wrapper that raises ENOSPC at the Nth byte (`Small`)."""

import builtins
import errno
import hashlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from compiler_cases import random_reduced_net
from PIL import Image
from serve_cases import needs_server

from dagc import checkpoint as checkpoint_module
from dagc.artifact import MANIFEST, load_manifest
from dagc.checkpoint import load_checkpoint, save_checkpoint
from dagc.compiler.compile import compile_checkpoint
from dagc.errors import BenchError, DagcError
from dagc.spec import TaskSpec, preset
from dagc.tools.bench_report import write_json
from dagc.tools.cli import main
from dagc.tools.serve import ServeConfig, TritonServer
from dagc.tools.triton import TritonConfig
from dagc.trainer.network import network_tensors
from dagc.trainer.train import TrainConfig, train


def name_max(d: Path) -> int:
    return os.pathconf(d, "PC_NAME_MAX")


SPEC = preset("tiny", [TaskSpec("seg", "segmentation", 3), TaskSpec("depth", "depth")], input_size=(8, 8))
FAST = dict(warmup_iters=4, search_iters=6, finetune_iters=4, batch_size=4, n_train=24, n_test=8,
            save_every=2, log_every=2)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """Two checkpoints of different weights and the artifact of the first."""
    root = tmp_path_factory.mktemp("faults")
    for seed in (1, 2):
        save_checkpoint(root / f"c{seed}.safetensors", network_tensors(random_reduced_net(SPEC, seed)), SPEC,
                        "finetune")
    compile_checkpoint(root / "c1.safetensors", root / "art")
    return root


def _tree(d: Path) -> dict:
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(d.rglob("*"))}


def _cli(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return e.value.code, out, err


def _refused(argv, capsys, *words):
    code, out, err = _cli(argv, capsys)
    lines = err.strip().splitlines()
    assert code == 2, (out, err)
    assert len(lines) == 1 and lines[0].startswith("dagc: error:") and "Traceback" not in err, err
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


# ---------------------------------------------------------------------------------------------------
# a small device

class _Budget:
    def __init__(self, root: Path):
        self.root, self.left = str(root) + os.sep, None


class _Limited:
    """A file opened for writing under the small directory: ENOSPC once its budget is spent."""

    def __init__(self, f, budget: _Budget):
        self._f, self._budget = f, budget

    def write(self, data):
        n = len(memoryview(data).cast("B")) if not isinstance(data, str) else len(data.encode())
        left = self._budget.left
        if left is not None and n > left:
            self._budget.left = 0
            if left:
                self._f.write(data[:left])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        if left is not None:
            self._budget.left = left - n
        return self._f.write(data)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


class Small:
    """A directory on a device that can be made nearly full: ``limit(n)`` lets only ``n`` more
    bytes fit. ``tmpfs``: a real tmpfs, resized with ``mount -o remount``; ``wrapper``: every file
    opened for writing under it (and safetensors' writer) raises ENOSPC at the n-th byte."""

    def __init__(self, path: Path, kind: str, monkeypatch):
        self.path, self.kind = path, kind
        path.mkdir()
        if kind == "tmpfs":
            r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m,mode=0755", "tmpfs", str(path)],
                               capture_output=True, text=True)
            if r.returncode != 0:
                pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip()}); the wrapper case covers it")
            return
        self.budget = _Budget(path)
        real_open = builtins.open

        def limited_open(file, mode="r", *args, **kwargs):
            f = real_open(file, mode, *args, **kwargs)
            if (isinstance(file, (str, os.PathLike)) and any(c in mode for c in "wax+")
                    and os.path.abspath(file).startswith(self.budget.root)):
                return _Limited(f, self.budget)
            return f

        def save_file(tensors, filename, metadata=None):  # safetensors writes from Rust: route it here
            from safetensors.torch import save
            with limited_open(filename, "wb") as f:
                f.write(save(tensors, metadata=metadata))

        monkeypatch.setattr(builtins, "open", limited_open)
        monkeypatch.setattr(io, "open", limited_open)
        monkeypatch.setattr(checkpoint_module, "save_file", save_file)

    def limit(self, free: int) -> None:
        if self.kind == "wrapper":
            self.budget.left = free
            return
        st = os.statvfs(self.path)
        used = (st.f_blocks - st.f_bfree) * st.f_frsize
        subprocess.run(["mount", "-o", f"remount,size={used + free}", str(self.path)], check=True)

    def close(self) -> None:
        if self.kind == "tmpfs":
            subprocess.run(["umount", "-l", str(self.path)], capture_output=True)


@pytest.fixture(params=["tmpfs", "wrapper"])
def small(request, tmp_path, monkeypatch):
    s = Small(tmp_path / "small", request.param, monkeypatch)
    yield s
    s.close()


def _no_leftovers(d: Path) -> None:
    hidden = [p.name for p in d.rglob(".*")]
    assert not hidden, f"temporary files left: {hidden}"


# ---------------------------------------------------------------------------------------------------
# class 1: a full device

def test_compile_to_a_full_device_is_one_line_and_leaves_nothing(base, small, capsys):
    small.limit(16 * 1024)
    _refused(["compile", base / "c1.safetensors", "--out", small.path / "art"], capsys,
             f"cannot write {small.path / 'art'}", "the device is full")
    assert os.listdir(small.path) == []


def test_compile_force_on_a_full_device_keeps_the_old_artifact(base, small, capsys):
    code, _, err = _cli(["compile", base / "c1.safetensors", "--out", small.path / "art"], capsys)
    assert code == 0, err
    before = _tree(small.path / "art")
    small.limit(16 * 1024)
    _refused(["compile", base / "c2.safetensors", "--out", small.path / "art", "--force"], capsys,
             "the device is full", "the existing one is unchanged")
    assert _tree(small.path / "art") == before and os.listdir(small.path) == ["art"]
    load_manifest(small.path / "art")  # every file verified


def test_run_on_a_full_device_says_what_was_written_completely(base, small, capsys, tmp_path):
    images = []
    for k in range(3):
        images.append(tmp_path / f"img{k}.npy")
        np.save(images[-1], np.random.default_rng(k).random((3, 8, 8), dtype=np.float32))
    small.limit(3 * 4096 + 512 if small.kind == "tmpfs" else 3000)
    line = _refused(["run", base / "art", *images, "--out", small.path / "out"], capsys, "the device is full")
    m = re.search(r"(\d+) of 12 output files had been written completely", line)
    assert m and 0 < int(m.group(1)) < 12, line
    files = sorted((small.path / "out").iterdir())
    assert len(files) == int(m.group(1))
    _no_leftovers(small.path)
    for f in files:  # each one complete
        if f.suffix == ".npy":
            assert np.load(f).shape[-2:] == (8, 8)
        elif f.suffix == ".png":
            Image.open(f).load()
        else:
            json.loads(f.read_text())


def test_bench_json_on_a_full_device_is_a_bench_error(small):
    small.limit(1024)
    with pytest.raises(BenchError, match="the device is full") as e:
        write_json({"numbers": list(range(2000))}, small.path / "bench.json")
    assert str(small.path / "bench.json") in str(e.value)
    assert os.listdir(small.path) == []


def test_training_on_a_full_device_stops_with_one_line_and_resumes_to_the_same_model(small, tmp_path, capsys):
    full = tmp_path / "full"
    train(TrainConfig(**FAST), full, progress=False)
    run = small.path / "run"
    small.limit(int(1.5 * (full / "state.safetensors").stat().st_size))
    with pytest.raises(DagcError, match="the device is full") as e:
        train(TrainConfig(**FAST), run, progress=False)
    assert f"dagc train --resume {run}" in str(e.value)
    assert "Traceback" not in capsys.readouterr().err  # no logging error printed either
    _no_leftovers(run)
    load_checkpoint(run / "state.safetensors")  # the last state is whole
    small.limit(64 * 1024 * 1024)
    train(None, run, resume=True, progress=False)
    a = load_checkpoint(full / "checkpoint.safetensors").tensors
    b = load_checkpoint(run / "checkpoint.safetensors").tensors
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], msg=k)


# ---------------------------------------------------------------------------------------------------
# class 2: names that are legal for the final file

def test_a_long_but_legal_out_name_compiles(base, tmp_path, capsys):
    out = tmp_path / ("a" * 250)
    code, _, err = _cli(["compile", base / "c1.safetensors", "--out", out], capsys)
    assert code == 0, err
    load_manifest(out)
    code, _, err = _cli(["compile", base / "c2.safetensors", "--out", out, "--force"], capsys)
    assert code == 0, err
    assert sorted(os.listdir(tmp_path)) == [out.name]


def test_run_on_an_input_with_a_long_stem(base, tmp_path, capsys):
    stem = "i" * (name_max(tmp_path) - len("_depth.json"))  # the longest output name is exactly the limit
    image = tmp_path / f"{stem}.npy"
    np.save(image, np.zeros((3, 8, 8), np.float32))
    code, out, err = _cli(["run", base / "art", image, "--out", tmp_path / "out"], capsys)
    assert code == 0, err
    assert len(os.listdir(tmp_path / "out")) == 4
    longer = tmp_path / f"{stem}xx.npy"
    np.save(longer, np.zeros((3, 8, 8), np.float32))
    _refused(["run", base / "art", longer, "--out", tmp_path / "out2"], capsys,
             f"at most {name_max(tmp_path)} bytes in a name")
    assert not (tmp_path / "out2").exists()


def test_a_killed_write_to_a_long_name_is_cleaned_up_by_the_next(base, tmp_path, capsys):
    """The shortened temporary name is the same rule for every process: the next write finds what
    a killed one left (`remove_stale`)."""
    # imported here: dagc.writing is new with the fix, and the other tests run on older code too
    from dagc import outputs
    from dagc.writing import tmp_sibling

    out = tmp_path / ("a" * 250)
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    stale = tmp_sibling(out, f".dagc-tmp-{outputs._host()}-{p.pid}-0000000a", reserve=outputs._TMP_TAIL)
    stale.mkdir()
    (stale / ".dagc-tmp.json").write_text(json.dumps({"format": "dagc.tmp", "files": ["model.onnx"]}))
    (stale / "model.onnx").write_bytes(b"half")
    assert len(os.fsencode(stale.name)) <= name_max(tmp_path)
    code, _, err = _cli(["compile", base / "c1.safetensors", "--out", out], capsys)
    assert code == 0, err
    assert sorted(os.listdir(tmp_path)) == [out.name]


@pytest.mark.parametrize("argv", [
    ["compile", "{c1}", "--out", "{tmp}/" + "a" * 300],
    ["export", "triton", "{art}", "--out", "{tmp}/" + "r" * 300],
    ["export", "triton", "{art}", "--out", "{tmp}/repo", "--name", "n" * 250],
    ["run", "{art}", "{c1}", "--out", "{tmp}/" + "o" * 300],
    ["train", "--out", "{tmp}/" + "t" * 300],
    ["train", "--resume", "{tmp}/" + "t" * 300],
    ["recalibrate", "{c1}", "--out", "{tmp}/" + "c" * 300],
    ["inspect", "{tmp}/" + "i" * 300],
    ["evaluate", "{tmp}/" + "e" * 300],
])
def test_a_name_that_cannot_fit_is_one_line_naming_the_limit(base, tmp_path, capsys, argv):
    argv = [a.format(c1=base / "c1.safetensors", art=base / "art", tmp=tmp_path) for a in argv]
    _refused(argv, capsys, f"at most {name_max(tmp_path)} bytes in a name")
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------------------------------
# class 3: the server's log

@pytest.mark.parametrize("where", [MANIFEST, "report.md", "new.log"])
def test_serve_refuses_a_log_inside_the_artifact(base, tmp_path, capsys, where):
    before = _tree(base / "art")
    _refused(["serve", base / "art", "--server-log", base / "art" / where, "--http-port", "0", "--grpc-port", "0",
              "--no-metrics"], capsys, "--server-log", "lies inside the artifact")
    assert _tree(base / "art") == before


# ---------------------------------------------------------------------------------------------------
# class 5: export options at the edge of what Triton's model configuration holds

@pytest.mark.parametrize("option, value, words", [
    ("--max-batch", 3_000_000_000, "max_batch_size must be an integer >= 1 and <= 2147483647"),
    ("--max-batch", 2**31, "max_batch_size"),
    ("--instances", 2**31, "instances must be an integer >= 1 and <= 2147483647"),
    ("--max-queue-delay-us", 2**64, "max_queue_delay_us must be an integer >= 0 and <= 18446744073709551615"),
    ("--threads", 2**31, "intra_op_threads must be an integer >= 0 and <= 2147483647"),
])
@pytest.mark.parametrize("command", ["export", "serve"])
def test_export_options_beyond_the_format_are_refused_before_writing(base, tmp_path, capsys, option, value, words,
                                                                     command):
    if command == "export":
        argv = ["export", "triton", base / "art", "--out", tmp_path / "repo", "--backend", "python"]
    else:
        argv = ["serve", base / "art", "--http-port", "0", "--grpc-port", "0", "--no-metrics"]
    _refused([*argv, option, value], capsys, words)
    assert os.listdir(tmp_path) == []


def test_the_largest_legal_batch_is_written():
    assert TritonConfig(max_batch_size=2**31 - 1).max_batch_size == 2**31 - 1


# ---------------------------------------------------------------------------------------------------
# class 4: kill -9 of dagc serve

def _descendants(pid: int) -> set[int]:
    """Every live process below ``pid`` (from /proc)."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(d.name))
    out, todo = set(), [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.add(c)
            todo.append(c)
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@needs_server
def test_kill_9_of_serve_leaves_no_process_and_frees_its_ports(base, tmp_path):
    http, grpc = _free_port(), _free_port()
    log = tmp_path / "logs" / "new" / "server.log"  # a directory that does not exist yet
    env = {**os.environ, "TMPDIR": str(tmp_path / "tmp"), "OMP_NUM_THREADS": "1"}
    (tmp_path / "tmp").mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "dagc", "serve", str(base / "art"), "--http-port", str(http),
                             "--grpc-port", str(grpc), "--no-metrics", "--threads", "1", "--server-log", str(log)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        for line in proc.stdout:
            if line.startswith("Ctrl-C"):
                break
        tree = _descendants(proc.pid)
        assert len(tree) >= 3, "the watcher, the server and its stubs"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        deadline = time.monotonic() + 10
        while any(_alive(p) for p in tree) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [p for p in tree if _alive(p)], "processes of the killed dagc serve still run after 10 s"
    finally:
        if proc.poll() is None:
            proc.kill()
    assert log.is_file() and log.stat().st_size > 0
    assert os.listdir(tmp_path / "tmp") == [], "the watcher removes the server's temporary directory"
    # a restart on the same ports works at once
    triton = TritonConfig(backend="python", intra_op_threads=1)
    with TritonServer(base / "art", ServeConfig(http_port=http, grpc_port=grpc, metrics_port=None,
                                                triton=triton)) as s:
        assert s.ports["http"] == http
