"""Decisiveness of the search (issue 12): margins, decided edges, near-ties of Algorithm 1's first
removals, the warning, and their place in metrics.json and the `dagc train` output."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dagc.tools.cli import main
from dagc.trainer.decisiveness import MARGIN_THRESHOLD, task_decisiveness, warning_line
from dagc.trainer.reduction import first_removals, flow_based_reduction, flow_scores, state_range
from dagc.trainer.topology import flow_band, flow_matrix
from dagc.trainer.train import TrainConfig, train

BAND = flow_band(4, 2)  # 0->1, 0->2, 1->2, 1->3, 2->3


def _gamma(values):
    g = np.zeros((4, 4))
    g[BAND != 0] = values  # row-major order of the band: (0,1) (0,2) (1,2) (1,3) (2,3)
    return g


def test_margins_and_decided_edges_of_hand_made_logits():
    alpha = np.array([0.2, 0.9, 0.5, 0.7])   # argmax 1, runner-up 0.7: margin 0.2
    beta = np.array([0.1, 0.3, 0.35, 0.95])  # argmax 3, runner-up 0.35: margin 0.6
    gamma = _gamma([0.95, 0.05, 0.6, 0.92, 0.3])  # 3 of 5 edges beyond 0.5 ± 0.4
    d = task_decisiveness(gamma, alpha, beta, BAND)
    assert d["alpha_margin"] == pytest.approx(0.2)
    assert d["beta_margin"] == pytest.approx(0.6)
    assert d["decided_edges"] == pytest.approx(0.6)
    assert d["decided"] is (not d["near_tie"])
    json.dumps(d)  # JSON-ready for metrics.json


def test_small_margin_is_undecided_and_warned_about():
    alpha = np.array([0.58, 0.63, 0.68, 0.70])  # the near-tie: 0.02
    beta = np.array([0.1, 0.2, 0.3, 0.9])
    d = task_decisiveness(_gamma([0.5] * 5), alpha, beta, BAND)
    assert d["alpha_margin"] == pytest.approx(0.02)
    assert d["alpha_margin"] < MARGIN_THRESHOLD and not d["decided"]
    assert d["decided_edges"] == 0.0
    line = warning_line({"normal": d, "seg": {**d, "decided": True}})
    assert line is not None and "\n" not in line
    assert "normal" in line and "seg" not in line and "--search-iters" in line and "--arch-lr" in line
    assert "saturated" not in line
    assert warning_line({"seg": {**d, "decided": True}}) is None
    # read-outs all on: a saturated tie, which the warning names as such
    d = task_decisiveness(_gamma([0.5] * 5), np.array([0.1, 0.9, 0.2, 0.2]), np.array([0.2, 0.99, 0.995, 0.999]), BAND)
    assert d["beta_margin"] < MARGIN_THRESHOLD and d["beta_runner_up"] == pytest.approx(0.995)
    line = warning_line({"seg": d})
    assert "saturated" in line and "\n" not in line
    assert warning_line(None) is None  # a baseline: no search, no warning


def test_first_removals_follow_algorithm_1_and_flag_ties():
    # Margins 0.3 and 0.6, but Algorithm 1's first removal (input -> s_1, score 0.2) ties with
    # another edge of score 0.2: decided by the row-major tie rule, not by the data.
    alpha = np.array([0.5, 0.8, 0.2, 0.2])
    beta = np.array([0.2, 0.2, 0.8, 0.2])
    gamma = _gamma([0.2, 0.2, 0.2, 0.8, 0.2])
    removals = first_removals(gamma, alpha, beta, 3)
    n_alpha, n_beta = state_range(alpha, beta)  # Algorithm 1 starts on states [N_α, N_β] = [1, 2]
    keep = np.isin(np.arange(4), np.arange(n_alpha, n_beta + 1))
    psi = flow_matrix(np.where(np.outer(keep, keep), gamma, 0), np.where(keep, alpha, 0), np.where(keep, beta, 0))
    scores = flow_scores(psi)
    first = np.unravel_index(np.argmin(np.where(scores > 0, scores, np.inf)), scores.shape)
    assert removals[0]["edge"] == [int(first[0]), int(first[1])]
    assert removals[0]["score"] == pytest.approx(scores[first])
    # every recorded removal is absent from Algorithm 1's result (same loop, same result)
    g_hat, a_hat, b_hat = flow_based_reduction(gamma, alpha, beta)
    psi_hat = flow_matrix(g_hat, a_hat, b_hat)
    assert all(psi_hat[i, j] == 0 for i, j in (r["edge"] for r in removals))
    d = task_decisiveness(gamma, alpha, beta, BAND)
    assert d["alpha_margin"] >= MARGIN_THRESHOLD and d["beta_margin"] >= MARGIN_THRESHOLD
    assert d["first_removals"][0]["relative_gap"] == pytest.approx(0.0)
    assert d["near_tie"] and not d["decided"]


FAST = ["--warmup-iters", "2", "--search-iters", "2", "--finetune-iters", "2", "--batch-size", "4", "--quiet"]


def test_cli_warns_in_one_line_when_the_search_did_not_decide(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--out", str(tmp_path / "run"), "--tasks", "segmentation,depth", *FAST])
    out, err = capsys.readouterr()
    assert e.value.code == 0
    lines = err.strip().splitlines()
    assert all(line.startswith("dagc: warning:") for line in lines), err
    assert len([line for line in lines if "--arch-lr" in line]) == 1, err
    # 2 iterations learn nothing either: the held-out scores are near the constant predictors'
    assert len(lines) == 2 and "constant predictor" in lines[1], err
    assert "A-margin" in out
    report = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert set(report["decisiveness"]) == {"segmentation", "depth"}
    assert report["decisiveness"]["depth"]["alpha_margin"] < MARGIN_THRESHOLD  # 2 iterations decide nothing
    assert report["baseline_protocol"] is None


@pytest.mark.parametrize("protocol, iters", [("finetune", 3), ("total", 2 + 2 + 3)])
def test_baseline_trains_for_its_protocol_and_records_it(tmp_path, protocol, iters):
    cfg = TrainConfig(warmup_iters=2, search_iters=2, finetune_iters=3, batch_size=4, n_train=8, n_test=4,
                      log_every=1, baseline="shared-bottom", baseline_protocol=protocol)
    m = train(cfg, tmp_path / "run", progress=False)
    assert m["baseline_protocol"] == protocol and m["decisiveness"] is None
    assert m["losses"]["finetune"][-1]["step"] == iters
    assert not m["losses"].get("warmup") and not m["losses"].get("search")


def test_unknown_baseline_protocol_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--out", str(tmp_path / "run"), "--baseline", "shared-bottom", "--baseline-protocol", "half"])
    _, err = capsys.readouterr()
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1 and "baseline_protocol" in err


def test_a_task_deployed_near_its_constant_predictor_is_warned_about():
    from dagc.trainer.report import NEAR_CONSTANT, near_constant_line

    # digits, seed 1, budget 1.3 ms: parity's chain read in at the 1x1 state (RESULTS)
    primary = {"low": {"metric": "accuracy", "higher_is_better": True, "model": 1.0, "constant": 0.2},
               "parity": {"metric": "accuracy", "higher_is_better": True, "model": 0.549, "constant": 0.504}}
    line = near_constant_line(primary)
    assert line is not None and "\n" not in line and line.startswith("warning:")
    assert "parity accuracy 0.549 (constant predictor 0.504)" in line and "low" not in line
    assert "--budget" in line
    # lower is better: an error no smaller than the constant's is warned about, a real gain is not
    depth = {"metric": "abs_err", "higher_is_better": False, "constant": 2.8}
    assert "depth" in near_constant_line({"depth": {**depth, "model": 2.8 * (1 - NEAR_CONSTANT / 2)}})
    assert "depth" in near_constant_line({"depth": {**depth, "model": 3.5}})  # worse than constant
    assert near_constant_line({"depth": {**depth, "model": 0.6}}) is None
    # synthetic edge F at shared-bottom's 25% of the gap is not flagged; an unbounded metric is not judged
    assert near_constant_line({"edge": {"metric": "ods_f", "higher_is_better": True, "model": 0.387,
                                        "constant": 0.184}}) is None
    assert near_constant_line({"r": {"metric": "psnr", "higher_is_better": True, "model": 20.0, "constant": 19.9}}) is None
    assert near_constant_line(None) is None and near_constant_line({}) is None
