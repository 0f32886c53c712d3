"""The built-in dataset ``synthetic``: nothing is downloaded, every scene is rendered from the seed.

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

Inputs are standardised per channel with the train split's mean and standard deviation; the same
statistics are applied to the test split.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from dagc.spec import TaskSpec
from dagc.trainer.data import Dataset, LoadOptions, MultiTaskData, Split, standardise

SEG_CLASSES = ("wall", "floor", "sphere", "box", "cylinder")
_TASKS = {t.name: t for t in (TaskSpec("segmentation", "segmentation", len(SEG_CLASSES)), TaskSpec("depth", "depth"),
                              TaskSpec("normal", "normal"), TaskSpec("edge", "edge"))}
_ALBEDO = np.array([
    [0.78, 0.74, 0.66],  # wall: warm grey
    [0.55, 0.38, 0.22],  # floor: brown
    [0.88, 0.22, 0.20],  # sphere: red
    [0.22, 0.72, 0.28],  # box: green
    [0.22, 0.38, 0.88],  # cylinder: blue
], dtype=np.float32)
_MAX_OBJECTS = 5
_SPHERE, _BOX, _CYLINDER = 0, 1, 2  # object types; class = 2 + type


def load(opts: LoadOptions) -> MultiTaskData:
    """Renders ``opts.n_train`` train and ``opts.n_test`` test scenes and keeps the selected tasks'
    targets (see the module doc)."""
    raw = load_raw(opts)
    x_tr, x_te, prep = standardise(raw.train.inputs, raw.test.inputs, "RGB in [0, 1]")
    return replace(raw, train=Split(x_tr, raw.train.targets), test=Split(x_te, raw.test.targets), preprocessing=prep)


def load_raw(opts: LoadOptions) -> MultiTaskData:
    """`load` before standardisation: the rendered images as they are (about [0, 1]), no
    preprocessing record. What `dagc.trainer.folder.write_folder` writes for a bit-exact round trip."""
    # Separate child streams of the seed: test scenes never repeat train scenes, and the train
    # split does not change when n_test does.
    train_rng = np.random.default_rng(np.random.SeedSequence([opts.seed, 0]))
    test_rng = np.random.default_rng(np.random.SeedSequence([opts.seed, 1]))
    x_tr, y_tr = render_scenes(train_rng, opts.n_train, opts.size)
    x_te, y_te = render_scenes(test_rng, opts.n_test, opts.size)
    tasks = opts.tasks
    return MultiTaskData(
        name="synthetic", in_channels=3, input_size=opts.size, shared_input=True,
        tasks=tuple(_TASKS[t] for t in tasks),
        train=Split(x_tr, {t: y_tr[t] for t in tasks}),
        test=Split(x_te, {t: y_te[t] for t in tasks}),
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


# The paper's `tiny` preset keeps the dense synthetic tasks within minutes on a CPU.
DATASET = Dataset("synthetic", load, preset="tiny", on_disk=False, tasks=tuple(_TASKS), input_size=(32, 32),
                  min_size=16, n_train=2048, n_test=512)
