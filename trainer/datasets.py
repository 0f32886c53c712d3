"""Built-in multi-task datasets: nothing is downloaded, everything is generated or bundled.

Two datasets stand in for the paper's benchmarks (Sec. 4.1):

``synthetic`` (heterogeneous, shared input; stands in for NYU-v2 / PASCAL-Context)
    Procedurally rendered 3-channel scenes with four dense tasks on the same image:
    ``segmentation`` (5 classes), ``depth``, ``normal`` and ``edge``.

    Scene model. Image-plane coordinates: ``y`` runs from -1 (top row) to +1 (bottom row),
    ``x`` from -W/H to +W/H (same spacing 2/H per pixel in both directions); depth ``d`` is
    the distance from the camera.

    * Background: a back wall (class 0) at constant depth ``d_wall`` in [7, 10] and a floor
      (class 1) whose depth falls off smoothly with the row, ``d = K / (y - y_h)`` (a
      perspective ground plane with horizon ``y_h``), from ``d_wall`` where it meets the wall
      down to ``d_near`` in [1.5, 2.5] at the bottom row.
    * 2-5 objects per scene, each a sphere (class 2), box (class 3) or vertical cylinder
      (class 4). Each stands on the floor: its base row ``y_b`` fixes its depth ``c`` (the
      floor's depth there), and its image size shrinks as ``1 / c`` -- so nearer objects are
      lower and larger, as in a photograph. A sphere bulges towards the camera
      (``c - sqrt(r^2 - rho^2)``), a cylinder bulges across its width, a box shows a yawed
      front face plus a top face receding upwards. Surfaces occlude by a z-buffer.
    * Normals are the analytic normals of the depth map read as a height field over the image
      plane: ``n = (dd/dx, dd/dy, 1) / |.|`` in a camera frame with x right, y down and z
      pointing towards the camera (so ``n_z > 0``; a surface receding to the right has
      ``n_x > 0``; the floor's normals point up, ``n_y < 0``). They therefore agree with finite
      differences of ``depth`` wherever the depth is smooth.
    * Edges (binary, 1 pixel thick) mark where the visible surface changes between 4-neighbours
      -- occlusion boundaries (depth discontinuities) and label boundaries such as wall/floor;
      the pixel on the nearer side is marked.
    * The image: per-class albedo (with per-scene / per-object jitter; a checker texture on the
      floor), Lambertian shading ``0.35 + 0.65 * max(0, n . l)`` with a random light from
      above, a mild depth fog ``exp(-0.03 d)`` and Gaussian noise (std 0.02). Every target is
      thus visible in the image: class from colour, normals from shading, depth from the row
      and the object sizes, edges from colour and shading changes.

    Train and test scenes come from two disjoint random streams of the seed; the same seed
    always gives byte-identical arrays.

``digits`` (homogeneous classification, per-task inputs; stands in for Omniglot)
    scikit-learn's bundled 8x8 handwritten digits (1797 images). Like one Omniglot alphabet per
    task, each task classifies its own images:

    * ``low``:    the images of digits 0-4, 5-way, label = digit
    * ``high``:   the images of digits 5-9, 5-way, label = digit - 5
    * ``parity``: all images, 2-way, label = digit % 2 (0 even, 1 odd)

    The held-out split is one deterministic, stratified (per digit) 80/20 split of all 1797
    images by the seed, shared by every task, so no image is ever in the train split of one
    task and the test split of another. Pixels 0..16 are scaled to [0, 1]; another
    ``input_size`` than (8, 8) (at least (8, 8)) resizes the images bilinearly. ``n_train`` /
    ``n_test`` cap the samples per task (the digits are finite: a larger request gives all).

Normalisation (both datasets): inputs are float32, standardised per channel with the mean and
standard deviation of the train split's inputs (for ``digits``: all train images of the seed's
split, independent of the selected tasks); the same statistics are applied to the test split.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

from dagc.errors import DataError
from dagc.preprocessing import Preprocessing

# Read from a directory the user has (dagc.trainer.readers): the paper's real benchmarks.
ON_DISK = ("nyuv2", "cityscapes", "cityscapes19", "omniglot", "pascal-context")
DATASETS = ("synthetic", "digits", *ON_DISK)

SEG_CLASSES = ("wall", "floor", "sphere", "box", "cylinder")
_SYNTHETIC_TASKS = ("segmentation", "depth", "normal", "edge")
_DIGITS_TASKS = ("low", "high", "parity")

_DEFAULT_SIZE = {"synthetic": (32, 32), "digits": (8, 8)}
_MIN_SIZE = {"synthetic": 16, "digits": 8}
_DEFAULT_COUNTS = {"synthetic": (2048, 512), "digits": (None, None)}  # None: every image


@dataclass(frozen=True)
class TaskInfo:
    """One task: its name, kind and (segmentation / classification only) number of classes."""

    name: str
    kind: str  # "segmentation" | "depth" | "normal" | "edge" | "classification"
    classes: int | None


@dataclass(frozen=True)
class Split:
    """Inputs and per-task targets of one split.

    ``inputs`` is one float32 array (n, C, H, W) shared by all tasks when the dataset has a
    shared input, else a dict task -> (n_k, C, H, W); ``targets[task]`` is aligned with the
    task's inputs.
    """

    inputs: np.ndarray | dict[str, np.ndarray]
    targets: dict[str, np.ndarray]

    def size(self, task: str) -> int:
        """Takes a task name; returns how many samples the split holds for it.

        Raises DataError (a ValueError) for a task not in this split.
        """
        if task not in self.targets:
            raise DataError(f"unknown task {task!r}; this split has {list(self.targets)}")
        return int(self.targets[task].shape[0])


@dataclass(frozen=True)
class MultiTaskData:
    """A loaded dataset: its geometry, its tasks and its train / test splits."""

    name: str
    in_channels: int
    input_size: tuple[int, int]
    shared_input: bool
    tasks: tuple[TaskInfo, ...]
    train: Split
    test: Split
    # How a raw input becomes a model input: ``(raw - mean) / std`` per channel, raw as described.
    preprocessing: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------- public API
def task_names(dataset: str, root: str | os.PathLike | None = None) -> tuple[str, ...]:
    """Takes a dataset name and, for the on-disk ``omniglot`` (whose tasks are its alphabets), its
    root directory; returns every task it offers, in the default order.

    Raises DataError (a ValueError) for an unknown dataset, or omniglot without a readable root.
    """
    _check_dataset(dataset)
    if dataset in ON_DISK:
        from dagc.trainer import readers  # imported lazily: readers imports this module

        return readers.task_names(dataset, root)
    return _SYNTHETIC_TASKS if dataset == "synthetic" else _DIGITS_TASKS


def load_dataset(name: str, *, tasks: Sequence[str] | None = None, seed: int = 0,
                 input_size: tuple[int, int] | None = None, n_train: int | None = None,
                 n_test: int | None = None, root: str | os.PathLike | None = None) -> MultiTaskData:
    """Takes a dataset name and options; returns the dataset with the selected tasks.

    ``tasks`` (default: all, see ``task_names``) picks and orders the tasks; the arrays do not
    depend on which tasks are picked. ``seed`` fixes every random choice. ``input_size`` is
    (H, W) (default (32, 32) for synthetic, (8, 8) for digits). ``n_train`` / ``n_test`` are
    the number of scenes for synthetic (default 2048 / 512) and a per-task cap for digits
    (default: all images). ``root`` is the directory of an on-disk dataset (`ON_DISK`, read by
    ``dagc.trainer.readers``, which documents their layouts and defaults) and must be None for
    the built-in ones.

    Raises DataError (a ValueError) for an unknown dataset or task, or an invalid option; for
    on-disk datasets also for a missing or malformed file (the message names it).
    """
    _check_dataset(name)
    if name in ON_DISK:
        from dagc.trainer import readers

        return readers.load(name, root, tasks=tasks, seed=seed, input_size=input_size, n_train=n_train,
                            n_test=n_test)
    if root is not None:
        raise DataError(f"dataset {name!r} is built in and reads no directory; drop root (--data-root)")
    selected = _check_tasks(name, tasks)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise DataError(f"seed must be an integer >= 0, got {seed!r}")
    size = _check_size(name, input_size)
    default_train, default_test = _DEFAULT_COUNTS[name]
    n_tr = _check_count("n_train", n_train, default_train)
    n_te = _check_count("n_test", n_test, default_test)
    if name == "synthetic":
        return _load_synthetic(selected, int(seed), size, n_tr, n_te)
    return _load_digits(selected, int(seed), size, n_tr, n_te)


# --------------------------------------------------------------------------------- validation
def _check_dataset(name: str) -> None:
    """Raises DataError unless ``name`` is a built-in dataset."""
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose one of {list(DATASETS)}")


def _check_tasks(dataset: str, tasks: Sequence[str] | None,
                 valid: tuple[str, ...] | None = None) -> tuple[str, ...]:
    """Returns the selected task names out of ``valid`` (default: ``task_names(dataset)``; all
    when ``tasks`` is None); raises DataError for bad selections."""
    valid = task_names(dataset) if valid is None else valid
    if tasks is None:
        return valid
    if isinstance(tasks, str):  # a bare string would otherwise be read as a list of letters
        tasks = (tasks,)
    selected = tuple(tasks)
    bad = [t for t in selected if t not in valid]
    if bad or not selected:
        raise DataError(f"unknown task(s) {bad} for dataset {dataset!r}; choose from {list(valid)}")
    if len(set(selected)) != len(selected):
        raise DataError(f"tasks: name each task at most once, got {list(selected)}")
    return selected


def _check_size(dataset: str, input_size: tuple[int, int] | None) -> tuple[int, int]:
    """Returns (H, W) for the dataset; raises DataError for a malformed or too small size."""
    if input_size is None:
        return _DEFAULT_SIZE[dataset]
    low = _MIN_SIZE.get(dataset, 8)
    try:
        h, w = input_size
    except (TypeError, ValueError):
        raise DataError(f"input_size must be a pair (H, W), got {input_size!r}") from None
    if not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in (h, w)):
        raise DataError(f"input_size must be two integers (H, W), got {input_size!r}")
    if h < low or w < low:
        raise DataError(f"input_size for {dataset!r} must be at least ({low}, {low}), "
                        f"got {(int(h), int(w))}")
    return int(h), int(w)


def _check_count(field: str, value: int | None, default: int | None) -> int | None:
    """Returns the sample count to use (``default`` for None); raises DataError unless >= 1."""
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise DataError(f"{field} must be an integer >= 1, got {value!r}")
    return int(value)


def _standardise(train: np.ndarray, test: np.ndarray, raw: str,
                 raw_range: tuple[float, float] = (0.0, 1.0)) -> tuple[np.ndarray, np.ndarray, dict]:
    """Takes (n, C, H, W) train and test inputs, a description of the raw values and their range;
    returns both standardised per channel with the train split's statistics (the test split must
    not leak into them), and those statistics as a preprocessing record for deployment
    (`dagc.preprocessing.Preprocessing.to_dict`)."""
    mean = train.mean(axis=(0, 2, 3), keepdims=True, dtype=np.float64).astype(np.float32)
    # A constant channel would otherwise divide by zero.
    std = np.maximum(train.std(axis=(0, 2, 3), keepdims=True, dtype=np.float64), 1e-6).astype(np.float32)
    scale = 1.0 / std
    prep = Preprocessing(raw_range, tuple(mean.ravel().tolist()), tuple(std.ravel().tolist()), description=raw).to_dict()
    return (train - mean) * scale, (test - mean) * scale, prep


# ---------------------------------------------------------------------------------- synthetic
_ALBEDO = np.array([
    [0.78, 0.74, 0.66],  # wall: warm grey
    [0.55, 0.38, 0.22],  # floor: brown
    [0.88, 0.22, 0.20],  # sphere: red
    [0.22, 0.72, 0.28],  # box: green
    [0.22, 0.38, 0.88],  # cylinder: blue
], dtype=np.float32)
_MAX_OBJECTS = 5
_SPHERE, _BOX, _CYLINDER = 0, 1, 2  # object types; class = 2 + type


def _load_synthetic(tasks: tuple[str, ...], seed: int, size: tuple[int, int], n_train: int,
                    n_test: int) -> MultiTaskData:
    """Renders the train and test scenes and keeps the selected tasks' targets."""
    # Separate child streams of the seed: test scenes never repeat train scenes, and the train
    # split does not change when n_test does.
    train_rng = np.random.default_rng(np.random.SeedSequence([seed, 0]))
    test_rng = np.random.default_rng(np.random.SeedSequence([seed, 1]))
    x_tr, y_tr = render_scenes(train_rng, n_train, size)
    x_te, y_te = render_scenes(test_rng, n_test, size)
    x_tr, x_te, prep = _standardise(x_tr, x_te, "RGB in [0, 1]")
    infos = {
        "segmentation": TaskInfo("segmentation", "segmentation", len(SEG_CLASSES)),
        "depth": TaskInfo("depth", "depth", None),
        "normal": TaskInfo("normal", "normal", None),
        "edge": TaskInfo("edge", "edge", None),
    }
    return MultiTaskData(
        name="synthetic", in_channels=3, input_size=size, shared_input=True,
        tasks=tuple(infos[t] for t in tasks),
        train=Split(x_tr, {t: y_tr[t] for t in tasks}),
        test=Split(x_te, {t: y_te[t] for t in tasks}),
        preprocessing=prep,
    )


def render_scenes(rng: np.random.Generator, n: int, size: tuple[int, int]
                  ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Takes a random generator, a scene count and (H, W); returns the un-normalised images
    float32 (n, 3, H, W) in about [0, 1] and the targets of all four tasks (see module doc)."""
    h, w = size
    ys = ((np.arange(h, dtype=np.float32) + 0.5) / h * 2 - 1)[None, :, None]  # (1, H, 1)
    xs = ((np.arange(w, dtype=np.float32) + 0.5) / h * 2 - w / h)[None, None, :]  # (1, 1, W)
    scene = _draw_scene_params(rng, n, w / h)
    depth, normal, surface = _render_background(scene, ys, xs)
    for k in range(_MAX_OBJECTS):
        _draw_object(scene, k, ys, xs, depth, normal, surface)
    label = scene["surface_class"][np.arange(n)[:, None, None], surface]
    edge = _edges(surface, depth)
    image = _shade(rng, scene, ys, xs, depth, normal, surface)
    targets = {
        "segmentation": label.astype(np.int64, copy=False),
        "depth": depth[:, None].astype(np.float32, copy=False),
        "normal": normal.astype(np.float32, copy=False),
        "edge": edge[:, None].astype(np.float32, copy=False),
    }
    return image, targets


def _draw_scene_params(rng: np.random.Generator, n: int, aspect: float) -> dict[str, np.ndarray]:
    """Draws every random quantity of n scenes up front (fixed order and shapes, so a scene
    depends only on the stream, never on which branches the rendering takes)."""
    f32 = np.float32
    k = _MAX_OBJECTS
    p = {
        "y_h": rng.uniform(-0.75, -0.35, n).astype(f32),      # horizon row
        "d_wall": rng.uniform(7.0, 10.0, n).astype(f32),
        "d_near": rng.uniform(1.5, 2.5, n).astype(f32),       # floor depth at the bottom row
        "n_obj": rng.integers(2, _MAX_OBJECTS + 1, n),
        "kind": rng.integers(0, 3, (n, k)),
        "base_u": rng.uniform(0.0, 1.0, (n, k)).astype(f32),  # where on the floor it stands
        "cx": rng.uniform(-0.9 * aspect, 0.9 * aspect, (n, k)).astype(f32),
        "scale": rng.uniform(1.1, 2.0, (n, k)).astype(f32),  # world size
        "shape": rng.uniform(0.7, 1.4, (n, k)).astype(f32),   # height / width of boxes, cylinders
        "yaw": rng.uniform(-0.8, 0.8, (n, k)).astype(f32),    # box front-face slope dd/dx
        "light": rng.uniform(-0.6, 0.6, (n, 2)).astype(f32),
        "jitter": rng.uniform(-0.07, 0.07, (n, 2 + k, 3)).astype(f32),
    }
    p["light"][:, 1] = -np.abs(p["light"][:, 1]) - 0.2  # light from above, so the floor is lit
    p["K"] = p["d_near"] * (1 - p["y_h"])                 # floor: d = K / (y - y_h)
    p["y_w"] = p["y_h"] + p["K"] / p["d_wall"]            # row where floor meets wall
    # Per surface id (0 wall, 1 floor, 2.. objects): its class and its colour.
    cls = np.concatenate([np.zeros((n, 1), int), np.ones((n, 1), int), 2 + p["kind"]], axis=1)
    p["surface_class"] = cls
    p["albedo"] = np.clip(_ALBEDO[cls] + p["jitter"], 0.0, 1.0)
    return p


def _render_background(p: dict[str, np.ndarray], ys: np.ndarray, xs: np.ndarray
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Returns depth (n, H, W), normals (n, 3, H, W) and surface ids (n, H, W) of wall + floor."""
    n, w = p["y_h"].shape[0], xs.shape[2]
    y_h, k_f, y_w = (p[key][:, None, None] for key in ("y_h", "K", "y_w"))
    on_floor = ys > y_w                                            # (n, H, 1)
    dy = np.maximum(ys - y_h, 1e-3)                                # rows above the horizon: wall
    depth_rows = np.where(on_floor, k_f / dy, p["d_wall"][:, None, None])
    slope = np.where(on_floor, -k_f / dy**2, 0.0)                  # dd/dy of the floor
    norm = np.sqrt(slope**2 + 1)
    normal_rows = np.stack([np.zeros_like(slope), slope / norm, 1 / norm], axis=1)  # (n,3,H,1)
    shape = (n, ys.shape[1], w)
    depth = np.broadcast_to(depth_rows, shape).astype(np.float32)
    normal = np.broadcast_to(normal_rows, (n, 3, *shape[1:])).astype(np.float32)
    surface = np.broadcast_to(on_floor, shape).astype(np.int64)    # 0 wall, 1 floor
    return depth, normal, surface


def _draw_object(p: dict[str, np.ndarray], k: int, ys: np.ndarray, xs: np.ndarray,
                 depth: np.ndarray, normal: np.ndarray, surface: np.ndarray) -> None:
    """Z-buffers object slot k of every scene that has it into depth / normal / surface."""
    active = k < p["n_obj"]
    y_w = p["y_w"]
    # sqrt biases the base towards the bottom rows: near objects are big enough to be learnable
    # at 32x32, while far ones (near the wall) stay a minority.
    y_b = y_w + 0.08 + (1.15 - y_w - 0.08) * np.sqrt(p["base_u"][:, k])
    c = p["K"] / (y_b - p["y_h"])                                  # depth of the floor there
    size = p["scale"][:, k] / c                                    # perspective: size ~ 1 / depth
    for kind, render in ((_SPHERE, _sphere), (_BOX, _box), (_CYLINDER, _cylinder)):
        idx = np.flatnonzero(active & (p["kind"][:, k] == kind))
        if idx.size == 0:
            continue
        # (m,) -> (m, 1, 1): one value per scene, broadcast over the image.
        cx, yb, ck, sk, hk, yk = (a[idx][:, None, None] for a in (
            p["cx"][:, k], y_b, c, size, p["shape"][:, k], p["yaw"][:, k]))
        d_obj, n_obj = render(ys, xs, cx, yb, ck, sk, hk, yk)
        closer = d_obj < depth[idx]
        depth[idx] = np.where(closer, d_obj, depth[idx])
        normal[idx] = np.where(closer[:, None], n_obj, normal[idx])
        surface[idx] = np.where(closer, 2 + k, surface[idx])


def _unit(nx: np.ndarray, ny: np.ndarray, nz: np.ndarray) -> np.ndarray:
    """Stacks normal components on axis 1 and scales them to unit length."""
    v = np.stack(np.broadcast_arrays(nx, ny, nz), axis=1)
    v *= 1.0 / np.sqrt((v * v).sum(axis=1, keepdims=True))
    return v


# The three primitives share one signature: image coordinates ys (1, H, 1) and xs (1, 1, W), then
# per-scene parameters (m, 1, 1): centre column, base row, depth, size, height/width, yaw.
def _sphere(ys, xs, cx, y_b, c, size, shape, yaw):
    """A sphere of radius ``size`` resting on row y_b; returns depth (inf outside), normals."""
    r = 0.5 * size
    cy = y_b - r
    rho2 = (xs - cx) ** 2 + (ys - cy) ** 2
    inside = rho2 < r**2
    bulge = np.sqrt(np.maximum(r**2 - rho2, 0.0))
    depth = np.where(inside, c - bulge, np.inf).astype(np.float32)
    # Analytic normal of the height field d = c - sqrt(r^2 - rho^2): (x - cx, y - cy, bulge).
    return depth, _unit(xs - cx, ys - cy, np.maximum(bulge, 1e-4))


def _cylinder(ys, xs, cx, y_b, c, size, shape, yaw):
    """An upright cylinder standing on row y_b; returns depth (inf outside), normals."""
    r = 0.35 * size
    top = y_b - 1.1 * size * shape
    inside = (np.abs(xs - cx) < r) & (ys > top) & (ys <= y_b)
    bulge = np.sqrt(np.maximum(r**2 - (xs - cx) ** 2, 0.0))
    depth = np.where(inside, c - bulge, np.inf).astype(np.float32)
    return depth, _unit(xs - cx, np.zeros_like(ys), np.maximum(bulge, 1e-4))


def _box(ys, xs, cx, y_b, c, size, shape, yaw):
    """A box on row y_b: a yawed front face (depth slope ``yaw`` along x) below a top face that
    recedes upwards; returns depth (inf outside), normals. Depth is continuous at the crease."""
    half = 0.45 * size
    front_top = y_b - 0.9 * size * shape
    lid_top = front_top - 0.25 * size
    recede = 3.0  # dd/dy of the top face (negative y is up): it moves away as it goes up
    in_x = np.abs(xs - cx) < half
    front = in_x & (ys > front_top) & (ys <= y_b)
    lid = in_x & (ys > lid_top) & (ys <= front_top)
    # Shift forward so the farthest point of the face is at c: it stands in front of the floor.
    d_front = c - np.abs(yaw) * half + yaw * (xs - cx)
    d_lid = d_front + recede * (front_top - ys)
    depth = np.where(front, d_front, np.where(lid, d_lid, np.inf)).astype(np.float32)
    n_front = _unit(yaw + 0 * xs, 0 * ys, np.ones_like(yaw))
    n_lid = _unit(yaw + 0 * xs, -recede + 0 * ys, np.ones_like(yaw))
    return depth, np.where(lid[:, None], n_lid, n_front)


def _edges(surface: np.ndarray, depth: np.ndarray) -> np.ndarray:
    """Marks, for every pair of 4-neighbours on different surfaces, the nearer pixel (one-pixel
    thin occlusion / label boundaries); returns a float32 (n, H, W) map of 0 / 1."""
    edge = np.zeros(surface.shape, dtype=bool)
    for axis in (1, 2):
        a = [slice(None)] * 3
        b = [slice(None)] * 3
        a[axis], b[axis] = slice(None, -1), slice(1, None)
        a, b = tuple(a), tuple(b)
        differ = surface[a] != surface[b]
        a_nearer = depth[a] <= depth[b]
        edge[a] |= differ & a_nearer
        edge[b] |= differ & ~a_nearer
    return edge.astype(np.float32)


def _shade(rng: np.random.Generator, p: dict[str, np.ndarray], ys: np.ndarray, xs: np.ndarray,
           depth: np.ndarray, normal: np.ndarray, surface: np.ndarray) -> np.ndarray:
    """Returns the rendered images float32 (n, 3, H, W): albedo x Lambertian shading x fog +
    noise. The noise, whose amount depends on (H, W), is drawn after every scene parameter, so a
    seed gives the same scenes at every input size."""
    n = depth.shape[0]
    flat = surface.reshape(n, -1)
    albedo = np.stack([np.take_along_axis(p["albedo"][:, :, ch], flat, axis=1) for ch in range(3)],
                      axis=1).reshape(n, 3, *surface.shape[1:])
    # A floor checker in world units (x * d across, d along) gives a texture with perspective.
    checker = (np.floor(1.2 * xs * depth) + np.floor(1.2 * depth)) % 2
    texture = np.where(surface == 1, 0.9 + 0.2 * checker, 1.0)
    light = np.concatenate([p["light"], np.ones((n, 1), np.float32)], axis=1)
    light /= np.linalg.norm(light, axis=1, keepdims=True)
    lambert = sum(normal[:, ch] * light[:, ch, None, None] for ch in range(3))
    shading = 0.35 + 0.65 * np.maximum(lambert, 0.0)
    fog = np.exp(np.float32(-0.03) * depth)
    albedo *= (texture * shading * fog).astype(np.float32)[:, None]
    albedo += np.float32(0.02) * rng.standard_normal(albedo.shape, dtype=np.float32)
    return albedo


# ------------------------------------------------------------------------------------- digits
@lru_cache(maxsize=1)
def _raw_digits() -> tuple[np.ndarray, np.ndarray]:
    """Returns scikit-learn's bundled digits as images float32 (1797, 8, 8) in [0, 1] and
    labels int64 (1797,); cached because every load needs them."""
    from sklearn.datasets import load_digits  # imported lazily: only digits needs scikit-learn

    bunch = load_digits()
    images = (bunch.images / 16.0).astype(np.float32)
    images.setflags(write=False)
    labels = bunch.target.astype(np.int64)
    labels.setflags(write=False)
    return images, labels


def _stratified_split(labels: np.ndarray, seed: int, test_fraction: float = 0.2
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Takes labels and a seed; returns (train, test) index arrays: per class a shuffled
    ``test_fraction`` goes to test, the rest to train; both are then shuffled."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 2]))
    train, test = [], []
    for cls in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        n_test = round(test_fraction * idx.size)
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    # Shuffled, so a per-task cap (n_train / n_test) keeps every class represented.
    return rng.permutation(np.concatenate(train)), rng.permutation(np.concatenate(test))


def _resize_bilinear(images: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Takes images (n, h, w) and (H, W); returns them resized bilinearly (half-pixel centres,
    like torch's ``align_corners=False``)."""
    h, w = images.shape[1:]
    if (h, w) == size:
        return images

    def taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        pos = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
        lo = np.floor(pos).astype(int)
        hi = np.minimum(lo + 1, n_in - 1)
        return lo, hi, (pos - lo).astype(np.float32)

    r0, r1, fr = taps(h, size[0])
    c0, c1, fc = taps(w, size[1])
    rows = images[:, r0] * (1 - fr)[None, :, None] + images[:, r1] * fr[None, :, None]
    return (rows[:, :, c0] * (1 - fc) + rows[:, :, c1] * fc).astype(np.float32)


def _digits_task(task: str, digits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Takes a digits task and digit labels; returns (mask of the images it uses, its labels)."""
    if task == "low":
        return digits < 5, digits
    if task == "high":
        return digits >= 5, digits - 5
    return np.ones(digits.shape, bool), digits % 2


def _load_digits(tasks: tuple[str, ...], seed: int, size: tuple[int, int],
                 n_train: int | None, n_test: int | None) -> MultiTaskData:
    """Builds the digits tasks from one stratified split of all images (see module doc)."""
    images, digits = _raw_digits()
    train_idx, test_idx = _stratified_split(digits, seed)
    x = _resize_bilinear(images, size)[:, None]                   # (1797, 1, H, W)
    x_tr, x_te, prep = _standardise(x[train_idx], x[test_idx], "grey level / 16, in [0, 1]")
    d_tr, d_te = digits[train_idx], digits[test_idx]
    train_in, train_y, test_in, test_y = {}, {}, {}, {}
    for t in tasks:
        m_tr, y_tr = _digits_task(t, d_tr)
        m_te, y_te = _digits_task(t, d_te)
        train_in[t], train_y[t] = x_tr[m_tr][:n_train], y_tr[m_tr][:n_train]
        test_in[t], test_y[t] = x_te[m_te][:n_test], y_te[m_te][:n_test]
    classes = {"low": 5, "high": 5, "parity": 2}
    return MultiTaskData(
        name="digits", in_channels=1, input_size=size, shared_input=False,
        tasks=tuple(TaskInfo(t, "classification", classes[t]) for t in tasks),
        train=Split(train_in, train_y),
        test=Split(test_in, test_y),
        preprocessing=prep,
    )
