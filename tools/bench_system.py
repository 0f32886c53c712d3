"""`dagc bench`'s measurements of the process and the machine: peak resident memory of a variant,
latency statistics of a list of call times, and a description of the machine and libraries."""

from __future__ import annotations

import ctypes
import datetime
import os
import platform
import resource
import sys
from typing import Any

import numpy as np
import onnxruntime
import torch

__all__ = ["Memory", "latency_stats", "machine"]


def _proc_status(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


class Memory:
    """Peak RSS growth: VmHWM after a reset via /proc/self/clear_refs, else ru_maxrss. ``method``
    describes which one is used. All values are bytes."""

    def __init__(self) -> None:
        self.hwm = False
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.hwm = _proc_status("VmHWM") is not None and _proc_status("VmRSS") is not None
        except OSError:
            self.hwm = False
        self._trim = None
        if sys.platform.startswith("linux"):
            try:
                self._trim = ctypes.CDLL("libc.so.6").malloc_trim
            except (OSError, AttributeError):
                self._trim = None
        self.method = ("Linux VmHWM (peak resident set, reset via /proc/self/clear_refs) minus VmRSS before "
                       "the variant was built" if self.hwm else
                       "growth of resource.getrusage(RUSAGE_SELF).ru_maxrss (a lower bound)")

    @staticmethod
    def _maxrss() -> int:
        r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(r) if sys.platform == "darwin" else int(r) * 1024

    def baseline(self) -> int:
        """Return the resident set now, after returning freed heap to the system and resetting the
        peak (with VmHWM; else the peak so far, which only grows)."""
        if self._trim is not None:
            self._trim(0)
        if self.hwm:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return _proc_status("VmRSS") or 0
        return self._maxrss()

    def current(self) -> int:
        """The resident set now (with VmHWM; else the peak so far)."""
        return (_proc_status("VmRSS") or 0) if self.hwm else self._maxrss()

    def peak(self) -> int:
        """The peak resident set since the last `baseline`."""
        return (_proc_status("VmHWM") or 0) if self.hwm else self._maxrss()


def latency_stats(times_s: list[float], batch: int) -> dict[str, Any]:
    """Repetitions, p50/p90/p99/mean/min latency in ms and throughput (images/s at the p50) of the
    call times ``times_s`` (seconds) of batches of ``batch`` images."""
    ms = np.asarray(times_s) * 1e3
    p50, p90, p99 = (float(v) for v in np.percentile(ms, [50, 90, 99]))
    return {"reps": len(ms), "p50_ms": p50, "p90_ms": p90, "p99_ms": p99, "mean_ms": float(ms.mean()),
            "min_ms": float(ms.min()), "throughput_ips": batch / (p50 / 1e3)}


def machine() -> dict[str, Any]:
    """Platform, CPU model, CPU counts, library versions, torch threads, GPU name and the date."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"platform": platform.platform(), "cpu": cpu, "cpu_count": os.cpu_count(), "usable_cpus": usable,
            "python": platform.python_version(), "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__, "numpy": np.__version__,
            "torch_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
