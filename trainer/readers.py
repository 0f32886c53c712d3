"""Readers for the paper's real benchmarks (Sec. 4.1) NYU-v2, Cityscapes and Omniglot
(PASCAL-Context: `dagc.trainer.pascal`), from the on-disk layouts of the code the paper follows.
Nothing is downloaded: the user points ``root`` at a copy they already have.

Every reader returns the same `MultiTaskData` as the built-in datasets: inputs float32
(n, C, H, W) standardised per channel with the train split's mean / std (the statistics are in
``preprocessing``); segmentation targets int64 (n, H, W) with ``IGNORE_INDEX`` (-1) for unlabelled
pixels (255 in the files is read as -1); depth, edge and saliency float32 (n, 1, H, W); normals
float32 (n, 3, H, W); classification int64 (n,). Missing depth stays 0 and a missing normal stays
the zero vector (the losses and metrics skip them). Every file is checked (readable, shape, dtype,
finite values, labels in range); the first bad one raises `DataError` naming the file -- a corrupt
sample is never skipped silently. ``n_train`` / ``n_test`` keep the first n samples of a split
(per task for Omniglot), so a subset loads without touching the rest.

``nyuv2`` -- the preprocessed NumPy release of MTAN (Liu et al. 2019), also used by AdaShare::

    ROOT/{train,val}/image/<index>.npy    (H, W, 3) float in [0, 1] (288 x 384 in the release)
                     label/<index>.npy    (H, W) 13 classes, -1 unlabelled
                     depth/<index>.npy    (H, W, 1) or (H, W), metres, 0 = missing
                     normal/<index>.npy   (H, W, 3) unit vectors, all-zero = missing

    Tasks ``segmentation`` (13 classes), ``depth``, ``normal``; ``val`` is the held-out split.

``cityscapes`` / ``cityscapes19`` -- the same release's Cityscapes::

    ROOT/{train,val}/image/<index>.npy    (128, 256, 3) float in [0, 1]
                     label_7/<index>.npy  (H, W) 7 classes, -1 unlabelled      (cityscapes)
                     label_19/<index>.npy (H, W) 19 classes, -1 unlabelled     (cityscapes19)
                     depth/<index>.npy    (H, W, 1) inverse depth (disparity), 0 = missing

    Tasks ``segmentation`` and ``depth``. A depth of exactly -1 (how the Auto-Lambda copy marks
    missing depth) is read as 0.

    For both NumPy layouts the index sets of every selected task's folder must equal the image
    folder's; ``<index>`` is sorted numerically. The input size defaults to the files' own (all
    samples must share it); another ``input_size`` resizes images and normals bilinearly (normals
    renormalised, missing ones kept zero) and labels and depth by nearest neighbour (so missing
    depth stays exactly 0). ``val`` (or ``test`` when there is no ``val``) is the test split.

``omniglot`` -- the official folder layout (Lake et al.), either ``ROOT/<alphabet>/<character>/
*.png`` or the unzipped ``ROOT/images_background/...`` and ``ROOT/images_evaluation/...`` (both
read when present). The homogeneous setting of Soft Ordering (Meyerson & Miikkulainen 2018), which
the paper follows: one 20-way classification task per alphabet, on the alphabet's first 20
characters in natural sort order (``character2`` before ``character10``); an alphabet with fewer
characters is an error naming it. Each task has its own inputs (``shared_input=False``). The task
name is the alphabet's folder name with every run of characters other than letters and digits
turned into ``_`` (``Japanese_(hiragana)`` -> ``Japanese_hiragana``). Images are read as grey levels
/ 255 in [0, 1] (white paper = 1, as in the files) and resized bilinearly to ``input_size``
(default 32 x 32, which the ``omniglot`` preset's stride 8 divides; 28 x 28 would not). Each
character's drawings (at least 2) are split by the seed: ``max(1, round(0.2 n))`` to test, the
rest to train; the split of a character depends only on the seed and its alphabet / character
names, never on which tasks are selected.
"""

from __future__ import annotations

import os
import re
import zlib
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

from dagc.errors import DataError
from dagc.preprocessing import resize_chw
from dagc.spec import TaskSpec
from dagc.trainer.data import Dataset, LoadOptions, MultiTaskData, Split, check_root, standardise
from dagc.trainer.files import (
    finite_float,
    load_npy_file,
    natural_key,
    normalise_normals,
    read_labels,
    read_picture,
    subdirs,
    target_buffer,
    target_map,
)

OMNIGLOT_WAYS = 20
OMNIGLOT_TEST_FRACTION = 0.2
_OMNIGLOT_SETS = ("images_background", "images_evaluation")
_IMAGE_EXTS = (".png",)


@dataclass(frozen=True)
class _NpyLayout:
    """One NumPy release: task -> (folder, TaskSpec)."""

    folders: dict[str, str]
    infos: dict[str, TaskSpec]


_NPY_LAYOUTS = {
    "nyuv2": _NpyLayout(
        {"segmentation": "label", "depth": "depth", "normal": "normal"},
        {"segmentation": TaskSpec("segmentation", "segmentation", 13), "depth": TaskSpec("depth", "depth"),
         "normal": TaskSpec("normal", "normal")}),
    "cityscapes": _NpyLayout(
        {"segmentation": "label_7", "depth": "depth"},
        {"segmentation": TaskSpec("segmentation", "segmentation", 7), "depth": TaskSpec("depth", "depth")}),
    "cityscapes19": _NpyLayout(
        {"segmentation": "label_19", "depth": "depth"},
        {"segmentation": TaskSpec("segmentation", "segmentation", 19), "depth": TaskSpec("depth", "depth")}),
}


# ------------------------------------------------------------------------ NYU-v2 / Cityscapes
def _npy_indices(folder: Path) -> dict[str, Path]:
    """The ``<index>.npy`` files of a folder, by index (stem), in numeric order."""
    try:
        files = [p for p in folder.iterdir() if p.suffix == ".npy" and not p.name.startswith(".")]
    except OSError as e:
        raise DataError(f"{folder}: cannot list the folder ({e.strerror or e})") from None
    return {p.stem: p for p in sorted(files, key=lambda p: natural_key(p.stem))}


def _split_dir(name: str, base: Path, split: str) -> Path:
    """The folder of one split (``val`` falls back to ``test``); DataError if missing."""
    for candidate in ((split,) if split == "train" else ("val", "test")):
        if (base / candidate).is_dir():
            return base / candidate
    folders = "train" if split == "train" else "val"
    raise DataError(f"{base}: no '{folders}' folder; the {name} layout is ROOT/{{train,val}}/image/<index>.npy "
                    "plus one folder per task")


def _load_npy(name: str, opts: LoadOptions) -> MultiTaskData:
    """Reads a NumPy release (NYU-v2 / Cityscapes): both splits, the selected tasks."""
    layout, base, tasks = _NPY_LAYOUTS[name], opts.root, opts.tasks
    x_tr, y_tr, size = _npy_split(name, _split_dir(name, base, "train"), layout, tasks, opts.size, opts.n_train)
    # The test split is resized to the train split's size, whatever the files' own.
    x_te, y_te, _ = _npy_split(name, _split_dir(name, base, "test"), layout, tasks, size, opts.n_test)
    x_tr, x_te, prep = standardise(x_tr, x_te, "RGB in [0, 1]")
    return MultiTaskData(name=name, in_channels=3, input_size=size, shared_input=True,
                         tasks=tuple(layout.infos[t] for t in tasks), train=Split(x_tr, y_tr),
                         test=Split(x_te, y_te), preprocessing=prep)


def _npy_split(name: str, folder: Path, layout: _NpyLayout, tasks: tuple[str, ...],
               size: tuple[int, int] | None, cap: int | None
               ) -> tuple[np.ndarray, dict[str, np.ndarray], tuple[int, int]]:
    """Reads one split folder; returns raw inputs (n, 3, H, W), targets and (H, W)."""
    image_dir = folder / "image"
    if not image_dir.is_dir():
        raise DataError(f"{folder}: no 'image' folder; the {name} layout is <split>/image/<index>.npy")
    index = _npy_indices(image_dir)
    if not index:
        raise DataError(f"{image_dir}: no <index>.npy files; the split is empty")
    files = {}
    for t in tasks:
        task_dir = folder / layout.folders[t]
        if not task_dir.is_dir():
            raise DataError(f"{folder}: no '{layout.folders[t]}' folder for task {t!r}; "
                            f"the {name} layout is <split>/{layout.folders[t]}/<index>.npy")
        files[t] = _npy_indices(task_dir)
        missing = [i for i in index if i not in files[t]]
        extra = [i for i in files[t] if i not in index]
        if missing or extra:
            what = (f"{task_dir / (missing[0] + '.npy')} is missing" if missing
                    else f"{task_dir / (extra[0] + '.npy')} has no image")
            raise DataError(f"{what}: {image_dir} holds {len(index)} images and {task_dir} {len(files[t])} "
                            "files; every index needs an image and a file per task")
    keys = list(index)[:cap] if cap is not None else list(index)
    n = len(keys)
    native = size is None  # no size asked for: every image must have the first one's
    x = targets = None
    for i, key in enumerate(keys):
        img = _npy_image(index[key])
        h, w = img.shape[:2]
        if size is None:
            size = (h, w)
        elif native and (h, w) != size:
            raise DataError(f"{index[key]}: image is {h}x{w} but the first image is {size[0]}x{size[1]}; "
                            "give input_size to resize them all to one size")
        if x is None:
            x = np.empty((n, 3, *size), np.float32)
            targets = {t: target_buffer(layout.infos[t], n, size) for t in tasks}
        x[i] = resize_chw(img.transpose(2, 0, 1), size)
        for t in tasks:
            targets[t][i] = _npy_target(layout.infos[t], files[t][key], (h, w), size)
    return x, targets, size


def _npy_image(path: Path) -> np.ndarray:
    """One image (H, W, 3) float32 in [0, 1] (uint8 files are divided by 255)."""
    arr = load_npy_file(path)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise DataError(f"{path}: image has shape {arr.shape}; expected (H, W, 3)")
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 255.0
    if arr.dtype.kind != "f":
        raise DataError(f"{path}: image has dtype {arr.dtype}; expected float in [0, 1] or uint8")
    img = finite_float(arr, path, "image")
    # A little slack: the release's floats come from 8-bit pictures, but rounding happens.
    if img.min() < -1e-3 or img.max() > 1 + 1e-3:
        raise DataError(f"{path}: image values span [{img.min():.3g}, {img.max():.3g}]; expected [0, 1]")
    return np.clip(img, 0.0, 1.0)


def _npy_target(info: TaskSpec, path: Path, hw: tuple[int, int], size: tuple[int, int]) -> np.ndarray:
    """Reads one target file, checks it against its image's (H, W) and returns it resized to
    ``size`` in the kind's standard layout."""
    arr = load_npy_file(path)
    arr = target_map(arr, info.kind, path, hw)
    if info.kind == "segmentation":
        labels = read_labels(arr, path, info.classes)
        return resize_chw(labels[None], size, nearest=True)[0].astype(np.int64)
    values = finite_float(arr, path, f"{info.kind} map")
    if info.kind == "depth":
        values[values == -1] = 0.0  # the Auto-Lambda copy of Cityscapes marks missing depth with -1
        if (values < 0).any():
            raise DataError(f"{path}: depth has negative values (min {values.min():.3g}); expected >= 0, "
                            "0 for missing")
        # Nearest keeps missing depth exactly 0 instead of blending it into its neighbours.
        return resize_chw(values[None], size, nearest=True)
    if np.abs(values).max() > 1.01:
        raise DataError(f"{path}: normal components reach {np.abs(values).max():.3g}; expected unit "
                        "vectors in [-1, 1] (all-zero for missing)")
    chw = values.transpose(2, 0, 1)
    valid = (chw != 0).any(axis=0)
    if chw.shape[1:] == tuple(size):
        return np.ascontiguousarray(chw)
    valid = resize_chw(valid[None].astype(np.float32), size, nearest=True)[0] > 0.5
    return normalise_normals(resize_chw(chw, size), valid)


# ------------------------------------------------------------------------------------ Omniglot
def _task_name(alphabet: str) -> str:
    """An alphabet folder name as a task name (letters, digits and single underscores)."""
    return re.sub(r"[^A-Za-z0-9]+", "_", alphabet).strip("_")


def _omniglot_alphabets(base: Path) -> dict[str, Path]:
    """Task name -> alphabet folder, sorted by task name; DataError for an empty root or two
    alphabets with the same task name."""
    sets = [base / s for s in _OMNIGLOT_SETS if (base / s).is_dir()]
    folders = [a for s in (sets or [base]) for a in subdirs(s)]
    if not folders:
        raise DataError(f"{base}: no alphabet folders; the omniglot layout is ROOT/<alphabet>/<character>/*.png "
                        "(or ROOT/images_background/... and ROOT/images_evaluation/...)")
    out: dict[str, Path] = {}
    for folder in folders:
        name = _task_name(folder.name)
        if not name:
            raise DataError(f"{folder}: the alphabet's name has no letters or digits to name its task; rename it")
        if name in out:
            raise DataError(f"{folder} and {out[name]} both give the task name {name!r}; rename one of them")
        out[name] = folder
    return dict(sorted(out.items(), key=lambda kv: natural_key(kv[0])))


def _omniglot_characters(alphabet: Path) -> list[tuple[Path, list[Path]]]:
    """The first `OMNIGLOT_WAYS` characters of an alphabet with their drawings; DataError for an
    alphabet with fewer characters or a character with fewer than 2 drawings."""
    chars = subdirs(alphabet)
    if len(chars) < OMNIGLOT_WAYS:
        raise DataError(f"{alphabet}: alphabet has {len(chars)} characters; an omniglot task is "
                        f"{OMNIGLOT_WAYS}-way, so each alphabet needs at least {OMNIGLOT_WAYS}")
    out = []
    for char in chars[:OMNIGLOT_WAYS]:
        try:
            drawings = sorted((p for p in char.iterdir() if p.suffix.lower() in _IMAGE_EXTS
                               and not p.name.startswith(".")), key=lambda p: natural_key(p.name))
        except OSError as e:
            raise DataError(f"{char}: cannot list the folder ({e.strerror or e})") from None
        if len(drawings) < 2:
            raise DataError(f"{char}: {len(drawings)} drawings (.png); each character needs at least 2, "
                            "one for training and one for testing")
        out.append((char, drawings))
    return out


def _omniglot_split(seed: int, key: str, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Takes the seed, a character's ``alphabet/character`` key and its drawing count; returns
    (train, test) drawing indices. Seeded by the names, so it never depends on the task selection."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 3, zlib.crc32(key.encode())]))
    perm = rng.permutation(n)
    n_test = max(1, round(OMNIGLOT_TEST_FRACTION * n))
    return np.sort(perm[n_test:]), np.sort(perm[:n_test])


def _omniglot_tasks(root: str | os.PathLike | None) -> tuple[str, ...]:
    """The task names of the alphabets under ``root``, sorted (see `_omniglot_alphabets`);
    DataError without a root or for an unreadable one."""
    if root is None:
        raise DataError("omniglot's tasks are the alphabets under its root; give the root "
                        "(--data-root DIR) to list them")
    return tuple(_omniglot_alphabets(check_root("omniglot", root)))


def _load_omniglot(opts: LoadOptions) -> MultiTaskData:
    """Reads the selected alphabets, one 20-way task each, and splits every character's drawings."""
    found = _omniglot_alphabets(opts.root)
    alphabets = {t: found[t] for t in opts.tasks}
    seed, size, n_train, n_test = opts.seed, opts.size, opts.n_train, opts.n_test
    raw: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {"train": {}, "test": {}}
    for task, folder in alphabets.items():
        parts: dict[str, tuple[list, list]] = {"train": ([], []), "test": ([], [])}
        for label, (char, drawings) in enumerate(_omniglot_characters(folder)):
            train_idx, test_idx = _omniglot_split(seed, f"{folder.name}/{char.name}", len(drawings))
            for split, idx in (("train", train_idx), ("test", test_idx)):
                for k in idx:
                    grey = read_picture(drawings[k], "L").astype(np.float32) / 255.0
                    parts[split][0].append(resize_chw(grey[None], size))
                    parts[split][1].append(label)
        # Shuffled (by the seed and the alphabet), so a per-task cap keeps every character.
        rng = np.random.default_rng(np.random.SeedSequence([seed, 4, zlib.crc32(folder.name.encode())]))
        for split, cap in (("train", n_train), ("test", n_test)):
            order = rng.permutation(len(parts[split][1]))[:cap]
            x = np.stack(parts[split][0])[order]
            y = np.asarray(parts[split][1], np.int64)[order]
            raw[split][task] = (x, y)
    tasks = list(alphabets)
    # One set of statistics over every selected task's train images, applied to every task.
    x_tr_all, x_te_all, prep = standardise(
        np.concatenate([raw["train"][t][0] for t in tasks]), np.concatenate([raw["test"][t][0] for t in tasks]),
        "grey level in [0, 1] (white paper = 1)")
    splits = {}
    for split, stacked in (("train", x_tr_all), ("test", x_te_all)):
        bounds = np.cumsum([0] + [len(raw[split][t][1]) for t in tasks])
        inputs = {t: stacked[bounds[k]:bounds[k + 1]] for k, t in enumerate(tasks)}
        splits[split] = Split(inputs, {t: raw[split][t][1] for t in tasks})
    return MultiTaskData(name="omniglot", in_channels=1, input_size=size, shared_input=False,
                         tasks=tuple(TaskSpec(t, "classification", OMNIGLOT_WAYS) for t in tasks),
                         train=splits["train"], test=splits["test"], preprocessing=prep)


# The paper's presets (appendix Table 7): VGG-16's 12 states for the dense benchmarks, 8 states
# for Omniglot. The NumPy releases default to their files' own size; Omniglot to 32 x 32, which
# the `omniglot` preset's stride 8 divides (28 x 28 would not).
DATASETS = (
    *(Dataset(name, partial(_load_npy, name), preset="vgg16", on_disk=True, tasks=tuple(layout.folders))
      for name, layout in _NPY_LAYOUTS.items()),
    Dataset("omniglot", _load_omniglot, preset="omniglot", on_disk=True, find_tasks=_omniglot_tasks,
            input_size=(32, 32)),
)
