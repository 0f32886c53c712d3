"""Image files in, readable outputs out: what ``dagc run ART IMAGE... --out DIR`` does.

`read_image` turns a PNG/JPEG/.npy file into one preprocessed model input, `save_outputs` writes a
sample's outputs (raw ``.npy`` plus a picture or top-k JSON), `run_images` does both around
`dagc.runtime.load`.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dagc.manifest import Manifest
from dagc.outputs import check_not_input, check_writable_dir
from dagc.pictures import MAX_PIXELS, PictureError, PictureTooLarge, decode_picture
from dagc.precision_table import REFERENCE
from dagc.preprocessing import Preprocessing, resize_chw
from dagc.runtime.engine import ArtifactError, InputError, load
from dagc.writing import check_name_fits, write_atomic, write_failed

__all__ = ["read_image", "save_outputs", "run_images", "IMAGE_SUFFIXES", "MAX_PIXELS"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
_MODES = {1: "L", 3: "RGB", 4: "RGBA"}
# MAX_PIXELS (dagc.pictures): the largest picture `read_image` decodes (about 7000 x 7000: any
# camera's photo fits), checked against the file's header before anything is decoded: a small file
# can claim a huge size (a decompression bomb) and decoding it would take gigabytes.
# Pillow's modes for 16-bit (and 32-bit integer) grey pixels; converting them to "L" or "RGB"
# clips at 255, so they are scaled here instead (a 16-bit PNG's 0..65535 onto [0, 1]).
_WIDE_GREY = {"I;16": 65535.0, "I;16L": 65535.0, "I;16B": 65535.0, "I;16N": 65535.0, "I": 65535.0}


def _chw(input_spec: Mapping[str, Any]) -> tuple[int, int, int]:
    c, h, w = (int(v) for v in input_spec["shape"][1:])
    return c, h, w


def _read_picture(path: Path, c: int) -> np.ndarray:
    """(C, H, W) float32 pixel values in [0, 1] from a PNG/JPEG: 8-bit pixels / 255, 16-bit grey
    pixels / 65535. Refuses a header size above `MAX_PIXELS` before decoding
    (`dagc.pictures.decode_picture`)."""
    if c not in _MODES:
        raise InputError(f"{path}: the model takes {c}-channel inputs, which an image file cannot hold; "
                         "pass a .npy array (C, H, W) instead")
    try:
        arr, mode = decode_picture(path, lambda m: None if m in _WIDE_GREY else _MODES[c])
    except PictureTooLarge as e:
        raise InputError(f"{e} (dagc.runtime.images.MAX_PIXELS)") from None
    except PictureError as e:
        raise InputError(str(e)) from None
    if mode in _WIDE_GREY:
        grey = np.clip(arr.astype(np.float64) / _WIDE_GREY[mode], 0.0, 1.0)
        return _grey_to(grey.astype(np.float32), c)
    arr = arr.reshape(arr.shape[0], arr.shape[1], -1).transpose(2, 0, 1)
    return arr.astype(np.float32) / 255.0


def _grey_to(grey: np.ndarray, c: int) -> np.ndarray:
    """(H, W) grey values in [0, 1] as ``c`` channels: grey, RGB (grey thrice) or RGBA (opaque)."""
    planes = [grey] * min(c, 3) + ([np.ones_like(grey)] if c == 4 else [])
    return np.stack(planes)


def _read_npy(path: Path, c: int, h: int, w: int) -> tuple[np.ndarray, bool]:
    """(C, H, W) float32 from a .npy array and whether it held 8-bit pixels (uint8)."""
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise InputError(f"{path}: cannot read the array ({e})") from None
    if not isinstance(arr, np.ndarray) or arr.dtype.kind not in "fiu":
        raise InputError(f"{path}: expected a numeric array, got dtype {getattr(arr, 'dtype', type(arr).__name__)}")
    if arr.ndim == 2 and c == 1:
        arr = arr[None]
    elif arr.ndim == 3:
        chw, hwc = arr.shape[0] == c, arr.shape[2] == c
        if chw and hwc:  # (C, x, C): decide by the expected size, else refuse
            chw, hwc = arr.shape[1:] == (h, w), arr.shape[:2] == (h, w)
            if chw == hwc:
                raise InputError(f"{path}: shape {arr.shape} is ambiguous between (C, H, W) and (H, W, C); "
                                 f"save it as ({c}, H, W)")
        if hwc and not chw:
            arr = arr.transpose(2, 0, 1)
        elif not chw:
            raise InputError(f"{path}: array of shape {arr.shape} has no axis of {c} channels; the model "
                             f"takes {c}-channel images as (C, H, W) or (H, W, C)")
    else:
        allowed = "(H, W), (C, H, W) or (H, W, C)" if c == 1 else "(C, H, W) or (H, W, C)"
        raise InputError(f"{path}: array of shape {arr.shape} is not an image; expected {allowed} with C = {c}")
    pixels = arr.dtype == np.uint8
    x = np.ascontiguousarray(arr, dtype=np.float32)
    if pixels:
        x /= 255.0
    if not np.all(np.isfinite(x)):
        raise InputError(f"{path}: the array contains NaN or infinite values")
    return x, pixels


def read_image(path: str | os.PathLike, input_spec: Mapping[str, Any]) -> np.ndarray:
    """One model input (C, H, W) float32 from an image file, preprocessed as the manifest says.

    Takes the file and an engine's ``input_spec`` (``shape``, and ``preprocessing``: the
    `dagc.preprocessing.Preprocessing.to_dict` form, or None).

    * PNG/JPEG (Pillow): converted to RGB for 3-channel models, to grey ("L") for 1-channel ones
      (RGBA for 4); 8-bit pixels 0..255 (16-bit grey PNGs: 0..65535) are mapped linearly onto
      the preprocessing's ``raw_range`` ([0, 1] when the artifact recorded no preprocessing).
      A picture whose header claims more than `MAX_PIXELS` pixels is refused before decoding.
    * ``.npy`` (``allow_pickle=False``): (H, W) for 1 channel, (C, H, W) or (H, W, C) when it is
      unambiguous; float arrays are taken as raw values already in that range, uint8 arrays as
      8-bit pixels like image files.
    * Resized to the model's H x W with bilinear interpolation (Pillow) when the size differs.
    * Then ``(raw - mean) / std`` per channel (skipped when the artifact recorded no preprocessing).

    Raises InputError naming the file when it is missing, unreadable or corrupt, of an unknown
    type, or has the wrong number of channels; DataError for an invalid ``preprocessing``.
    """
    p = Path(path)
    c, h, w = _chw(input_spec)
    if not p.is_file():
        raise InputError(f"{p}: no such image file")
    suffix = p.suffix.lower()
    record = input_spec["preprocessing"]
    pre = None if record is None else Preprocessing.from_dict(record)
    lo, hi = (0.0, 1.0) if pre is None else pre.raw_range
    if suffix in IMAGE_SUFFIXES:
        x, scale = _read_picture(p, c), True
    elif suffix == ".npy":
        x, scale = _read_npy(p, c, h, w)
    else:
        raise InputError(f"{p}: unsupported file type {p.suffix or '(none)'!r}; pass PNG, JPEG or .npy files")
    if scale and (lo, hi) != (0.0, 1.0):
        x = lo + (hi - lo) * x
    x = resize_chw(x, (h, w))
    if pre is not None:
        if pre.channels not in (1, c):
            raise ArtifactError(f"the manifest's preprocessing has {pre.channels} means and stds for {c}-channel "
                                "inputs; recompile the artifact")
        x = pre.normalise(x)
    return np.ascontiguousarray(x, dtype=np.float32)


# ---------------------------------------------------------------------------------------------------
# outputs


def _atomic_write(path: Path, write) -> Path:
    """`dagc.writing.write_atomic`, failing with InputError (the output directory is the caller's)."""
    return write_atomic(path, write, error=InputError)


def _save_png(path: Path, rgb_or_grey: np.ndarray) -> Path:
    from PIL import Image

    im = Image.fromarray(np.ascontiguousarray(rgb_or_grey))
    return _atomic_write(path, lambda tmp: im.save(tmp, format="PNG"))


def _palette(n: int) -> np.ndarray:
    """n distinct colours (uint8 RGB): matplotlib's tab20, then evenly spaced hues."""
    from matplotlib import colormaps

    base = (np.asarray(colormaps["tab20"].colors)[:, :3] * 255).round().astype(np.uint8)
    if n <= len(base):
        return base[:n]
    hsv = colormaps["hsv"](np.linspace(0, 1, n, endpoint=False))[:, :3]
    return (hsv * 255).round().astype(np.uint8)


def _to_u8(x: np.ndarray) -> np.ndarray:
    return (np.clip(x, 0.0, 1.0) * 255).round().astype(np.uint8)


def _normalise(x: np.ndarray) -> np.ndarray:
    lo, hi = float(np.min(x)), float(np.max(x))
    return (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64) - np.max(z)
    e = np.exp(z)
    return e / e.sum()


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]", "_", name) or "_"


def save_outputs(out_dir: str | os.PathLike, name: str, outputs: Mapping[str, np.ndarray],
                 manifest: Manifest, written: list[Path] | None = None) -> list[Path]:
    """Write one sample's outputs; returns the paths written (``written``, when given, gets each
    path as soon as its file is complete: what an error leaves).

    Takes the output directory (created if needed), the sample's name (file name stem), its
    outputs task -> array ((out, H, W) for dense tasks, (classes,) for classification; a leading
    batch axis of 1 is dropped) and the artifact's `Manifest` (for each task's kind). For every task
    writes ``<name>_<task>.npy`` (the raw output) and:

    * segmentation: ``<name>_<task>.png``, the per-pixel argmax in a colour palette;
    * depth: ``<name>_<task>.png``, viridis, normalised to the image's own min..max;
    * normal: ``<name>_<task>.png``, RGB = (n + 1) / 2;
    * edge, saliency: ``<name>_<task>.png``, grey, the prediction clipped to [0, 1];
    * classification: ``<name>_<task>.json``, the top-k (k = min(5, classes)) class indices
      (``label``) with softmax probabilities;
    * regression (any other per-image kind): ``<name>_<task>.json``, its ``values``.

    Every file is written atomically (`dagc.writing.write_atomic`; InputError, a full device says
    so): an error leaves no partial file."""
    from matplotlib import colormaps

    out = _make_dir(Path(out_dir))
    kinds = {t: info.kind for t, info in manifest.tasks.items()}
    per_image = {t for t, info in manifest.tasks.items() if len(info.output_shape) == 1}
    written = [] if written is None else written
    stem = _safe(name)
    for task, value in outputs.items():
        y = np.asarray(value, dtype=np.float32)
        kind = kinds.get(task)
        if kind is None:
            raise InputError(f"task {task!r} is not in the manifest (tasks {sorted(kinds)})")
        if y.ndim in (2, 4) and y.shape[0] == 1 and (y.ndim == 4 or task in per_image):
            y = y[0]
        base = f"{stem}_{_safe(task)}"
        written.append(_atomic_write(out / f"{base}.npy", lambda tmp, y=y: _save_npy(tmp, y)))
        if kind == "classification":
            probs = _softmax(y.reshape(-1))
            k = min(5, probs.size)
            top = np.argsort(-probs, kind="stable")[:k]
            doc = {"task": task, "top_k": [{"label": int(i), "probability": round(float(probs[i]), 6)} for i in top]}
            written.append(_write_json(out / f"{base}.json", doc))
            continue
        if task in per_image:  # regression and any other per-image vector: its values
            written.append(_write_json(out / f"{base}.json", {"task": task, "values": [round(float(v), 6)
                                                                                      for v in y.reshape(-1)]}))
            continue
        if y.ndim != 3:
            raise InputError(f"task {task!r}: expected a dense output (out, H, W), got shape {y.shape}")
        if kind == "segmentation":
            labels = np.argmax(y, axis=0)
            picture = _palette(y.shape[0])[labels]
        elif kind == "depth":
            picture = (colormaps["viridis"](_normalise(y[0]))[..., :3] * 255).round().astype(np.uint8)
        elif kind == "normal":
            picture = _to_u8((y[:3].transpose(1, 2, 0) + 1.0) / 2.0)
        else:  # edge, saliency and any other one-channel map
            picture = _to_u8(y[0])
        written.append(_save_png(out / f"{base}.png", picture))
    return written


def _make_dir(out: Path) -> Path:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise write_failed(out, e, InputError) from None
    return out


def _write_json(path: Path, doc: dict) -> Path:
    """Writes ``doc`` as indented JSON, atomically; returns the path."""
    text = json.dumps(doc, indent=2) + "\n"
    return _atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def _save_npy(tmp: str, y: np.ndarray) -> None:
    with open(tmp, "wb") as f:
        np.save(f, y, allow_pickle=False)


NO_PREPROCESSING = ("the artifact records no preprocessing, so image pixels are fed as values in [0, 1] "
                    "without normalisation; compile a checkpoint that records one (dagc train writes it)")


class NoPreprocessingWarning(UserWarning):
    """`run_images` fed image files to an artifact that records no preprocessing."""


def run_images(artifact_dir: str | os.PathLike, paths: Sequence[str | os.PathLike], out_dir: str | os.PathLike,
               tasks: Iterable[str] | str | None = None, backend: str = "auto", precision: str = REFERENCE) -> list[Path]:
    """``dagc run``: run an artifact on image files and write every output; returns the paths written.

    Takes the artifact directory, the image files (PNG/JPEG/.npy; see `read_image`), the output
    directory, the tasks (names, or one comma-separated string; default all), the backend and
    the models' precision (`dagc.runtime.load`). All images go through the model as one batch; when each task has its own input, the same
    images are fed to every selected task's input. Outputs are named after each file's stem (a
    repeated stem gets ``_2``, ``_3``...) and written by `save_outputs`.

    Raises InputError (no images, an unreadable file, a bad task list, an ``out_dir`` that cannot
    be written or lies in the artifact, an output name too long for the file system: checked before
    anything runs; a write that fails, e.g. on a full device: the message says how many output
    files were written completely, and no file is left partly written) and ArtifactError. Warns
    (`NoPreprocessingWarning`) when the artifact records no preprocessing and image files are given.
    """
    check_writable_dir(out_dir, option="--out", error=InputError)
    check_not_input(out_dir, [artifact_dir], option="--out", error=InputError, what="artifact")
    if isinstance(tasks, str):
        tasks = [t.strip() for t in tasks.split(",") if t.strip()]
    files = [Path(p) for p in paths]
    if not files:
        raise InputError("no image files given; pass PNG, JPEG or .npy files")
    engine = load(artifact_dir, backend, precision=precision)
    names = engine._task_list(tasks)  # validate before reading any image
    per_image = [t for t in names if len(engine.manifest.tasks[t].output_shape) == 1]
    stems = _stems(files, {t: ".json" if t in per_image else ".png" for t in names}, out_dir)
    if engine.preprocessing is None and any(Path(p).suffix.lower() != ".npy" for p in files):
        # a checkpoint made with the Python API may record none; the pixels then reach the model
        # as [0, 1] values, which is right only if it was trained on such values
        warnings.warn(NO_PREPROCESSING, NoPreprocessingWarning, stacklevel=2)
    batch = np.stack([read_image(p, engine.input_spec) for p in files])
    if engine.shared_input:
        images: Any = batch
    else:
        images = {t: batch for t in names}
    outputs = engine.run(images, names)
    written: list[Path] = []
    try:
        for i, stem in enumerate(stems):
            save_outputs(out_dir, stem, {t: outputs[t][i] for t in names}, engine.manifest, written)
    except InputError as e:  # a full disk half-way: say what is there, complete
        raise InputError(f"{e} ({len(written)} of {2 * len(files) * len(names)} output files had been written "
                         f"completely to {out_dir}, none partly)") from None
    return written


def _stems(files: Sequence[Path], suffixes: Mapping[str, str], out_dir: str | os.PathLike) -> list[str]:
    """Each image's output stem (a repeated one gets ``_2``, ``_3``...), every output name (task ->
    its longest suffix, `save_outputs`) checked to fit the file system (InputError naming the
    limit) before the model runs."""
    stems: list[str] = []
    for p in files:
        stem, n = _safe(p.stem), 1
        while stem in stems:
            n += 1
            stem = f"{_safe(p.stem)}_{n}"
        stems.append(stem)
        longest = max((f"{stem}_{_safe(t)}{x}" for t, x in suffixes.items()), key=lambda s: len(os.fsencode(s)))
        check_name_fits(Path(out_dir) / longest, what=f"the output of {p} in --out", error=InputError)
    return stems
