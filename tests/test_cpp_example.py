"""examples/cpp: `dagc compile --target aoti` packages, the C++ library and `dagc_run` built with CMake,
its outputs against the Python runtime, and its refusals (one line, exit 2).

The end-to-end tests compile three AOTInductor packages and build the C++ example (a few minutes
on two cores), so they are marked slow; run them with `-m slow`.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from compiler_cases import random_reduced_net

from dagc.artifact import read_manifest, sha256
from dagc.checkpoint import save_checkpoint
from dagc.compiler.compile import compile_checkpoint
from dagc.compiler.ir import CompileError
from dagc.compiler.verify import relative_error
from dagc.runtime import load
from dagc.spec import TaskSpec, preset
from dagc.tools.cli import main
from dagc.trainer.network import network_tensors

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "examples" / "cpp"
SPEC = preset("tiny", [TaskSpec("seg", "segmentation", 3), TaskSpec("cls", "classification", 4)], input_size=(16, 16))


def _checkpoint(root: Path) -> Path:
    path = root / "c.safetensors"
    save_checkpoint(path, network_tensors(random_reduced_net(SPEC, 5)), SPEC, "finetune")
    return path


def _compiler() -> str | None:
    return next((c for c in (os.environ.get("CXX"), "c++", "g++", "clang++") if c and shutil.which(c)), None)


def _start_build(build: Path) -> subprocess.Popen:
    """Configure and build examples/cpp into ``build`` in the background (it overlaps the compile)."""
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    configure = ["cmake", "-S", str(SOURCE), "-B", str(build), *generator, "-DCMAKE_BUILD_TYPE=Release",
                 f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}", f"-DPython3_EXECUTABLE={sys.executable}"]
    script = f"{subprocess.list2cmdline(configure)} && cmake --build {build} -j 2"
    return subprocess.Popen(script, shell=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(artifact dir, dagc_run path, checkpoint) — compiled with the CLI's --target aoti."""
    if shutil.which("cmake") is None or _compiler() is None:
        pytest.skip("needs cmake and a C++ compiler")
    root = tmp_path_factory.mktemp("cpp")
    build = _start_build(root / "build")
    try:
        ckpt = _checkpoint(root)
        with pytest.raises(SystemExit) as done:
            main(["compile", str(ckpt), "--target", "aoti", "--out", str(root / "art")])
        assert done.value.code == 0
    finally:
        log, _ = build.communicate()
    assert build.returncode == 0, f"building examples/cpp failed:\n{log[-4000:]}"
    return root / "art", root / "build" / "dagc_run", ckpt


def _run(exe, *args):
    return subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True, timeout=120)


def _x(batch, seed=0):
    return np.random.default_rng(seed).standard_normal((batch, SPEC.in_channels, *SPEC.input_size)).astype(np.float32)


def _one_line_error(result, *words):
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dagc_run: error: "), result.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


def test_aoti_target_without_a_cxx_compiler_is_refused_and_writes_nothing(tmp_path, monkeypatch):
    import torch._inductor.config as config

    monkeypatch.setattr(config.cpp, "cxx", (None, "dagc-no-such-compiler++"))
    with pytest.raises(CompileError, match="needs a C.. compiler.*dagc-no-such-compiler"):
        compile_checkpoint(_checkpoint(tmp_path), tmp_path / "art", target="aoti")
    assert not (tmp_path / "art").exists()


@pytest.mark.slow
def test_manifest_records_verified_packages(built):
    art, _, _ = built
    manifest = read_manifest(art)  # checks every listed file's sha256
    assert manifest["target"] == "aoti"
    rtol = manifest["verification"]["aoti_rtol"]
    for task in (None, *SPEC.task_names):
        name = "model.pt2" if task is None else f"task_{task}.pt2"
        info = manifest["models"][name]
        assert info["format"] == "aoti" and info["torch_version"] == torch.__version__
        assert info["outputs"] == (list(SPEC.task_names) if task is None else [task])
        assert info["inputs"] == ["image"]
        assert 0 <= info["verified_max_rel_error"] <= rtol
        assert manifest["files"][name]["sha256"] == sha256((art / name).read_bytes())
        assert info["flops"] == manifest["models"][info["built_from"]]["flops"]
    # one route per task subset and model format, recorded once by the compiler
    for fmt, ext in (("onnx", "onnx"), ("aoti", "pt2")):
        routes = manifest["routes"][fmt]
        assert set(routes) == {"seg", "cls", "seg,cls"}
        assert routes["seg"] == [f"task_seg.{ext}"] and routes["cls"] == [f"task_cls.{ext}"]
        assert routes["seg,cls"] == [f"model.{ext}"]


@pytest.mark.slow
@pytest.mark.parametrize("tasks,batch,model", [(None, 3, "model.pt2"), (["seg"], 1, "task_seg.pt2"),
                                               (["cls"], 5, "task_cls.pt2"), (["cls", "seg"], 2, "model.pt2")])
def test_cpp_outputs_equal_the_python_runtime(built, tmp_path, tasks, batch, model):
    art, exe, _ = built
    x = _x(batch, seed=batch)
    np.save(tmp_path / "x.npy", x)
    args = [art, tmp_path / "x.npy", "--out", tmp_path / "out"] + (["--tasks", ",".join(tasks)] if tasks else [])
    result = _run(exe, *args)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"ran {model};")
    want = load(art).run(x, tasks=tasks)
    rtol = read_manifest(art)["verification"]["aoti_rtol"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(f"{t}.npy" for t in want)
    for task, ref in want.items():
        got = np.load(tmp_path / "out" / f"{task}.npy")
        assert got.dtype == np.float32 and got.shape == ref.shape
        assert relative_error(got, ref) <= rtol, task


def _copy(art, tmp_path):
    dst = tmp_path / "art"
    shutil.copytree(art, dst)
    return dst


@pytest.mark.slow
def test_tampered_or_missing_package_is_refused(built, tmp_path):
    art, exe, _ = built
    np.save(tmp_path / "x.npy", _x(2))
    bad = _copy(art, tmp_path)
    data = bytearray((bad / "task_cls.pt2").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (bad / "task_cls.pt2").write_bytes(bytes(data))
    _one_line_error(_run(exe, bad, tmp_path / "x.npy", "--out", tmp_path / "o"), "'task_cls.pt2'", "sha256")
    (bad / "task_cls.pt2").unlink()
    _one_line_error(_run(exe, bad, tmp_path / "x.npy", "--out", tmp_path / "o"), "'task_cls.pt2'", "missing")
    shutil.rmtree(bad)
    _one_line_error(_run(exe, bad, tmp_path / "x.npy", "--out", tmp_path / "o"), "not a directory")
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_cpp_runs_the_recorded_routes_and_refuses_version_1(built, tmp_path):
    """dagc_run takes the packages from manifest.json's routes (here one rewritten to the shared
    package, which manifest.json's own checksums do not cover), and refuses a version-1 manifest,
    which records none."""
    art, exe, _ = built
    x = _x(2)
    np.save(tmp_path / "x.npy", x)
    routed = _copy(art, tmp_path)
    manifest = json.loads((routed / "manifest.json").read_text())
    manifest["routes"]["aoti"]["cls"] = ["model.pt2"]
    (routed / "manifest.json").write_text(json.dumps(manifest))
    result = _run(exe, routed, tmp_path / "x.npy", "--tasks", "cls", "--out", tmp_path / "o")
    assert result.returncode == 0 and result.stdout.startswith("ran model.pt2;"), result
    ref = load(art).run(x, ["cls"])["cls"]
    assert relative_error(np.load(tmp_path / "o" / "cls.npy"), ref) <= manifest["verification"]["aoti_rtol"]
    del manifest["routes"]
    (routed / "manifest.json").write_text(json.dumps({**manifest, "format_version": 1}))
    _one_line_error(_run(exe, routed, tmp_path / "x.npy", "--out", tmp_path / "o1"), "format version 1",
                    "--target aoti")


@pytest.mark.slow
def test_bad_requests_are_one_line_errors(built, tmp_path):
    art, exe, _ = built
    np.save(tmp_path / "x.npy", _x(2))
    np.save(tmp_path / "small.npy", np.zeros((2, 3, 8, 16), np.float32))
    np.save(tmp_path / "flat.npy", np.zeros((3, 16, 16), np.float32))
    np.save(tmp_path / "f64.npy", _x(2).astype(np.float64))
    out = ["--out", tmp_path / "o"]
    _one_line_error(_run(exe, art, tmp_path / "x.npy", "--tasks", "seg,nope", *out), "unknown task", "'nope'",
                    "'seg', 'cls'")
    _one_line_error(_run(exe, art, tmp_path / "x.npy", "--tasks", "seg,seg", *out), "more than once")
    _one_line_error(_run(exe, art, tmp_path / "small.npy", *out), "(2, 3, 8, 16)", "(batch, 3, 16, 16)")
    _one_line_error(_run(exe, art, tmp_path / "flat.npy", *out), "(3, 16, 16)", "(batch, 3, 16, 16)")
    _one_line_error(_run(exe, art, tmp_path / "f64.npy", *out), "float32", "'<f8'")
    _one_line_error(_run(exe, art, tmp_path / "missing.npy", *out), "cannot read", "missing.npy")
    _one_line_error(_run(exe, art, tmp_path / "x.npy"), "--out DIR is required")
    _one_line_error(_run(exe, art, tmp_path / "x.npy", "--frobnicate", *out), "unknown option --frobnicate")
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_artifact_without_packages_says_how_to_compile_one(built, tmp_path):
    _, exe, ckpt = built
    compile_checkpoint(ckpt, tmp_path / "onnx_only")
    np.save(tmp_path / "x.npy", _x(1))
    _one_line_error(_run(exe, tmp_path / "onnx_only", tmp_path / "x.npy", "--out", tmp_path / "o"),
                    "no AOTInductor packages", "--target aoti")


@pytest.mark.slow
def test_per_task_inputs(built, tmp_path):
    _, exe, _ = built
    spec = preset("omniglot", [TaskSpec("a", "classification", 5), TaskSpec("b", "classification", 3)],
                  in_channels=1, shared_input=False, input_size=(8, 8))
    path = tmp_path / "p.safetensors"
    save_checkpoint(path, network_tensors(random_reduced_net(spec, 6)), spec, "finetune")
    art = tmp_path / "art"
    compile_checkpoint(path, art, target="aoti")
    rng = np.random.default_rng(1)
    x = {t: rng.standard_normal((3, 1, 8, 8)).astype(np.float32) for t in ("a", "b")}
    for t, v in x.items():
        np.save(tmp_path / f"{t}.npy", v)
    rtol = read_manifest(art)["verification"]["aoti_rtol"]
    engine = load(art)
    for tasks, feeds, model in [(["a", "b"], ["a", "b"], "model.pt2"), (["b"], ["b"], "task_b.pt2")]:
        out = tmp_path / f"out_{'_'.join(tasks)}"
        result = _run(exe, art, *(f"{t}={tmp_path / f'{t}.npy'}" for t in feeds), "--tasks", ",".join(tasks),
                      "--out", out)
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith(f"ran {model};")
        want = engine.run({t: x[t] for t in feeds}, tasks=tasks)
        for task, ref in want.items():
            assert relative_error(np.load(out / f"{task}.npy"), ref) <= rtol, task
    _one_line_error(_run(exe, art, tmp_path / "a.npy", "--out", tmp_path / "o"), "one input per task")
    _one_line_error(_run(exe, art, f"a={tmp_path / 'a.npy'}", "--out", tmp_path / "o"), "no images for task 'b'")
    _one_line_error(_run(exe, art, f"zz={tmp_path / 'a.npy'}", "--out", tmp_path / "o"), "unknown input 'zz'")
