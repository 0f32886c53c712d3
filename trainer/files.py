"""Reading and checking the files of the on-disk datasets (`dagc.trainer.readers`,
`dagc.trainer.pascal`): every reader goes through these, so every bad file raises `DataError`
naming it and a corrupt sample is never skipped silently.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import numpy as np

from dagc.errors import DataError
from dagc.pictures import PictureError, decode_picture
from dagc.spec import TaskSpec
from dagc.trainer.data import IGNORE_INDEX

# How the labels 255 and -1 of the files are read: unlabelled.
_IGNORE_VALUES = (255, -1)


def natural_key(text: str) -> list:
    """Sort key ordering embedded numbers by value (``a2`` before ``a10``)."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", text) if part]


def subdirs(path: Path) -> list[Path]:
    """The subdirectories of ``path`` in natural order, without hidden ones and archivers' debris
    (``.git``, ``__MACOSX``); DataError if it cannot be listed."""
    try:
        return sorted((p for p in path.iterdir() if p.is_dir() and not p.name.startswith((".", "__"))),
                      key=lambda p: natural_key(p.name))
    except OSError as e:
        raise DataError(f"{path}: cannot list the folder ({e.strerror or e})") from None


def load_npy_file(path: Path) -> np.ndarray:
    """Reads one .npy array without pickle; DataError naming the file if it cannot be read."""
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise DataError(f"{path}: cannot read the array ({e}); the file is corrupt or not a .npy array") from None


def read_picture(path: Path, mode: str | None) -> np.ndarray:
    """Reads a PNG / JPEG, converted to ``mode`` (``RGB``, ``L``) unless it is None; returns its
    pixels (H, W[, C]). DataError naming the file if it is missing, unreadable or larger than
    `dagc.pictures.MAX_PIXELS` (`dagc.pictures.decode_picture`)."""
    return open_picture(path, None if mode is None else lambda _: mode)[0]


def open_picture(path: Path, convert: Callable[[str], str | None] | None = None) -> tuple[np.ndarray, str]:
    """Reads a PNG / JPEG, converted to ``convert(its mode)`` where that is not None; returns its
    pixels (H, W[, C]) and their mode (``L``, ``RGB``, ``I;16``...). DataError naming the file if
    it is missing, truncated, unreadable or larger than `dagc.pictures.MAX_PIXELS`."""
    if not path.is_file():
        raise DataError(f"{path}: file missing; every id of the split needs one")
    try:
        return decode_picture(path, convert)
    except PictureError as e:
        raise DataError(str(e)) from None


def load_mat(path: Path) -> dict:
    """Reads a MATLAB .mat file with scipy; DataError naming the file if missing or unreadable."""
    import scipy.io

    if not path.is_file():
        raise DataError(f"{path}: file missing; every id of the split needs one")
    try:
        return scipy.io.loadmat(str(path))
    except (scipy.io.matlab.MatReadError, OSError, ValueError, TypeError, NotImplementedError, EOFError) as e:
        raise DataError(f"{path}: cannot read the .mat file ({e}); the file is corrupt") from None


def read_labels(values: np.ndarray, path: Path, classes: int) -> np.ndarray:
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


def finite_float(arr: np.ndarray, path: Path, what: str) -> np.ndarray:
    """Returns ``arr`` as float32; DataError naming the file unless it is real and finite."""
    if arr.dtype.kind not in "iuf":
        raise DataError(f"{path}: {what} has dtype {arr.dtype}; expected a real number array")
    out = arr.astype(np.float32)
    if not np.isfinite(out).all():
        raise DataError(f"{path}: {what} contains NaN or infinite values")
    return out


def plane(arr: np.ndarray, path: Path, what: str) -> np.ndarray:
    """Takes (H, W) or (H, W, 1); returns (H, W). DataError naming the file for other shapes."""
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim != 2:
        raise DataError(f"{path}: {what} has shape {arr.shape}; expected (H, W) or (H, W, 1)")
    return arr


def normalise_normals(normal: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Takes (3, H, W) normals and a (H, W) validity mask; returns them scaled to unit length
    where valid and the zero vector elsewhere (interpolation shortens unit vectors)."""
    norm = np.sqrt((normal * normal).sum(axis=0))
    valid = valid & (norm > 1e-6)
    return np.where(valid[None], normal / np.maximum(norm, 1e-6)[None], 0.0).astype(np.float32)


def target_buffer(task: TaskSpec, n: int, size: tuple[int, int]) -> np.ndarray:
    """An uninitialised target array of n samples of a dense task in its kind's standard shape and
    dtype: labels int64 (n, H, W), values float32 (n, C, H, W)."""
    if task.labelled:
        return np.empty((n, *size), np.int64)
    return np.empty((n, task.out_channels, *size), np.float32)


def target_map(arr: np.ndarray, kind: str, path: Path, hw: tuple[int, int]) -> np.ndarray:
    """A dense target as read from ``path``, checked: (H, W, 3) for normals, one plane (H, W) for
    the other kinds (`plane`), and the size ``hw`` of its image. DataError naming the file."""
    if kind == "normal":
        if arr.ndim != 3 or arr.shape[2] != 3:
            raise DataError(f"{path}: normal map has shape {arr.shape}; expected (H, W, 3)")
    else:
        arr = plane(arr, path, f"{kind} map")
    if arr.shape[:2] != hw:
        raise DataError(f"{path}: {kind} map is {arr.shape[0]}x{arr.shape[1]} but its image is {hw[0]}x{hw[1]}")
    return arr
