"""dagc.runtime: backends against the masked supernet, task subsets, model choice, refusals, threads,
image files in and readable outputs out."""

import itertools
import json
import shutil
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from compiler_cases import random_reduced_net
from PIL import Image

from dagc.checkpoint import save_checkpoint
from dagc.compiler.compile import compile_checkpoint
from dagc.compiler.verify import relative_error, supernet_reference
from dagc.errors import DagcError
from dagc.manifest import Manifest
from dagc.runners import ort_providers
from dagc.runtime import BACKENDS, ArtifactError, Engine, InputError, load
from dagc.runtime.images import read_image, run_images, save_outputs
from dagc.spec import TaskSpec, preset
from dagc.trainer.network import network_tensors

MEAN, STD = [0.4, 0.5, 0.3], [0.2, 0.25, 0.15]
PRE_RGB = {"raw": "RGB in [0, 1]", "layout": "NCHW", "dtype": "float32", "mean": MEAN, "std": STD,
           "formula": "(raw - mean) / std per channel"}
PRE_GREY = {"raw": "grey level / 16, in [0, 1]", "layout": "NCHW", "dtype": "float32", "mean": [0.3], "std": [0.4],
            "formula": "(raw - mean) / std per channel"}


def _artifact(root, spec, seed, pre, **kw):
    net = random_reduced_net(spec, seed)
    path = root / "c.safetensors"
    save_checkpoint(path, network_tensors(net), spec, "finetune", preprocessing=pre)
    compile_checkpoint(path, root / "art", **kw)
    return root / "art", net


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    spec = preset("tiny", [TaskSpec("seg", "segmentation", 3), TaskSpec("depth", "depth"),
                           TaskSpec("normal", "normal"), TaskSpec("cls", "classification", 4)], input_size=(16, 16))
    art, net = _artifact(tmp_path_factory.mktemp("shared"), spec, 5, PRE_RGB)
    return art, net


@pytest.fixture(scope="module")
def per_task(tmp_path_factory):
    spec = preset("omniglot", [TaskSpec("a", "classification", 5), TaskSpec("b", "classification", 3),
                               TaskSpec("c", "classification", 7)], in_channels=1, shared_input=False,
                  input_size=(8, 8))
    art, net = _artifact(tmp_path_factory.mktemp("pertask"), spec, 6, PRE_GREY)
    return art, net


def _x(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _per_task_inputs(tasks, batch=3, seed=0):
    return {t: _x((batch, 1, 8, 8), seed + i) for i, t in enumerate(tasks)}


# --------------------------------------------------------------------------------------------- numerics


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_shared_artifact_equals_the_masked_supernet(shared, backend):
    art, net = shared
    engine = load(art, backend)
    assert isinstance(engine, Engine) and engine.backend == backend
    assert engine.tasks == ("seg", "depth", "normal", "cls")
    assert engine.input_spec["shape"] == ["batch", 3, 16, 16] and engine.input_spec["names"] == ["image"]
    assert engine.input_spec["preprocessing"]["mean"] == MEAN
    x = _x((3, 3, 16, 16))
    got = engine.run(x)
    ref = supernet_reference(net)({"image": x})
    assert list(got) == list(engine.tasks)
    for t in engine.tasks:
        assert got[t].dtype == np.float32 and got[t].shape == ref[t].shape
        assert relative_error(got[t], ref[t]) <= 1e-4, t


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_per_task_artifact_equals_the_masked_supernet(per_task, backend):
    art, net = per_task
    engine = load(art, backend)
    assert engine.input_spec["names"] == ["image_a", "image_b", "image_c"]
    feeds = _per_task_inputs(engine.tasks)
    got = engine.run(feeds)
    ref = supernet_reference(net)({f"image_{t}": v for t, v in feeds.items()})
    for t in engine.tasks:
        assert got[t].shape == (3, net.spec.task(t).classes)
        assert relative_error(got[t], ref[t]) <= 1e-4, t
    by_input = engine.run({f"image_{t}": v for t, v in feeds.items()})  # keyed by input name
    for t in engine.tasks:
        np.testing.assert_array_equal(by_input[t], got[t])


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_every_subset_returns_exactly_its_tasks_and_equals_the_shared_run(shared, per_task, backend):
    for art, make in ((shared[0], lambda ts: _x((2, 3, 16, 16), 1)), (per_task[0], _per_task_inputs)):
        engine = load(art, backend)
        full = engine.run(make(engine.tasks))
        subsets = [s for r in range(1, len(engine.tasks) + 1) for s in itertools.combinations(engine.tasks, r)]
        for subset in subsets + [s[::-1] for s in subsets if len(s) > 1]:  # results come in the order asked
            images = make(engine.tasks)
            if isinstance(images, dict):
                images = {t: images[t] for t in subset}  # only the inputs the tasks read
            got = engine.run(images, list(subset))
            assert list(got) == list(subset)
            for t in subset:
                assert relative_error(got[t], full[t]) <= 1e-5, (subset, t)


def test_float16_and_float64_inputs_are_converted(shared):
    engine = load(shared[0], "onnxruntime")
    x = _x((2, 3, 16, 16))
    want = engine.run(x, ["depth"])["depth"]
    np.testing.assert_array_equal(engine.run(x.astype(np.float64), ["depth"])["depth"], want)
    assert relative_error(engine.run(x.astype(np.float16), ["depth"])["depth"], want) < 1e-2
    noncontiguous = np.asfortranarray(x)
    np.testing.assert_array_equal(engine.run(noncontiguous, "depth")["depth"], want)


# --------------------------------------------------------------------------------------------- model choice


def test_one_task_runs_its_per_task_model_and_all_tasks_the_shared_one(shared, per_task):
    engine = load(shared[0], "onnxruntime")
    for t in engine.tasks:
        assert engine.model_for([t]) == f"task_{t}.onnx"
        assert engine.models_for(t) == (f"task_{t}.onnx",)
    assert engine.model_for() == "model.onnx" and engine.model_for(list(engine.tasks)) == "model.onnx"
    costs = engine.manifest.costs
    for subset in itertools.combinations(engine.tasks, 2):
        chosen = engine.models_for(subset)
        per_task_flops = sum(costs.per_task[t].flops for t in subset)
        assert chosen == (("model.onnx",) if costs.shared.flops <= per_task_flops
                          else tuple(f"task_{t}.onnx" for t in subset))
    # only the chosen model's session was created
    fresh = load(shared[0], "onnxruntime")
    fresh.run(_x((1, 3, 16, 16)), ["normal"])
    assert set(fresh._runners) == {"task_normal.onnx"}
    fresh.run(_x((1, 3, 16, 16)))
    assert set(fresh._runners) == {"task_normal.onnx", "model.onnx"}

    pt = load(per_task[0], "torch")
    assert pt.models_for(["b"]) == ("task_b.onnx",)
    assert pt.models_for(["c", "a"]) == ("task_a.onnx", "task_c.onnx")  # the shared model needs every input
    assert pt.models_for() == ("model.onnx",)


# --------------------------------------------------------------------------------------------- load refusals


def _copy(art, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(art, dst)
    return dst


def test_tampered_or_missing_model_file_is_refused_at_load(shared, tmp_path):
    art = _copy(shared[0], tmp_path)
    data = bytearray((art / "task_depth.onnx").read_bytes())
    data[-1] ^= 1
    (art / "task_depth.onnx").write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"task_depth\.onnx.*sha256"):
        load(art)
    (art / "task_depth.onnx").unlink()
    with pytest.raises(ArtifactError, match=r"task_depth\.onnx.*missing"):
        load(art, "torch")
    with pytest.raises(ArtifactError, match="does not exist"):
        load(tmp_path / "nothing")
    with pytest.raises(ArtifactError, match="no manifest.json"):
        load(tmp_path)


def test_a_file_changed_after_load_does_not_change_what_runs(shared, tmp_path):
    # load keeps the verified bytes of one snapshot (a --force replace may swap the directory at
    # any time): sessions created later run those, not whatever the path holds by then
    art = _copy(shared[0], tmp_path)
    engine = load(art)
    x = _x((1, 3, 16, 16))
    (art / "task_seg.onnx").write_bytes(b"not a model")
    np.testing.assert_array_equal(engine.run(x, ["seg"])["seg"], load(shared[0]).run(x, ["seg"])["seg"])
    with pytest.raises(ArtifactError, match=r"task_seg\.onnx"):  # a new load verifies again
        load(art)


def test_unknown_manifest_version_is_refused(shared, tmp_path):
    art = _copy(shared[0], tmp_path)
    manifest = json.loads((art / "manifest.json").read_text())
    manifest["format_version"] = 99
    (art / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="version 99 is not supported"):
        load(art)


def test_backend_names_and_availability(shared):
    assert BACKENDS == ("auto", "onnxruntime", "tensorrt", "torch", "openvino")
    with pytest.raises(InputError, match="unknown backend 'tflite'"):
        load(shared[0], "tflite")
    with pytest.raises(InputError, match="threads"):
        load(shared[0], threads=0)
    assert load(shared[0], threads=1).backend == "onnxruntime"
    assert ort_providers()[-1] == "CPUExecutionProvider"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a GPU")
def test_tensorrt_backend_without_gpu_or_plans_is_one_line(shared):
    with pytest.raises(ArtifactError) as e:
        load(shared[0], "tensorrt")
    assert "\n" not in str(e.value) and "tensorrt" in str(e.value).lower()
    assert load(shared[0], "auto").backend == "onnxruntime"


# --------------------------------------------------------------------------------------------- bad inputs


def test_errors_are_documented_types():
    assert issubclass(InputError, DagcError) and issubclass(InputError, ValueError)
    assert issubclass(ArtifactError, DagcError)


@pytest.mark.parametrize("images, tasks, words", [
    (_x((2, 3, 16, 16)), ["sky"], r"unknown task 'sky'; this artifact has tasks \['seg', 'depth', 'normal', 'cls'\]"),
    (_x((2, 3, 16, 16)), [], "task list is empty"),
    (_x((2, 3, 16, 16)), ["seg", "seg"], "more than once"),
    (_x((2, 3, 16, 16)), 3, "tasks must be a list"),
    ([[0.0]], None, "must be a numpy array"),
    (torch.zeros(2, 3, 16, 16), None, "must be a numpy array"),
    (_x((3, 16, 16)), None, r"4 dimensions .*add a batch axis"),
    (_x((2, 1, 16, 16)), None, "has 1 channels .* takes 3 channels in NCHW order"),
    (_x((2, 16, 16, 3)), None, "NCHW order.*looks like NHWC"),
    (_x((2, 3, 32, 32)), None, "32x32 .*takes 16x16"),
    (np.zeros((2, 3, 16, 16), np.uint8), None, r"integer dtype uint8.*float32.*preprocessing"),
    (np.zeros((2, 3, 16, 16), np.int64), None, "integer dtype int64"),
    (np.zeros((2, 3, 16, 16), bool), None, "boolean dtype"),
    (np.full((2, 3, 16, 16), np.nan, np.float32), None, "NaN or infinite"),
    (np.full((2, 3, 16, 16), np.inf, np.float64), None, "NaN or infinite"),
    (np.zeros((0, 3, 16, 16), np.float32), None, "empty batch"),
    (np.full((2, 3, 16, 16), 255.0, np.float32), None, "un-normalised pixels"),
    ({"img": _x((2, 3, 16, 16))}, None, "one input shared by all tasks"),
])
def test_bad_inputs_shared(shared, images, tasks, words):
    engine = load(shared[0], "onnxruntime")
    with pytest.raises(InputError, match=words):
        engine.run(images, tasks)


@pytest.mark.parametrize("images, tasks, words", [
    (_x((2, 1, 8, 8)), None, "one input per task .*pass a dict"),
    ({"a": _x((2, 1, 8, 8))}, ["a", "b"], "no image for task 'b'"),
    ({"zz": _x((2, 1, 8, 8))}, ["a"], "unknown input 'zz'"),
    ({"a": _x((2, 1, 8, 8)), "image_a": _x((2, 1, 8, 8))}, ["a"], "given twice"),
    ({"a": _x((2, 1, 8, 8)), "b": _x((3, 1, 8, 8))}, ["a", "b"], "different batch sizes"),
    ({"a": _x((2, 3, 8, 8))}, ["a"], "input 'a' has 3 channels .* takes 1 channels"),
])
def test_bad_inputs_per_task(per_task, images, tasks, words):
    engine = load(per_task[0], "torch")
    with pytest.raises(InputError, match=words):
        engine.run(images, tasks)


def test_check_values_false_skips_only_the_value_scan(shared):
    checked, unchecked = load(shared[0], "onnxruntime"), load(shared[0], "onnxruntime", check_values=False)
    x = _x((2, 3, 16, 16), seed=3)
    for t, v in checked.run(x).items():
        np.testing.assert_array_equal(unchecked.run(x)[t], v)
    pixels = np.full((2, 3, 16, 16), 255.0, np.float32)
    with pytest.raises(InputError, match="un-normalised"):
        checked.run(pixels)
    assert set(unchecked.run(pixels)) == set(checked.tasks)  # runs: nothing scans the values
    for bad, words in [(_x((2, 1, 16, 16)), "channels"), (np.zeros((2, 3, 16, 16), np.uint8), "integer dtype")]:
        with pytest.raises(InputError, match=words):
            unchecked.run(bad)
    # A non-contiguous float32 view takes the slow path and gives the same result as a copy.
    wide = _x((2, 3, 16, 32), seed=4)[..., ::2]
    np.testing.assert_array_equal(checked.run(wide)["seg"], checked.run(np.ascontiguousarray(wide))["seg"])


# --------------------------------------------------------------------------------------------- threads


@pytest.mark.parametrize("backend, calls", [("onnxruntime", 200), ("torch", 200)])
def test_run_from_8_threads_equals_single_threaded(shared, backend, calls):
    engine = load(shared[0], backend)
    subsets = [None, ["depth"], ["seg", "cls"], ["normal"], ["cls"]]
    inputs = [_x((2, 3, 16, 16), s) for s in range(4)]
    want = {(i, k): load(shared[0], backend).run(inputs[i], subsets[k]) for i in range(4) for k in range(5)}

    def worker(w):
        bad = []
        for n in range(calls):
            i, k = (w + n) % 4, (w * 7 + n) % 5
            got = engine.run(inputs[i], subsets[k])
            exp = want[(i, k)]
            if list(got) != list(exp) or not all(np.array_equal(got[t], exp[t]) for t in exp):
                bad.append((w, n))
        return bad

    with ThreadPoolExecutor(8) as pool:  # a fresh engine: sessions are also created concurrently
        bad = [b for r in pool.map(worker, range(8)) for b in r]
    assert not bad


# --------------------------------------------------------------------------------------------- images


def test_read_png_applies_the_preprocessing(shared, tmp_path):
    spec = load(shared[0]).input_spec
    pixels = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "a.png")
    x = read_image(tmp_path / "a.png", spec)
    want = (pixels.transpose(2, 0, 1) / 255.0 - np.array(MEAN)[:, None, None]) / np.array(STD)[:, None, None]
    assert x.dtype == np.float32 and x.shape == (3, 16, 16)
    np.testing.assert_allclose(x, want, atol=1e-5)
    # another size is resized; a grey picture becomes RGB
    Image.fromarray(pixels[..., 0]).resize((40, 30)).save(tmp_path / "b.png")
    y = read_image(tmp_path / "b.png", spec)
    assert y.shape == (3, 16, 16) and np.isfinite(y).all()
    raw = y * np.array(STD, np.float32)[:, None, None] + np.array(MEAN, np.float32)[:, None, None]
    np.testing.assert_allclose(raw[0], raw[1], atol=1e-5)


def test_read_jpeg_and_grey_models(shared, per_task, tmp_path):
    pixels = np.full((16, 16, 3), 128, np.uint8)
    Image.fromarray(pixels).save(tmp_path / "a.jpg", quality=95)
    x = read_image(tmp_path / "a.jpg", load(shared[0]).input_spec)
    raw = x * np.array(STD, np.float32)[:, None, None] + np.array(MEAN, np.float32)[:, None, None]
    np.testing.assert_allclose(raw, 128 / 255, atol=3 / 255)
    g = read_image(tmp_path / "a.jpg", load(per_task[0]).input_spec)  # colour -> grey, 16x16 -> 8x8
    assert g.shape == (1, 8, 8)
    np.testing.assert_allclose(g * 0.4 + 0.3, 128 / 255, atol=3 / 255)


def test_read_npy_layouts(shared, per_task, tmp_path):
    spec = load(shared[0]).input_spec
    raw = np.random.default_rng(1).random((3, 16, 16)).astype(np.float32)
    want = (raw - np.array(MEAN, np.float32)[:, None, None]) / np.array(STD, np.float32)[:, None, None]
    np.save(tmp_path / "chw.npy", raw)
    np.save(tmp_path / "hwc.npy", raw.transpose(1, 2, 0).astype(np.float64))
    np.testing.assert_allclose(read_image(tmp_path / "chw.npy", spec), want, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(read_image(tmp_path / "hwc.npy", spec), want, rtol=1e-6, atol=1e-6)
    np.save(tmp_path / "u8.npy", (raw * 255).round().astype(np.uint8))  # 8-bit pixels, like a PNG
    np.testing.assert_allclose(read_image(tmp_path / "u8.npy", spec), want, atol=0.02)
    np.save(tmp_path / "hw.npy", raw[0, :8, :8])
    np.testing.assert_allclose(read_image(tmp_path / "hw.npy", load(per_task[0]).input_spec),
                               (raw[None, 0, :8, :8] - 0.3) / 0.4, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("make, words", [
    (lambda p: np.save(p.with_suffix(".npy"), np.zeros((16, 16, 4), np.float32)), "no axis of 3 channels"),
    (lambda p: np.save(p.with_suffix(".npy"), np.zeros((16, 16), np.float32)), "not an image"),
    (lambda p: np.save(p.with_suffix(".npy"), np.array(["a", "b"])), "numeric array"),
    (lambda p: np.save(p.with_suffix(".npy"), np.array([object()]), allow_pickle=True), "cannot read the array"),
    (lambda p: p.with_suffix(".png").write_bytes(b"\x89PNG\r\n\x1a\n garbage"), "cannot read the image"),
    (lambda p: p.with_suffix(".jpg").write_bytes(b""), "cannot read the image"),
    (lambda p: p.with_suffix(".gif").write_bytes(b"GIF89a"), "unsupported file type"),
])
def test_read_image_refusals_name_the_file(shared, tmp_path, make, words):
    base = tmp_path / "bad"
    make(base)
    path = next(tmp_path.iterdir())
    with pytest.raises(InputError, match=words) as e:
        read_image(path, load(shared[0]).input_spec)
    assert str(path) in str(e.value)
    with pytest.raises(InputError, match="no such image file"):
        read_image(tmp_path / "missing.png", load(shared[0]).input_spec)


def _relabelled(manifest: Manifest, task: str, kind: str) -> Manifest:
    """``manifest`` with ``task`` of another kind with the same output shape (depth -> edge)."""
    d = manifest.to_dict()
    d["spec"]["tasks"] = [{**t, "kind": kind} if t["name"] == task else t for t in d["spec"]["tasks"]]
    d["tasks"][task]["kind"] = kind
    return Manifest.from_dict(d)


def test_save_outputs_writes_raw_arrays_pictures_and_top_k(shared, tmp_path):
    engine = load(shared[0])
    out = engine.run(_x((1, 3, 16, 16)))
    written = save_outputs(tmp_path / "o", "img", {t: v[0] for t, v in out.items()}, engine.manifest)
    names = sorted(p.name for p in written)
    assert names == sorted(["img_seg.npy", "img_seg.png", "img_depth.npy", "img_depth.png", "img_normal.npy",
                            "img_normal.png", "img_cls.npy", "img_cls.json"])
    for t in engine.tasks:
        np.testing.assert_array_equal(np.load(tmp_path / "o" / f"img_{t}.npy"), out[t][0])
    for t in ("seg", "depth", "normal"):
        with Image.open(tmp_path / "o" / f"img_{t}.png") as im:
            assert im.size == (16, 16) and im.mode == "RGB"
    doc = json.loads((tmp_path / "o" / "img_cls.json").read_text())
    probs = [e["probability"] for e in doc["top_k"]]
    assert len(probs) == 4 and probs == sorted(probs, reverse=True) and abs(sum(probs) - 1) < 1e-4
    assert doc["top_k"][0]["label"] == int(np.argmax(out["cls"][0]))
    assert not [p for p in (tmp_path / "o").iterdir() if p.name.startswith(".")]  # no temporary files left
    # an edge map: grey (the artifact's one-channel depth task, relabelled as an edge task)
    manifest = _relabelled(engine.manifest, "depth", "edge")
    [npy, png] = save_outputs(tmp_path / "o", "e", {"depth": np.linspace(-1, 2, 64, dtype=np.float32).reshape(1, 8, 8)},
                              manifest)
    with Image.open(png) as im:
        assert im.mode == "L" and im.size == (8, 8)


def test_run_images_end_to_end(shared, per_task, tmp_path):
    pixels = np.random.default_rng(2).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    paths = []
    for i, p in enumerate(pixels):
        Image.fromarray(p).save(tmp_path / f"im{i}.png")
        paths.append(tmp_path / f"im{i}.png")
    written = run_images(shared[0], paths, tmp_path / "out", tasks="depth,cls", backend="torch")
    assert sorted(p.name for p in written) == sorted(
        f"im{i}_{t}.{e}" for i in range(2) for t, e in (("depth", "npy"), ("depth", "png"), ("cls", "npy"),
                                                        ("cls", "json")))
    engine = load(shared[0])
    batch = np.stack([read_image(p, engine.input_spec) for p in paths])
    want = engine.run(batch, ["depth"])["depth"]
    for i in range(2):
        assert relative_error(np.load(tmp_path / "out" / f"im{i}_depth.npy"), want[i]) <= 1e-5
    # per-task inputs: the same image goes to every selected task; a repeated stem is numbered
    np.save(tmp_path / "d.npy", np.random.default_rng(3).random((8, 8)).astype(np.float32))
    written = run_images(per_task[0], [tmp_path / "d.npy", tmp_path / "d.npy"], tmp_path / "out2", tasks=["a", "c"])
    assert {p.name for p in written} == {"d_a.npy", "d_a.json", "d_c.npy", "d_c.json", "d_2_a.npy", "d_2_a.json",
                                         "d_2_c.npy", "d_2_c.json"}
    with pytest.raises(InputError, match="no image files"):
        run_images(shared[0], [], tmp_path / "out3")
    with pytest.raises(InputError, match="unknown task 'sky'"):
        run_images(shared[0], paths, tmp_path / "out3", tasks=["sky"])


# --------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
def test_tensorrt_backend_equals_onnxruntime(tmp_path):
    spec = preset("tiny", [TaskSpec("seg", "segmentation", 3), TaskSpec("depth", "depth"),
                           TaskSpec("cls", "classification", 4)], input_size=(16, 16))
    art, _ = _artifact(tmp_path, spec, 7, PRE_RGB, target="tensorrt", batches=(1, 4))
    trt_engine = load(art, "tensorrt")
    assert load(art).backend == "tensorrt"
    ort_engine = load(art, "onnxruntime")
    for batch in (1, 3, 9):  # 9: beyond the plans' profile, run in chunks
        x = _x((batch, 3, 16, 16), batch)
        for tasks in (None, ["depth"], ["seg", "cls"]):
            got, want = trt_engine.run(x, tasks), ort_engine.run(x, tasks)
            assert list(got) == list(want)
            for t in want:
                assert relative_error(got[t], want[t]) <= 1e-2, (batch, tasks, t)
    x = _x((2, 3, 16, 16))
    ref = trt_engine.run(x)
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: trt_engine.run(x), range(64)))
    for r in results:
        for t in ref:
            np.testing.assert_allclose(r[t], ref[t], rtol=1e-5, atol=1e-5)
