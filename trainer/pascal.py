"""The on-disk ``pascal-context`` dataset (Sec. 4.1), read like the other on-disk benchmarks
(`dagc.trainer.readers`, whose module doc describes what every reader returns and checks).

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

from collections.abc import Callable
from pathlib import Path

import numpy as np

from dagc.errors import DataError
from dagc.preprocessing import resize_chw
from dagc.spec import TaskSpec
from dagc.trainer.data import IGNORE_INDEX, Dataset, LoadOptions, MultiTaskData, Split, standardise
from dagc.trainer.files import load_mat, normalise_normals, plane, read_labels, read_picture, target_buffer

_PASCAL_INFOS = {t.name: t for t in (
    TaskSpec("semseg", "segmentation", 21),
    TaskSpec("human_parts", "segmentation", 7),
    TaskSpec("saliency", "saliency"),
    TaskSpec("normal", "normal"),
    TaskSpec("edge", "edge"),
)}
PASCAL_TASKS = tuple(_PASCAL_INFOS)
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
    arr = read_picture(path, None)
    if arr.ndim != 2:
        raise DataError(f"{path}: label image has shape {arr.shape}; expected a single-channel (palette or "
                        "grey) PNG of class indices")
    return read_labels(arr, path, classes)


def _label_map(path: Path) -> np.ndarray:
    """The full PASCAL-Context ``LabelMap`` (H, W) int64 of a .mat file."""
    mat = load_mat(path)
    if "LabelMap" not in mat:
        raise DataError(f"{path}: no 'LabelMap' variable; expected a PASCAL-Context trainval label file")
    arr = plane(np.asarray(mat["LabelMap"]), path, "LabelMap")
    if arr.dtype.kind not in "iuf" or (arr.dtype.kind == "f" and not np.isfinite(arr).all()):
        raise DataError(f"{path}: LabelMap has dtype {arr.dtype} or non-finite values; expected class ids")
    return arr.astype(np.int64)


def _human_parts(path: Path) -> np.ndarray | None:
    """The 7-class part labels (H, W) int64 of a PASCAL-Part annotation, or None when it holds no
    person with annotated parts (the benchmark then ignores the whole image)."""
    mat = load_mat(path)
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


def _load_pascal(opts: LoadOptions) -> MultiTaskData:
    """Reads PASCAL-Context's train and val lists, the selected tasks, resized to ``opts.size``."""
    base, tasks, size = opts.root, opts.tasks, opts.size
    x_tr, y_tr = _pascal_split(base, "train", tasks, size, opts.n_train)
    x_te, y_te = _pascal_split(base, "val", tasks, size, opts.n_test)
    h, w = size
    x_tr, x_te, prep = standardise(x_tr, x_te, f"RGB in [0, 1] (8-bit / 255), resized bilinearly to {h}x{w}")
    return MultiTaskData(name="pascal-context", in_channels=3, input_size=size, shared_input=True,
                         tasks=tuple(_PASCAL_INFOS[t] for t in tasks), train=Split(x_tr, y_tr),
                         test=Split(x_te, y_te), preprocessing=prep)


def _pascal_split(base: Path, split: str, tasks: tuple[str, ...], size: tuple[int, int], cap: int | None
                  ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Reads one split: raw inputs (n, 3, H, W) and the selected tasks' targets."""
    ids = _pascal_ids(base, split)[:cap] if cap is not None else _pascal_ids(base, split)
    n = len(ids)
    x = np.empty((n, 3, *size), np.float32)
    targets = {t: target_buffer(_PASCAL_INFOS[t], n, size) for t in tasks}
    readers: dict[str, Callable[[str], np.ndarray]] = {
        "semseg": lambda i: resize_chw(_label_png(_semseg_path(base, i), 21)[None], size, nearest=True)[0],
        "human_parts": lambda i: _parts_target(base / "human_parts" / f"{i}.mat", size),
        "saliency": lambda i: _saliency_target(base / "sal_distill" / f"{i}.png", size),
    }
    for k, i in enumerate(ids):
        img = read_picture(base / "JPEGImages" / f"{i}.jpg", "RGB").astype(np.float32) / 255.0
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
    arr = read_picture(path, "L").astype(np.float32) / 255.0
    return (resize_chw(arr[None], size) > 0.5).astype(np.float32)


def _normal_target(path: Path, label_map: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The distilled normals (3, H, W): decoded, resized, renormalised; zero on classes outside
    `_NORMAL_VALID_CLASSES`."""
    rgb = read_picture(path, "RGB").astype(np.float32)
    normal = resize_chw((2.0 * rgb / 255.0 - 1.0).transpose(2, 0, 1), size)
    return normalise_normals(normal, np.isin(label_map, _NORMAL_VALID_CLASSES))


def _edges(label_map: np.ndarray) -> np.ndarray:
    """Takes a label map (H, W); returns float32 (H, W) with 1 where a pixel's label differs
    from its right or lower neighbour (one-pixel thin boundaries), else 0."""
    edge = np.zeros(label_map.shape, bool)
    edge[:, :-1] |= label_map[:, :-1] != label_map[:, 1:]
    edge[:-1, :] |= label_map[:-1, :] != label_map[1:, :]
    return edge.astype(np.float32)


# VGG-16's 12 states (appendix Table 7); 128 x 128 inputs (the benchmark's 512 x 512 take about 16x
# the memory).
DATASET = Dataset("pascal-context", _load_pascal, preset="vgg16", on_disk=True, tasks=PASCAL_TASKS,
                  input_size=(128, 128))
