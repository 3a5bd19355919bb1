"""The arithmetic the rules do on a report's stated comparisons (handlers/decide/claims.py)."""

from __future__ import annotations

import pytest

from prng_daemon.handlers.decide.claims import stated_claims


@pytest.mark.parametrize(
    ("report", "expected"),
    [
        # A value against a bar whose kind says which side is good.
        (
            "Train AUC 0.812, holdout 0.765: gap 0.047 under the 0.08 overfit bar.",
            {"gap": True, "chance": True},
        ),
        ("Holdout F1 0.71 vs train 0.93, a gap of 0.22 over the 0.10 bar.", {"gap": False}),
        ("validation AUC 0.765, above the 0.70 bar.", {"target": True, "chance": True}),
        ("CV R^2 0.62 against the 0.55 target.", {"target": True}),
        ("812 survivors against a minimum of 1,000.", {"target": False}),
        ("38 bidirectional survivors (minimum required: 5,000)", {"target": False}),
        # The number before a bar's name is the bar; a word with no bar named says nothing.
        ("412 pass the 0.0085 threshold, inside the 380-450 range projected.", {}),
        ("the loss was 0.4, above 0.3 yesterday", {}),
        ("CV AUC 0.78 (target 0.75).", {"target": True, "chance": True}),
        ("training loss 0.31 (limit 0.25)", {"target": False}),
        # Within 2 % of its bar is no verdict: a 95 % interval covering 94.6 % is fine.
        ("coverage 94.6% (target 95%)", {}),
        # A chance baseline: far above it, at it, or in between (no verdict).
        ("Match rate 3.9% vs 0.4% random baseline.", {"chance": True}),
        ("Match rate 0.38%, at the random baseline of 0.39%.", {"chance": False}),
        ("hit rate 0.15% (chance 0.1%)", {}),
        ("hit rate 12.3% against 0.1% by chance", {"chance": True}),
        ("4.3% exact matches vs 0.39% random.", {"chance": True}),
        # The report's own inequality, checked.
        ("(gap 0.047 < 0.08)", {"gap": True}),
        ("(gap 0.12 < 0.08)", {"gap": False}),
        # With no bar stated: a train/holdout gap, an AUC.
        ("Train AUC 0.98, holdout AUC 0.61 (gap 0.37).", {"gap": False, "chance": True}),
        ("Holdout R^2 0.58, train 0.61.", {"gap": True}),
        ("Training stopped at epoch 23; holdout AUC 0.60, train AUC 0.70.", {"chance": True}),
        ("CV AUC 0.51 on every fold.", {"chance": False}),
        # Nothing found, or parts missing.
        ("Success: 0 bidirectional survivors.", {"zero": False}),
        ("no survivors were lost in the rerun", {}),
        ("its sha256 no longer matches the one logged", {}),
        ("52 shards planned, 31 returned, 21 missing.", {"missing": False}),
        ("0 failed shards; rig-6600 unreachable for an hour, then back.", {}),
        # A count against a percentage compares nothing; a fraction against one does.
        ("0 exact matches in 200 known outputs (baseline 0.39%)", {"zero": False}),
        ("hit rate 0.041 (baseline 0.4%)", {"chance": True}),
        # A train/holdout gap only between the same metric; a loss overfits upwards.
        ("Train loss 0.412 and holdout Brier score 0.186.", {}),
        ("Train loss 0.21; holdout loss 0.52.", {"gap": False}),
        ("Train accuracy 0.91, validation accuracy 0.89.", {"gap": True}),
        # The report's own comparison with a named bar settles it; a range is not one.
        (
            "Train loss 0.412, holdout Brier score 0.186 (gap 4.6%, limit 10%).",
            {"gap": True},
        ),
        ("Calibration done (gap 14%, limit 10%).", {"gap": False}),
        ("Per-shard pass counts look uniform (min 2, max 9).", {}),
        # A target's side is what it measures: a loss or a gap under it, a score over it.
        ("Validation loss 0.42 under the 0.50 target.", {"target": True}),
        ("Validation loss 0.61 against the 0.50 target.", {"target": False}),
        ("Train/holdout gap 0.04, under the 0.05 target.", {"gap": True}),
        ("Holdout F1 0.48 against the 0.55 required.", {"target": False}),
        ("CV AUC 0.64, below the 0.70 cutoff.", {"target": False, "chance": True}),
        ("Validation loss 0.30, under the 0.35 goal.", {"target": True}),
        # Numbers with no stated bar say nothing.
        ("Best trial #73: threshold=0.012, k_folds=5, score 0.847.", {}),
    ],
)
def test_stated_comparisons_are_checked(report: str, expected: dict[str, bool]) -> None:
    claims = stated_claims(report)
    found: dict[str, bool] = {}
    for claim in claims:
        found[claim.finding] = found.get(claim.finding, True) and claim.holds
    assert found == expected, [c.describe() for c in claims]


def test_a_claim_quotes_the_report_printably() -> None:
    (claim,) = stated_claims("gap 0.3\x1fover the\u2028 0.1 bar")
    assert claim.text == "0.3 over the 0.1 bar"
