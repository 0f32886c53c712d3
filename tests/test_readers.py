"""Readers of the paper's real benchmarks (dagc.trainer.readers): tiny datasets in each on-disk
layout are written to tmp_path, read back, and checked value by value; every kind of bad input
gives a one-line DataError naming the file, and the CLI turns it into exit code 2."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from PIL import Image

from dagc.errors import ConfigError, DataError
from dagc.tools.cli import main
from dagc.trainer.datasets import DATASETS, ON_DISK, load_dataset, task_names
from dagc.trainer.losses import IGNORE_INDEX
from dagc.trainer.pascal import _NORMAL_VALID_CLASSES
from dagc.trainer.train import TrainConfig, train

HW = (16, 24)
NYU_COUNTS = {"train": 5, "val": 3}


# ------------------------------------------------------------------------------------ builders
def _unit_normals(rng: np.random.Generator, hw: tuple[int, int]) -> np.ndarray:
    v = rng.normal(size=(*hw, 3)).astype(np.float32)
    v /= np.linalg.norm(v, axis=2, keepdims=True)
    v[:4, :6] = 0.0  # missing normals (a block, so that it survives downsampling)
    return v


def make_npy_dataset(root: Path, name: str = "nyuv2", counts=NYU_COUNTS, hw=HW, seed=0) -> dict:
    """Writes a NumPy-layout dataset (nyuv2 or cityscapes); returns what it wrote, by split and
    folder, as lists of arrays."""
    rng = np.random.default_rng(seed)
    folders = {"nyuv2": {"label": 13, "depth": None, "normal": None},
               "cityscapes": {"label_7": 7, "label_19": 19, "depth": None}}[name]
    written: dict = {}
    for split, n in counts.items():
        written[split] = {f: [] for f in ("image", *folders)}
        for f in ("image", *folders):
            (root / split / f).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            arrays = {"image": rng.uniform(0, 1, (*hw, 3)).astype(np.float32)}
            for f, classes in folders.items():
                if classes is not None:
                    lab = rng.integers(0, classes, hw).astype(np.float32)  # the release stores floats
                    lab[0, 0] = -1
                    arrays[f] = lab
                elif f == "depth":
                    d = rng.uniform(0.5, 10, (*hw, 1)).astype(np.float32)
                    d[1, :4] = 0.0
                    arrays[f] = d
                else:
                    arrays[f] = _unit_normals(rng, hw)
            for f, arr in arrays.items():
                np.save(root / split / f / f"{i}.npy", arr)
                written[split][f].append(arr)
    return written


def _png(path: Path, arr: np.ndarray, mode: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr, mode=mode).save(path)


def make_omniglot(root: Path, alphabets=("Latin", "Japanese_(hiragana)"), chars=20, drawings=3,
                  seed=0) -> None:
    rng = np.random.default_rng(seed)
    for a in alphabets:
        for c in range(1, chars + 1):
            for d in range(drawings):
                img = np.where(rng.uniform(size=(12, 12)) < 0.8, 255, 0).astype(np.uint8)
                _png(root / a / f"character{c:02d}" / f"{c:02d}_{d:02d}.png", img)


def _parts_mat(path: Path, hw: tuple[int, int], person: bool) -> None:
    """A PASCAL-Part annotation: one dog without parts, and (if ``person``) a person whose head
    is the top-left quarter and whose left upper arm is the bottom-right quarter."""
    h, w = hw
    part_dt = [("part_name", "O"), ("mask", "O")]
    obj_dt = [("class", "O"), ("class_ind", "O"), ("mask", "O"), ("parts", "O")]
    objs = np.zeros((1, 2 if person else 1), dtype=obj_dt)
    objs[0, 0] = ("dog", np.array([[12]]), np.ones(hw, np.uint8), np.zeros((0, 0)))
    if person:
        head = np.zeros(hw, np.uint8)
        head[: h // 2, : w // 2] = 1
        arm = np.zeros(hw, np.uint8)
        arm[h // 2:, w // 2:] = 1
        parts = np.zeros((1, 2), dtype=part_dt)
        parts[0, 0] = ("head", head)
        parts[0, 1] = ("luarm", arm)
        objs[0, 1] = ("person", np.array([[15]]), head | arm, parts)
    anno = np.zeros((1, 1), dtype=[("imname", "O"), ("objects", "O")])
    anno[0, 0] = (path.stem, objs)
    path.parent.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(path, {"anno": anno})


PASCAL_IDS = {"train": ["2008_000001", "2008_000002", "2008_000003"], "val": ["2008_000004", "2008_000005"]}
PASCAL_SIZE = (16, 16)


def make_pascal(root: Path, seed=0) -> dict:
    """Writes a PASCAL-Context (PASCAL_MT) layout; the first train image is exactly PASCAL_SIZE
    (so its targets can be compared without resizing), the others differ. Returns the raw
    per-id arrays."""
    rng = np.random.default_rng(seed)
    raw = {}
    sizes = [PASCAL_SIZE, (20, 28), (12, 18), (18, 14), (24, 20)]
    ids = PASCAL_IDS["train"] + PASCAL_IDS["val"]
    (root / "ImageSets" / "Context").mkdir(parents=True)
    for split, split_ids in PASCAL_IDS.items():
        (root / "ImageSets" / "Context" / f"{split}.txt").write_text("\n".join(split_ids) + "\n")
    valid_class = int(_NORMAL_VALID_CLASSES[0])
    invalid_class = 1  # "accordion": not an NYUD class
    for k, (i, hw) in enumerate(zip(ids, sizes, strict=True)):
        h, w = hw
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        _png(root / "JPEGImages" / f"{i}.jpg", img)
        sem = rng.integers(0, 21, hw).astype(np.uint8)
        sem[0, 0] = 255
        p = Image.fromarray(sem, mode="P")
        p.putpalette(list(range(256)) * 3)
        (root / "semseg" / "pascal-context").mkdir(parents=True, exist_ok=True)
        p.save(root / "semseg" / "pascal-context" / f"{i}.png")
        _parts_mat(root / "human_parts" / f"{i}.mat", hw, person=(k % 2 == 0))
        sal = rng.integers(0, 256, hw, dtype=np.uint8)
        _png(root / "sal_distill" / f"{i}.png", sal)
        nrm = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        _png(root / "normals_distill" / f"{i}.png", nrm)
        label_map = np.full(hw, valid_class, np.uint16)
        label_map[:, w // 2:] = invalid_class
        (root / "pascal-context" / "trainval").mkdir(parents=True, exist_ok=True)
        scipy.io.savemat(root / "pascal-context" / "trainval" / f"{i}.mat", {"LabelMap": label_map})
        raw[i] = {"sem": sem, "sal": sal, "nrm": nrm, "label_map": label_map}
    return raw


# ----------------------------------------------------------------------------------- NYU-v2 etc
def _unstandardise(x: np.ndarray, prep: dict) -> np.ndarray:
    mean = np.asarray(prep["mean"], np.float32)[None, :, None, None]
    std = np.asarray(prep["std"], np.float32)[None, :, None, None]
    return x * std + mean


def test_names_are_registered():
    assert set(ON_DISK) <= set(DATASETS)
    assert task_names("nyuv2") == ("segmentation", "depth", "normal")
    assert task_names("cityscapes") == task_names("cityscapes19") == ("segmentation", "depth")
    assert task_names("pascal-context") == ("semseg", "human_parts", "saliency", "normal", "edge")
    with pytest.raises(DataError, match="alphabets under its root"):
        task_names("omniglot")


def test_nyuv2_values_shapes_and_standardisation(tmp_path):
    written = make_npy_dataset(tmp_path)
    data = load_dataset("nyuv2", root=tmp_path)
    assert data.name == "nyuv2" and data.shared_input and data.in_channels == 3 and data.input_size == HW
    assert [(t.name, t.kind, t.classes) for t in data.tasks] == [
        ("segmentation", "segmentation", 13), ("depth", "depth", None), ("normal", "normal", None)]
    for split, name in ((data.train, "train"), (data.test, "val")):
        n = NYU_COUNTS[name]
        assert split.inputs.shape == (n, 3, *HW) and split.inputs.dtype == np.float32
        seg, depth, normal = (split.targets[t] for t in ("segmentation", "depth", "normal"))
        assert seg.shape == (n, *HW) and seg.dtype == np.int64
        assert depth.shape == (n, 1, *HW) and depth.dtype == np.float32
        assert normal.shape == (n, 3, *HW) and normal.dtype == np.float32
        np.testing.assert_array_equal(seg, np.stack(written[name]["label"]).astype(np.int64))
        assert (seg[:, 0, 0] == IGNORE_INDEX).all()
        np.testing.assert_array_equal(depth, np.stack(written[name]["depth"]).transpose(0, 3, 1, 2))
        assert (depth[:, 0, 1, :4] == 0).all()  # missing depth stays 0
        np.testing.assert_array_equal(normal, np.stack(written[name]["normal"]).transpose(0, 3, 1, 2))
        raw = np.stack(written[name]["image"]).transpose(0, 3, 1, 2)
        np.testing.assert_allclose(_unstandardise(split.inputs, data.preprocessing), raw, atol=1e-5)
    # Standardised with the train split's statistics only.
    np.testing.assert_allclose(data.train.inputs.mean(axis=(0, 2, 3)), 0, atol=1e-4)
    np.testing.assert_allclose(data.train.inputs.std(axis=(0, 2, 3)), 1, atol=1e-3)
    assert "[0, 1]" in data.preprocessing["raw"]


def test_nyuv2_subset_of_tasks_caps_and_resize(tmp_path):
    written = make_npy_dataset(tmp_path)
    # Only the selected tasks' folders are needed.
    for f in ("normal", "label"):
        for split in NYU_COUNTS:
            for p in (tmp_path / split / f).iterdir():
                p.unlink()
            (tmp_path / split / f).rmdir()
    data = load_dataset("nyuv2", root=tmp_path, tasks=["depth"], n_train=2, n_test=1, input_size=(8, 12))
    assert [t.name for t in data.tasks] == ["depth"]
    assert data.train.inputs.shape == (2, 3, 8, 12) and data.test.inputs.shape == (1, 3, 8, 12)
    depth = data.train.targets["depth"]
    assert depth.shape == (2, 1, 8, 12)
    # Nearest neighbour: every value is one of the file's values (no blending with missing 0).
    for k in range(2):
        assert np.isin(depth[k], written["train"]["depth"][k]).all()


def test_resized_labels_and_normals(tmp_path):
    written = make_npy_dataset(tmp_path)
    data = load_dataset("nyuv2", root=tmp_path, input_size=(8, 8))
    seg, normal = data.train.targets["segmentation"], data.train.targets["normal"]
    for k in range(NYU_COUNTS["train"]):
        assert set(np.unique(seg[k])) <= set(np.unique(written["train"]["label"][k]).astype(int))
    norm = np.linalg.norm(normal, axis=1)
    zero = norm == 0
    assert zero.any() and np.allclose(norm[~zero], 1, atol=1e-5)  # unit where valid, 0 where missing


def test_cityscapes_7_and_19_classes(tmp_path):
    written = make_npy_dataset(tmp_path, "cityscapes")
    # 255 also means unlabelled; -1 depth (Auto-Lambda's missing marker) is read as 0.
    lab = written["train"]["label_19"][0].copy()
    lab[2, 2] = 255
    np.save(tmp_path / "train" / "label_19" / "0.npy", lab)
    d = written["train"]["depth"][0].copy()
    d[3, 3] = -1
    np.save(tmp_path / "train" / "depth" / "0.npy", d)
    c7 = load_dataset("cityscapes", root=tmp_path)
    c19 = load_dataset("cityscapes19", root=tmp_path)
    assert c7.tasks[0].classes == 7 and c19.tasks[0].classes == 19
    np.testing.assert_array_equal(c7.train.targets["segmentation"],
                                  np.stack(written["train"]["label_7"]).astype(np.int64))
    assert c19.train.targets["segmentation"][0, 2, 2] == IGNORE_INDEX
    assert c19.train.targets["segmentation"].max() > 6  # the 19-class labels, not the 7-class ones
    assert c7.train.targets["depth"][0, 0, 3, 3] == 0.0


def _bad_npy_cases():
    """(name, how to break a valid nyuv2 tree, words the message must hold, file it names)."""
    def put(rel, arr):
        return lambda root: np.save(root / rel, arr)

    def remove(rel):
        return lambda root: (root / rel).unlink()

    def write(rel, data):
        return lambda root: (root / rel).write_bytes(data)

    def rmtree(rel):
        def f(root):
            for p in (root / rel).iterdir():
                p.unlink()
            (root / rel).rmdir()
        return f

    lab = np.zeros(HW, np.float32)
    return [
        ("missing split", rmtree("val/image"), "no 'image' folder", "val"),
        ("missing task folder", rmtree("train/normal"), "no 'normal' folder", "train"),
        ("count mismatch", put("train/label/5.npy", lab), "has no image", "train/label/5.npy"),
        ("index mismatch", remove("val/depth/2.npy"), "is missing", "val/depth/2.npy"),
        ("wrong image shape", put("train/image/1.npy", np.zeros((3, *HW), np.float32)), "expected (H, W, 3)",
         "train/image/1.npy"),
        ("image size differs from label", put("train/label/1.npy", np.zeros((8, 8), np.float32)),
         "but its image is", "train/label/1.npy"),
        ("wrong dtype", put("train/image/2.npy", np.zeros((*HW, 3), np.int32)), "dtype int32",
         "train/image/2.npy"),
        ("label out of range", put("train/label/0.npy", lab + 13), "label 13 is outside the 13 classes",
         "train/label/0.npy"),
        ("fractional labels", put("train/label/0.npy", lab + 0.5), "not whole numbers", "train/label/0.npy"),
        ("non-finite depth", put("val/depth/0.npy", np.full((*HW, 1), np.nan, np.float32)), "NaN",
         "val/depth/0.npy"),
        ("negative depth", put("val/depth/0.npy", np.full((*HW, 1), -2, np.float32)), "negative",
         "val/depth/0.npy"),
        ("normals too long", put("train/normal/0.npy", np.full((*HW, 3), 2, np.float32)), "unit vectors",
         "train/normal/0.npy"),
        ("image out of [0, 1]", put("train/image/0.npy", np.full((*HW, 3), 200, np.float32)), "expected [0, 1]",
         "train/image/0.npy"),
        ("corrupt file", write("train/depth/3.npy", b"\x93NUMPY garbage"), "cannot read", "train/depth/3.npy"),
        ("truncated file", write("val/image/0.npy", b""), "cannot read", "val/image/0.npy"),
        ("pickled objects", put("train/normal/4.npy", np.array([{"a": 1}], dtype=object)), "cannot read",
         "train/normal/4.npy"),
    ]


@pytest.mark.parametrize("case", _bad_npy_cases(), ids=lambda c: c[0])
def test_bad_npy_input_names_file_and_problem(tmp_path, case):
    _, breaks, words, names = case
    make_npy_dataset(tmp_path)
    breaks(tmp_path)
    with pytest.raises(DataError) as e:
        load_dataset("nyuv2", root=tmp_path)
    msg = str(e.value)
    assert words in msg and names in msg and "\n" not in msg, msg


def test_missing_or_bad_root(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_dataset("nyuv2", root=tmp_path / "nope")
    (tmp_path / "file").write_text("x")
    with pytest.raises(DataError, match="is not a directory"):
        load_dataset("cityscapes", root=tmp_path / "file")
    with pytest.raises(DataError, match="give its root directory"):
        load_dataset("nyuv2")
    with pytest.raises(DataError, match="no 'train' folder"):
        load_dataset("nyuv2", root=tmp_path)
    with pytest.raises(DataError, match="built in and reads no directory"):
        load_dataset("synthetic", root=tmp_path)


def test_native_sizes_must_agree(tmp_path):
    make_npy_dataset(tmp_path, counts={"train": 2, "val": 1})
    make_npy_dataset(tmp_path / "other", counts={"train": 1}, hw=(8, 8))
    for f in ("image", "label", "depth", "normal"):
        (tmp_path / "other" / "train" / f / "0.npy").rename(tmp_path / "train" / f / "2.npy")
    with pytest.raises(DataError, match="train/image/2.npy: image is 8x8 but the first image is 16x24"):
        load_dataset("nyuv2", root=tmp_path)
    assert load_dataset("nyuv2", root=tmp_path, input_size=(8, 8)).train.inputs.shape == (3, 3, 8, 8)


# ------------------------------------------------------------------------------------- Omniglot
def test_omniglot_tasks_split_and_inputs(tmp_path):
    make_omniglot(tmp_path)
    assert task_names("omniglot", tmp_path) == ("Japanese_hiragana", "Latin")
    data = load_dataset("omniglot", root=tmp_path, seed=1)
    assert not data.shared_input and data.in_channels == 1 and data.input_size == (32, 32)
    assert [(t.name, t.kind, t.classes) for t in data.tasks] == [
        ("Japanese_hiragana", "classification", 20), ("Latin", "classification", 20)]
    for t in ("Japanese_hiragana", "Latin"):
        x_tr, y_tr = data.train.inputs[t], data.train.targets[t]
        x_te, y_te = data.test.inputs[t], data.test.targets[t]
        # 3 drawings per character: max(1, round(0.6)) = 1 to test, 2 to train.
        assert x_tr.shape == (40, 1, 32, 32) and x_te.shape == (20, 1, 32, 32)
        assert y_tr.dtype == np.int64 and sorted(np.bincount(y_tr)) == [2] * 20
        assert sorted(np.bincount(y_te)) == [1] * 20
        # No drawing in both splits.
        tr = {a.tobytes() for a in x_tr}
        assert not any(a.tobytes() in tr for a in x_te)
    again = load_dataset("omniglot", root=tmp_path, seed=1)
    np.testing.assert_array_equal(again.train.inputs["Latin"], data.train.inputs["Latin"])
    other_seed = load_dataset("omniglot", root=tmp_path, seed=2)
    assert not np.array_equal(other_seed.test.inputs["Latin"], data.test.inputs["Latin"])
    # The split of an alphabet does not depend on which tasks are selected.
    alone = load_dataset("omniglot", root=tmp_path, seed=1, tasks=["Latin"])
    np.testing.assert_array_equal(alone.train.targets["Latin"], data.train.targets["Latin"])
    raw = _unstandardise(alone.train.inputs["Latin"], alone.preprocessing)
    np.testing.assert_allclose(raw, _unstandardise(data.train.inputs["Latin"], data.preprocessing), atol=1e-5)
    capped = load_dataset("omniglot", root=tmp_path, tasks=["Latin"], n_train=10, n_test=5, input_size=(16, 16))
    assert capped.train.inputs["Latin"].shape == (10, 1, 16, 16) and capped.test.targets["Latin"].shape == (5,)


def test_omniglot_official_zip_layout_and_short_alphabet(tmp_path):
    make_omniglot(tmp_path / "images_background", alphabets=("Greek",))
    make_omniglot(tmp_path / "images_evaluation", alphabets=("Korean",), chars=19)
    assert task_names("omniglot", tmp_path) == ("Greek", "Korean")
    assert [t.name for t in load_dataset("omniglot", root=tmp_path, tasks=["Greek"]).tasks] == ["Greek"]
    with pytest.raises(DataError, match=r"images_evaluation/Korean: alphabet has 19 characters"):
        load_dataset("omniglot", root=tmp_path)
    with pytest.raises(DataError, match="unknown task"):
        load_dataset("omniglot", root=tmp_path, tasks=["Klingon"])


def test_omniglot_corrupt_drawing_and_too_few_drawings(tmp_path):
    make_omniglot(tmp_path, alphabets=("Latin",))
    bad = tmp_path / "Latin" / "character05" / "05_01.png"
    bad.write_bytes(b"\x89PNG not really")
    with pytest.raises(DataError, match="character05/05_01.png: cannot read the image"):
        load_dataset("omniglot", root=tmp_path)
    for p in (tmp_path / "Latin" / "character05").iterdir():
        if p.name != "05_00.png":
            p.unlink()
    with pytest.raises(DataError, match="character05: 1 drawings"):
        load_dataset("omniglot", root=tmp_path)
    with pytest.raises(DataError, match="no alphabet folders"):
        load_dataset("omniglot", root=tmp_path / "Latin" / "character05")


# ------------------------------------------------------------------------------- PASCAL-Context
def test_pascal_context_targets(tmp_path):
    raw = make_pascal(tmp_path)
    data = load_dataset("pascal-context", root=tmp_path, input_size=PASCAL_SIZE)
    n_tr, n_te = len(PASCAL_IDS["train"]), len(PASCAL_IDS["val"])
    assert data.train.inputs.shape == (n_tr, 3, *PASCAL_SIZE) and data.test.inputs.shape == (n_te, 3, *PASCAL_SIZE)
    assert [(t.name, t.kind, t.classes) for t in data.tasks] == [
        ("semseg", "segmentation", 21), ("human_parts", "segmentation", 7), ("saliency", "saliency", None),
        ("normal", "normal", None), ("edge", "edge", None)]
    y = data.train.targets
    assert y["semseg"].shape == (n_tr, *PASCAL_SIZE) and y["semseg"].dtype == np.int64
    assert y["human_parts"].dtype == np.int64
    for t, c in (("saliency", 1), ("normal", 3), ("edge", 1)):
        assert y[t].shape == (n_tr, c, *PASCAL_SIZE) and y[t].dtype == np.float32
    first = raw[PASCAL_IDS["train"][0]]  # stored at PASCAL_SIZE: no resizing
    expected = first["sem"].astype(np.int64)
    expected[expected == 255] = IGNORE_INDEX
    np.testing.assert_array_equal(y["semseg"][0], expected)
    h, w = PASCAL_SIZE
    parts = np.zeros(PASCAL_SIZE, np.int64)
    parts[: h // 2, : w // 2] = 1   # head -> head group
    parts[h // 2:, w // 2:] = 3     # left upper arm -> upper arms
    np.testing.assert_array_equal(y["human_parts"][0], parts)
    assert (y["human_parts"][1] == IGNORE_INDEX).all()  # no person: ignored, as in the benchmark
    np.testing.assert_array_equal(y["saliency"][0, 0], (first["sal"] / 255.0 > 0.5).astype(np.float32))
    decoded = 2.0 * first["nrm"].astype(np.float32) / 255.0 - 1.0
    decoded /= np.linalg.norm(decoded, axis=2, keepdims=True)
    np.testing.assert_allclose(y["normal"][0][:, :, : w // 2], decoded[:, : w // 2].transpose(2, 0, 1), atol=1e-5)
    assert (y["normal"][0][:, :, w // 2:] == 0).all()  # a class without NYUD normals
    edge = np.zeros(PASCAL_SIZE, np.float32)
    edge[:, w // 2 - 1] = 1  # the label map's one boundary, on its left side
    np.testing.assert_array_equal(y["edge"][0, 0], edge)
    # Other sizes are resized: labels stay labels, saliency and edges binary, normals unit or 0.
    assert set(np.unique(y["semseg"][1:])) <= set(range(21)) | {IGNORE_INDEX}
    assert set(np.unique(data.test.targets["saliency"])) <= {0.0, 1.0}
    norm = np.linalg.norm(data.test.targets["normal"], axis=1)
    assert np.allclose(norm[norm > 0], 1, atol=1e-5) and (norm == 0).any()
    assert data.test.targets["edge"].sum() > 0
    default = load_dataset("pascal-context", root=tmp_path, tasks=["edge", "semseg"], n_train=2)
    assert default.input_size == (128, 128) and default.train.inputs.shape == (2, 3, 128, 128)
    assert list(default.train.targets) == ["edge", "semseg"]


@pytest.mark.parametrize("breaks, words", [
    (lambda r: (r / "JPEGImages" / "2008_000002.jpg").write_bytes(b"\xff\xd8\xff broken"),
     "JPEGImages/2008_000002.jpg: cannot read the image"),
    (lambda r: (r / "sal_distill" / "2008_000004.png").unlink(), "sal_distill/2008_000004.png: file missing"),
    (lambda r: (r / "ImageSets" / "Context" / "val.txt").unlink(), "Context/val.txt: split list missing"),
    (lambda r: (r / "ImageSets" / "Context" / "train.txt").write_text("2008_000001\n2008_000001\n"),
     "listed twice"),
    (lambda r: _png(r / "semseg" / "pascal-context" / "2008_000003.png", np.full((12, 18), 30, np.uint8)),
     "2008_000003.png: label 30 is outside the 21 classes"),
    (lambda r: _png(r / "semseg" / "pascal-context" / "2008_000003.png", np.zeros((12, 18, 3), np.uint8)),
     "expected a single-channel"),
    (lambda r: scipy.io.savemat(r / "pascal-context" / "trainval" / "2008_000005.mat", {"x": np.zeros(2)}),
     "2008_000005.mat: no 'LabelMap'"),
    (lambda r: (r / "human_parts" / "2008_000001.mat").write_bytes(b"MATLAB 5.0 garbage"),
     "human_parts/2008_000001.mat: cannot read"),
    (lambda r: scipy.io.savemat(r / "human_parts" / "2008_000001.mat", {"anno": np.zeros(3)}),
     "not a PASCAL-Part annotation"),
])
def test_bad_pascal_input(tmp_path, breaks, words):
    make_pascal(tmp_path)
    breaks(tmp_path)
    with pytest.raises(DataError) as e:
        load_dataset("pascal-context", root=tmp_path, input_size=PASCAL_SIZE)
    assert words in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_unknown_person_part(tmp_path):
    make_pascal(tmp_path)
    path = tmp_path / "human_parts" / "2008_000001.mat"
    mat = scipy.io.loadmat(path)
    mat["anno"][0, 0]["objects"][0, 1]["parts"][0, 0]["part_name"] = np.array(["tail"])
    scipy.io.savemat(path, {"anno": mat["anno"]})
    with pytest.raises(DataError, match="unknown person part 'tail'"):
        load_dataset("pascal-context", root=tmp_path, tasks=["human_parts"], input_size=PASCAL_SIZE)
    # A task that does not need the file does not read it.
    load_dataset("pascal-context", root=tmp_path, tasks=["semseg"], input_size=PASCAL_SIZE)


# --------------------------------------------------------------------------- config, CLI, train
def test_train_config_data_root(tmp_path):
    with pytest.raises(ConfigError, match="give its directory as data_root"):
        TrainConfig(dataset="nyuv2")
    with pytest.raises(ConfigError, match="is not a directory"):
        TrainConfig(dataset="nyuv2", data_root=str(tmp_path / "nope"))
    with pytest.raises(ConfigError, match="only for the on-disk datasets"):
        TrainConfig(dataset="synthetic", data_root=str(tmp_path))
    cfg = TrainConfig(dataset="nyuv2", data_root=tmp_path)  # a Path is stored as text
    assert cfg.data_root == str(tmp_path) and cfg.preset == "vgg16"
    assert json.loads(json.dumps(cfg.to_dict()))["data_root"] == str(tmp_path)
    make_omniglot(tmp_path / "omni", alphabets=("Latin",))
    assert TrainConfig(dataset="omniglot", data_root=str(tmp_path / "omni"), tasks=("Latin",)).preset == "omniglot"
    with pytest.raises(ConfigError, match="unknown task"):
        TrainConfig(dataset="omniglot", data_root=str(tmp_path / "omni"), tasks=("Greek",))


def _cli(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    _, err = capsys.readouterr()
    return e.value.code, err


@pytest.mark.parametrize("extra, words", [
    (["--dataset", "nyuv2", "--data-root", "BAD"], "data_root 'BAD' is not a directory"),
    (["--dataset", "nyuv2"], "give its directory as data_root"),
    (["--data-root", "."], "only for the on-disk datasets"),
    (["--dataset", "nyuv2", "--data-root", "{root}"], "label/0.npy: label 99 is outside the 13 classes"),
])
def test_cli_bad_data_gives_one_line_and_exit_2(tmp_path, capsys, extra, words):
    root = tmp_path / "nyu"
    make_npy_dataset(root, counts={"train": 2, "val": 1}, hw=(8, 8))
    np.save(root / "train" / "label" / "0.npy", np.full((8, 8), 99.0, np.float32))
    argv = ["train", "--out", str(tmp_path / "run"), "--quiet", "--preset", "tiny",
            *[a.replace("{root}", str(root)) for a in extra]]
    code, err = _cli(argv, capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("dagc: error:") and words in lines[0], err


def test_short_training_on_fake_nyuv2(tmp_path, capsys):
    root = tmp_path / "nyu"
    make_npy_dataset(root, counts={"train": 6, "val": 3}, hw=(16, 16))
    code, _ = _cli(["train", "--dataset", "nyuv2", "--data-root", str(root), "--preset", "tiny",
                    "--warmup-iters", "2", "--search-iters", "2", "--finetune-iters", "2", "--batch-size", "4",
                    "--quiet", "--out", str(tmp_path / "run")], capsys)
    assert code == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["config"]["data_root"] == str(root)
    assert set(metrics["final"]) == {"segmentation", "depth", "normal"}
    assert metrics["test_samples"] == {"segmentation": 3, "depth": 3, "normal": 3}
    assert np.isfinite(metrics["final"]["depth"]["abs_err"]) and metrics["spec"]["input_size"] == [16, 16]
    # The same through the Python API, resuming nothing: one more run in another directory.
    again = train(TrainConfig(dataset="nyuv2", data_root=str(root), preset="tiny", tasks=("depth",),
                              warmup_iters=1, search_iters=1, finetune_iters=1, batch_size=2),
                  tmp_path / "run2", progress=False)
    assert set(again["final"]) == {"depth"}
