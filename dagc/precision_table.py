"""The precisions dagc compiles and runs, declared once (`TABLE`): every other module reads these
records instead of testing precision names, and the names themselves are spelled only here.

A `PrecisionSpec` says how a precision's model files are made (`Files`), which backend's run of
them the compile's accuracy check scores (``checked_on``) and which other backends are scored
too when installed (``also_checked_on``, recorded as ``<precision>-<backend>``), which backends
alone may run it (``runs_on``), the verification tolerance of its compiled forms per target
(``tolerance``, relative to the output scale), the fallbacks tried when it fails the check, the
torch dtype its AOTInductor packages compute in and the OpenVINO inference precision it is.

Adding a precision is adding a record here (and, for a new `Files` kind, how such files are made
in `dagc.compiler.precision`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from types import MappingProxyType

__all__ = ["Files", "PrecisionSpec", "TABLE", "FP32", "INT8", "BF16", "FP16", "REFERENCE", "CHECKED_ON", "spec_of", "tolerances"]


class Files(Enum):
    """How a precision's model files are made."""

    EMITTED = "emitted"  # the reference: the models the compiler emits and verifies
    QUANTIZED = "quantized"  # QDQ files by static quantization, calibrated on the run's training data
    CONVERTED = "converted"  # the emitted models converted (reduced-precision weights, float32 I/O)
    SHARED = "shared"  # no files of its own: the reference files run at this inference precision


@dataclass(frozen=True)
class PrecisionSpec:
    """One precision (module docstring)."""

    name: str
    files: Files
    checked_on: str
    also_checked_on: tuple[str, ...] = ()
    runs_on: tuple[str, ...] | None = None  # None: any backend that runs its files
    tolerance: Mapping[str, float] = field(default_factory=dict)  # compile target -> rtol of its forms
    fallbacks: tuple[str, ...] = ()
    torch_dtype: str | None = None  # the dtype of its AOTInductor packages (None: it has none)
    # OpenVINO's INFERENCE_PRECISION_HINT when OpenVINO runs at it, and the CPU capability it needs
    openvino: tuple[str, str | None] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "tolerance", MappingProxyType(dict(self.tolerance)))

    @property
    def reference(self) -> bool:
        """Whether this is the precision every other one is checked against."""
        return self.files is Files.EMITTED

    @property
    def own_files(self) -> bool:
        """Whether it has model files of its own (``model.int8.onnx``)."""
        return self.files not in (Files.EMITTED, Files.SHARED)


_SPECS = (
    # The ONNX models' and AOTInductor's fp32 tolerance is 10x float32 noise; TensorRT may run fp32
    # convolutions in TF32.
    PrecisionSpec("fp32", Files.EMITTED, "onnxruntime", tolerance={"onnx": 1e-4, "aoti": 1e-4, "tensorrt": 1e-2},
                  torch_dtype="float32", openvino=("f32", None)),
    # TensorRT's int8 kernels may round scales one step apart from ONNX Runtime's reference Q/DQ.
    # Fallbacks (`dagc.compiler.quantize.excluded_nodes`): which convs stay fp32, tried in order.
    PrecisionSpec("int8", Files.QUANTIZED, "onnxruntime", also_checked_on=("openvino",), tolerance={"tensorrt": 1e-1},
                  fallbacks=("none", "first-conv", "heads", "first-conv+heads")),
    # Measured on random reduced tiny/vgg16 networks in eager mode on the CPU (fp16 up to 7e-4,
    # bf16 up to 6e-3 relative to the output scale); about 10x that for the packages.
    PrecisionSpec("bf16", Files.SHARED, "openvino", runs_on=("openvino",), tolerance={"aoti": 5e-2},
                  torch_dtype="bfloat16", openvino=("bf16", "BF16")),
    PrecisionSpec("fp16", Files.CONVERTED, "onnxruntime", tolerance={"aoti": 1e-2, "tensorrt": 5e-2},
                  torch_dtype="float16"),
)
TABLE: Mapping[str, PrecisionSpec] = MappingProxyType({s.name: s for s in _SPECS})
FP32, INT8, BF16, FP16 = TABLE  # the names, for the few places that mean one precision
# the backends precisions are checked on (`PrecisionSpec.checked_on`), as messages name them
CHECKED_ON = MappingProxyType({"onnxruntime": "ONNX Runtime", "openvino": "OpenVINO"})
REFERENCE = next(p.name for p in _SPECS if p.reference)  # what every other precision is checked against


def tolerances(target: str) -> dict[str, float]:
    """The precisions compile target ``target`` builds its own files at, each with its verification
    tolerance (relative to the output scale), in `TABLE` order."""
    return {p: t for p, s in TABLE.items() if (t := s.tolerance.get(target)) is not None}


def spec_of(name: str | None) -> PrecisionSpec:
    """The record of precision ``name`` (None: the reference, as a manifest that records none)."""
    return TABLE[REFERENCE if name is None else name]
