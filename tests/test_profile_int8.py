"""benchmarks/profile_int8.py: ONNX Runtime's profiler trace read back per op type, on a real compiled
model, and the one line for an artifact without int8."""

import importlib.util
import sys
from pathlib import Path

import pytest
from compiler_cases import compiled_artifact

from dagc.spec import TaskSpec, preset

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "profile_int8.py"
_spec = importlib.util.spec_from_file_location("profile_int8", _PATH)
pi = importlib.util.module_from_spec(_spec)
sys.modules["profile_int8"] = pi
_spec.loader.exec_module(pi)


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    spec = preset("tiny", [TaskSpec("seg", "segmentation", 3), TaskSpec("depth", "depth")], input_size=(16, 16))
    return compiled_artifact(tmp_path_factory.mktemp("prof"), spec, 3)


@pytest.mark.parametrize("mode", sorted(pi.MODES))
def test_a_profile_counts_every_kernel_of_the_model_per_call(art, mode):
    import numpy as np
    import onnx

    path = art / "model.onnx"
    feed = {"image": np.zeros((2, 3, 16, 16), np.float32)}
    got = pi.profile_once(path, 2, mode, feed, calls=3)
    convs = sum(n.op_type == "Conv" for n in onnx.load(path).graph.node)
    # ONNX Runtime may fuse or re-lay out convs, but every one still runs as a kernel named after it
    assert sum(v["nodes"] for op, v in got["ops"].items() if "Conv" in op) >= convs > 0
    assert all(v["ms"] > 0 for v in got["ops"].values())
    assert got["wall_ms"] > 0
    assert "| wall per call |" in pi.table({f"fp32/2t/{mode}": got})


def test_an_artifact_without_int8_is_one_line_naming_the_compile(art):
    with pytest.raises(SystemExit, match=r"no int8 shared model: compile it with --precision fp32,int8"):
        pi.shared_files(art)
