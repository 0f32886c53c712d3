"""Tests of the built-in datasets (dagc.trainer.datasets): determinism, formats, geometry and
a torch-free learnability check of every task family."""

from __future__ import annotations

import numpy as np
import pytest

from dagc.errors import DataError
from dagc.spec import PRESETS
from dagc.trainer import datasets
from dagc.trainer import digits as digits_module
from dagc.trainer.datasets import DATASETS, ON_DISK, load_dataset, task_names

BUILT_IN = tuple(d for d in DATASETS if d not in ON_DISK)

SMALL = {"n_train": 64, "n_test": 32}


@pytest.fixture(scope="module")
def synthetic() -> datasets.MultiTaskData:
    """The default synthetic dataset (generated once: the tests only read it)."""
    return load_dataset("synthetic")


@pytest.fixture(scope="module")
def digits() -> datasets.MultiTaskData:
    return load_dataset("digits")


def _all_arrays(data: datasets.MultiTaskData) -> list[np.ndarray]:
    """Every array of a dataset, in a fixed order, for byte-wise comparisons."""
    out = []
    for split in (data.train, data.test):
        inputs = split.inputs
        out += [inputs[k] for k in sorted(inputs)] if isinstance(inputs, dict) else [inputs]
        out += [split.targets[k] for k in sorted(split.targets)]
    return out


# ------------------------------------------------------------------------------ API and errors
def test_task_names():
    assert DATASETS == ("synthetic", "digits", "multidigits", *ON_DISK)
    assert task_names("multidigits") == ("left", "right", "parts")
    assert task_names("synthetic") == ("segmentation", "depth", "normal", "edge")
    assert task_names("digits") == ("low", "high", "parity")


@pytest.mark.parametrize("call, words", [
    (lambda: task_names("nyu"), ["'nyu'", "synthetic", "digits"]),
    (lambda: load_dataset("omniglot"), ["'omniglot'", "read from disk", "--data-root"]),
    (lambda: load_dataset("synthetic", tasks=["depth", "sal"]), ["'sal'", "segmentation", "edge"]),
    (lambda: load_dataset("digits", tasks=["odd"]), ["'odd'", "low", "high", "parity"]),
    (lambda: load_dataset("digits", tasks=[]), ["low", "high", "parity"]),
    (lambda: load_dataset("synthetic", tasks=["depth", "depth"]), ["at most once"]),
    (lambda: load_dataset("synthetic", input_size=(8, 32)), ["input_size", "16"]),
    (lambda: load_dataset("digits", input_size=(4, 4)), ["input_size", "8"]),
    (lambda: load_dataset("synthetic", input_size=32), ["input_size"]),
    (lambda: load_dataset("synthetic", n_train=0), ["n_train"]),
    (lambda: load_dataset("synthetic", n_test=2.5), ["n_test"]),
    (lambda: load_dataset("synthetic", seed=-1), ["seed"]),
])
def test_bad_arguments_raise_value_error_naming_the_choices(call, words):
    with pytest.raises(ValueError) as info:
        call()
    assert isinstance(info.value, DataError)
    message = str(info.value)
    assert "\n" not in message
    for word in words:
        assert word in message


def test_split_size_rejects_unknown_task():
    data = load_dataset("synthetic", tasks=["depth"], **SMALL)
    assert data.train.size("depth") == 64 and data.test.size("depth") == 32
    with pytest.raises(ValueError, match="depth"):
        data.train.size("normal")


def test_task_selection_keeps_order_and_does_not_change_data():
    full = load_dataset("synthetic", **SMALL)
    part = load_dataset("synthetic", tasks=["edge", "depth"], **SMALL)
    assert [t.name for t in part.tasks] == ["edge", "depth"]
    assert set(part.train.targets) == {"edge", "depth"}
    np.testing.assert_array_equal(part.train.inputs, full.train.inputs)
    np.testing.assert_array_equal(part.test.targets["depth"], full.test.targets["depth"])


# --------------------------------------------------------------------------------- determinism
@pytest.mark.parametrize("name", BUILT_IN)
def test_same_seed_gives_identical_arrays(name):
    a, b = load_dataset(name, seed=3, **SMALL), load_dataset(name, seed=3, **SMALL)
    for x, y in zip(_all_arrays(a), _all_arrays(b), strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes()


@pytest.mark.parametrize("name", BUILT_IN)
def test_different_seeds_differ(name):
    a, b = load_dataset(name, seed=0, **SMALL), load_dataset(name, seed=1, **SMALL)
    first = next(iter(a.train.targets))
    xa = a.train.inputs if a.shared_input else a.train.inputs[first]
    xb = b.train.inputs if b.shared_input else b.train.inputs[first]
    assert not np.array_equal(xa, xb)


def test_synthetic_train_and_test_scenes_differ():
    data = load_dataset("synthetic", n_train=32, n_test=32)
    assert not np.array_equal(data.train.targets["depth"], data.test.targets["depth"])


def test_synthetic_train_split_does_not_depend_on_n_test():
    a = load_dataset("synthetic", n_train=32, n_test=8)
    b = load_dataset("synthetic", n_train=32, n_test=40)
    np.testing.assert_array_equal(a.train.targets["segmentation"], b.train.targets["segmentation"])


# ----------------------------------------------------------------------------- synthetic format
def test_synthetic_metadata(synthetic):
    assert synthetic.name == "synthetic" and synthetic.in_channels == 3
    assert synthetic.input_size == (32, 32) and synthetic.shared_input
    kinds = {t.name: (t.kind, t.classes) for t in synthetic.tasks}
    assert kinds == {"segmentation": ("segmentation", 5), "depth": ("depth", None),
                     "normal": ("normal", None), "edge": ("edge", None)}
    assert synthetic.train.size("segmentation") == 2048 and synthetic.test.size("edge") == 512


def test_synthetic_shapes_dtypes_ranges(synthetic):
    for split, n in ((synthetic.train, 2048), (synthetic.test, 512)):
        x, t = split.inputs, split.targets
        assert x.shape == (n, 3, 32, 32) and x.dtype == np.float32 and np.isfinite(x).all()
        assert t["segmentation"].shape == (n, 32, 32) and t["segmentation"].dtype == np.int64
        assert t["segmentation"].min() >= 0 and t["segmentation"].max() < 5
        assert t["depth"].shape == (n, 1, 32, 32) and t["depth"].dtype == np.float32
        assert np.isfinite(t["depth"]).all() and t["depth"].min() > 0
        assert t["normal"].shape == (n, 3, 32, 32) and t["normal"].dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(t["normal"], axis=1), 1.0, atol=1e-5)
        assert (t["normal"][:, 2] >= 0).all()  # every visible surface faces the camera
        assert t["edge"].shape == (n, 1, 32, 32) and t["edge"].dtype == np.float32
        assert t["edge"].min() >= 0 and t["edge"].max() <= 1


def test_inputs_standardised_with_train_statistics(synthetic):
    mean = synthetic.train.inputs.mean(axis=(0, 2, 3))
    std = synthetic.train.inputs.std(axis=(0, 2, 3))
    np.testing.assert_allclose(mean, 0.0, atol=1e-3)
    np.testing.assert_allclose(std, 1.0, atol=1e-3)
    # Same statistics on test: close to, but not exactly, standard.
    np.testing.assert_allclose(synthetic.test.inputs.mean(axis=(0, 2, 3)), 0.0, atol=0.1)


def test_segmentation_uses_every_class(synthetic):
    freq = np.bincount(synthetic.train.targets["segmentation"].ravel(), minlength=5)
    freq = freq / freq.sum()
    assert (freq > 0.02).all(), freq
    assert freq.max() < 0.6, freq  # no class dominates so much that it is the only answer


def test_edges_non_trivial(synthetic):
    edge = synthetic.train.targets["edge"]
    assert set(np.unique(edge)) == {0.0, 1.0}
    assert 0.01 < edge.mean() < 0.5
    assert (edge.reshape(len(edge), -1).max(axis=1) == 1).all()  # every scene has edges


def test_edges_sit_at_label_boundaries(synthetic):
    seg = synthetic.train.targets["segmentation"][:256]
    edge = synthetic.train.targets["edge"][:256, 0] > 0
    boundary = np.zeros_like(edge)
    boundary[:, :, 1:] |= seg[:, :, 1:] != seg[:, :, :-1]
    boundary[:, :, :-1] |= seg[:, :, 1:] != seg[:, :, :-1]
    boundary[:, 1:] |= seg[:, 1:] != seg[:, :-1]
    boundary[:, :-1] |= seg[:, 1:] != seg[:, :-1]
    assert edge[boundary].mean() > 0.4  # one side of every label boundary is marked
    assert (boundary & ~edge).sum() < boundary.sum()


def test_depth_varies_smoothly_with_row_on_the_floor(synthetic):
    seg = synthetic.train.targets["segmentation"]
    depth = synthetic.train.targets["depth"][:, 0]
    floor = seg == 1
    below = floor[:, 1:] & floor[:, :-1]
    # Lower rows of the floor are nearer the camera.
    assert (depth[:, 1:][below] < depth[:, :-1][below]).all()
    wall = seg == 0
    assert depth[wall].min() > depth[floor].mean()


def test_normals_consistent_with_depth(synthetic):
    depth = synthetic.train.targets["depth"][:256, 0].astype(np.float64)
    normal = synthetic.train.targets["normal"][:256].astype(np.float64)
    spacing = 2.0 / 32  # image-plane units per pixel (see module docstring)
    for axis, comp in ((2, 0), (1, 1)):  # x along columns, y along rows
        d = np.moveaxis(depth, axis, -1)
        n = np.moveaxis(normal, axis + 1, -1)
        fwd = d[..., 2:] - d[..., 1:-1]
        bwd = d[..., 1:-1] - d[..., :-2]
        central = (fwd + bwd) / (2 * spacing)
        # Smooth: both one-sided differences agree closely (no occlusion jump, no crease).
        smooth = np.abs(fwd - bwd) < 0.1 * np.maximum(np.abs(fwd), np.abs(bwd)) + 1e-6
        sloped = smooth & (np.abs(central) > 0.05)
        assert sloped.sum() > 1000
        nx, nz = n[:, comp, ..., 1:-1], n[:, 2, ..., 1:-1]
        assert (np.sign(nx[sloped]) == np.sign(central[sloped])).mean() > 0.99
        # The normal's slope n_i / n_z is the depth gradient itself.
        ratio = nx[sloped] / nz[sloped]
        rel = np.abs(ratio - central[sloped]) / np.abs(central[sloped])
        assert np.median(rel) < 0.1
        # Flat places (e.g. the back wall) have no tilt along that axis.
        flat = smooth & (np.abs(fwd) < 1e-6) & (np.abs(bwd) < 1e-6)
        assert np.abs(nx[flat]).max() < 1e-3


@pytest.mark.parametrize("size", [(16, 16), (24, 40), (48, 20)])
def test_synthetic_input_size_configurable(size):
    data = load_dataset("synthetic", input_size=size, n_train=16, n_test=8)
    assert data.input_size == size
    assert data.train.inputs.shape == (16, 3, *size)
    assert data.test.targets["segmentation"].shape == (8, *size)
    assert data.train.targets["normal"].shape == (16, 3, *size)
    assert np.unique(data.train.targets["segmentation"]).size >= 3


# ------------------------------------------------------------------------------- digits format
def test_digits_metadata_and_formats(digits):
    assert digits.name == "digits" and digits.in_channels == 1 and digits.input_size == (8, 8)
    assert not digits.shared_input
    assert [(t.name, t.kind, t.classes) for t in digits.tasks] == [
        ("low", "classification", 5), ("high", "classification", 5),
        ("parity", "classification", 2)]
    for split in (digits.train, digits.test):
        for task, classes in (("low", 5), ("high", 5), ("parity", 2)):
            x, y = split.inputs[task], split.targets[task]
            assert x.dtype == np.float32 and x.shape[1:] == (1, 8, 8)
            assert y.dtype == np.int64 and y.shape == (len(x),) == (split.size(task),)
            assert set(np.unique(y)) == set(range(classes))
    # 80/20 of 1797 images; low and high split the images, parity has them all.
    total_train = digits.train.size("parity")
    assert total_train + digits.test.size("parity") == 1797
    assert abs(digits.test.size("parity") / 1797 - 0.2) < 0.01
    assert digits.train.size("low") + digits.train.size("high") == total_train


def test_digits_train_and_test_disjoint(digits):
    train = {r.tobytes() for t in ("low", "high", "parity") for r in digits.train.inputs[t]}
    test = {r.tobytes() for t in ("low", "high", "parity") for r in digits.test.inputs[t]}
    assert train and test and not train & test


def test_digits_labels_match_tasks(digits):
    # The same image carries its digit in low/high and its parity in parity.
    parity = {r.tobytes(): y for r, y in zip(digits.train.inputs["parity"],
                                             digits.train.targets["parity"], strict=True)}
    for task, offset in (("low", 0), ("high", 5)):
        for r, y in zip(digits.train.inputs[task], digits.train.targets[task], strict=True):
            assert parity[r.tobytes()] == (y + offset) % 2


def test_digits_counts_cap_and_resize():
    data = load_dataset("digits", tasks=["high"], n_train=50, n_test=10, input_size=(16, 12))
    assert data.train.inputs["high"].shape == (50, 1, 16, 12)
    assert data.test.inputs["high"].shape == (10, 1, 16, 12)
    big = load_dataset("digits", tasks=["low"], n_train=10_000)
    assert big.train.size("low") < 10_000  # a cap: the digits are finite


def test_bilinear_resize_preserves_constants_and_identity():
    images = np.random.default_rng(0).random((3, 8, 8)).astype(np.float32)
    assert digits_module.resize_bilinear(images, (8, 8)) is images
    const = np.full((2, 8, 8), 0.25, np.float32)
    np.testing.assert_allclose(digits_module.resize_bilinear(const, (13, 20)), 0.25, atol=1e-6)


# -------------------------------------------------------------------------------- learnability
def test_segmentation_learnable_from_colour(synthetic):
    """Nearest class mean on a pixel's colour beats always answering the majority class."""
    x_tr = np.moveaxis(synthetic.train.inputs[:512], 1, -1).reshape(-1, 3)
    y_tr = synthetic.train.targets["segmentation"][:512].ravel()
    x_te = np.moveaxis(synthetic.test.inputs, 1, -1).reshape(-1, 3)
    y_te = synthetic.test.targets["segmentation"].ravel()
    means = np.stack([x_tr[y_tr == c].mean(axis=0) for c in range(5)])
    pred = np.argmin(((x_te[:, None] - means[None]) ** 2).sum(-1), axis=1)
    accuracy = (pred == y_te).mean()
    majority = np.bincount(y_tr, minlength=5).max() / y_tr.size
    assert accuracy > majority + 0.15, (accuracy, majority)


def test_depth_learnable_from_image(synthetic):
    """Least squares on a pixel's colour plus its row's mean train depth explains much of the
    depth variance (the row alone gives the floor; colour tells objects and wall apart)."""
    tr, te = synthetic.train, synthetic.test
    row_depth = tr.targets["depth"][:, 0].mean(axis=(0, 2))  # (H,)

    def features(split, n):
        x = np.moveaxis(split.inputs[:n], 1, -1)
        rows = np.broadcast_to(row_depth[None, :, None, None], (*x.shape[:3], 1))
        return np.concatenate([x, rows, np.ones_like(rows)], axis=-1).reshape(-1, 5)

    coef, *_ = np.linalg.lstsq(features(tr, 512), tr.targets["depth"][:512].ravel(), rcond=None)
    y = te.targets["depth"].ravel()
    residual = ((features(te, 512) @ coef - y) ** 2).mean()
    assert residual < 0.5 * y.var()


def test_digits_tasks_linearly_learnable(digits):
    from sklearn.linear_model import LogisticRegression

    for task in ("low", "high", "parity"):
        x_tr = digits.train.inputs[task].reshape(digits.train.size(task), -1)
        x_te = digits.test.inputs[task].reshape(digits.test.size(task), -1)
        clf = LogisticRegression(C=0.1, max_iter=500).fit(x_tr, digits.train.targets[task])
        assert clf.score(x_te, digits.test.targets[task]) > 0.85, task


def test_every_dataset_is_registered_once_with_its_defaults():
    assert tuple(datasets.REGISTRY) == DATASETS
    assert ON_DISK == tuple(name for name, d in datasets.REGISTRY.items() if d.on_disk)
    for name, d in datasets.REGISTRY.items():
        assert datasets.dataset(name) is d and d.name == name
        assert d.preset in PRESETS, name
        # Either the tasks are known up front or they are found on disk (Omniglot's alphabets).
        assert bool(d.tasks) != (d.find_tasks is not None), name
    with pytest.raises(DataError, match="unknown dataset 'mnist'"):
        datasets.dataset("mnist")


def test_multidigits_composes_two_digits_per_image():
    data = load_dataset("multidigits", n_train=200, n_test=50, seed=3)
    assert data.shared_input and data.in_channels == 1 and tuple(data.input_size) == (32, 32)
    assert [t.name for t in data.tasks] == ["left", "right", "parts"]
    assert data.train.inputs.shape == (200, 1, 32, 32) and data.test.inputs.shape == (50, 1, 32, 32)
    for split in (data.train, data.test):
        for t in ("left", "right"):
            assert split.targets[t].dtype == np.int64 and set(np.unique(split.targets[t])) <= set(range(10))
        parts = split.targets["parts"]
        assert set(np.unique(parts)) == {0, 1, 2}
        assert not (parts[:, 20:, :12] == 1).any() and not (parts[:, :12, :] == 2).any()  # each digit in its corner
    again = load_dataset("multidigits", n_train=200, n_test=50, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(_all_arrays(data), _all_arrays(again)))
    other = load_dataset("multidigits", n_train=200, n_test=50, seed=4)
    assert not np.array_equal(data.train.inputs, other.train.inputs)
    small = load_dataset("multidigits", tasks=["parts"], n_train=4, n_test=2, input_size=(16, 16))
    assert small.train.inputs.shape == (4, 1, 16, 16) and small.train.targets["parts"].shape == (4, 16, 16)
