"""Preprocessing shared by training data and deployment: the typed record of how a raw input
becomes a model input, and the one image resize.

`Preprocessing` is written by the trainer's datasets into the checkpoint (metadata key
``preprocessing``), copied by the compiler into the artifact manifest (``input.preprocessing``) and
read by the runtime (`dagc.runtime.images.read_image` applies it, `dagc.runtime.Engine` bounds the
values it accepts with it). Its dictionary form (`Preprocessing.to_dict`)::

    {"raw": "RGB in [0, 1]",          # what a raw value is, for people (never parsed)
     "raw_range": [0.0, 1.0],         # the numeric range of raw values; 8-bit pixels map onto it
     "mean": [...], "std": [...],     # per channel (or one value for every channel)
     "layout": "NCHW", "dtype": "float32",
     "formula": "(raw - mean) / std per channel"}

Checkpoints and artifacts written before the numeric ``raw_range`` existed carry only the prose
``raw``; `Preprocessing.from_legacy` converts that form once, where such a file is read.

Training readers (`dagc.trainer.readers`) and `dagc run` (`dagc.runtime.images`) both resize with
`resize_chw`, so a model sees the same pixels in training and in deployment.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from dagc.errors import DataError

__all__ = ["Preprocessing", "FORMULA", "LAYOUTS", "DTYPES", "resize_chw"]

FORMULA = "(raw - mean) / std per channel"
LAYOUTS = ("NCHW",)
DTYPES = ("float32",)
_KEYS = ("raw", "raw_range", "mean", "std", "layout", "dtype", "formula")


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise DataError(f"{where} must be a finite number, got {value!r}")
    return float(value)


def _numbers(value: Any, where: str) -> tuple[float, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or not value:
        raise DataError(f"{where} must be a non-empty list of numbers, got {value!r}")
    return tuple(_number(v, f"{where}[{i}]") for i, v in enumerate(value))


@dataclass(frozen=True)
class Preprocessing:
    """How a raw input becomes a model input: ``(raw - mean) / std`` per channel.

    Fields:
        raw_range: (lo, hi), the range raw values lie in; image readers map 8-bit pixels
            0..255 linearly onto it.
        mean, std: per channel (one value applies to every channel); std > 0.
        layout: the model input's layout, ``"NCHW"``.
        dtype: the model input's dtype, ``"float32"``.
        description: what a raw value is, in words (e.g. ``"RGB in [0, 1]"``); informative only.

    Raises DataError naming the field if a value is invalid.
    """

    raw_range: tuple[float, float]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    layout: str = "NCHW"
    dtype: str = "float32"
    description: str = ""

    def __post_init__(self) -> None:
        rng = _numbers(self.raw_range, "preprocessing.raw_range")
        if len(rng) != 2 or not rng[0] < rng[1]:
            raise DataError(f"preprocessing.raw_range must be two numbers lo < hi, got {list(rng)}")
        mean, std = _numbers(self.mean, "preprocessing.mean"), _numbers(self.std, "preprocessing.std")
        if len(mean) != len(std):
            raise DataError(f"preprocessing.mean and preprocessing.std must have one value per channel each, got "
                            f"{len(mean)} and {len(std)}")
        if min(std) <= 0:
            raise DataError(f"preprocessing.std must be positive, got {list(std)}")
        if self.layout not in LAYOUTS:
            raise DataError(f"preprocessing.layout must be one of {list(LAYOUTS)}, got {self.layout!r}")
        if self.dtype not in DTYPES:
            raise DataError(f"preprocessing.dtype must be one of {list(DTYPES)}, got {self.dtype!r}")
        if not isinstance(self.description, str):
            raise DataError(f"preprocessing.raw must be a string, got {self.description!r}")
        # normalised storage: tuples of floats, so that equal records compare equal
        object.__setattr__(self, "raw_range", rng)
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)

    @property
    def channels(self) -> int:
        """How many channels mean and std give values for (1: one value for every channel)."""
        return len(self.mean)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (module docstring); `from_dict` reads it back."""
        return {"raw": self.description, "raw_range": list(self.raw_range), "mean": list(self.mean),
                "std": list(self.std), "layout": self.layout, "dtype": self.dtype, "formula": FORMULA}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Preprocessing:
        """Read the `to_dict` form. Takes the mapping; returns the record. Raises DataError naming
        the field that is missing, unknown or invalid (a ``formula`` other than `FORMULA` too)."""
        if not isinstance(d, Mapping):
            raise DataError(f"preprocessing must be a JSON object, got {type(d).__name__}")
        unknown = sorted(set(d) - set(_KEYS))
        if unknown:
            raise DataError(f"preprocessing: unknown field(s) {unknown}")
        for key in ("raw_range", "mean", "std", "layout", "dtype"):
            if key not in d:
                raise DataError(f"preprocessing.{key} is missing")
        if d.get("formula", FORMULA) != FORMULA:  # optional and constant: documentation in the file
            raise DataError(f"preprocessing.formula {d['formula']!r} is not supported (only {FORMULA!r})")
        return cls(raw_range=d["raw_range"], mean=d["mean"], std=d["std"], layout=d["layout"], dtype=d["dtype"],
                   description=d.get("raw", ""))

    @classmethod
    def from_legacy(cls, d: Mapping[str, Any]) -> Preprocessing:
        """Convert the prose form of checkpoints and version-1 artifacts written before
        ``raw_range`` existed: ``{"raw": "RGB in [0, 1]", "mean", "std", ...}``.

        The range is the first ``[a, b]`` in ``raw`` ([0, 1] when it states none, the range those
        readers assumed); missing mean / std / layout / dtype take the values those readers used
        (0, 1, NCHW, float32). Raises DataError if a value is invalid.
        """
        if not isinstance(d, Mapping):
            raise DataError(f"preprocessing must be a JSON object, got {type(d).__name__}")
        text = d.get("raw", "")
        found = re.search(r"\[\s*(-?\d+(?:\.\d*)?)\s*,\s*(-?\d+(?:\.\d*)?)\s*\]", text) if isinstance(text, str) else None
        rng = (float(found.group(1)), float(found.group(2))) if found else (0.0, 1.0)
        return cls(raw_range=rng, mean=d.get("mean", [0.0]), std=d.get("std", [1.0]),
                   layout=d.get("layout", "NCHW"), dtype=d.get("dtype", "float32"),
                   description=text if isinstance(text, str) else "")

    @classmethod
    def from_record(cls, d: Mapping[str, Any]) -> Preprocessing:
        """Either form, as a checkpoint may hold it: `from_dict` when ``raw_range`` is present,
        else `from_legacy`. Raises DataError."""
        return cls.from_dict(d) if isinstance(d, Mapping) and "raw_range" in d else cls.from_legacy(d)

    def value_bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """Per channel, the model-input values of the raw range's ends: ``((lo - mean) / std,
        (hi - mean) / std)`` as float64 arrays of `channels` values."""
        mean, std = np.asarray(self.mean, np.float64), np.asarray(self.std, np.float64)
        return (self.raw_range[0] - mean) / std, (self.raw_range[1] - mean) / std

    def normalise(self, chw: np.ndarray) -> np.ndarray:
        """Takes raw (C, H, W) values with C == `channels` (or any C when `channels` is 1);
        returns float32 ``(raw - mean) / std`` per channel."""
        mean = np.asarray(self.mean, np.float32).reshape(-1, 1, 1)
        std = np.asarray(self.std, np.float32).reshape(-1, 1, 1)
        return ((chw - mean) / std).astype(np.float32, copy=False)


def resize_chw(chw: np.ndarray, size: tuple[int, int], nearest: bool = False) -> np.ndarray:
    """Takes (C, h, w) and (H, W); returns float32 (C, H, W) resized per channel with Pillow
    (mode "F"), bilinearly, or by nearest neighbour (labels and masks). The one resize of dagc:
    `dagc run` applies it to pictures and the dataset readers to training data, so training and
    deployment agree."""
    chw = chw.astype(np.float32, copy=False)
    if chw.shape[1:] == tuple(size):
        return chw
    method = Image.NEAREST if nearest else Image.BILINEAR
    h, w = size
    return np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(ch), mode="F").resize((w, h), method),
                                dtype=np.float32) for ch in chw])
