"""The built-in dataset ``multidigits``: two real handwritten digits per image, nothing downloaded.

``multidigits`` (a shared input whose tasks' sub-networks differ; issue 26's and 27's problem)
    32x32 grey images, each composed of two of scikit-learn's bundled 8x8 digits upscaled to 20x20,
    one in the upper left, one in the lower right, overlapping by 8 pixels (the brighter pixel wins):

    * ``left``:  the upper-left digit, 10-way
    * ``right``: the lower-right digit, 10-way
    * ``parts``: 3-class segmentation: 0 background, 1 the left digit, 2 the right digit (where it
      is drawn, the right digit wins)

    The training and held-out images are composed from the two sides of one stratified 80/20
    split of the 1797 digit images (`dagc.trainer.digits`), so no held-out image reuses a training
    digit. Default 6000 training and 1000 held-out images; the pairs are drawn by the seed. Inputs
    are standardised with the training images' mean and standard deviation. Another
    ``input_size`` than (32, 32) resizes the composed images bilinearly (labels: nearest).
"""

from __future__ import annotations

import numpy as np

from dagc.preprocessing import resize_chw
from dagc.spec import TaskSpec
from dagc.trainer.data import Dataset, LoadOptions, MultiTaskData, Split, standardise
from dagc.trainer.digits import raw_digits, resize_bilinear, stratified_split

_TASKS = {t.name: t for t in (TaskSpec("left", "classification", 10), TaskSpec("right", "classification", 10),
                              TaskSpec("parts", "segmentation", 3))}
SIZE, DIGIT, OFFSET = 32, 20, 12  # the image, a digit, where the lower-right digit starts
INK = 0.25  # a digit's pixel counts as part of it from this grey level on


def compose(images: np.ndarray, labels: np.ndarray, n: int, rng: np.random.Generator
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``n`` scenes from random pairs of ``images`` (m, 20, 20) in [0, 1] with their ``labels``:
    returns the images (n, 1, 32, 32) float32, the left and right labels, and the parts (n, 32, 32)."""
    a, b = rng.integers(0, len(images), n), rng.integers(0, len(images), n)
    left = np.zeros((n, SIZE, SIZE), np.float32)
    right = np.zeros((n, SIZE, SIZE), np.float32)
    left[:, :DIGIT, :DIGIT] = images[a]
    right[:, OFFSET:OFFSET + DIGIT, OFFSET:OFFSET + DIGIT] = images[b]
    parts = np.zeros((n, SIZE, SIZE), np.int64)
    parts[left > INK] = 1
    parts[right > INK] = 2
    return np.maximum(left, right)[:, None], labels[a], labels[b], parts


def load(opts: LoadOptions) -> MultiTaskData:
    """Composes the scenes of ``opts.seed`` (see the module doc) and keeps the selected tasks."""
    images, digits = raw_digits()
    big = resize_bilinear(np.asarray(images), (DIGIT, DIGIT))
    train_idx, test_idx = stratified_split(digits, opts.seed)
    rng = np.random.default_rng([opts.seed, 26])
    splits = []
    for idx, n in ((train_idx, opts.n_train or 6000), (test_idx, opts.n_test or 1000)):
        x, left, right, parts = compose(big[idx], digits[idx], n, rng)
        if tuple(opts.size) != (SIZE, SIZE):
            x = np.stack([resize_chw(im, opts.size) for im in x]).astype(np.float32)
            parts = np.stack([resize_chw(p[None], opts.size, nearest=True)[0] for p in parts]).astype(np.int64)
        splits.append((x, {"left": left, "right": right, "parts": parts}))
    x_tr, x_te, prep = standardise(splits[0][0], splits[1][0], "grey level / 16, in [0, 1]")
    return MultiTaskData(
        name="multidigits", in_channels=1, input_size=tuple(opts.size), shared_input=True,
        tasks=tuple(_TASKS[t] for t in opts.tasks),
        train=Split(x_tr, {t: splits[0][1][t] for t in opts.tasks}),
        test=Split(x_te, {t: splits[1][1][t] for t in opts.tasks}),
        preprocessing=prep,
    )


DATASET = Dataset("multidigits", load, preset="tiny-v2", on_disk=False, tasks=tuple(_TASKS), input_size=(SIZE, SIZE),
                  min_size=8, n_train=6000, n_test=1000)
