"""The ``folder`` dataset: the user's own images and labels in a folder layout (FORMAT.md,
"Folder datasets"), read from ``--data-root ROOT``::

    ROOT/dataset.json                {"name": "...", "tasks": [{"name": "left", "kind": "classification",
                                      "classes": 10}, {"name": "parts", "kind": "segmentation", "classes": 3}]}
    ROOT/{train,test}/images/<id>.png|.jpg|.jpeg|.npy     one image per sample, shared by every task
    ROOT/{train,test}/labels.csv     header ``id,<task>,...``: one column per classification task
    ROOT/{train,test}/<task>/<id>.png|.npy                one folder per dense task

Images are grey or RGB (every image of the dataset the same), 8-bit pictures read as pixel / 255,
16-bit grey PNGs as pixel / 65535, ``.npy`` arrays (H, W), (H, W, 1) or (H, W, 3) as stored
(uint8 / 255); the network's input channels follow them. Segmentation maps hold class ids (255
or -1 unlabelled); depth, edge and saliency maps one value per pixel (PNG: edge and saliency
pixel / 255 or / 65535, depth the pixel value itself; ``.npy`` as stored); normals ``.npy``
(H, W, 3). Ids are sorted naturally (``img2`` before ``img10``); ``n_train`` / ``n_test`` keep
the first ids. The input size is the files' own (all the same); ``input_size`` resizes (images,
edge and saliency bilinearly, labels and depth by nearest neighbour, normals bilinearly and
renormalised). Every file is checked where it is read; the first bad one raises `DataError`
naming it. `write_folder` (below) writes any one-input `MultiTaskData` in this layout.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import uuid
from pathlib import Path

import numpy as np

from dagc.errors import DataError, SpecError
from dagc.preprocessing import resize_chw
from dagc.spec import Spec, TaskSpec, preset_network
from dagc.trainer.data import Dataset, LoadOptions, MultiTaskData, Split, check_root, standardise
from dagc.trainer.files import (
    finite_float,
    load_npy_file,
    natural_key,
    normalise_normals,
    open_picture,
    read_labels,
    target_buffer,
    target_map,
)

DESCRIPTION = "dataset.json"
LABELS = "labels.csv"
IMAGES = "images"
SPLITS = ("train", "test")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".npy")
MAP_SUFFIXES = (".png", ".npy")
# The preset chosen when none is given: `tiny` up to this many pixels a side, `vgg16` above.
TINY_MAX_SIDE = 64
# Pictures converted on reading: inputs to grey or RGB, one-channel maps kept as stored.
_INPUT_MODES = {"1": "L", "P": "RGB", "CMYK": "RGB", "YCbCr": "RGB"}
_WIDE = {"I;16": 65535.0, "I;16L": 65535.0, "I;16B": 65535.0, "I;16N": 65535.0, "I": 65535.0}
_MAP_MODES = ("L", "P", *_WIDE)
_ID = re.compile(r"-?[0-9]+")


# ------------------------------------------------------------------------------ dataset.json
def describe(root: str | os.PathLike) -> tuple[str, tuple[TaskSpec, ...]]:
    """Takes the dataset's root; returns its name and its tasks as ROOT/dataset.json declares them.
    Raises DataError naming the file when it is missing, not JSON, or declares invalid tasks."""
    path = check_root("folder", root) / DESCRIPTION
    if not path.is_file():
        raise DataError(f"{path}: file missing; a folder dataset declares its name and tasks there")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: not a readable JSON file ({e})") from None
    if not isinstance(doc, dict) or set(doc) - {"name", "tasks"}:
        raise DataError(f"{path}: expected an object with 'name' and 'tasks' only")
    name, entries = doc.get("name"), doc.get("tasks")
    if not isinstance(name, str) or not name.strip():
        raise DataError(f"{path}: 'name' must be a non-empty string")
    if not isinstance(entries, list) or not entries:
        raise DataError(f"{path}: 'tasks' must be a non-empty list of {{\"name\", \"kind\", \"classes\"}} objects")
    tasks = []
    for i, t in enumerate(entries):
        if not isinstance(t, dict) or set(t) - {"name", "kind", "classes"} or not {"name", "kind"} <= set(t):
            raise DataError(f"{path}: tasks[{i}] must be an object with 'name', 'kind' and (for "
                            "classification / segmentation) 'classes'")
        if not isinstance(t["name"], str) or t["name"] in (IMAGES, LABELS):
            raise DataError(f"{path}: tasks[{i}].name must be a string other than {IMAGES!r}")
        tasks.append(TaskSpec(t["name"], t["kind"], t.get("classes")))
    try:  # the spec's own checks: names, kinds, class counts
        Spec.from_network(preset_network("tiny"), tasks, input_size=(64, 64))
    except SpecError as e:
        raise DataError(f"{path}: {str(e).replace('spec.', '')}") from None
    return name, tuple(tasks)


def _task_names(root: str | os.PathLike | None) -> tuple[str, ...]:
    if root is None:
        raise DataError("the folder dataset's tasks are declared in ROOT/dataset.json; give its root "
                        "(--data-root ROOT)")
    return tuple(t.name for t in describe(root)[1])


def choose_preset(root: str | os.PathLike, size: tuple[int, int] | None) -> str:
    """The preset for a folder dataset given none: ``tiny`` when the input's larger side is at most
    `TINY_MAX_SIDE` pixels, else ``vgg16``. ``size`` is the asked input size (None: the first
    train image's own). Raises DataError naming the image when the chosen preset's largest stride
    does not divide the image size."""
    path = None
    if not (isinstance(size, tuple) and len(size) == 2 and all(isinstance(v, int) and v > 0 for v in size)):
        describe(root)
        folder = Path(root) / "train" / IMAGES
        files = _listing(folder, IMAGE_SUFFIXES, "an image")
        if not files:
            raise DataError(f"{folder}: no images; the split is empty")
        path = next(iter(files.values()))
        size = _read_image(path).shape[1:]
    name = "tiny" if max(size) <= TINY_MAX_SIDE else "vgg16"
    net = preset_network(name)
    stride = max(s.stride for s in (*net.states, net.readout))
    if size[0] % stride or size[1] % stride:
        where = f"{path}: images are" if path is not None else "input size is"
        raise DataError(f"{where} {size[0]}x{size[1]}; the preset {name!r} (chosen for inputs "
                        f"{'up to' if name == 'tiny' else 'above'} {TINY_MAX_SIDE} px) needs H and W divisible by "
                        f"{stride}: give --input-size (the data is resized) or --preset")
    return name


# ------------------------------------------------------------------------------------ files
def _listing(folder: Path, suffixes: tuple[str, ...], what: str) -> dict[str, Path]:
    """The files of a folder by id (stem), in natural order; DataError for a missing folder, a
    file of another type or two files of one id."""
    if not folder.is_dir():
        raise DataError(f"{folder}: folder missing; see FORMAT.md, \"Folder datasets\"")
    try:
        entries = sorted((p for p in folder.iterdir() if not p.name.startswith(".")), key=lambda p: natural_key(p.name))
    except OSError as e:
        raise DataError(f"{folder}: cannot list the folder ({e.strerror or e})") from None
    out: dict[str, Path] = {}
    for p in entries:
        if not p.is_file() or p.suffix.lower() not in suffixes:
            raise DataError(f"{p}: not {what} file ({'/'.join(suffixes)}); remove it from {folder}")
        if p.stem in out:
            raise DataError(f"{p}: a second file for id {p.stem!r} (also {out[p.stem].name})")
        out[p.stem] = p
    return dict(sorted(out.items(), key=lambda kv: natural_key(kv[0])))


def _same_ids(ids: list[str], files: dict[str, Path], folder: Path) -> None:
    missing = [i for i in ids if i not in files]
    if missing:
        raise DataError(f"{folder / missing[0]}.png|.npy: file missing; every image id needs one "
                        f"({len(missing)} missing)")
    extra = [i for i in files if i not in set(ids)]
    if extra:
        raise DataError(f"{files[extra[0]]}: no image has id {extra[0]!r}; remove it or add the image")


def _read_image(path: Path) -> np.ndarray:
    """One input (C, H, W) float32 with C 1 (grey) or 3 (RGB), raw values (see the module doc)."""
    if path.suffix.lower() == ".npy":
        arr = load_npy_file(path)
        if arr.ndim == 3 and arr.shape[2] in (1, 3):
            arr = arr.transpose(2, 0, 1)
        elif arr.ndim == 2:
            arr = arr[None]
        else:
            raise DataError(f"{path}: image has shape {arr.shape}; expected (H, W), (H, W, 1) or (H, W, 3)")
        scale = 255.0 if arr.dtype == np.uint8 else 1.0
        return np.ascontiguousarray(finite_float(arr, path, "image") / np.float32(scale))
    pixels, mode = open_picture(path, _INPUT_MODES.get)
    if mode in _WIDE:
        return (pixels.astype(np.float64) / _WIDE[mode]).astype(np.float32)[None]
    if mode not in ("L", "RGB"):
        raise DataError(f"{path}: image mode {mode} (alpha or an unusual format); save it as 8-bit grey or RGB")
    chw = pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)
    return chw.astype(np.float32) / np.float32(255.0)


def _read_map(task: TaskSpec, path: Path, hw: tuple[int, int], size: tuple[int, int]) -> np.ndarray:
    """One dense target of ``task`` checked against its image's (H, W), resized to ``size``, in
    the kind's standard layout."""
    if path.suffix.lower() == ".npy":
        arr = load_npy_file(path)
    else:
        if task.kind == "normal":
            raise DataError(f"{path}: normal maps are .npy arrays (H, W, 3), not pictures")
        arr, mode = open_picture(path)
        if mode not in _MAP_MODES:
            raise DataError(f"{path}: {task.kind} map has mode {mode}; expected a one-channel PNG (8 or 16 bit)")
        if task.kind in ("edge", "saliency"):
            arr = arr.astype(np.float64) / (_WIDE.get(mode, 255.0))
    arr = target_map(arr, task.kind, path, hw)
    if task.kind == "segmentation":
        return resize_chw(read_labels(arr, path, task.classes)[None], size, nearest=True)[0].astype(np.int64)
    values = finite_float(arr, path, f"{task.kind} map")
    if task.kind == "normal":
        if np.abs(values).max(initial=0.0) > 1.01:
            raise DataError(f"{path}: normal components reach {np.abs(values).max():.3g}; expected unit vectors "
                            "(all-zero for missing)")
        chw = np.ascontiguousarray(values.transpose(2, 0, 1))
        if chw.shape[1:] == tuple(size):
            return chw
        valid = resize_chw((chw != 0).any(axis=0)[None].astype(np.float32), size, nearest=True)[0] > 0.5
        return normalise_normals(resize_chw(chw, size), valid)
    if task.kind == "depth" and (values < 0).any():
        raise DataError(f"{path}: depth has negative values (min {values.min():.3g}); expected >= 0, 0 for missing")
    if task.kind != "depth" and (values.min() < 0 or values.max() > 1):
        raise DataError(f"{path}: {task.kind} values span [{values.min():.3g}, {values.max():.3g}]; expected [0, 1]")
    return resize_chw(values[None], size, nearest=task.kind == "depth")


def _read_labels_csv(path: Path, ids: list[str], tasks: dict[str, TaskSpec]) -> dict[str, np.ndarray]:
    """The classification labels of a split: one int64 (n,) per task, in the order of ``ids``."""
    if not path.is_file():
        raise DataError(f"{path}: file missing; the classification task(s) {list(tasks)} need a header "
                        "'id,<task>,...' and one row per image")
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = [r for r in csv.reader(f) if r]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{path}: cannot read the CSV file ({e})") from None
    header = [h.strip() for h in rows[0]] if rows else []
    if not header or header[0] != "id" or len(set(header)) != len(header):
        raise DataError(f"{path}: the header must be 'id' then one column per classification task, got {header}")
    if set(header[1:]) != set(tasks):
        what = [c for c in header[1:] if c not in tasks] or [t for t in tasks if t not in header]
        raise DataError(f"{path}: header {header} must name exactly the classification tasks {list(tasks)} "
                        f"(column {what[0]!r})")
    cols = {t: header.index(t) for t in tasks}
    found: dict[str, list[str]] = {}
    for line, row in enumerate(rows[1:], start=2):
        if len(row) != len(header):
            raise DataError(f"{path}: line {line} has {len(row)} fields; the header has {len(header)}")
        key = row[0].strip()
        if key in found:
            raise DataError(f"{path}: line {line}: id {key!r} appears twice")
        found[key] = row
    known = set(ids)
    missing, extra = [i for i in ids if i not in found], [i for i in found if i not in known]
    if missing or extra:
        what = f"no row for image {missing[0]!r}" if missing else f"id {extra[0]!r} has no image"
        raise DataError(f"{path}: {what}; every image id needs exactly one row")
    out = {}
    for t, col in cols.items():
        labels = np.empty(len(ids), np.int64)
        for k, key in enumerate(ids):
            text = found[key][col].strip()
            if not _ID.fullmatch(text) or not 0 <= int(text) < tasks[t].classes:
                raise DataError(f"{path}: id {key!r}, task {t!r}: label {text!r} is not a class index "
                                f"0..{tasks[t].classes - 1}")
            labels[k] = int(text)
        out[t] = labels
    return out


# ---------------------------------------------------------------------------------- loading
def _read_split(base: Path, split: str, tasks: tuple[TaskSpec, ...], size: tuple[int, int] | None,
                cap: int | None, native: tuple[int, int, int] | None
                ) -> tuple[np.ndarray, dict[str, np.ndarray], tuple[int, int], tuple[int, int, int]]:
    """Reads one split; returns raw inputs (n, C, H, W), targets, (H, W) and the files' (C, H, W)
    (``native``: the train split's, which the test split's files must share)."""
    folder = base / split
    if not folder.is_dir():
        raise DataError(f"{folder}: folder missing; a folder dataset has ROOT/train and ROOT/test")
    everything = {t.name for t in describe(base)[1]}
    for p in folder.iterdir():
        if p.is_dir() and not p.name.startswith(".") and p.name != IMAGES and p.name not in everything:
            raise DataError(f"{p}: no task of {base / DESCRIPTION} is named {p.name!r}; remove or rename the folder")
    images = _listing(folder / IMAGES, IMAGE_SUFFIXES, "an image")
    if not images:
        raise DataError(f"{folder / IMAGES}: no images; the split is empty")
    ids = list(images)
    dense = {t.name: _listing(folder / t.name, MAP_SUFFIXES, f"a {t.kind} map") for t in tasks if t.dense}
    for t, files in dense.items():
        _same_ids(ids, files, folder / t)
    classified = {t.name: t for t in tasks if not t.dense}
    labels = _read_labels_csv(folder / LABELS, ids, classified) if classified else {}
    keep = ids[:cap] if cap is not None else ids
    x = None
    targets = {t.name: labels[t.name][:len(keep)] for t in tasks if not t.dense}
    for i, key in enumerate(keep):
        img = _read_image(images[key])
        if native is None:
            native = img.shape
        elif img.shape != native:
            c, h, w = native
            raise DataError(f"{images[key]}: image is {img.shape[1]}x{img.shape[2]} with {img.shape[0]} channel(s) "
                            f"but the dataset's first is {h}x{w} with {c}; every image needs one size and one "
                            "colour mode (grey or RGB)")
        if size is None:
            size = native[1:]
        if x is None:
            x = np.empty((len(keep), native[0], *size), np.float32)
            targets.update({t.name: target_buffer(t, len(keep), size) for t in tasks if t.dense})
        x[i] = resize_chw(img, size)
        for t in tasks:
            if t.dense:
                targets[t.name][i] = _read_map(t, dense[t.name][key], native[1:], size)
    return x, targets, size, native


def load(opts: LoadOptions) -> MultiTaskData:
    """Reads both splits of the folder dataset at ``opts.root`` with the selected tasks."""
    name, declared = describe(opts.root)
    tasks = tuple({t.name: t for t in declared}[t] for t in opts.tasks)
    x_tr, y_tr, size, native = _read_split(opts.root, "train", tasks, opts.size, opts.n_train, None)
    x_te, y_te, _, _ = _read_split(opts.root, "test", tasks, size, opts.n_test, native)
    channels = native[0]
    # As the built-in datasets describe theirs: 8-bit pixels / 255 (16-bit / 65535), .npy as stored.
    x_tr, x_te, prep = standardise(x_tr, x_te, ("grey" if channels == 1 else "RGB") + " in [0, 1]")
    return MultiTaskData(name=name, in_channels=channels, input_size=tuple(size), shared_input=True, tasks=tasks,
                         train=Split(x_tr, y_tr), test=Split(x_te, y_te), preprocessing=prep)


# ---------------------------------------------------------------------------------- writing
def write_folder(data: MultiTaskData, root: str | os.PathLike, *, images: str = "npy") -> Path:
    """Writes ``data`` (shared input) in the folder layout at ``root`` (a new or empty folder);
    returns the root. Give the raw inputs, not standardised ones (the built-in datasets' raw
    arrays: e.g. `dagc.trainer.synthetic.load_raw`): reading the folder standardises them again.
    ``images="npy"`` writes inputs and dense maps as float32 / int64 ``.npy`` (read back
    bit-exact); ``"png"`` writes 8-bit PNG inputs (values in [0, 1], rounded). Ids are the sample
    indices, zero-padded. Raises DataError for per-task inputs or a non-empty ``root``."""
    out = Path(root)
    if not data.shared_input or images not in ("npy", "png"):
        raise DataError("write_folder writes datasets with one shared input, as .npy or .png images")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError(f"{out}: exists and is not an empty folder; write the dataset to a new one")
    out.parent.mkdir(parents=True, exist_ok=True)
    # Written beside, then renamed into place (rename(2) replaces an empty folder): an interrupted
    # write leaves no half dataset that a later `dagc train --data` would read as whole.
    tmp = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:12]}"
    tmp.mkdir()
    try:
        _write_into(data, tmp, images)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _write_into(data: MultiTaskData, out: Path, images: str) -> None:
    tasks = [{"name": t.name, "kind": t.kind, **({"classes": t.classes} if t.labelled else {})} for t in data.tasks]
    (out / DESCRIPTION).write_text(json.dumps({"name": data.name, "tasks": tasks}, indent=2) + "\n", encoding="utf-8")
    for split_name in SPLITS:
        split = getattr(data, split_name)
        x = np.asarray(split.inputs)
        width = len(str(max(len(x) - 1, 0)))
        ids = [f"{i:0{width}d}" for i in range(len(x))]
        for sub in [IMAGES] + [t.name for t in data.tasks if t.dense]:
            (out / split_name / sub).mkdir(parents=True)
        for i, key in enumerate(ids):
            hwc = x[i].transpose(1, 2, 0)
            hwc = hwc[:, :, 0] if hwc.shape[2] == 1 else hwc
            if images == "png":
                from PIL import Image
                Image.fromarray((np.clip(hwc, 0, 1) * 255).round().astype(np.uint8)).save(
                    out / split_name / IMAGES / f"{key}.png")
            else:
                np.save(out / split_name / IMAGES / f"{key}.npy", np.ascontiguousarray(hwc, np.float32))
            for t in data.tasks:
                if t.dense:
                    y = split.targets[t.name][i]
                    y = y.transpose(1, 2, 0) if t.kind == "normal" else (y if t.labelled else y[0])
                    np.save(out / split_name / t.name / f"{key}.npy", np.ascontiguousarray(y))
        classified = [t.name for t in data.tasks if not t.dense]
        if classified:
            with open(out / split_name / LABELS, "w", newline="", encoding="utf-8") as f:
                writer = csv.writer(f)
                writer.writerow(["id", *classified])
                writer.writerows([key, *(int(split.targets[t][i]) for t in classified)] for i, key in enumerate(ids))


DATASET = Dataset("folder", load, preset="tiny", on_disk=True, find_tasks=_task_names, choose_preset=choose_preset)
