"""Write a small folder dataset (FORMAT.md, "Folder datasets") from scikit-learn's bundled 8x8
digits; nothing is downloaded. Each sample is one grey 16 x 32 PNG holding two digits side by side
(each upscaled 2x), with three tasks:

    left    classification, 10 classes: the left digit           (labels.csv)
    right   classification, 10 classes: the right digit          (labels.csv)
    parts   segmentation, 3 classes: 0 paper, 1 left ink, 2 right ink   (parts/<id>.png)

Usage:
    python examples/own_data/make_dataset.py ROOT [--n-train 400] [--n-test 100] [--seed 0]
    dagc train --dataset folder --data-root ROOT --out run

The train and test splits draw their digits from disjoint halves of scikit-learn's images.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

INK = 4  # a digit pixel (0..16) above this is ink in the segmentation map


def write_split(folder: Path, images: np.ndarray, labels: np.ndarray, n: int, rng: np.random.Generator) -> None:
    """Writes n samples of two random digits each into folder/images, folder/parts, folder/labels.csv."""
    (folder / "images").mkdir(parents=True)
    (folder / "parts").mkdir()
    rows = []
    for i in range(n):
        a, b = rng.integers(0, len(images), 2)
        pair = np.concatenate([images[a], images[b]], axis=1).repeat(2, axis=0).repeat(2, axis=1)  # 16 x 32
        picture = np.round(pair / 16.0 * 255).astype(np.uint8)
        parts = np.where(pair > INK, 1, 0).astype(np.uint8)
        parts[:, 16:] *= 2  # right digit's ink: class 2
        key = f"{i:05d}"
        Image.fromarray(picture, mode="L").save(folder / "images" / f"{key}.png")
        Image.fromarray(parts, mode="L").save(folder / "parts" / f"{key}.png")
        rows.append([key, int(labels[a]), int(labels[b])])
    with open(folder / "labels.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "left", "right"])
        writer.writerows(rows)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("root", type=Path, help="folder to write (must not exist)")
    ap.add_argument("--n-train", type=int, default=400)
    ap.add_argument("--n-test", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    digits = load_digits()
    images, labels = digits.images, digits.target
    half = len(images) // 2
    rng = np.random.default_rng(args.seed)
    args.root.mkdir(parents=True)
    (args.root / "dataset.json").write_text(json.dumps({"name": "digit-pairs", "tasks": [
        {"name": "left", "kind": "classification", "classes": 10},
        {"name": "right", "kind": "classification", "classes": 10},
        {"name": "parts", "kind": "segmentation", "classes": 3}]}, indent=2) + "\n")
    write_split(args.root / "train", images[:half], labels[:half], args.n_train, rng)
    write_split(args.root / "test", images[half:], labels[half:], args.n_test, rng)
    print(f"wrote {args.root}: {args.n_train} train and {args.n_test} test images (16 x 32, grey)")


if __name__ == "__main__":
    main()
