"""Hostile and careless inputs (issue 13, content validation): corrupted checkpoints, training states,
artifacts, manifests, images and runtime arguments. Each case asserts the contract: from the CLI one
``dagc: error:`` line, exit 2, no traceback; from the API the documented DagcError subclass; or the
correct result where the input is legal (16-bit PNGs, batches of any size)."""

import hashlib
import io
import json
import shutil
import struct
import subprocess
import sys
import textwrap
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from compiler_cases import random_reduced_net
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from dagc.checkpoint import save_checkpoint
from dagc.compiler.compile import compile_artifact, compile_checkpoint
from dagc.errors import ArtifactError, CheckpointError, CompileError, ConfigError, DagcError, InputError
from dagc.manifest import Manifest
from dagc.modelcheck import check_model, verify_artifact
from dagc.runtime import load
from dagc.runtime.images import MAX_PIXELS, NoPreprocessingWarning, read_image, run_images
from dagc.spec import TaskSpec, preset
from dagc.tools.cli import main
from dagc.trainer.config import TrainConfig
from dagc.trainer.state import resume_run
from dagc.trainer.train import train

PRE = {"raw": "RGB in [0, 1]", "raw_range": [0.0, 1.0], "layout": "NCHW", "dtype": "float32",
       "mean": [0.4, 0.5, 0.3], "std": [0.2, 0.25, 0.15], "formula": "(raw - mean) / std per channel"}
FAST = dict(warmup_iters=4, search_iters=6, finetune_iters=4, batch_size=4, n_train=24, n_test=8,
            save_every=2, log_every=2)
WEIGHT = "theta.edges.0_1.conv.weight"


def _cli(argv, capsys):
    """Run the CLI in-process; returns (exit code, stderr)."""
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in argv])
    return e.value.code, capsys.readouterr().err


def _one_error(code, err, *words):
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("dagc: error: "), err
    assert "Traceback" not in err
    for w in words:
        assert w in lines[0], lines[0]


def _subprocess(*argv):
    """The CLI in its own process (a crash or Pillow's warnings would show); returns (code, stderr)."""
    r = subprocess.run([sys.executable, "-m", "dagc", *map(str, argv)], capture_output=True, text=True, timeout=300)
    return r.returncode, r.stderr


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """(checkpoint, artifact) of a small two-task network with preprocessing."""
    root = tmp_path_factory.mktemp("hostile")
    spec = preset("tiny", [TaskSpec("seg", "segmentation", 3), TaskSpec("depth", "depth")], input_size=(16, 16))
    ckpt = root / "c.safetensors"
    save_checkpoint(ckpt, {k: v for k, v in _tensors(spec).items()}, spec, "finetune", preprocessing=PRE)
    compile_checkpoint(ckpt, root / "art")
    return ckpt, root / "art"


def _tensors(spec):
    from dagc.trainer.network import network_tensors

    return network_tensors(random_reduced_net(spec, 3))


# --------------------------------------------------------------------------------------------- checkpoints


def _relabel(src: Path, dst: Path, tensor: str, dtype: str) -> Path:
    """Rewrite the safetensors header so that ``tensor`` claims ``dtype`` (same byte size)."""
    data = src.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    header[tensor]["dtype"] = dtype
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    dst.write_bytes(len(text).to_bytes(8, "little") + text + data[8 + n:])
    return dst


def _rewrite(src: Path, dst: Path, tensors=None, meta=None) -> Path:
    with safe_open(str(src), "pt") as f:
        t = {k: f.get_tensor(k) for k in f.keys()}
        m = dict(f.metadata())
    (tensors or (lambda t: None))(t)
    (meta or (lambda m: None))(m)
    save_file(t, str(dst), metadata=m)
    return dst


def _poke(name, value):
    def f(t):
        t[name] = t[name].clone()
        t[name].view(-1)[0] = value
    return f


@pytest.mark.parametrize("tensor, dtype", [
    (WEIGHT, "I32"), ("theta.read_in.0.bn.running_var", "I32"), ("arch.gamma", "I32"),
    ("theta.read_out.2.conv.weight", "U32"),
])
def test_a_relabelled_tensor_dtype_is_refused(compiled, tmp_path, capsys, tensor, dtype):
    bad = _relabel(compiled[0], tmp_path / "bad.safetensors", tensor, dtype)
    code, err = _cli(["compile", bad, "--out", tmp_path / "art"], capsys)
    _one_error(code, err, tensor, "dtype", "float32")
    assert not (tmp_path / "art").exists()


@pytest.mark.parametrize("tensor, value", [
    (WEIGHT, float("nan")), ("theta.read_in.0.bn.running_var", float("inf")), ("arch.alpha", float("-inf")),
])
def test_non_finite_weights_are_refused_at_load(compiled, tmp_path, capsys, tensor, value):
    bad = _rewrite(compiled[0], tmp_path / "bad.safetensors", tensors=_poke(tensor, value))
    with pytest.raises(CheckpointError, match=rf"{tensor} has 1 NaN or infinite"):
        compile_artifact(bad, tmp_path / "art")
    _one_error(*_cli(["inspect", bad], capsys), tensor, "NaN or infinite")


@pytest.mark.parametrize("command", ["compile", "inspect"])
def test_non_json_preprocessing_is_one_line(compiled, tmp_path, capsys, command):
    bad = _rewrite(compiled[0], tmp_path / "bad.safetensors", meta=lambda m: m.update(preprocessing="{mean: 1"))
    argv = [command, bad] + (["--out", tmp_path / "art"] if command == "compile" else [])
    _one_error(*_cli(argv, capsys), "'preprocessing' is not valid JSON")


def test_preprocessing_for_the_wrong_channel_count_is_refused_at_compile(compiled, tmp_path):
    two = {**PRE, "mean": [0.4, 0.5], "std": [0.2, 0.25]}
    bad = _rewrite(compiled[0], tmp_path / "bad.safetensors", meta=lambda m: m.update(preprocessing=json.dumps(two)))
    with pytest.raises(CheckpointError, match="2 means and stds for 3-channel"):
        compile_artifact(bad, tmp_path / "art")


# --------------------------------------------------------------------------------------------- training states


@pytest.fixture(scope="module")
def state(tmp_path_factory):
    """A run interrupted in the search stage (step 4 of 6): its directory."""
    run = tmp_path_factory.mktemp("state") / "run"

    class Stop(Exception):
        pass

    def stop(r):
        if r.stage == "search" and r.step == 5:
            raise Stop

    with pytest.raises(Stop):
        train(TrainConfig(**FAST), run, progress=False, on_step=stop)
    return run


def _broken_run(state, tmp_path, tensors=None, meta=None) -> Path:
    run = tmp_path / "run"
    shutil.copytree(state, run)
    _rewrite(state / "state.safetensors", run / "state.safetensors", tensors, meta)
    return run


def _set(key, value):
    return lambda m: m.update({key: value if isinstance(value, str) else json.dumps(value)})


def _replace(name, make):
    return lambda t: t.update({name: make(t[name])})


STATE_CASES = {
    "exp_avg shape": (_replace("optim.0.exp_avg", lambda v: torch.zeros(3)), None, "optim.0.exp_avg"),
    "exp_avg_sq dtype": (_replace("optim.1.exp_avg_sq", lambda v: v.double()), None, "optim.1.exp_avg_sq"),
    "step shape": (_replace("optim.2.step", lambda v: torch.zeros(2)), None, "optim.2.step"),
    "negative step count": (_replace("optim.2.step", lambda v: torch.tensor(-1.0)), None, "optim.2.step"),
    "unknown parameter id": (lambda t: t.update({"optim.9999.exp_avg": torch.zeros(1)}), None, "optim.9999"),
    "malformed name": (lambda t: t.update({"optim.x": torch.zeros(1)}), None, "optim.x"),
    "rewind shape": (_replace(f"rewind.{WEIGHT[6:]}", lambda v: v[:1]), None, "rewind."),
    "no rewind in search": (lambda t: [t.pop(k) for k in [k for k in t if k.startswith("rewind.")]], None, "rewind"),
    "history not JSON": (None, _set("history", "{oops"), "'history' is not valid JSON"),
    "history a list": (None, _set("history", [1, 2]), "'history' must map"),
    "negative progress step": (None, _set("progress", {"stage": "search", "step": -1}), "step -1"),
    "step beyond the stage": (None, _set("progress", {"stage": "search", "step": 60}), "steps 0..6"),
    "step not an integer": (None, _set("progress", {"stage": "search", "step": "4"}), "step '4'"),
    "progress not JSON": (None, _set("progress", "[["), "'progress' is not valid JSON"),
    "seconds negative": (None, _set("seconds", -5), "'seconds'"),
    "optimizer groups missing": (None, _set("optimizer", {"groups": []}), "param_groups"),
}


@pytest.mark.parametrize("case", sorted(STATE_CASES))
def test_a_corrupted_training_state_is_refused_before_use(state, tmp_path, case):
    tensors, meta, words = STATE_CASES[case]
    run = _broken_run(state, tmp_path, tensors, meta)
    with pytest.raises(CheckpointError) as e:
        resume_run(run)
    assert words in str(e.value)


def test_resume_with_a_wrong_shaped_adam_state_is_one_line_not_a_crash(state, tmp_path):
    run = _broken_run(state, tmp_path, _replace("optim.0.exp_avg", lambda v: torch.zeros(3)))
    before = (run / "state.safetensors").read_bytes()
    _one_error(*_subprocess("train", "--resume", run, "--quiet"), "optim.0.exp_avg", "(3,)")
    assert (run / "state.safetensors").read_bytes() == before  # nothing lost


@pytest.mark.parametrize("which", ["search state", "reduced fine-tuning state"])
@pytest.mark.parametrize("command", ["compile", "inspect"])
def test_a_training_state_is_not_compiled(state, compiled, tmp_path, capsys, which, command):
    # Reduced or not, a state.safetensors is mid-training and records no preprocessing: its
    # artifact would take un-normalised pixels without a word.
    path = state / "state.safetensors"
    if which.startswith("reduced"):
        path = _rewrite(compiled[0], tmp_path / "state.safetensors",
                        meta=lambda m: (m.pop("preprocessing"), m.update(progress='{"stage": "finetune", "step": 2}')))
    argv = [command, path] + (["--out", tmp_path / "a"] if command == "compile" else [])
    _one_error(*_cli(argv, capsys), "resumable training state", "use the run's checkpoint.safetensors")
    assert not (tmp_path / "a").exists()


# --------------------------------------------------------------------------------------------- artifacts


def _rehash(art: Path, manifest: dict, name: str) -> None:
    data = (art / name).read_bytes()
    manifest["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


def _swap(src, dst):
    def f(art, m):
        shutil.copy(art / src, art / dst)
        _rehash(art, m, dst)
    return f


def _cut(name, keep):
    def f(art, m):
        data = (art / name).read_bytes()
        (art / name).write_bytes(data[:keep(len(data))])
        _rehash(art, m, name)
    return f


def _garbage(art, m):
    (art / "task_depth.onnx").write_bytes(b"\x08\x07" + bytes(range(256)) * 4)
    _rehash(art, m, "task_depth.onnx")


def _opset(art, m):
    m["models"]["model.onnx"]["opset"] = 13


def _means(art, m):
    m["input"]["preprocessing"].update(mean=[0.1, 0.2], std=[0.3, 0.4])


ARTIFACT_CASES = {
    "per-task model of another task": (_swap("task_depth.onnx", "task_seg.onnx"), "task_seg.onnx"),
    "shared model replaced by a task's": (_swap("task_seg.onnx", "model.onnx"), "model.onnx"),
    "truncated to half": (_cut("model.onnx", lambda n: n // 2), "model.onnx"),
    "truncated by a few bytes": (_cut("task_seg.onnx", lambda n: n - 7), "task_seg.onnx"),
    "not a protobuf": (_garbage, "task_depth.onnx"),
    "opset differs": (_opset, "opset"),
    "two means for three channels": (_means, "2 means and stds for 3-channel"),
}


def _broken_artifact(compiled, tmp_path, case) -> Path:
    art = tmp_path / "art"
    shutil.copytree(compiled[1], art)
    manifest = json.loads((art / "manifest.json").read_text())
    ARTIFACT_CASES[case][0](art, manifest)
    (art / "manifest.json").write_text(json.dumps(manifest))
    return art


@pytest.mark.parametrize("case", sorted(ARTIFACT_CASES))
def test_a_model_file_that_is_not_the_declared_model_is_refused_at_load(compiled, tmp_path, case):
    art = _broken_artifact(compiled, tmp_path, case)
    for backend in ("onnxruntime", "torch"):
        with pytest.raises(ArtifactError, match=ARTIFACT_CASES[case][1]):
            load(art, backend)


@pytest.mark.parametrize("case", sorted(ARTIFACT_CASES))
def test_inspect_verifies_what_load_verifies(compiled, tmp_path, capsys, case):
    art = _broken_artifact(compiled, tmp_path, case)
    _one_error(*_cli(["inspect", art], capsys), ARTIFACT_CASES[case][1])


@pytest.mark.parametrize("case", ["per-task model of another task", "truncated to half", "not a protobuf"])
def test_export_triton_refuses_a_wrong_model_and_writes_nothing(compiled, tmp_path, capsys, case):
    art = _broken_artifact(compiled, tmp_path, case)
    _one_error(*_cli(["export", "triton", art, "--out", tmp_path / "repo"], capsys), ARTIFACT_CASES[case][1])
    assert not (tmp_path / "repo").exists()


def _pt2(members) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    return buf.getvalue()


GOOD_PT2 = {"model/archive_format": b"pt2", "model/data/aotinductor/model/model.wrapper.so": b"\x7fELF" + bytes(64)}
PACKAGES = {
    "not a zip": (b"PK\x03\x04 not really", "not a readable AOTInductor package"),
    "truncated": (_pt2(GOOD_PT2)[:-30], "not a readable AOTInductor package"),
    "no archive_format": (_pt2({"model/data/aotinductor/model/x.so": b"x"}), "not an AOTInductor package"),
    "no model inside": (_pt2({"model/archive_format": b"pt2"}), "not an AOTInductor package"),
}


@pytest.mark.parametrize("case", sorted(PACKAGES))
def test_an_aoti_package_must_be_a_complete_pt2_archive(compiled, case):
    d = json.loads((compiled[1] / "manifest.json").read_text())
    d["models"]["model.pt2"] = {**d["models"]["model.onnx"], "format": "aoti", "torch_version": torch.__version__,
                                "batch": {"min": 1, "max": 8}, "built_from": "model.onnx"}
    d["models"]["model.pt2"].pop("opset")
    d["files"]["model.pt2"] = {"sha256": "0" * 64}
    manifest = Manifest.from_dict(d)
    check_model(manifest, "model.pt2", _pt2(GOOD_PT2))  # the layout torch.export's pt2 archive has
    data, words = PACKAGES[case]
    with pytest.raises(ArtifactError, match=words):
        check_model(manifest, "model.pt2", data)


def test_the_intact_artifact_verifies(compiled):
    assert set(verify_artifact(compiled[1]).models) == {"model.onnx", "task_seg.onnx", "task_depth.onnx"}


# --------------------------------------------------------------------------------------------- images


def _png_with_size(src: Path, dst: Path, w: int, h: int) -> Path:
    """``src`` (a PNG) with its IHDR claiming w x h (the CRC fixed): a decompression bomb's header."""
    data = bytearray(src.read_bytes())
    data[16:24] = struct.pack(">II", w, h)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    dst.write_bytes(bytes(data))
    return dst


@pytest.fixture
def grey(tmp_path):
    g8 = np.random.default_rng(0).integers(0, 256, (16, 16), dtype=np.uint8)
    Image.fromarray(g8).save(tmp_path / "g8.png")
    return g8, tmp_path / "g8.png"


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _rgb48_png(path: Path, rgb16: np.ndarray) -> Path:
    """A 16-bit-per-channel RGB PNG (Pillow cannot write one)."""
    h, w, _ = rgb16.shape
    raw = b"".join(b"\x00" + rgb16[i].astype(">u2").tobytes() for i in range(h))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
                     + _png_chunk(b"IDAT", zlib.compress(raw)) + _png_chunk(b"IEND", b""))
    return path


@pytest.mark.parametrize("kind", ["grey x257", "grey x256", "rgb48"])  # exact 16-bit, 8 bits shifted up, RGB
def test_a_16_bit_png_reads_as_its_8_bit_version(compiled, tmp_path, grey, kind):
    g8, p8 = grey
    if kind == "rgb48":
        rgb8 = np.random.default_rng(2).integers(0, 256, (16, 16, 3), dtype=np.uint8)
        Image.fromarray(rgb8).save(p8)
        p16 = _rgb48_png(tmp_path / "g16.png", rgb8.astype(np.uint16) * 257)
    else:
        p16 = tmp_path / "g16.png"
        Image.fromarray(g8.astype(np.uint16) * int(kind[-3:])).save(p16)
        assert Image.open(p16).mode.startswith("I")
    spec = load(compiled[1], "torch").input_spec
    a, b = read_image(p8, spec), read_image(p16, spec)
    std = np.asarray(PRE["std"], np.float32).reshape(-1, 1, 1)
    assert np.abs((a - b) * std).max() <= 1 / 255 + 1e-6


@pytest.mark.parametrize("w, h", [(20000, 20000), (10000, 10000), (MAX_PIXELS // 1000 + 1, 1000)])
def test_a_decompression_bomb_is_refused_from_its_header(compiled, tmp_path, grey, w, h):
    bomb = _png_with_size(grey[1], tmp_path / "bomb.png", w, h)
    with pytest.raises(InputError, match="MAX_PIXELS"):
        read_image(bomb, load(compiled[1], "torch").input_spec)


def test_a_bomb_from_the_cli_is_one_line_without_pillow_warnings(compiled, tmp_path, grey):
    bomb = _png_with_size(grey[1], tmp_path / "bomb.png", 10000, 10000)  # Pillow warns above 89M pixels
    _one_error(*_subprocess("run", compiled[1], bomb, "--out", tmp_path / "out"), "bomb.png", "MAX_PIXELS")


# --------------------------------------------------------------------------------------------- runtime


@pytest.mark.parametrize("path", [None, 3, ["art"]])
def test_load_of_a_non_path_is_an_input_error(path):
    with pytest.raises(InputError, match="must be a path"):
        load(path)


@pytest.mark.parametrize("max_batch", [0, -1, 2.5, True])
def test_load_refuses_a_bad_max_batch(compiled, max_batch):
    with pytest.raises(InputError, match="max_batch"):
        load(compiled[1], max_batch=max_batch)


def test_chunked_runs_equal_one_run(compiled):
    x = np.random.default_rng(1).standard_normal((11, 3, 16, 16)).astype(np.float32)
    whole = load(compiled[1], "onnxruntime").run(x)
    chunked = load(compiled[1], "onnxruntime", max_batch=3).run(x)
    for t in whole:
        np.testing.assert_allclose(chunked[t], whole[t], rtol=1e-5, atol=1e-6)


def test_a_large_batch_runs_under_an_address_space_limit(compiled):
    # 16384 samples: about 1.5 GiB of address space in one ONNX Runtime call (measured: it fails
    # under a 1 GiB limit with max_batch=16384), about 0.45 GiB in default chunks.
    script = textwrap.dedent(f"""
        import resource, numpy as np
        from dagc.runtime import load
        engine = load({str(compiled[1])!r}, "onnxruntime", threads=1)
        x = np.random.default_rng(0).standard_normal((16384, 3, 16, 16)).astype(np.float32)
        small = engine.run(x[:5])
        resource.setrlimit(resource.RLIMIT_AS, (2**30, 2**30))
        out = engine.run(x)
        assert all(out[t].shape[0] == 16384 for t in out)
        for t in out:
            np.testing.assert_allclose(out[t][:5], small[t], rtol=1e-5, atol=1e-6)
        print("ok")
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                       env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


# --------------------------------------------------------------------------------------------- options


@pytest.mark.parametrize("kw, words", [
    (dict(flow_constant=1000), "1..5"), (dict(flow_constant=6), "1..5"),
    (dict(preset="omniglot", dataset="digits", flow_constant=8), "1..7"),
    (dict(kappa=1e9), "[0, 12]"), (dict(kappa=-1.0), "kappa"), (dict(kappa=float("nan")), "kappa"),
])
def test_flow_constant_and_kappa_outside_the_paper_ranges(kw, words):
    with pytest.raises(ConfigError, match=None) as e:
        TrainConfig(**kw)
    assert words in str(e.value)


def test_flow_constant_from_the_cli_is_one_line_and_writes_nothing(tmp_path, capsys):
    _one_error(*_cli(["train", "--flow-constant", "1000", "--out", tmp_path / "run"], capsys), "flow_constant")
    assert not (tmp_path / "run").exists()


def test_the_largest_flow_constant_is_the_complete_dag():
    assert TrainConfig(flow_constant=5).flow_constant == 5


def test_every_refusal_here_is_a_dagc_error():
    for cls in (ArtifactError, CheckpointError, CompileError, ConfigError, InputError):
        assert issubclass(cls, DagcError)


def test_run_on_images_without_preprocessing_warns_in_one_line(tmp_path, grey):
    # an API-made checkpoint may record no preprocessing: dagc run says so once and still runs
    spec = preset("tiny", [TaskSpec("depth", "depth")], input_size=(16, 16))
    ckpt = tmp_path / "c.safetensors"
    save_checkpoint(ckpt, _tensors(spec), spec, "finetune")
    compile_checkpoint(ckpt, tmp_path / "art")
    code, err = _subprocess("run", tmp_path / "art", grey[1], "--out", tmp_path / "out")
    lines = err.strip().splitlines()
    assert code == 0 and len(lines) == 1 and lines[0].startswith("dagc: warning: "), err
    assert "no preprocessing" in lines[0] and (tmp_path / "out").is_dir()
    with pytest.warns(NoPreprocessingWarning):
        run_images(tmp_path / "art", [grey[1]], tmp_path / "out2")
    npy = tmp_path / "x.npy"
    np.save(npy, np.zeros((3, 16, 16), np.float32))
    code, err = _subprocess("run", tmp_path / "art", npy, "--out", tmp_path / "out3")
    assert code == 0 and err.strip() == "", err  # .npy is already the model's input: nothing to say
