"""Confidence calibrated from the daemon's own record (issue 26): a monotone map from how much
the signals backed a decision (`Signals.supports`) to how often such decisions were right,
fitted on the labelled cases that carry the daemon's decision. Platt scaling (a logistic curve,
two numbers, fitted by Newton's method in microseconds, again whenever the pool changes): it
keeps the order of the support, where an isotonic fit on a hundred cases with a handful wrong
flattened into one or two steps (bench/RESULTS-cases.md). One curve pooled over the steps,
once there are policy.calibration_min_cases: per-step curves, each fitted on a sixth of the pool
with a wrong answer or two, ranked the decisions worse (pooled r 0.76 -> 0.82 for `escalate`,
0.46 -> 0.62 for `stronger`, 0.28 -> 0.34 for `majority` over the six labelled sets).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from ...config import PolicyConfig
from ...document.case import Case

__all__ = ["Calibration", "Platt", "platt"]


@dataclass(frozen=True)
class Platt:
    slope: float
    intercept: float

    def __call__(self, support: float) -> float:
        z = self.slope * support + self.intercept
        return 1.0 / (1.0 + math.exp(-z)) if z > -700 else 0.0


def platt(points: Sequence[tuple[float, bool]], iterations: int = 50) -> Platt:
    """The logistic curve of P(right) on the score that fits `points` (score, right) best,
    with Platt's targets (a right answer counts (n+1)/(n+2), a wrong one 1/(m+2)): a pool with
    no wrong answer yet does not say "certain". Never decreasing: a slope that would fall is
    no evidence, and the curve is the (smoothed) base rate."""
    n_right = sum(r for _, r in points)
    n_wrong = len(points) - n_right
    hi, lo = (n_right + 1) / (n_right + 2), 1 / (n_wrong + 2)
    a, b = 0.0, math.log((n_right + 1) / (n_wrong + 1))
    for _ in range(iterations):
        g_a = g_b = h_aa = h_ab = h_bb = 0.0
        for x, right in points:
            p = Platt(a, b)(x)
            d, w = p - (hi if right else lo), max(p * (1 - p), 1e-12)
            g_a, g_b = g_a + d * x, g_b + d
            h_aa, h_ab, h_bb = h_aa + w * x * x, h_ab + w * x, h_bb + w
        h_aa, h_bb = h_aa + 1e-6, h_bb + 1e-6  # a pool of one score: still solvable
        det = h_aa * h_bb - h_ab * h_ab
        step_a, step_b = (h_bb * g_a - h_ab * g_b) / det, (h_aa * g_b - h_ab * g_a) / det
        a, b = a - step_a, b - step_b
        if abs(step_a) + abs(step_b) < 1e-9:
            break
    if a < 0:
        return Platt(0.0, math.log((n_right + 1) / (n_wrong + 1)))
    return Platt(a, b)


class Calibration:
    """The map fitted on `cases`, pooled over the steps; none with too few cases (then
    `calibrated` answers None)."""

    def __init__(self, cases: Sequence[Case], policy: PolicyConfig) -> None:
        points: list[tuple[float, bool]] = []
        for case in cases:
            decision = case.decision
            support = decision.signals.get("support") if decision is not None else None
            if decision is None or not isinstance(support, float | int):
                continue  # a seed case the daemon never decided, or one from before issue 26
            if decision.decided_by == "operator":
                continue  # an approved escalation: its support was the escalation's
            points.append((support, decision.action == case.label))
        self.size = len(points)
        self._fitted = platt(points) if len(points) >= policy.calibration_min_cases else None

    def calibrated(self, support: float) -> float | None:
        return round(self._fitted(support), 4) if self._fitted is not None else None
