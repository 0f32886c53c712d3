"""Bounded memory for any batch size: how many samples `dagc.runtime.Engine.run` feeds a model at
once.

A model's working memory grows linearly with the batch it is given (every state of every sample is
alive at once, plus the back end's scratch buffers), so a batch of tens of thousands of images
would exhaust memory inside ONNX Runtime. `Engine.run` therefore runs a large batch in chunks of at
most ``Engine.max_batch`` samples and writes each chunk's outputs into arrays allocated once for the
whole batch: the outputs are the same as one run over the whole batch (every op is per sample), and
the memory beyond the caller's inputs and the outputs is one chunk's.

The default chunk (`default_max_batch`) gives a chunk about `CHUNK_BYTES` of float32 activations:
the per-sample estimate (`sample_bytes`) is the size of one sample's input, every hidden state, the
read-out, the dense heads' ASPP branches at the read-out's resolution and the outputs, a lower
bound of what a model holds per sample; back ends use a small multiple of it. ``load(...,
max_batch=N)`` sets another chunk size.
"""

from __future__ import annotations

from dagc.manifest import Manifest

__all__ = ["CHUNK_BYTES", "sample_bytes", "default_max_batch"]

CHUNK_BYTES = 64 * 2**20


def sample_bytes(manifest: Manifest) -> int:
    """The float32 bytes of one sample's input(s), hidden states, read-out, dense-head branches and
    outputs (module docstring): the per-sample activation estimate of the artifact's models."""
    spec = manifest.spec
    h, w = spec.input_size
    values = len(manifest.input.names) * spec.in_channels * h * w
    values += sum(s.channels * (h // s.stride) * (w // s.stride) for s in spec.states)
    lh, lw = h // spec.readout.stride, w // spec.readout.stride
    values += spec.readout.channels * lh * lw
    for task in manifest.tasks.values():
        if len(task.output_shape) == 3:  # a dense task: its ASPP branches, and its refinement's layers
            values += spec.head_channels * len(spec.aspp_rates) * lh * lw
            values += (spec.refine_channels + spec.in_channels + task.output_shape[0]) * h * w if spec.refine_channels else 0
        size = 1
        for d in task.output_shape:
            size *= d
        values += size
    return 4 * values


def default_max_batch(manifest: Manifest) -> int:
    """The default chunk size: `CHUNK_BYTES` // `sample_bytes`, at least 1."""
    return max(1, CHUNK_BYTES // sample_bytes(manifest))
