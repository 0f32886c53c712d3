"""Activation ranges for `dagc.compiler.quantize.quantize_int8` (``--calibration``).

``minmax`` and ``percentile`` are ONNX Runtime's calibrators as `quantize_static` runs them.
``entropy`` is not: ONNX Runtime 1.32's `quantize_static` gives its entropy calibrator 128
histogram bins and 128 quantized bins, which leaves one candidate threshold, the whole histogram,
so its ranges were min-max's (measured: byte-identical int8 files); and its threshold search runs
in Python loops (70 CPU seconds for the default run's model at 2048 bins). `entropy_ranges` keeps
ONNX Runtime's histograms (its collector, `ENTROPY_BINS` bins over [-max|x|, max|x|]) and picks
each tensor's range with the KL-divergence search of TensorRT's entropy calibration
(`kl_threshold`, on a grid of `CANDIDATES` thresholds), then hands the ranges to `quantize_static` through its calibration
cache.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np

__all__ = ["ENTROPY_BINS", "QUANTIZED_BINS", "CANDIDATES", "Reader", "kl_threshold", "entropy_ranges"]

ENTROPY_BINS = 2048  # TensorRT's histogram size for entropy calibration
QUANTIZED_BINS = 128  # levels each candidate distribution is merged into (int8's one side)
# Thresholds tried per tensor: every one of the up to 961 candidates costs a dozen NumPy calls (6 s
# a calibration of the default run's model); a grid of 128 finds the range to within 8 of 2048 bins.
CANDIDATES = 128
_EPS = 1e-4  # mass given to empty bins before the divergence (ONNX Runtime's and MXNet's smoothing)


class Reader:
    """The feeds as ONNX Runtime's CalibrationDataReader wants them (``get_next`` until None)."""

    def __init__(self, feeds: Sequence[Mapping[str, np.ndarray]], inputs: Sequence[str]) -> None:
        self._it: Iterator = iter([{i: f[i] for i in inputs} for f in feeds])

    def get_next(self):
        return next(self._it, None)


def _smooth(p: np.ndarray) -> np.ndarray | None:
    zeros = p == 0
    n = int(zeros.sum())
    if n == p.size:
        return None
    return np.where(zeros, _EPS, p - _EPS * n / (p.size - n))


def _divergence(p: np.ndarray, q: np.ndarray) -> float:
    p, q = _smooth(p), _smooth(q)
    if p is None or q is None or (p <= 0).any() or (q <= 0).any():
        return np.inf
    p, q = p / p.sum(), q / q.sum()
    return float(np.sum(p * np.log(p / q)))


def kl_threshold(hist: np.ndarray, edges: np.ndarray, quantized: int = QUANTIZED_BINS) -> tuple[float, float]:
    """The range of a symmetric histogram (``hist`` over ``edges``, zero at the middle) whose
    clipped distribution, merged into ``quantized`` levels, diverges least (KL) from the whole one:
    each candidate keeps the central 2i bins, folds the mass outside into its end bins (p) and
    compares p with its merge into ``quantized`` levels spread back over p's non-empty bins (q)."""
    hist = hist.astype(np.float64)
    n, half = hist.size, quantized // 2
    zero = n // 2
    best, where = np.inf, (edges[0], edges[-1])
    for i in range(half, zero + 1, max(1, (zero + 1 - half) // CANDIDATES)):
        lo, hi = zero - i, min(zero + i + 1, n)
        p = hist[lo:hi].copy()
        p[0] += hist[:lo].sum()
        p[-1] += hist[hi:].sum()
        merged = p.size // quantized
        groups = np.minimum(np.arange(p.size) // merged, quantized - 1)  # the remainder joins the last level
        mass = np.bincount(groups, weights=hist[lo:hi], minlength=quantized)
        nonzero = p != 0
        count = np.bincount(groups, weights=nonzero, minlength=quantized)
        q = np.where(nonzero, mass[groups] / np.maximum(count[groups], 1), 0.0)
        d = _divergence(p, q)
        if d < best:
            best, where = d, (edges[lo], edges[hi])
    return float(where[0]), float(where[1])


def entropy_ranges(model: Path, reader: Reader, tmp: Path) -> Path:
    """Calibrate fp32 ONNX file ``model`` on ``reader`` (module docstring); returns the calibration
    cache, a JSON file in directory ``tmp``, for `quantize_static`'s ``calibration_cache_path``."""
    from onnxruntime.quantization import CalibrationMethod
    from onnxruntime.quantization.calibrate import (
        TensorData,
        TensorsData,
        create_calibrator,
        save_tensors_data,
    )

    calibrator = create_calibrator(model, None, augmented_model_path=str(tmp / "augmented.onnx"),
                                   calibrate_method=CalibrationMethod.Entropy, providers=["CPUExecutionProvider"],
                                   extra_options={"num_bins": ENTROPY_BINS, "num_quantized_bins": QUANTIZED_BINS})
    calibrator.collect_data(reader)
    ranges = {}
    for tensor, (hist, edges, low, high, _) in calibrator.collector.histogram_dict.items():
        lo, hi = kl_threshold(hist, edges)
        ranges[tensor] = TensorData(lowest=np.array(max(lo, low), edges.dtype), highest=np.array(min(hi, high), edges.dtype))
    cache = tmp / "ranges.json"
    save_tensors_data(TensorsData(CalibrationMethod.Entropy, ranges), cache)
    return cache
