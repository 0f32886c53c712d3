"""The ``model.py`` of every model in a ``dagc export triton --backend python`` repository.

`dagc.tools.triton` copies this file, byte for byte, next to each ONNX model (``<model>/1/``).
Triton's Python backend runs it in a stub process; it is not imported by dagc itself. It runs the
model with `dagc.runners.OrtRunner`, the one way dagc runs an ONNX model, so the Python that the
stub embeds must have dagc and ONNX Runtime installed (`dagc serve` starts the server so that it
embeds the Python dagc runs in).

Each call of ``execute`` gets the requests the dynamic batcher gathered; their inputs are joined
into one batch, run once (only the outputs some request asked for) and split again. The server
has already checked every request against ``config.pbtxt`` (input names, shapes, data types,
requested output names), so a malformed request never reaches this code.

Tensors cross the stub's boundary by DLPack, not by ``as_numpy()`` / ``Tensor(name, array)``:
those read numpy's C structures with the layout of numpy 1, and with numpy 2 return zeros or
empty tensors without an error (the stub of Triton 2.51 was built before numpy 2).
"""

from __future__ import annotations

import ctypes
import hashlib
import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from dagc.runners import OrtRunner

# DLPack's rule: a consumer renames the capsule it took to "used_dltensor", so that its creator's
# destructor leaves the tensor alone. The stub renames it "used_dlpack" instead, and numpy's
# destructor then reports an error for every response (the stub still frees the tensor itself);
# finishing the rename keeps the log clean. The name must outlive the capsule: a module constant.
_USED = b"used_dltensor"
_set_capsule_name = ctypes.pythonapi.PyCapsule_SetName
_set_capsule_name.argtypes = [ctypes.py_object, ctypes.c_char_p]
_set_capsule_name.restype = ctypes.c_int


def _tensor(name: str, array: np.ndarray):
    """A `pb_utils.Tensor` holding ``array`` (C-contiguous float32 after conversion)."""
    capsule = np.ascontiguousarray(array, dtype=np.float32).__dlpack__()
    tensor = pb_utils.Tensor.from_dlpack(name, capsule)
    _set_capsule_name(capsule, _USED)
    return tensor


class TritonPythonModel:
    """One ONNX model of a dagc artifact, on ONNX Runtime."""

    def initialize(self, args: dict) -> None:
        """Load ``1/model.onnx`` after checking it against the sha256 that ``config.pbtxt``
        records (parameter ``sha256``). Raises RuntimeError for a changed file: Triton then marks
        the model unavailable and, by default, refuses to start."""
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        path = Path(args["model_repository"]) / args["model_version"] / "model.onnx"
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != params["sha256"]:
            raise RuntimeError(f"{path} does not match the sha256 in its config.pbtxt; export the repository again")
        threads = int(params.get("intra_op_threads", "0")) or None
        device = "cpu" if args["model_instance_kind"] == "CPU" else "auto"
        self.runner = OrtRunner(data, threads=threads, device=device)
        self.inputs = [i["name"] for i in config["input"]]
        self.outputs = [o["name"] for o in config["output"]]

    def execute(self, requests: list) -> list:
        """One response per request, in order: the outputs it asked for (all when it named none)."""
        feeds = [{n: np.from_dlpack(pb_utils.get_input_tensor_by_name(r, n)) for n in self.inputs} for r in requests]
        asked = [list(r.requested_output_names()) or self.outputs for r in requests]
        wanted = [t for t in self.outputs if any(t in a for a in asked)]
        sizes = [f[self.inputs[0]].shape[0] for f in feeds]
        batch = {n: feeds[0][n] if len(feeds) == 1 else np.concatenate([f[n] for f in feeds]) for n in self.inputs}
        try:
            result = self.runner.run(batch, wanted)
        except Exception as e:  # noqa: BLE001 - ONNX Runtime's own errors: each request gets the reason
            return [pb_utils.InferenceResponse(error=pb_utils.TritonError(f"{type(e).__name__}: {e}"))
                    for _ in requests]
        responses, start = [], 0
        for size, names in zip(sizes, asked):
            responses.append(pb_utils.InferenceResponse(
                [_tensor(t, result[t][start:start + size]) for t in self.outputs if t in names]))
            start += size
        return responses
