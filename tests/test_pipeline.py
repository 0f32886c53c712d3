"""The typed compile after the IR (issue 22): validated `CompileOptions`, a `Source` read once,
model entries typed from birth, and the stages after emission as a checked list."""

import dataclasses
import json

import pytest
from compiler_cases import random_reduced_net

import dagc.compiler.budget_report as budget_module
import dagc.compiler.ir as ir_module
import dagc.compiler.pipeline as pipeline
import dagc.compiler.report as report_module
from dagc.artifact import read_manifest
from dagc.checkpoint import save_checkpoint
from dagc.compiler import targets
from dagc.compiler.compile import CompileOptions, compile_artifact, compile_summary
from dagc.compiler.pipeline import STAGES, Stage, State, read_source, run_stages
from dagc.compiler.targets import REGISTRY
from dagc.errors import CompileError
from dagc.manifest import ModelInfo
from dagc.precision_table import FP16, REFERENCE
from dagc.spec import TaskSpec, preset
from dagc.trainer.network import network_tensors

TASKS = [TaskSpec("seg", "segmentation", 3), TaskSpec("depth", "depth")]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("pipe") / "c.safetensors"
    spec = preset("tiny", TASKS, input_size=(16, 16))
    save_checkpoint(path, network_tensors(random_reduced_net(spec, 3)), spec, "finetune")
    return path


# ------------------------------------------------------------------------------------------ options


def test_options_are_frozen_and_checked_on_construction_with_the_keyword_forms_messages(ckpt, tmp_path):
    o = CompileOptions(precisions="int8, fp32", batches=[1, 4])
    assert o.precisions == (REFERENCE, "int8") and o.batches == (1, 4) and o.device == "cpu"
    assert o.chosen is REGISTRY["onnx"] and o.own == () and o.settings.batches == 8 and o.max_drop == 0.01
    with pytest.raises(dataclasses.FrozenInstanceError):
        o.target = "aoti"
    for kw, words in [({"target": "tpu"}, "unknown target 'tpu'"), ({"precisions": "fp32,int4"}, "unknown precision"),
                      ({"calibration_seed": 1}, "add int8 to --precision"), ({"batches": (1, 0)}, "positive integers"),
                      ({"fp16": True}, "--precision fp32,fp16"), ({"colour": "red"}, "unknown compile option 'colour'")]:
        with pytest.raises(CompileError, match=words):
            CompileOptions.of(**kw)
        with pytest.raises(CompileError, match=words):  # the keyword form says the same
            compile_artifact(ckpt, tmp_path / "a", **kw)
    with pytest.raises(CompileError, match="not both"):
        compile_artifact(ckpt, tmp_path / "a", CompileOptions(), force=True)
    assert not (tmp_path / "a").exists()


def test_options_and_keywords_compile_the_same_artifact(ckpt, tmp_path):
    a = compile_artifact(ckpt, tmp_path / "a", CompileOptions(opset=17, batches=(1, 2)))
    b = compile_artifact(ckpt, tmp_path / "b", opset=17, batches=(1, 2))
    assert {n: f.sha256 for n, f in a.files.items() if n != "report.md"} == \
           {n: f.sha256 for n, f in b.files.items() if n != "report.md"}
    assert all(isinstance(m, ModelInfo) for m in a.models.values())


# ------------------------------------------------------------------------------------- source once


def test_a_compile_reads_the_checkpoint_and_its_masks_once(ckpt, tmp_path, monkeypatch):
    """The summary's budget report included: nothing re-reads the checkpoint or re-derives the masks."""
    calls = {"masks_of": 0, "load_checkpoint": 0}

    def counted(module, name):
        real = getattr(module, name)

        def spy(*a, **k):
            calls[name] += 1
            return real(*a, **k)
        monkeypatch.setattr(module, name, spy)

    for module in (ir_module, pipeline, report_module):
        counted(module, "masks_of")
    for module in (pipeline, budget_module):
        counted(module, "load_checkpoint")
    manifest, text = compile_summary(ckpt, tmp_path / "a")
    assert calls == {"masks_of": 1, "load_checkpoint": 1}
    assert "shared model:" in text and set(manifest.tasks) == {"seg", "depth"}


# ----------------------------------------------------------------------------------------- stages


def _state(ckpt) -> State:
    return State.start(read_source(ckpt), CompileOptions())


def test_the_stages_run_in_order_and_leave_a_consistent_build(ckpt):
    state = run_stages(_state(ckpt))
    assert state.done == ["onnx models", "precisions", "target files", "pictures", "manifest"]
    assert [s.name for s in STAGES] == state.done
    assert pipeline.problem(state) is None and dict(state.manifest.models) == state.build.models
    assert set(state.build.files) == {"model.onnx", "task_seg.onnx", "task_depth.onnx", "graph_seg.svg",
                                      "graph_depth.svg"}


def _drop_file(state: State) -> None:
    del state.build.files["task_depth.onnx"]


def _half_entry(state: State) -> None:
    state.build.files["model.fp16.onnx"] = state.build.files["model.onnx"]
    state.build.models["model.fp16.onnx"] = dataclasses.replace(state.build.models["model.onnx"],
                                                                name="model.fp16.onnx", built_from="gone.onnx")


def _case_twin(state: State) -> None:
    state.build.files["MODEL.onnx"] = state.build.files["model.onnx"]
    state.build.models["MODEL.onnx"] = dataclasses.replace(state.build.models["model.onnx"], name="MODEL.onnx")


def _task_model_lost(state: State) -> None:
    for n in ("task_seg.onnx",):
        del state.build.files[n], state.build.models[n]


@pytest.mark.parametrize("broken, words", [
    (_drop_file, "model 'task_depth.onnx' has no file"),
    (_half_entry, "built from 'gone.onnx', which is no model"),
    (_case_twin, "differ only in case"),
    (_task_model_lost, "no model for ['task_seg.onnx']"),
    (lambda s: s.build.files.update({"notes.txt": b""}), "neither a model nor a task's picture"),
])
def test_a_broken_stage_is_caught_by_the_check_naming_the_stage(ckpt, broken, words):
    state = _state(ckpt)
    with pytest.raises(CompileError, match=r"compile stage 'broken' left an inconsistent build: .*" +
                       words.replace("[", r"\[").replace("]", r"\]").replace(".", r"\.")):
        run_stages(state, (STAGES[0], Stage("broken", broken), *STAGES[1:]))
    assert state.done == ["onnx models", "broken"]  # stopped there: nothing after it ran


def test_a_stage_short_of_its_own_postcondition_is_named(ckpt):
    pictures = next(s for s in STAGES if s.name == "pictures")
    lazy = dataclasses.replace(pictures, run=lambda s: None)
    with pytest.raises(CompileError, match=r"stage 'pictures' .*no picture \['graph_seg.svg', 'graph_depth.svg'\]"):
        run_stages(_state(ckpt), (*STAGES[:3], lazy, *STAGES[4:]))


# ------------------------------------------------------------------------------- one precision flag


@pytest.fixture
def half_target():
    """The onnx target's record, for one test, with fp16 files of its own on the CPU (as TensorRT
    plans or aoti cuda packages are, where a GPU is); what its ``add`` was asked for."""
    asked = []
    onnx = REGISTRY["onnx"]
    REGISTRY["onnx"] = dataclasses.replace(onnx, add=lambda b: asked.append(tuple(b.precisions)), precisions=(FP16,),
                                           reduced_on=("cpu",))
    try:
        yield asked
    finally:
        REGISTRY["onnx"] = onnx


def test_precision_fp16_asks_the_target_for_its_own_fp16_files(short_checkpoint, tmp_path, half_target):
    """``--precision fp32,fp16`` on a target that builds fp16 files gives both the checked fp16
    ONNX models and the target's own; ``--fp16`` gives the target's alone."""
    assert CompileOptions(precisions="fp32,fp16").own == (FP16,)
    assert CompileOptions(fp16=True).own == (FP16,)
    assert CompileOptions().own == ()
    compile_artifact(short_checkpoint, tmp_path / "p", precisions="fp32,fp16")
    compile_artifact(short_checkpoint, tmp_path / "f", fp16=True)
    assert half_target == [(FP16,), (FP16,)]
    checked = json.loads(json.dumps(read_manifest(tmp_path / "p")))
    assert "model.fp16.onnx" in checked["models"] and checked["accuracy"]["precisions"][FP16]
    assert "model.fp16.onnx" not in read_manifest(tmp_path / "f")["models"]
    assert targets.requested(True, False) == (FP16,)


def test_a_stage_that_loses_a_checked_file_is_named(short_checkpoint):
    """The accuracy record names the fp16 files it checked: a later stage that drops one is caught."""
    def lose(state: State) -> None:
        for n in [n for n in state.build.models if state.build.models[n].precision == FP16]:
            del state.build.files[n], state.build.models[n]

    state = State.start(read_source(short_checkpoint), CompileOptions(precisions="fp32,fp16"))
    with pytest.raises(CompileError, match=r"stage 'loses fp16' .*the fp16 accuracy check records \['model.fp16.onnx'"):
        run_stages(state, (*STAGES[:2], Stage("loses fp16", lose), *STAGES[2:]))
