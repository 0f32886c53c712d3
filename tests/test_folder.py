"""The ``folder`` dataset (issue 20, item 1): the user's own images in the layout of FORMAT.md,
"Folder datasets". A dataset written by examples/own_data/make_dataset.py (two classification
tasks and one segmentation, grey PNGs) goes through train, compile, run and serve; the synthetic
scenes written with `write_folder` read back bit-exact and train identically; hostile files are
refused from the CLI with one line naming the file, exit 2, nothing written."""

import csv
import json
import runpy
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors import safe_open

from dagc.artifact import load_manifest
from dagc.errors import DataError
from dagc.runtime import load
from dagc.tools.cli import main
from dagc.trainer import synthetic
from dagc.trainer.config import TrainConfig
from dagc.trainer.data import LoadOptions
from dagc.trainer.datasets import load_dataset
from dagc.trainer.folder import write_folder
from dagc.trainer.train import train

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--warmup-iters", "2", "--search-iters", "2", "--finetune-iters", "2", "--batch-size", "4",
        "--stats-batches", "1", "--quiet"]


def _cli(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in argv])
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """The example's digit pairs (16 x 32 grey PNGs), trained and compiled through the CLI."""
    base = tmp_path_factory.mktemp("pairs")
    example = runpy.run_path(str(ROOT / "examples" / "own_data" / "make_dataset.py"), run_name="example")
    example["main"]([str(base / "data"), "--n-train", "24", "--n-test", "8"])
    with pytest.raises(SystemExit) as e:
        main(["train", "--dataset", "folder", "--data-root", str(base / "data"), "--out", str(base / "run"), *FAST])
    assert e.value.code == 0
    with pytest.raises(SystemExit) as e:
        main(["compile", str(base / "run" / "checkpoint.safetensors"), "--out", str(base / "art")])
    assert e.value.code == 0
    return base


def test_own_grey_pngs_train_compile_and_run_as_the_runtime_on_the_arrays(pairs, capsys):
    data = load_dataset("folder", root=pairs / "data")
    assert (data.name, data.in_channels, data.input_size) == ("digit-pairs", 1, (16, 32))
    assert [(t.name, t.kind, t.classes) for t in data.tasks] == [
        ("left", "classification", 10), ("right", "classification", 10), ("parts", "segmentation", 3)]
    with safe_open(str(pairs / "run" / "checkpoint.safetensors"), "pt") as f:
        config = json.loads(f.metadata()["config"])
    assert config["preset"] == "tiny"  # chosen for 16 x 32 inputs
    manifest = load_manifest(pairs / "art")
    assert list(manifest.input.shape) == [1, 16, 32]
    pngs = [pairs / "data" / "test" / "images" / f"0000{i}.png" for i in range(3)]
    code, out, err = _cli(["run", pairs / "art", *pngs, "--out", pairs / "outputs"], capsys)
    assert code == 0, err
    engine = load(pairs / "art", backend="onnxruntime")
    expected = engine.run(data.test.inputs[:3])
    for i, png in enumerate(pngs):
        for task in ("left", "right", "parts"):
            got = np.load(pairs / "outputs" / f"{png.stem}_{task}.npy")
            np.testing.assert_allclose(got, expected[task][i], rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_own_dataset_is_served(pairs):
    httpclient = pytest.importorskip("tritonclient.http", reason="needs tritonclient[http] (the serve extra)")
    from dagc.errors import ServeError
    from dagc.tools.serve import ServeConfig, TritonServer, find_server
    from dagc.tools.triton import TritonConfig

    try:
        find_server()
    except ServeError as e:
        pytest.skip(str(e))
    engine = load(pairs / "art", backend="onnxruntime")
    x = load_dataset("folder", root=pairs / "data").test.inputs[:2]
    expected = engine.run(x)
    config = ServeConfig(http_port=0, grpc_port=0, metrics_port=0, triton=TritonConfig(backend="python", intra_op_threads=1))
    server = TritonServer(pairs / "art", config).start()
    try:
        client = httpclient.InferenceServerClient(server.url("http"))
        route = server.routing["routes"]["onnx"]
        model = route["left,parts,right"]["model"] if "left,parts,right" in route else next(iter(route.values()))["model"]
        names = server.routing["models"][model]["inputs"]
        inputs = []
        for name in names:
            i = httpclient.InferInput(name, list(x.shape), "FP32")
            i.set_data_from_numpy(x)
            inputs.append(i)
        tasks = server.routing["models"][model]["tasks"]
        result = client.infer(model, inputs, outputs=[httpclient.InferRequestedOutput(t) for t in tasks])
        for t in tasks:
            np.testing.assert_allclose(result.as_numpy(t), expected[t], rtol=1e-4, atol=1e-4)
    finally:
        server.stop()


def _synthetic_folder(tmp_path, seed=3):
    opts = LoadOptions(root=None, tasks=("segmentation", "depth", "normal", "edge"), seed=seed, size=(32, 32),
                       n_train=16, n_test=8)
    return write_folder(synthetic.load_raw(opts), tmp_path / "synthetic")


def test_synthetic_scenes_round_trip_bit_exact_and_train_identically(tmp_path):
    root = _synthetic_folder(tmp_path, seed=3)
    built = load_dataset("synthetic", seed=3, n_train=16, n_test=8)
    read = load_dataset("folder", root=root)
    assert read.tasks == built.tasks and read.in_channels == 3 and read.input_size == (32, 32)
    assert read.preprocessing == built.preprocessing
    for split in ("train", "test"):
        a, b = getattr(built, split), getattr(read, split)
        assert a.inputs.dtype == b.inputs.dtype and np.array_equal(a.inputs, b.inputs)
        for t in a.targets:
            assert a.targets[t].dtype == b.targets[t].dtype and np.array_equal(a.targets[t], b.targets[t]), t
    short = dict(warmup_iters=2, search_iters=2, finetune_iters=2, batch_size=4, n_train=16, n_test=8, seed=3,
                 stats_batches=1)
    train(TrainConfig(**short), tmp_path / "built", progress=False)
    train(TrainConfig(dataset="folder", data_root=str(root), **short), tmp_path / "read", progress=False)
    import torch

    with safe_open(str(tmp_path / "built" / "checkpoint.safetensors"), "pt") as f, \
            safe_open(str(tmp_path / "read" / "checkpoint.safetensors"), "pt") as g:
        assert sorted(f.keys()) == sorted(g.keys())
        for k in f.keys():
            assert torch.equal(f.get_tensor(k), g.get_tensor(k)), k


def test_sixteen_bit_grey_images_are_read_as_pixel_over_65535(tmp_path):
    root = _base(tmp_path)
    for p in (root / "train" / "images").iterdir():
        Image.fromarray(np.full((16, 16), 65535 // 3, np.uint16)).save(p)
    data = load_dataset("folder", root=root)
    assert data.preprocessing["mean"][0] == pytest.approx(1 / 3, abs=1e-6)


def test_write_folder_refuses_a_non_empty_root(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "keep.txt").write_text("mine")
    opts = LoadOptions(root=None, tasks=("edge",), seed=0, size=(16, 16), n_train=2, n_test=2)
    with pytest.raises(DataError, match="not an empty folder"):
        write_folder(synthetic.load_raw(opts), tmp_path / "x")
    assert (tmp_path / "x" / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize("existing", [False, True])
def test_an_interrupted_write_folder_leaves_no_half_dataset(tmp_path, existing):
    from dataclasses import replace

    opts = LoadOptions(root=None, tasks=("normal",), seed=0, size=(16, 16), n_train=3, n_test=2)
    raw = synthetic.load_raw(opts)
    # the test split's normals lose their channel axis: the train split is on disk when writing fails
    broken = replace(raw, test=replace(raw.test, targets={"normal": raw.test.targets["normal"][:, 0]}))
    if existing:
        (tmp_path / "x").mkdir()
    with pytest.raises(ValueError):
        write_folder(broken, tmp_path / "x")
    assert sorted(p.name for p in tmp_path.iterdir()) == (["x"] if existing else [])
    assert not existing or not any((tmp_path / "x").iterdir())
    assert (write_folder(raw, tmp_path / "x") / "train" / "images").is_dir()


# ------------------------------------------------------------------------------ hostile files
def _png(path, array):
    Image.fromarray(np.asarray(array)).save(path)


def _base(tmp_path):
    """A valid folder dataset: 16 x 16 grey PNGs, tasks a (3 classes), b (2), seg (segmentation, 3)."""
    root = tmp_path / "data"
    root.mkdir()
    (root / "dataset.json").write_text(json.dumps({"name": "hostile", "tasks": [
        {"name": "a", "kind": "classification", "classes": 3}, {"name": "b", "kind": "classification", "classes": 2},
        {"name": "seg", "kind": "segmentation", "classes": 3}]}))
    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("test", 4)):
        (root / split / "images").mkdir(parents=True)
        (root / split / "seg").mkdir()
        rows = [["id", "a", "b"]]
        for i in range(n):
            _png(root / split / "images" / f"{i:04d}.png", rng.integers(0, 256, (16, 16), dtype=np.uint8))
            _png(root / split / "seg" / f"{i:04d}.png", rng.integers(0, 3, (16, 16), dtype=np.uint8))
            rows.append([f"{i:04d}", i % 3, i % 2])
        with open(root / split / "labels.csv", "w", newline="") as f:
            csv.writer(f).writerows(rows)
    return root


def _edit_csv(path, edit):
    rows = list(csv.reader(open(path, newline="")))
    edit(rows)
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(rows)
    return path


def _json(root, doc):
    (root / "dataset.json").write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return root / "dataset.json"


def _truncated(root):
    p = root / "train" / "images" / "0002.png"
    p.write_bytes(p.read_bytes()[:60])
    return p


def _bomb(root):
    p = root / "train" / "images" / "0003.png"
    Image.new("1", (8000, 8000)).save(p)
    return p


def _seg16(root):
    p = root / "train" / "seg" / "0001.png"
    _png(p, np.full((16, 16), 300, np.uint16))
    return p


def _nan(root):
    (root / "train" / "images" / "0004.png").unlink()
    arr = np.zeros((16, 16), np.float32)
    arr[3, 3] = np.nan
    np.save(root / "train" / "images" / "0004.npy", arr)
    return root / "train" / "images" / "0004.npy"


def _pickled(root):
    (root / "train" / "images" / "0004.png").unlink()
    np.save(root / "train" / "images" / "0004.npy", np.array([{"x": 1}], dtype=object), allow_pickle=True)
    return root / "train" / "images" / "0004.npy"


def _write(path, data):
    path.write_bytes(data) if isinstance(data, bytes) else path.write_text(data)
    return path


def _remove(path):
    for p in path.iterdir() if path.is_dir() else ():
        p.unlink()
    return path


T, S = Path("train"), Path("test")
HOSTILE = {
    "no dataset.json": lambda r: (r / "dataset.json").unlink() or r / "dataset.json",
    "dataset.json not JSON": lambda r: _json(r, "{not json"),
    "dataset.json unknown kind": lambda r: _json(r, {"name": "x", "tasks": [{"name": "a", "kind": "pose"}]}),
    "dataset.json classes missing": lambda r: _json(r, {"name": "x", "tasks": [{"name": "a", "kind": "classification"}]}),
    "dataset.json repeated task": lambda r: _json(r, {"name": "x", "tasks": [
        {"name": "a", "kind": "edge"}, {"name": "a", "kind": "depth"}]}),
    "dataset.json extra key": lambda r: _json(r, {"name": "x", "tasks": [{"name": "a", "kind": "edge"}], "v": 2}),
    "labels.csv missing": lambda r: (r / T / "labels.csv").unlink() or r / T / "labels.csv",
    "labels.csv extra id": lambda r: _edit_csv(r / T / "labels.csv", lambda rows: rows.append(["9999", 0, 0])),
    "labels.csv missing id": lambda r: _edit_csv(r / S / "labels.csv", lambda rows: rows.pop()),
    "labels.csv repeated id": lambda r: _edit_csv(r / T / "labels.csv", lambda rows: rows.append(rows[1])),
    "labels.csv label out of range": lambda r: _edit_csv(r / T / "labels.csv", lambda rows: rows[2].__setitem__(1, "3")),
    "labels.csv label not an integer": lambda r: _edit_csv(r / T / "labels.csv", lambda rows: rows[2].__setitem__(2, "0.5")),
    "labels.csv missing column": lambda r: _edit_csv(r / T / "labels.csv", lambda rows: [x.pop() for x in rows]),
    "image missing, its map left": lambda r: (r / T / "images" / "0001.png").unlink() or r / T / "seg" / "0001.png",
    "segmentation map missing": lambda r: (r / T / "seg" / "0002.png").unlink() or r / T / "seg" / "0002.png",
    "stray file among images": lambda r: _write(r / T / "images" / "notes.txt", "hello"),
    "two files of one id": lambda r: (np.save(r / T / "images" / "0001.npy", np.zeros((16, 16), np.float32))
                                      or r / T / "images" / "0001"),  # either file of the id
    "unknown task folder": lambda r: (r / T / "sgm").mkdir() or r / T / "sgm",
    "image not a picture": lambda r: _write(r / T / "images" / "0002.png", b"GIF89a not really"),
    "truncated image": _truncated,
    "decompression bomb": _bomb,
    "image with alpha": lambda r: _png(r / T / "images" / "0001.png", np.zeros((16, 16, 4), np.uint8))
    or r / T / "images" / "0001.png",
    "RGB among grey images": lambda r: _png(r / S / "images" / "0001.png", np.zeros((16, 16, 3), np.uint8))
    or r / S / "images" / "0001.png",
    "image of another size": lambda r: _png(r / T / "images" / "0005.png", np.zeros((16, 20), np.uint8))
    or r / T / "images" / "0005.png",
    "size the preset cannot take": lambda r: _png(r / T / "images" / "0000.png", np.zeros((18, 18), np.uint8))
    or r / T / "images" / "0000.png",
    "NaN in a .npy image": _nan,
    "pickled .npy image": _pickled,
    "segmentation label out of range": lambda r: _png(r / T / "seg" / "0003.png", np.full((16, 16), 7, np.uint8))
    or r / T / "seg" / "0003.png",
    "16-bit segmentation label out of range": _seg16,
    "segmentation map of the wrong size": lambda r: _png(r / S / "seg" / "0002.png", np.zeros((8, 8), np.uint8))
    or r / S / "seg" / "0002.png",
    "RGB segmentation map": lambda r: _png(r / T / "seg" / "0000.png", np.zeros((16, 16, 3), np.uint8))
    or r / T / "seg" / "0000.png",
    "empty test split": lambda r: _remove(r / S / "images"),
    "no test split": lambda r: shutil.rmtree(r / S) or r / S,
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_folder_dataset_is_refused_in_one_line_naming_the_file(tmp_path, capsys, case):
    root = _base(tmp_path)
    load_dataset("folder", root=root)  # valid before the edit
    culprit = HOSTILE[case](root)
    before = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    out = tmp_path / "run"
    code, _, err = _cli(["train", "--dataset", "folder", "--data-root", root, "--out", out, *FAST], capsys)
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("dagc: error: "), err
    assert "Traceback" not in err
    assert str(culprit) in lines[0], (str(culprit), lines[0])
    assert not out.exists()
    assert {p: p.read_bytes() for p in root.rglob("*") if p.is_file()} == before  # nothing lost


def test_sixteen_bit_header_is_what_pillow_reads():
    # the 16-bit case above relies on Pillow writing a 16-bit grey PNG from uint16 pixels
    import io

    buf = io.BytesIO()
    Image.fromarray(np.full((2, 2), 300, np.uint16)).save(buf, format="PNG")
    assert struct.unpack(">B", buf.getvalue()[24:25])[0] == 16  # IHDR bit depth
