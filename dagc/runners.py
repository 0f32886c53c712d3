"""Execution back ends shared by the compiler (which verifies with them) and the runtime (which
serves with them): ONNX Runtime session options and the TensorRT availability check.

They sit in the core because both the compiler and the runtime need them and neither may import
the other.
"""

from __future__ import annotations

__all__ = ["session_options", "tensorrt_unavailable"]


def session_options(threads: int | None = None):
    """ONNX Runtime session options used everywhere in dagc: quiet, ``threads`` intra-op threads if
    given, and no busy-waiting worker threads (on small machines spinning workers steal the cores
    from everything else, the PyTorch reference included)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads is not None:
        opts.intra_op_num_threads = threads
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return opts


def tensorrt_unavailable(what: str = "--target tensorrt", instead: str = "compile with --target onnx") -> str | None:
    """None when TensorRT can build and run here; otherwise why not, as one sentence naming
    ``what`` needs it and what to do ``instead``."""
    import torch

    if not torch.cuda.is_available():
        return f"{what} needs a CUDA GPU and none is available here; {instead}"
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return f"{what} needs the tensorrt package; install dagc[gpu] or {instead}"
    return None
