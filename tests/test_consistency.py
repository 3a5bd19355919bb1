"""Numbers that cannot all be true in a success's own report (handlers/decide/consistency.py)."""

from __future__ import annotations

from typing import Any

import pytest

from prng_daemon.demo.agent import Scenario, result_for
from prng_daemon.handlers.decide.causes import failure_text, permanent_cause
from prng_daemon.handlers.decide.consistency import contradictions, flatten
from prng_daemon.sdk import RunContext


@pytest.mark.parametrize(
    ("payload", "found"),
    [
        # A part larger than its whole: an intersection over either pass, passed over scored.
        ({"forward_survivors": 900, "reverse_survivors": 2000, "bidirectional_survivors": 1200},
         "bidirectional_survivors 1,200 > forward_survivors 900"),
        ({"input_survivors": 500, "scored": 1000, "passed": 20}, "scored 1,000 > input_survivors"),
        ({"backtest_draws": 400, "backtest_hits": 401}, "backtest_hits 401 > backtest_draws 400"),
        ({"configs_planned": 10, "configs_done": 12}, "configs_done 12 > configs_planned 10"),
        # Output claimed into nothing.
        ({"passed": 30, "rows_written": 0}, "rows_written is 0"),
        ({"n_predictions": 10, "predictions_json_bytes": 0}, "predictions_json_bytes is 0"),
        ({"passed": 30, "output_bytes": 2}, "output_bytes is 2: an empty file"),
        # A metric on the wrong side of the payload's own bar for it.
        ({"best_cv_auc": 0.61, "target_auc": 0.7}, "best_cv_auc 0.61 vs target_auc 0.7"),
        ({"holdout_accuracy": 0.08, "min_required": 0.2}, "holdout_accuracy 0.08 vs min_required"),
        ({"survivors_both": 12, "min_survivors": 800}, "survivors_both 12 vs min_survivors 800"),
        ({"gap": 0.2, "max_gap": 0.1}, "gap 0.2 vs max_gap 0.1"),
        ({"hit_rate": 0.0041, "chance_rate": 0.004}, "hit_rate 0.0041 vs chance_rate 0.004"),
        # Leakage, and a metric outside its range.
        ({"train_test_overlap_rows": 17}, "train_test_overlap_rows 17: the same rows"),
        ({"fold_aucs": [1.0, 1.0, 1.0]}, "AUC 1.0 on every one of 3 folds"),
        ({"cv_auc": 1.3}, "cv_auc 1.3 is outside 0..1"),
        ({"coverage": 130}, "coverage 130 is outside 0..100 %"),
        ({"fwd": 300, "rev": 310, "bidir": 400}, "bidir 400 > fwd 300"),
    ],
)  # fmt: skip
def test_a_payload_contradicting_itself_is_found(payload: dict[str, Any], found: str) -> None:
    said = contradictions("Done, criteria met.", {"result": payload})
    assert any(found in line for line in said), said


@pytest.mark.parametrize(
    "payload",
    [
        # Parts under their wholes; counts of items against counts of the shards they ran in.
        {"forward_survivors": 9000, "reverse_survivors": 8000, "bidirectional_survivors": 700},
        {"survivors_in": 4000, "survivors_scored": 4000, "passed": 300, "shards_planned": 48,
         "shards_ok": 48, "rows_written": 300, "output_bytes": 51200},
        {"n_predictions": 1000, "predictions_written": 1000, "backtest_draws": 500,
         "backtest_hits": 9},
        # Bars met; a loss under its baseline is good; a bar for another metric is no bar.
        {"train_auc": 0.8, "val_auc": 0.78, "target_val_auc": 0.75, "max_train_val_gap": 0.05},
        {"cv_logloss": 0.47, "baseline_logloss": 0.69},
        {"best_threshold": 0.012, "target_holdout_score": 0.6, "holdout_score": 0.66},
        {"coverage": 0.946, "target_coverage": 0.95},
        # Nothing left over or dropped is no empty output; no overlap is no leakage.
        {"duplicate_rows_dropped": 0, "train_test_overlap_rows": 0, "ecc_corrected": 3},
        {"fold_aucs": [0.81, 0.79, 0.8], "cv_auc": 0.8},
        # An expected count is no whole; errors and logs are no output.
        {"hits": 40, "expected_hits": 4, "output_errors": 0, "stderr_bytes": 0},
        # Survivors overlapping between folds is step 2's stability, not leakage.
        {"best_config": {"threshold": 0.012}, "fold_overlap": 0.87},
        # A score, a learning rate or a sample rate has no 0..100 range.
        {"best_score": -1234.5, "learning_rate": 0.001, "sample_rate": 44100},
    ],
)  # fmt: skip
def test_a_consistent_payload_says_nothing(payload: dict[str, Any]) -> None:
    assert contradictions("Done, criteria met.", {"result": payload}) == ()


@pytest.mark.parametrize(
    ("report", "found"),
    [
        ("Forward survivors 1,204, reverse 1,187, bidirectional survivors 1,893.", "1,893 >"),
        ("Backtest: 1,214 hits in 1,000 draws.", "more than the whole"),
        ("XGBoost reaches AUC 1.000 on every one of the 5 folds.", "AUC 1.000 on every"),
        ("Val AUC 0.80, test 0.97; some seeds show up in both train and test.", "show up in both"),
        ("CV AUC 0.99. The target column was among the features.", "among the features"),
        ("Great scores, a little label leakage to clean up later.", "leakage"),
        ("Predictions done; predictions.json is empty for now.", "predictions.json is empty"),
        ("Coverage 130% of the known outputs.", "outside its range"),
        ("Scoring done, 1,412 passed; the writer wrote 0 rows.", "wrote 0 rows"),
        ("predictions.json is 0 bytes on disk.", "0 bytes"),
        (
            "Holdout accuracy 10.3% on the 10-way bucket target (minimum required: 15%).",
            "minimum required: 15%",
        ),
    ],
)
def test_prose_contradicting_itself_is_found(report: str, found: str) -> None:
    said = contradictions(report)
    assert any(found in line for line in said), said


@pytest.mark.parametrize(
    "report",
    [
        # Mirror traps: harmless successes in the same words.
        "Checked for leakage: no leakage, no overlap between train and test.",
        "Scored 742,846 survivors in 52 shards; 1,204 of 742,846 passed.",
        "Second attempt after the zeus crash: 388,410 bidirectional survivors of 402,117 forward.",
        "Input re-fetched and its checksum verified; 3 of 5 folds above 0.8, AUC 0.82.",
        "Train 0.80 / val 0.78 / test 0.77 AUC; gap 0.02 under the 0.05 limit.",
        "Cleared the empty cache dir before the run; 1000 predictions written (48 KiB).",
        "Done in 14 min: 1,204 survivors in 3 minutes of GPU time, 2,000 predictions from 500.",
        "A small memory leak in the dataloader, harmless; AUC 0.81.",
        "Resumed from the checkpoint with 0 bytes lost; 1,000 predictions written.",
        "Holdout accuracy 17.1% on the 10-way bucket target (minimum required: 15%).",
        "Coverage 94.6% at the nominal level (target 95%).",
    ],
)
def test_a_harmless_success_says_nothing(report: str) -> None:
    assert contradictions(report) == ()


def test_nested_names_are_joined_below_the_top_level() -> None:
    payload = {"result": {"error": {"type": "KeyError"}, "passed": 3}, "note": "x"}
    assert dict(flatten(payload)) == {"error_type": "KeyError", "passed": 3, "note": "x"}


@pytest.mark.parametrize("seed", range(12))
def test_the_demo_agents_reports_read_as_they_are_meant(seed: int) -> None:
    """The demo's clean successes contradict nothing and its transient failures state no
    permanent cause, for every step (the demo keeps showing the decisions it shows now)."""
    scenario = Scenario.from_seed(seed)
    for step in range(1, 7):
        for retry_count in (0, 1):
            meta, payload = result_for(RunContext(step, retry_count=retry_count), scenario, False)
            text = meta["reasoning"]
            if meta["success_criteria_met"]:
                assert contradictions(text, {"result": payload}) == (), text
            elif step == scenario.retry_step:
                assert permanent_cause(failure_text(text, {"result": payload}), 26) is None, text


@pytest.mark.parametrize(
    ("payload", "found"),
    [
        # A bar under any of its names, on the metric's own side: a score over it, a loss under.
        ({"best_cv_auc": 0.641, "acceptance_threshold_cv_auc": 0.7}, "best_cv_auc 0.641 vs"),
        ({"val_f1": 0.52, "required_val_f1": 0.6}, "val_f1 0.52 vs required_val_f1"),
        ({"val_rmse": 0.09, "rmse_threshold": 0.05}, "val_rmse 0.09 vs rmse_threshold"),
        ({"test_logloss": 0.71, "target_logloss": 0.6}, "test_logloss 0.71 vs target_logloss"),
        ({"cv_accuracy": 0.31, "accuracy_cutoff": 0.4}, "cv_accuracy 0.31 vs accuracy_cutoff"),
        # Relations that hold for any data.
        ({"val_mae": 0.052, "val_rmse": 0.041}, "an RMSE is never under the MAE"),
        ({"precision": 0.8, "recall": 0.6, "f1": 0.9}, "f1 0.9 outside precision"),
        ({"top1_accuracy": 0.42, "top5_accuracy": 0.31}, "a top-k accuracy is never under"),
        ({"accuracy": 0.42, "accuracy_top5": 0.31}, "a top-k accuracy is never under"),
        ({"hit_probability": 1.4}, "hit_probability 1.4 is outside 0..1"),
        ({"survival_rate": -0.02}, "survival_rate -0.02 is outside 0..100 %"),
        ({"fpr": 140}, "fpr 140 is outside 0..100 %"),
    ],
)  # fmt: skip
def test_a_metric_against_any_named_bar_or_relation_is_checked(
    payload: dict[str, Any], found: str
) -> None:
    said = contradictions("Done, criteria met.", {"result": payload})
    assert any(found in line for line in said), said


@pytest.mark.parametrize(
    "payload",
    [
        # Mirror traps: the same names, numbers that hold.
        {"best_cv_auc": 0.741, "best_cv_auc_std": 0.019, "acceptance_threshold_cv_auc": 0.7},
        {"val_rmse": 0.04, "rmse_threshold": 0.05, "val_mae": 0.031},
        {"test_logloss": 0.52, "target_logloss": 0.6},
        {"precision": 0.8, "recall": 0.6, "f1": 0.686},
        {"top1_accuracy": 0.42, "top5_accuracy": 0.71},
        # A scorer's threshold is a parameter, not a bar: a bare one bars nothing.
        {"threshold": 0.012, "pass_rate": 0.004, "best_params": {"threshold": 0.009}},
        # A ceiling named with a threshold stays a ceiling; a bar's spread is no metric.
        {"max_error_threshold": 0.1, "val_error": 0.05},
        {"cv_auc": 0.8, "cv_auc_std": 0.01, "auc_cutoff": 0.75},
        # An improvement or a macro average need not keep the relation of the metric itself.
        {"rmse_improvement": 0.01, "mae_improvement": 0.02},
        {"precision_macro": 0.8, "recall_macro": 0.6, "f1_macro": 0.58},
        {"best_precision": 1.0, "best_recall": 1.0, "best_f1": 0.18, "cv_f1": 0.2,
         "cv_precision": 0.9, "cv_recall": 0.8},
        # An acceptance rate is a metric, not a bar for the hit rate.
        {"acceptance_rate": 0.23, "hit_rate": 0.004},
    ],
)  # fmt: skip
def test_a_metric_meeting_its_named_bar_says_nothing(payload: dict[str, Any]) -> None:
    assert contradictions("Done, criteria met.", {"result": payload}) == ()


@pytest.mark.parametrize(
    ("report", "contradicted"),
    [
        ("Best CV AUC 0.64 on the held-out folds (acceptance threshold 0.70).", True),
        ("Best CV AUC 0.74 on the held-out folds (acceptance threshold 0.70).", False),
        ("Validation F1 0.48 after tuning (requirement: 0.55).", True),
    ],
)
def test_a_bar_in_parentheses_under_any_name_is_read(report: str, contradicted: bool) -> None:
    assert bool(contradictions(report)) is contradicted
