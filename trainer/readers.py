"""Readers for the paper's real benchmarks (Sec. 4.1), from the on-disk layouts of the code the paper
follows. Nothing is downloaded: the user points ``root`` at a copy they already have.

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

``pascal-context`` -- the multi-task PASCAL-Context of ASTMT (Maninis et al. 2019) and
Multi-Task-Learning-PyTorch (Vandenhende et al.), the ``PASCAL_MT`` folder::

    ROOT/ImageSets/Context/{train,val}.txt      one image id per line
    ROOT/JPEGImages/<id>.jpg                    RGB image
    ROOT/semseg/pascal-context/<id>.png         21 classes (VOC's 20 + background), 255 ignore
                                                (semseg/VOC12/<id>.png is used when present,
                                                as the benchmark code does)
    ROOT/human_parts/<id>.mat                   PASCAL-Part annotation (``anno``)
    ROOT/sal_distill/<id>.png                   distilled saliency, grey 0..255
    ROOT/normals_distill/<id>.png               distilled normals, RGB = 255 (n + 1) / 2
    ROOT/pascal-context/trainval/<id>.mat       the full PASCAL-Context label map (``LabelMap``)

    Tasks: ``semseg`` (segmentation, 21 classes), ``human_parts`` (segmentation, 7 classes: 0
    background, 1 head, 2 torso, 3 upper arms, 4 lower arms and hands, 5 upper legs, 6 lower legs
    and feet -- the benchmark's 6-part grouping of the person's parts; an image without an
    annotated person is all ignore, as in the benchmark), ``saliency`` (kind ``saliency``: the
    grey level / 255 resized bilinearly, then > 0.5, as the benchmark binarises it), ``normal``
    (decoded as 2 RGB / 255 - 1, resized bilinearly and renormalised; zeroed on the PASCAL-Context
    classes that have no NYUD counterpart, the benchmark's mask of where the distilled normals
    are meaningful) and ``edge`` (the boundaries of ``LabelMap``). Images vary in size: all are
    resized to ``input_size`` (default 128 x 128; the benchmark uses 512 x 512, which takes about
    16x the memory) -- bilinearly for images, normals and saliency, by nearest neighbour for
    labels. Edges are computed on the label map after it is resized, so they stay one pixel thin
    at the model's resolution: a pixel is an edge when its label differs from its right or lower
    neighbour (the benchmark thins the support of the label map's Laplacian, which marks the
    same boundaries). A target map whose size differs from its image is resized like the others,
    as the benchmark does. ``train.txt`` is the train split, ``val.txt`` the test split.
"""

from __future__ import annotations

import os
import re
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dagc.errors import DataError
from dagc.preprocessing import resize_chw
from dagc.trainer.datasets import (
    ON_DISK,
    MultiTaskData,
    Split,
    TaskInfo,
    _check_count,
    _check_size,
    _check_tasks,
    _standardise,
)
from dagc.trainer.losses import IGNORE_INDEX

# Input size when the caller gives none; None: the files' own size.
DEFAULT_SIZE: dict[str, tuple[int, int] | None] = {
    "nyuv2": None, "cityscapes": None, "cityscapes19": None, "omniglot": (32, 32),
    "pascal-context": (128, 128),
}
OMNIGLOT_WAYS = 20
OMNIGLOT_TEST_FRACTION = 0.2
PASCAL_TASKS = ("semseg", "human_parts", "saliency", "normal", "edge")
_OMNIGLOT_SETS = ("images_background", "images_evaluation")
_IMAGE_EXTS = (".png",)
# How the labels 255 and -1 of the files are read: unlabelled.
_IGNORE_VALUES = (255, -1)


@dataclass(frozen=True)
class _NpyLayout:
    """One NumPy release: task -> (folder, TaskInfo)."""

    folders: dict[str, str]
    infos: dict[str, TaskInfo]


_NPY_LAYOUTS = {
    "nyuv2": _NpyLayout(
        {"segmentation": "label", "depth": "depth", "normal": "normal"},
        {"segmentation": TaskInfo("segmentation", "segmentation", 13), "depth": TaskInfo("depth", "depth", None),
         "normal": TaskInfo("normal", "normal", None)}),
    "cityscapes": _NpyLayout(
        {"segmentation": "label_7", "depth": "depth"},
        {"segmentation": TaskInfo("segmentation", "segmentation", 7), "depth": TaskInfo("depth", "depth", None)}),
    "cityscapes19": _NpyLayout(
        {"segmentation": "label_19", "depth": "depth"},
        {"segmentation": TaskInfo("segmentation", "segmentation", 19), "depth": TaskInfo("depth", "depth", None)}),
}
_PASCAL_INFOS = {
    "semseg": TaskInfo("semseg", "segmentation", 21),
    "human_parts": TaskInfo("human_parts", "segmentation", 7),
    "saliency": TaskInfo("saliency", "saliency", None),
    "normal": TaskInfo("normal", "normal", None),
    "edge": TaskInfo("edge", "edge", None),
}
# PASCAL-Part's person class and the benchmark's grouping of its parts into 6 (0 = background).
_PERSON_CLASS = 15
_HUMAN_PARTS = {
    **dict.fromkeys(("hair", "head", "lear", "lebrow", "leye", "mouth", "nose", "rear", "rebrow", "reye"), 1),
    **dict.fromkeys(("neck", "torso"), 2),
    **dict.fromkeys(("luarm", "ruarm"), 3),
    **dict.fromkeys(("llarm", "rlarm", "lhand", "rhand"), 4),
    **dict.fromkeys(("luleg", "ruleg"), 5),
    **dict.fromkeys(("llleg", "rlleg", "lfoot", "rfoot"), 6),
}
# PASCAL-Context (459-class LabelMap) ids whose class name also is an NYUD class (the distilled
# normals come from a network trained on NYUD), plus tvmonitor: the benchmark's normals mask,
# computed from its class lists (db_info/context_classes.json and nyu_classes.json).
_NORMAL_VALID_CLASSES = np.array([
    3, 4, 6, 9, 10, 11, 13, 15, 17, 18, 22, 23, 29, 30, 33, 34, 36, 37, 38, 39, 41, 43, 46, 49, 50,
    51, 53, 55, 56, 59, 61, 62, 65, 66, 68, 69, 72, 73, 78, 83, 84, 85, 87, 88, 95, 96, 101, 104,
    105, 107, 111, 113, 115, 122, 124, 135, 141, 142, 143, 146, 150, 154, 157, 158, 159, 165, 172,
    174, 181, 183, 184, 191, 193, 195, 197, 199, 202, 213, 215, 216, 219, 220, 223, 225, 228, 230,
    232, 233, 238, 239, 242, 243, 246, 250, 251, 252, 255, 260, 261, 263, 269, 272, 273, 275, 281,
    283, 284, 285, 286, 287, 288, 290, 291, 292, 293, 295, 304, 307, 309, 310, 314, 315, 319, 323,
    329, 330, 331, 336, 342, 345, 349, 350, 351, 352, 355, 357, 368, 370, 371, 374, 379, 380, 383,
    384, 397, 401, 403, 405, 407, 408, 411, 412, 413, 414, 417, 419, 421, 423, 427, 429, 430, 432,
    440, 441, 442, 443, 444, 446, 454, 457,
])

assert set(DEFAULT_SIZE) == set(ON_DISK), "readers and datasets.ON_DISK must name the same datasets"


# ---------------------------------------------------------------------------------- public API
def task_names(name: str, root: str | os.PathLike | None = None) -> tuple[str, ...]:
    """Takes an on-disk dataset name and (for Omniglot, whose tasks are its alphabets) its root;
    returns the tasks it offers, in the default order.

    Raises DataError for an unknown name, for Omniglot without a root, or an unreadable root.
    """
    if name in _NPY_LAYOUTS:
        return tuple(_NPY_LAYOUTS[name].folders)
    if name == "pascal-context":
        return PASCAL_TASKS
    if name == "omniglot":
        if root is None:
            raise DataError("omniglot's tasks are the alphabets under its root; give the root "
                            "(--data-root DIR) to list them")
        return tuple(_omniglot_alphabets(_check_root(name, root)))
    raise DataError(f"unknown on-disk dataset {name!r}; choose one of {list(ON_DISK)}")


def load(name: str, root: str | os.PathLike | None, *, tasks: Sequence[str] | None = None, seed: int = 0,
         input_size: tuple[int, int] | None = None, n_train: int | None = None,
         n_test: int | None = None) -> MultiTaskData:
    """Takes an on-disk dataset name (`ON_DISK`), its root directory and the options of
    `datasets.load_dataset`; returns the dataset with the selected tasks (see the module doc for
    layouts, defaults and what is checked).

    Raises DataError for a missing root or split, a missing task folder or file, mismatched
    indices, a file of the wrong shape, dtype or values, an unreadable file, or a bad option.
    """
    if name not in DEFAULT_SIZE:
        raise DataError(f"unknown on-disk dataset {name!r}; choose one of {list(ON_DISK)}")
    if root is None:
        raise DataError(f"dataset {name!r} is read from disk; give its root directory (--data-root DIR)")
    base = _check_root(name, root)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise DataError(f"seed must be an integer >= 0, got {seed!r}")
    size = _check_size(name, input_size) if input_size is not None else DEFAULT_SIZE[name]
    n_tr = _check_count("n_train", n_train, None)
    n_te = _check_count("n_test", n_test, None)
    if name == "omniglot":
        alphabets = _omniglot_alphabets(base)
        selected = _check_tasks(name, tasks, valid=tuple(alphabets))
        return _load_omniglot(base, {t: alphabets[t] for t in selected}, int(seed), size, n_tr, n_te)
    selected = _check_tasks(name, tasks, valid=task_names(name))
    if name == "pascal-context":
        return _load_pascal(base, selected, size, n_tr, n_te)
    return _load_npy(name, base, selected, size, n_tr, n_te)


# -------------------------------------------------------------------------------- file helpers
def _check_root(name: str, root: str | os.PathLike) -> Path:
    """Returns ``root`` as a Path; raises DataError unless it is an existing directory."""
    path = Path(root)
    if not path.is_dir():
        what = "is not a directory" if path.exists() else "does not exist"
        raise DataError(f"data root {path} {what}; give the folder that holds the {name} dataset")
    return path


def _natural_key(text: str) -> list:
    """Sort key ordering embedded numbers by value (``a2`` before ``a10``)."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", text) if part]


def _subdirs(path: Path) -> list[Path]:
    """The subdirectories of ``path`` in natural order, without hidden ones and archivers' debris
    (``.git``, ``__MACOSX``); DataError if it cannot be listed."""
    try:
        return sorted((p for p in path.iterdir() if p.is_dir() and not p.name.startswith((".", "__"))),
                      key=lambda p: _natural_key(p.name))
    except OSError as e:
        raise DataError(f"{path}: cannot list the folder ({e.strerror or e})") from None


def _load_npy_file(path: Path) -> np.ndarray:
    """Reads one .npy array without pickle; DataError naming the file if it cannot be read."""
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise DataError(f"{path}: cannot read the array ({e}); the file is corrupt or not a .npy array") from None


def _read_picture(path: Path, mode: str) -> np.ndarray:
    """Reads a PNG / JPEG with Pillow, converted to ``mode`` (``RGB``, ``L``) unless it is None;
    returns its pixels (H, W[, C]). DataError naming the file if it is missing or unreadable."""
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise DataError(f"{path}: file missing; every id of the split needs one")
    try:
        with Image.open(path) as im:
            im.load()
            return np.asarray(im.convert(mode) if mode and im.mode != mode else im)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise DataError(f"{path}: cannot read the image ({e}); the file is corrupt or not an image") from None


def _load_mat(path: Path) -> dict:
    """Reads a MATLAB .mat file with scipy; DataError naming the file if missing or unreadable."""
    import scipy.io

    if not path.is_file():
        raise DataError(f"{path}: file missing; every id of the split needs one")
    try:
        return scipy.io.loadmat(str(path))
    except (scipy.io.matlab.MatReadError, OSError, ValueError, TypeError, NotImplementedError, EOFError) as e:
        raise DataError(f"{path}: cannot read the .mat file ({e}); the file is corrupt") from None


def _labels(values: np.ndarray, path: Path, classes: int) -> np.ndarray:
    """Takes raw label values; returns int64 labels with 255 / -1 as IGNORE_INDEX. DataError
    naming the file for non-integer, non-finite or out-of-range values."""
    if values.dtype.kind not in "iuf":
        raise DataError(f"{path}: labels have dtype {values.dtype}; expected integers (or integral floats)")
    if values.dtype.kind == "f":
        if not np.isfinite(values).all():
            raise DataError(f"{path}: labels contain NaN or infinite values")
        if (values != np.round(values)).any():
            raise DataError(f"{path}: labels are not whole numbers; expected class indices")
    out = values.astype(np.int64)
    out[np.isin(out, _IGNORE_VALUES)] = IGNORE_INDEX
    bad = (out != IGNORE_INDEX) & ((out < 0) | (out >= classes))
    if bad.any():
        raise DataError(f"{path}: label {int(out[bad][0])} is outside the {classes} classes 0..{classes - 1} "
                        "(unlabelled pixels must be -1 or 255)")
    return out


def _finite_float(arr: np.ndarray, path: Path, what: str) -> np.ndarray:
    """Returns ``arr`` as float32; DataError naming the file unless it is real and finite."""
    if arr.dtype.kind not in "iuf":
        raise DataError(f"{path}: {what} has dtype {arr.dtype}; expected a real number array")
    out = arr.astype(np.float32)
    if not np.isfinite(out).all():
        raise DataError(f"{path}: {what} contains NaN or infinite values")
    return out


def _plane(arr: np.ndarray, path: Path, what: str) -> np.ndarray:
    """Takes (H, W) or (H, W, 1); returns (H, W). DataError naming the file for other shapes."""
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim != 2:
        raise DataError(f"{path}: {what} has shape {arr.shape}; expected (H, W) or (H, W, 1)")
    return arr


def _normalise_normals(normal: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Takes (3, H, W) normals and a (H, W) validity mask; returns them scaled to unit length
    where valid and the zero vector elsewhere (interpolation shortens unit vectors)."""
    norm = np.sqrt((normal * normal).sum(axis=0))
    valid = valid & (norm > 1e-6)
    return np.where(valid[None], normal / np.maximum(norm, 1e-6)[None], 0.0).astype(np.float32)


# ------------------------------------------------------------------------ NYU-v2 / Cityscapes
def _npy_indices(folder: Path) -> dict[str, Path]:
    """The ``<index>.npy`` files of a folder, by index (stem), in numeric order."""
    try:
        files = [p for p in folder.iterdir() if p.suffix == ".npy" and not p.name.startswith(".")]
    except OSError as e:
        raise DataError(f"{folder}: cannot list the folder ({e.strerror or e})") from None
    return {p.stem: p for p in sorted(files, key=lambda p: _natural_key(p.stem))}


def _split_dir(name: str, base: Path, split: str) -> Path:
    """The folder of one split (``val`` falls back to ``test``); DataError if missing."""
    for candidate in ((split,) if split == "train" else ("val", "test")):
        if (base / candidate).is_dir():
            return base / candidate
    folders = "train" if split == "train" else "val"
    raise DataError(f"{base}: no '{folders}' folder; the {name} layout is ROOT/{{train,val}}/image/<index>.npy "
                    "plus one folder per task")


def _load_npy(name: str, base: Path, tasks: tuple[str, ...], size: tuple[int, int] | None,
              n_train: int | None, n_test: int | None) -> MultiTaskData:
    """Reads a NumPy release (NYU-v2 / Cityscapes): both splits, the selected tasks."""
    layout = _NPY_LAYOUTS[name]
    x_tr, y_tr, size = _npy_split(name, _split_dir(name, base, "train"), layout, tasks, size, n_train)
    # The test split is resized to the train split's size, whatever the files' own.
    x_te, y_te, _ = _npy_split(name, _split_dir(name, base, "test"), layout, tasks, size, n_test)
    x_tr, x_te, prep = _standardise(x_tr, x_te, "RGB in [0, 1]")
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
            targets = {t: _target_buffer(layout.infos[t], n, size) for t in tasks}
        x[i] = resize_chw(img.transpose(2, 0, 1), size)
        for t in tasks:
            targets[t][i] = _npy_target(layout.infos[t], files[t][key], (h, w), size)
    return x, targets, size


def _target_buffer(info: TaskInfo, n: int, size: tuple[int, int]) -> np.ndarray:
    """An uninitialised target array of n samples in the standard shape and dtype of the kind."""
    if info.kind == "segmentation":
        return np.empty((n, *size), np.int64)
    return np.empty((n, 3 if info.kind == "normal" else 1, *size), np.float32)


def _npy_image(path: Path) -> np.ndarray:
    """One image (H, W, 3) float32 in [0, 1] (uint8 files are divided by 255)."""
    arr = _load_npy_file(path)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise DataError(f"{path}: image has shape {arr.shape}; expected (H, W, 3)")
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 255.0
    if arr.dtype.kind != "f":
        raise DataError(f"{path}: image has dtype {arr.dtype}; expected float in [0, 1] or uint8")
    img = _finite_float(arr, path, "image")
    # A little slack: the release's floats come from 8-bit pictures, but rounding happens.
    if img.min() < -1e-3 or img.max() > 1 + 1e-3:
        raise DataError(f"{path}: image values span [{img.min():.3g}, {img.max():.3g}]; expected [0, 1]")
    return np.clip(img, 0.0, 1.0)


def _npy_target(info: TaskInfo, path: Path, hw: tuple[int, int], size: tuple[int, int]) -> np.ndarray:
    """Reads one target file, checks it against its image's (H, W) and returns it resized to
    ``size`` in the kind's standard layout."""
    arr = _load_npy_file(path)
    if info.kind == "normal":
        if arr.ndim != 3 or arr.shape[2] != 3:
            raise DataError(f"{path}: normal map has shape {arr.shape}; expected (H, W, 3)")
    else:
        arr = _plane(arr, path, f"{info.kind} map")
    if arr.shape[:2] != hw:
        raise DataError(f"{path}: {info.kind} map is {arr.shape[0]}x{arr.shape[1]} but its image is "
                        f"{hw[0]}x{hw[1]}")
    if info.kind == "segmentation":
        labels = _labels(arr, path, info.classes)
        return resize_chw(labels[None], size, nearest=True)[0].astype(np.int64)
    values = _finite_float(arr, path, f"{info.kind} map")
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
    return _normalise_normals(resize_chw(chw, size), valid)


# ------------------------------------------------------------------------------------ Omniglot
def _task_name(alphabet: str) -> str:
    """An alphabet folder name as a task name (letters, digits and single underscores)."""
    return re.sub(r"[^A-Za-z0-9]+", "_", alphabet).strip("_")


def _omniglot_alphabets(base: Path) -> dict[str, Path]:
    """Task name -> alphabet folder, sorted by task name; DataError for an empty root or two
    alphabets with the same task name."""
    sets = [base / s for s in _OMNIGLOT_SETS if (base / s).is_dir()]
    folders = [a for s in (sets or [base]) for a in _subdirs(s)]
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
    return dict(sorted(out.items(), key=lambda kv: _natural_key(kv[0])))


def _omniglot_characters(alphabet: Path) -> list[tuple[Path, list[Path]]]:
    """The first `OMNIGLOT_WAYS` characters of an alphabet with their drawings; DataError for an
    alphabet with fewer characters or a character with fewer than 2 drawings."""
    chars = _subdirs(alphabet)
    if len(chars) < OMNIGLOT_WAYS:
        raise DataError(f"{alphabet}: alphabet has {len(chars)} characters; an omniglot task is "
                        f"{OMNIGLOT_WAYS}-way, so each alphabet needs at least {OMNIGLOT_WAYS}")
    out = []
    for char in chars[:OMNIGLOT_WAYS]:
        try:
            drawings = sorted((p for p in char.iterdir() if p.suffix.lower() in _IMAGE_EXTS
                               and not p.name.startswith(".")), key=lambda p: _natural_key(p.name))
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


def _load_omniglot(base: Path, alphabets: dict[str, Path], seed: int, size: tuple[int, int],
                   n_train: int | None, n_test: int | None) -> MultiTaskData:
    """Reads the selected alphabets, one 20-way task each, and splits every character's drawings."""
    raw: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {"train": {}, "test": {}}
    for task, folder in alphabets.items():
        parts: dict[str, tuple[list, list]] = {"train": ([], []), "test": ([], [])}
        for label, (char, drawings) in enumerate(_omniglot_characters(folder)):
            train_idx, test_idx = _omniglot_split(seed, f"{folder.name}/{char.name}", len(drawings))
            for split, idx in (("train", train_idx), ("test", test_idx)):
                for k in idx:
                    grey = _read_picture(drawings[k], "L").astype(np.float32) / 255.0
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
    x_tr_all, x_te_all, prep = _standardise(
        np.concatenate([raw["train"][t][0] for t in tasks]), np.concatenate([raw["test"][t][0] for t in tasks]),
        "grey level in [0, 1] (white paper = 1)")
    splits = {}
    for split, stacked in (("train", x_tr_all), ("test", x_te_all)):
        bounds = np.cumsum([0] + [len(raw[split][t][1]) for t in tasks])
        inputs = {t: stacked[bounds[k]:bounds[k + 1]] for k, t in enumerate(tasks)}
        splits[split] = Split(inputs, {t: raw[split][t][1] for t in tasks})
    return MultiTaskData(name="omniglot", in_channels=1, input_size=size, shared_input=False,
                         tasks=tuple(TaskInfo(t, "classification", OMNIGLOT_WAYS) for t in tasks),
                         train=splits["train"], test=splits["test"], preprocessing=prep)


# ------------------------------------------------------------------------------ PASCAL-Context
def _pascal_ids(base: Path, split: str) -> list[str]:
    """The image ids of ``ImageSets/Context/<split>.txt``; DataError if missing, empty or repeated."""
    path = base / "ImageSets" / "Context" / f"{split}.txt"
    if not path.is_file():
        raise DataError(f"{path}: split list missing; the pascal-context layout has "
                        "ROOT/ImageSets/Context/{train,val}.txt")
    try:
        ids = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read the split list ({e})") from None
    if not ids:
        raise DataError(f"{path}: the split list is empty")
    seen = set()
    for i in ids:
        if i in seen:
            raise DataError(f"{path}: image id {i!r} is listed twice")
        seen.add(i)
    return ids


def _label_png(path: Path, classes: int) -> np.ndarray:
    """A single-channel label PNG as int64 labels (255 -> IGNORE_INDEX)."""
    arr = _read_picture(path, None)
    if arr.ndim != 2:
        raise DataError(f"{path}: label image has shape {arr.shape}; expected a single-channel (palette or "
                        "grey) PNG of class indices")
    return _labels(arr, path, classes)


def _label_map(path: Path) -> np.ndarray:
    """The full PASCAL-Context ``LabelMap`` (H, W) int64 of a .mat file."""
    mat = _load_mat(path)
    if "LabelMap" not in mat:
        raise DataError(f"{path}: no 'LabelMap' variable; expected a PASCAL-Context trainval label file")
    arr = _plane(np.asarray(mat["LabelMap"]), path, "LabelMap")
    if arr.dtype.kind not in "iuf" or (arr.dtype.kind == "f" and not np.isfinite(arr).all()):
        raise DataError(f"{path}: LabelMap has dtype {arr.dtype} or non-finite values; expected class ids")
    return arr.astype(np.int64)


def _human_parts(path: Path) -> np.ndarray | None:
    """The 7-class part labels (H, W) int64 of a PASCAL-Part annotation, or None when it holds no
    person with annotated parts (the benchmark then ignores the whole image)."""
    mat = _load_mat(path)
    target = None
    try:
        # Positional fields, as the benchmark reads them: anno -> objects; object = (class,
        # class_ind, mask, parts); part = (part_name, mask).
        objects = mat["anno"][0][0][1][0]
        for obj in objects:
            parts = obj[3]
            if int(np.asarray(obj[1]).ravel()[0]) != _PERSON_CLASS or parts.size == 0:
                continue
            mask = np.asarray(obj[2])
            if target is None:
                target = np.zeros(mask.shape, np.int64)
            for part in parts[0]:
                name = str(np.asarray(part[0]).ravel()[0])
                if name not in _HUMAN_PARTS:
                    raise DataError(f"{path}: unknown person part {name!r}; expected PASCAL-Part's names "
                                    f"({', '.join(sorted(_HUMAN_PARTS))})")
                pmask = np.asarray(part[1]).astype(bool)
                if pmask.shape != target.shape:
                    raise DataError(f"{path}: part {name!r} mask is {pmask.shape} but the person mask is "
                                    f"{target.shape}")
                target[pmask] = _HUMAN_PARTS[name]
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as e:
        raise DataError(f"{path}: not a PASCAL-Part annotation (anno.objects.parts) ({e})") from None
    return target


def _load_pascal(base: Path, tasks: tuple[str, ...], size: tuple[int, int], n_train: int | None,
                 n_test: int | None) -> MultiTaskData:
    """Reads PASCAL-Context's train and val lists, the selected tasks, resized to ``size``."""
    x_tr, y_tr = _pascal_split(base, "train", tasks, size, n_train)
    x_te, y_te = _pascal_split(base, "val", tasks, size, n_test)
    h, w = size
    x_tr, x_te, prep = _standardise(x_tr, x_te, f"RGB in [0, 1] (8-bit / 255), resized bilinearly to {h}x{w}")
    return MultiTaskData(name="pascal-context", in_channels=3, input_size=size, shared_input=True,
                         tasks=tuple(_PASCAL_INFOS[t] for t in tasks), train=Split(x_tr, y_tr),
                         test=Split(x_te, y_te), preprocessing=prep)


def _pascal_split(base: Path, split: str, tasks: tuple[str, ...], size: tuple[int, int], cap: int | None
                  ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Reads one split: raw inputs (n, 3, H, W) and the selected tasks' targets."""
    ids = _pascal_ids(base, split)[:cap] if cap is not None else _pascal_ids(base, split)
    n = len(ids)
    x = np.empty((n, 3, *size), np.float32)
    targets = {t: _target_buffer(_PASCAL_INFOS[t], n, size) for t in tasks}
    readers: dict[str, Callable[[str], np.ndarray]] = {
        "semseg": lambda i: resize_chw(_label_png(_semseg_path(base, i), 21)[None], size, nearest=True)[0],
        "human_parts": lambda i: _parts_target(base / "human_parts" / f"{i}.mat", size),
        "saliency": lambda i: _saliency_target(base / "sal_distill" / f"{i}.png", size),
    }
    for k, i in enumerate(ids):
        img = _read_picture(base / "JPEGImages" / f"{i}.jpg", "RGB").astype(np.float32) / 255.0
        x[k] = resize_chw(img.transpose(2, 0, 1), size)
        for t in tasks:
            if t in readers:
                targets[t][k] = readers[t](i)
        if "normal" in tasks or "edge" in tasks:
            # Both come from the full label map, resized once by nearest neighbour.
            label_map = resize_chw(_label_map(base / "pascal-context" / "trainval" / f"{i}.mat")[None], size,
                                nearest=True)[0].astype(np.int64)
            if "normal" in tasks:
                targets["normal"][k] = _normal_target(base / "normals_distill" / f"{i}.png", label_map, size)
            if "edge" in tasks:
                targets["edge"][k, 0] = _edges(label_map)
    return x, targets


def _semseg_path(base: Path, image_id: str) -> Path:
    """The semantic label file of an id: VOC12's when present (as the benchmark code prefers)."""
    voc = base / "semseg" / "VOC12" / f"{image_id}.png"
    return voc if voc.is_file() else base / "semseg" / "pascal-context" / f"{image_id}.png"


def _parts_target(path: Path, size: tuple[int, int]) -> np.ndarray:
    """Human-part labels resized by nearest neighbour; all IGNORE_INDEX without a person."""
    parts = _human_parts(path)
    if parts is None:
        return np.full(size, IGNORE_INDEX, np.int64)
    return resize_chw(parts[None], size, nearest=True)[0].astype(np.int64)


def _saliency_target(path: Path, size: tuple[int, int]) -> np.ndarray:
    """The distilled saliency map (1, H, W): grey / 255, resized bilinearly, then > 0.5."""
    arr = _read_picture(path, "L").astype(np.float32) / 255.0
    return (resize_chw(arr[None], size) > 0.5).astype(np.float32)


def _normal_target(path: Path, label_map: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The distilled normals (3, H, W): decoded, resized, renormalised; zero on classes outside
    `_NORMAL_VALID_CLASSES`."""
    rgb = _read_picture(path, "RGB").astype(np.float32)
    normal = resize_chw((2.0 * rgb / 255.0 - 1.0).transpose(2, 0, 1), size)
    return _normalise_normals(normal, np.isin(label_map, _NORMAL_VALID_CLASSES))


def _edges(label_map: np.ndarray) -> np.ndarray:
    """Takes a label map (H, W); returns float32 (H, W) with 1 where a pixel's label differs
    from its right or lower neighbour (one-pixel thin boundaries), else 0."""
    edge = np.zeros(label_map.shape, bool)
    edge[:, :-1] |= label_map[:, :-1] != label_map[:, 1:]
    edge[:-1, :] |= label_map[:-1, :] != label_map[1:, :]
    return edge.astype(np.float32)
