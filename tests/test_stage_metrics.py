"""Per-stage metrics on a validation slice of the training split, and early stopping of
fine-tuning (issue 27, item 2): the slice is never trained on, the test split is left to the final
report, the stages are recorded, shown and resumed, and patience ends fine-tuning."""

import json

import numpy as np
import pytest

from dagc.checkpoint import load_checkpoint, save_checkpoint
from dagc.errors import ConfigError, DataError
from dagc.tools.cli import main
from dagc.trainer.batches import batch_at, build_spec, load_data, split_validation
from dagc.trainer.config import TrainConfig
from dagc.trainer.state import VALIDATION_STAGES
from dagc.trainer.train import train

FAST = dict(warmup_iters=4, search_iters=6, finetune_iters=4, batch_size=4, n_train=24, n_test=8,
            save_every=2, log_every=2)
TASKS = {"segmentation", "depth", "normal", "edge"}


def _cfg(**kw):
    return TrainConfig(**{**FAST, **kw})


class Stop(Exception):
    pass


def _flat(validation: dict) -> dict[tuple[str, str, str], float]:
    return {(s, t, m): v for s, tasks in validation.items() for t, ms in tasks.items() for m, v in ms.items()}


def _rows(a: np.ndarray) -> set[bytes]:
    return {r.tobytes() for r in a}


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("full") / "run"
    return out, train(_cfg(), out, progress=False)


def test_validation_slice_is_disjoint_from_training_batches_and_leaves_the_test_split(tmp_path):
    cfg = _cfg()
    data = load_data(cfg)
    rest, val = split_validation(data, cfg.val_fraction, cfg.seed)
    assert rest.test is data.test
    assert val.size("depth") == 2 and rest.train.size("depth") == 22
    held = _rows(val.inputs)
    assert held <= _rows(data.train.inputs) and not held & _rows(rest.train.inputs)
    spec = build_spec(cfg, rest)
    for stage, step in [("warmup", 0), ("search", 3), ("finetune", 1)]:
        x, _ = batch_at(rest.train, spec, cfg.batch_size, cfg.seed, stage, step, "cpu")
        assert not _rows(x.numpy()) & held
    again, val2 = split_validation(data, cfg.val_fraction, cfg.seed)  # deterministic by seed
    np.testing.assert_array_equal(val.inputs, val2.inputs)
    _, other = split_validation(data, cfg.val_fraction, cfg.seed + 1)
    assert _rows(other.inputs) != held


def test_per_task_inputs_are_split_per_task():
    data = load_data(TrainConfig(dataset="digits", preset="omniglot", n_train=40, n_test=8))
    rest, val = split_validation(data, 0.25, 0)
    for t in data.train.targets:
        assert val.size(t) + rest.train.size(t) == data.train.size(t) and val.size(t) >= 1
        assert not _rows(val.inputs[t]) & _rows(rest.train.inputs[t])
    assert split_validation(data, 0.0, 0) == (data, None)
    with pytest.raises(DataError, match="fewer than 2"):
        split_validation(load_data(_cfg(n_train=2)), 0.4, 0)


def test_metrics_json_log_and_checkpoint_hold_every_stage_for_every_task(full_run):
    out, metrics = full_run
    on_disk = json.loads((out / "metrics.json").read_text())
    assert set(on_disk["validation"]) == set(VALIDATION_STAGES)  # metrics.json sorts its keys
    assert list(metrics["validation"]) == list(VALIDATION_STAGES)
    for stage in VALIDATION_STAGES:
        assert set(on_disk["validation"][stage]) == TASKS
        assert "miou" in on_disk["validation"][stage]["segmentation"]
    assert on_disk["validation_samples"] == {t: 2 for t in TASKS}
    assert on_disk["test_samples"] == {t: 8 for t in TASKS}
    assert on_disk["stopped_early_at"] is None
    assert load_checkpoint(out / "checkpoint.safetensors").json("metrics")["validation"] == on_disk["validation"]
    log = (out / "train.log").read_text()
    assert all(f"validation after {s}:" in log for s in VALIDATION_STAGES)


def test_inspect_shows_a_line_per_stage(full_run, capsys):
    out, _ = full_run
    with pytest.raises(SystemExit) as e:
        main(["inspect", str(out / "checkpoint.safetensors")])
    text = capsys.readouterr().out
    assert e.value.code == 0
    assert "validation (a slice of the training split) after each stage:" in text
    assert "segmentation miou" in text and "normal mean_angle" in text
    for stage in VALIDATION_STAGES:
        assert any(line.split()[:1] == [stage] and len(line.split()) == 5 for line in text.splitlines()), stage


def test_resumed_run_has_the_same_validation_metrics(full_run, tmp_path):
    _, metrics = full_run

    def stop_in_search(run):
        if run.stage == "search" and run.step == 5:
            raise Stop

    part = tmp_path / "part"
    with pytest.raises(Stop):
        train(_cfg(), part, progress=False, on_step=stop_in_search)
    assert "warmup" in load_checkpoint(part / "state.safetensors").json("validation")["stages"]
    resumed = train(None, part, resume=True, progress=False)
    assert _flat(resumed["validation"]) == pytest.approx(_flat(metrics["validation"]))


def test_patience_stops_fine_tuning_when_nothing_improves_and_resumes_alike(tmp_path):
    cfg = _cfg(finetune_iters=30, weight_lr=1e-9, patience=2, val_every=1, save_every=1)
    done = train(cfg, tmp_path / "full", progress=False)
    stop = done["stopped_early_at"]
    assert stop is not None and stop < 30
    assert done["losses"]["finetune"][-1]["step"] == stop
    assert f"fine-tuning stopped early at step {stop}" in (tmp_path / "full" / "train.log").read_text()
    assert set(done["validation"]) == set(VALIDATION_STAGES)

    def stop_in_finetune(run):
        if run.stage == "finetune" and run.step == 2:
            raise Stop

    with pytest.raises(Stop):
        train(cfg, tmp_path / "part", progress=False, on_step=stop_in_finetune)
    resumed = train(None, tmp_path / "part", resume=True, progress=False)
    assert resumed["stopped_early_at"] == stop
    assert _flat(resumed["validation"]) == pytest.approx(_flat(done["validation"]))


def test_no_validation_slice_trains_on_the_whole_training_split(tmp_path):
    metrics = train(_cfg(val_fraction=0, patience=3), tmp_path / "run", progress=False)
    assert metrics["validation"] == {} and metrics["validation_samples"] == {}
    assert metrics["stopped_early_at"] is None
    assert "validation after" not in (tmp_path / "run" / "train.log").read_text()
    assert [e["step"] for e in metrics["losses"]["finetune"]] == [2, 4]


def test_a_stored_configuration_without_the_field_keeps_all_its_training_data():
    stored = {k: v for k, v in _cfg().to_dict().items() if k != "val_fraction"}
    assert TrainConfig.from_stored(stored).val_fraction == 0.0
    assert TrainConfig.from_dict(stored).val_fraction == 0.1
    assert TrainConfig.from_stored(_cfg(val_fraction=0.2).to_dict()).val_fraction == 0.2


def test_a_state_written_before_validation_resumes_on_its_whole_training_split(tmp_path):
    def stop_in_search(run):
        if run.stage == "search" and run.step == 3:
            raise Stop

    run = tmp_path / "old"
    with pytest.raises(Stop):
        train(_cfg(val_fraction=0), run, progress=False, on_step=stop_in_search)
    ck = load_checkpoint(run / "state.safetensors")
    meta = {k: ck.json(k) for k in ck.meta if k not in ("format", "format_version", "spec", "stage", "validation")}
    meta["config"] = {k: v for k, v in meta["config"].items() if k not in ("val_fraction", "patience", "val_every")}
    save_checkpoint(run / "state.safetensors", ck.tensors, ck.spec, ck.stage, **meta)  # as an older dagc wrote it
    resumed = train(None, run, resume=True, progress=False)
    assert resumed["config"]["val_fraction"] == 0.0 and resumed["validation"] == {}


def test_a_baseline_has_the_fine_tuning_stage_only(tmp_path):
    metrics = train(_cfg(baseline="shared-bottom"), tmp_path / "b", progress=False)
    assert list(metrics["validation"]) == ["finetune"]
    assert set(metrics["validation"]["finetune"]) == TASKS


@pytest.mark.parametrize("kw, match", [
    (dict(val_fraction=0.5), "val_fraction"),
    (dict(val_fraction=-0.1), "val_fraction"),
    (dict(val_fraction="0.1"), "val_fraction"),
    (dict(patience=-1), "patience"),
    (dict(patience=1.5), "patience"),
    (dict(val_every=0), "val_every"),
    (dict(val_every=True), "val_every"),
])
def test_bad_validation_settings_are_refused_with_the_field_named(kw, match):
    with pytest.raises(ConfigError, match=match):
        _cfg(**kw)
