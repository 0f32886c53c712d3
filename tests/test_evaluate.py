"""`dagc evaluate`: the paper-style table from run directories (Eq. 10-11 against a baseline)."""

import json

import pytest

from dagc.errors import ConfigError
from dagc.tools.cli import main
from dagc.tools.evaluate import compare, format_table, load_run


def _run(path, final, cfg=None, ratio=None, kinds=None):
    kinds = kinds or {"seg": "segmentation", "depth": "depth"}
    path.mkdir()
    m = {"config": cfg or {}, "spec": {"tasks": [{"name": t, "kind": k} for t, k in kinds.items()]},
         "final": final, "parameters": {"supernet": 1000, **({"relative_to_backbone": ratio} if ratio else {})}}
    (path / "metrics.json").write_text(json.dumps(m))
    return path


SINGLE = {"seg": {"miou": 0.40, "pixel_acc": 0.80}, "depth": {"abs_err": 0.50, "rel_err": 0.20, "delta_1.25": 0.5,
                                                            "delta_1.25^2": 0.8, "delta_1.25^3": 0.9}}
OURS = {"seg": {"miou": 0.44, "pixel_acc": 0.80}, "depth": {"abs_err": 0.45, "rel_err": 0.20, "delta_1.25": 0.5,
                                                          "delta_1.25^2": 0.8, "delta_1.25^3": 0.9}}


def test_delta_per_task_and_delta_t_by_hand(tmp_path):
    base = load_run(_run(tmp_path / "single", SINGLE, {"baseline": "single-task"}, ratio=2.0))
    ours = load_run(_run(tmp_path / "ours", OURS, {"flow_constant": 3}, ratio=1.1))
    c = compare(ours, base)
    # seg: (+10% mIoU, 0% pixel acc) / 2 = +5; depth: abs_err 10% lower -> +10, other four 0 -> +2
    assert c["per_task"]["seg"] == pytest.approx(5.0)
    assert c["per_task"]["depth"] == pytest.approx(2.0)
    assert c["delta_t"] == pytest.approx(3.5)
    text = format_table(ours, base)
    assert "+5.00" in text and "+2.00" in text and "Δ_T (%): +3.50" in text
    assert "relative to one backbone: 1.10 (baseline 2.00)" in text
    assert "dagc (M=3)" in text and "single-task" in text


def test_zero_baselines_are_left_out_and_mismatches_refused(tmp_path):
    base = dict(SINGLE, seg={"miou": 0.0, "pixel_acc": 0.8})
    c = compare(load_run(_run(tmp_path / "ours", OURS)), load_run(_run(tmp_path / "b", base)))
    assert c["metrics"]["seg"] == ["pixel_acc"]
    other = load_run(_run(tmp_path / "cls", {"a": {"accuracy": 0.5}}, kinds={"a": "classification"}))
    with pytest.raises(ConfigError, match="share no task"):
        compare(load_run(tmp_path / "ours"), other)
    clash = load_run(_run(tmp_path / "clash", {"seg": {"abs_err": 1.0}}, kinds={"seg": "depth"}))
    with pytest.raises(ConfigError, match="is segmentation in"):
        compare(load_run(tmp_path / "ours"), clash)


def test_cli_prints_the_table_and_refuses_bad_dirs(tmp_path, capsys):
    _run(tmp_path / "single", SINGLE, {"baseline": "single-task"})
    _run(tmp_path / "ours", OURS)
    with pytest.raises(SystemExit) as e:
        main(["evaluate", str(tmp_path / "ours"), "--against", str(tmp_path / "single")])
    assert e.value.code == 0
    assert "Δ_T (%): +3.50" in capsys.readouterr().out
    (tmp_path / "unfinished").mkdir()
    (tmp_path / "unfinished" / "state.safetensors").write_bytes(b"")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "metrics.json").write_text("{not json")
    for bad, words in [("nowhere", "no finished run"), ("unfinished", "--resume"), ("broken", "not a dagc metrics")]:
        with pytest.raises(SystemExit) as e:
            main(["evaluate", str(tmp_path / bad)])
        err = capsys.readouterr().err
        assert e.value.code == 2 and words in err and err.count("\n") == 1
