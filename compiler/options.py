"""What a compile is asked to do, as one frozen, validated record (`CompileOptions`, issue 22).

Constructing it checks every option before any work (the checkpoint is not read yet) and raises
CompileError with one line naming the option and what to do, so a bad request never costs a
compile. `compile_artifact(checkpoint, out, options)` takes it; the keyword form
(``compile_artifact(checkpoint, out, target="tensorrt", precisions="fp32,fp16")``) builds one
with `CompileOptions.of`.

One way to ask for a precision: ``precisions`` (``--precision``). Beside the checked reduced-
precision ONNX models (`dagc.compiler.precision`) it asks the target for its own files at every
listed precision it builds on the chosen device (`Target.precisions`, `Target.reduced_on`): fp16
TensorRT plans, fp16/bf16 AOTInductor packages on cuda. ``fp16`` / ``bf16`` (``--fp16`` /
``--bf16``) are the older spelling of that second part alone: the target's own files, without the
checked ONNX models and without reading the run's data; a target or device that does not build
them refuses the flag.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields

from dagc.compiler import precision, targets
from dagc.compiler.targets import Target
from dagc.errors import CompileError
from dagc.precision_table import REFERENCE
from dagc.precisions import Calibration

__all__ = ["CompileOptions"]


@dataclass(frozen=True)
class CompileOptions:
    """A compile's options (module docstring). ``target``: a `dagc.compiler.targets.REGISTRY`
    name; ``force``: replace an existing output; ``batches``: the TensorRT profile's batch sizes;
    ``opset``: the ONNX opset; ``device``: what ``aoti`` builds for (None: the target's default);
    ``precisions``: a comma-separated string or a sequence (fp32 always included); ``data_root``:
    the run's on-disk dataset root; ``calibration_batches`` / ``calibration_seed`` /
    ``calibration`` (minmax, entropy, percentile): int8 calibration (None: 8, 0, minmax);
    ``max_metric_drop``: the allowed relative drop of each task's primary metric (None: 0.01);
    ``fp16`` / ``bf16``: the target's own files only (module docstring).

    Derived on construction: ``precisions`` normalised (`precision.parse_precisions`),
    ``device`` resolved, ``chosen`` the target record, ``own`` the precisions of the target's
    own files, ``settings`` the int8 calibration in the target's form and ``max_drop``."""

    target: str = "onnx"
    force: bool = False
    batches: tuple[int, ...] = (1, 8, 32)
    opset: int = 17
    device: str | None = None
    precisions: tuple[str, ...] = (REFERENCE,)
    data_root: str | None = None
    calibration_batches: int | None = None
    calibration_seed: int | None = None
    calibration: str | None = None
    max_metric_drop: float | None = None
    fp16: bool = False
    bf16: bool = False
    chosen: Target = field(init=False, repr=False, compare=False)
    own: tuple[str, ...] = field(init=False)
    settings: Calibration = field(init=False)
    max_drop: float = field(init=False)

    def __post_init__(self) -> None:
        # the order of the checks is the order of the messages users know: target, precisions, batches
        flags = targets.requested(self.fp16, self.bf16)
        chosen, device = targets.choose(self.target, self.device, flags)
        asked = precision.parse_precisions(self.precisions)
        settings, drop = precision.check_options(asked, calibration_batches=self.calibration_batches,
                                                 calibration_seed=self.calibration_seed,
                                                 max_metric_drop=self.max_metric_drop, calibration=self.calibration)
        batches = tuple(self.batches) if isinstance(self.batches, Sequence) else ()
        if not batches or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in batches):
            raise CompileError(f"batch sizes must be positive integers, got {list(batches) or self.batches!r}")
        builds = device in chosen.reduced_on
        own = tuple(p for p in chosen.precisions if p in flags or (builds and p in asked))
        for name, value in (("device", device), ("precisions", asked), ("batches", batches), ("chosen", chosen),
                            ("own", own), ("settings", chosen.calibration(settings)), ("max_drop", drop)):
            object.__setattr__(self, name, value)

    @classmethod
    def of(cls, **options) -> CompileOptions:
        """The options from keywords (the fields above); CompileError for an unknown keyword."""
        known = {f.name for f in fields(cls) if f.init}
        unknown = sorted(set(options) - known)
        if unknown:
            raise CompileError(f"unknown compile option {unknown[0]!r}; the options are {sorted(known)}")
        return cls(**options)

    @classmethod
    def resolve(cls, options: CompileOptions | None, keywords: dict) -> CompileOptions:
        """``options``, or (None) the options of ``keywords``; CompileError when both are given."""
        if options is None:
            return cls.of(**keywords)
        if keywords:
            raise CompileError(f"give the compile options either as CompileOptions or as keywords, not both "
                               f"(got options and {sorted(keywords)})")
        if not isinstance(options, cls):
            raise CompileError(f"options must be a CompileOptions, got {type(options).__name__}")
        return options
