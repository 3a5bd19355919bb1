"""Confidence calibrated from the daemon's own record (issue 26): a monotone map from how much
the signals backed a decision (`Signals.supports`) to how often such decisions were right, fitted
on the labelled cases that carry the daemon's decision. Isotonic regression (pool adjacent
violators): no shape assumed, a few microseconds per case, refitted whenever the pool changes.
Per step once a step has policy.calibration_min_cases, pooled over all steps before.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass

from ...config import PolicyConfig
from ...document.case import Case

__all__ = ["Calibration", "isotonic"]


def isotonic(points: Sequence[tuple[float, bool]]) -> list[tuple[float, float, int]]:
    """The non-decreasing step function closest (least squares) to `points` (score, right):
    [(the highest score of a block, its rate of being right, its size)], in score order."""
    blocks: list[tuple[float, int, float]] = []  # (right, count, highest score)
    for score, right in sorted(points):
        blocks.append((float(right), 1, score))
        # A violator, or the same score (one score cannot map to two rates), joins the last.
        while len(blocks) > 1 and (
            blocks[-2][0] / blocks[-2][1] >= blocks[-1][0] / blocks[-1][1]
            or blocks[-2][2] == blocks[-1][2]
        ):
            last, before = blocks.pop(), blocks.pop()
            blocks.append((before[0] + last[0], before[1] + last[1], last[2]))
    return [(top, right / n, n) for right, n, top in blocks]


@dataclass(frozen=True)
class _Map:
    tops: list[float]
    rates: list[float]

    def __call__(self, score: float) -> float:
        i = bisect.bisect_left(self.tops, score)
        return self.rates[min(i, len(self.rates) - 1)]


class Calibration:
    """The maps fitted on `cases`: per step where it has enough cases, else the pooled one;
    none with too few cases (then `calibrated` answers None)."""

    def __init__(self, cases: Sequence[Case], policy: PolicyConfig) -> None:
        points: dict[int, list[tuple[float, bool]]] = {}
        for case in cases:
            decision = case.decision
            support = decision.signals.get("support") if decision is not None else None
            if decision is None or not isinstance(support, float | int):
                continue  # a seed case the daemon never decided, or one from before issue 26
            right = decision.action == case.label
            points.setdefault(case.agent_metadata.pipeline_step, []).append((support, right))
        pooled = [p for step in points.values() for p in step]
        self.size = len(pooled)
        least = policy.calibration_min_cases
        self._pooled = _fit(pooled) if len(pooled) >= least else None
        self._per_step = {s: _fit(p) for s, p in points.items() if len(p) >= least}

    def calibrated(self, step: int, support: float) -> float | None:
        fitted = self._per_step.get(step, self._pooled)
        return round(fitted(support), 4) if fitted is not None else None


def _fit(points: list[tuple[float, bool]]) -> _Map:
    """The isotonic map, each block's rate shrunk towards 1/2 by one right and one wrong
    answer (Laplace): 3 right of 3 is not certainty. A running maximum keeps it monotone."""
    tops: list[float] = []
    rates: list[float] = []
    for top, rate, n in isotonic(points):
        tops.append(top)
        rates.append(max((rate * n + 1) / (n + 2), rates[-1] if rates else 0.0))
    return _Map(tops, rates)
