"""What a report's own numbers say: the comparisons an agent states (a value against its bar,
target, limit or chance baseline; a train score against a holdout score), checked by
arithmetic before any model is asked.

A 1.5B model reads words, not magnitudes: it names `gap` for "gap 0.047 under the 0.08 bar"
as readily as for "gap 0.37". So the rules do the arithmetic. A comparison that holds settles
its finding (the model is no longer offered it); one that fails is a success contradicted by
its own numbers, escalated whatever the text says. Only what the report states is checked:
a number with no stated bar says nothing, except a train/holdout gap or an AUC, whose meaning
does not depend on the step.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

from ...document.names import printable

__all__ = ["NUMBER", "Claim", "Finding", "stated_claims", "versus"]

Finding = Literal["gap", "chance", "target", "zero", "missing"]

NUMBER = r"(?<![\w.-])(\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)(?:\s?(%))?"
_OPERATORS = {"<": True, "<=": True, "≤": True, ">": False, ">=": False, "≥": False}
"""Operator -> whether it says the value is under its bar."""
_PAIR_WORDS = (
    r"under|below|within|inside|less than|lower than|above|over|exceeds?|exceeding|beats?|"
    r"beating|past|more than|higher than|against|vs\.?|versus|at|compared to|relative to"
)

# What a value counts ("812 survivors"): words, not a conjunction, nor a bar's name (in "the
# 0.0085 threshold, inside the 380-450 range" the number is the bar, not a value).
_COUNTED = (
    r"(?:\s+(?!(?:but|and|or|is|was|not|bar|threshold|target|limit|minimum|maximum|baseline)\b)"
    r"[A-Za-z-]+){0,2}?"
)
# A value (and what it counts: "812 survivors"), then how it relates to its bar, then the
# bar, up to four words apart (the bar's kind often sits between: "above the 0.70 bar", "vs
# baseline 0.4%", "at the random baseline of 0.39%"). A parenthesis names the bar after a
# value: "CV AUC 0.78 (target 0.75)".
_STATED = re.compile(
    rf"{NUMBER}{_COUNTED}[,:;]?\s+"
    rf"(?P<rel>{_PAIR_WORDS})\s+(?P<between>(?:[A-Za-z'-]+\s+){{0,4}}?)"
    rf"(?P<op>[<>]=?|[≤≥])?\s?{NUMBER}(?P<after>(?:\s+[A-Za-z-]+){{0,3}})",
    re.IGNORECASE,
)
_PAREN = re.compile(
    rf"{NUMBER}{_COUNTED}\s*\(\s*(?P<noun>[A-Za-z][A-Za-z -]{{0,30}}?)\s*:?\s*"
    rf"(?P<op>[<>]=?|[≤≥])?\s*{NUMBER}\s*\)",
    re.IGNORECASE,
)
_OPERATOR = re.compile(rf"{NUMBER}\s*(?P<op>[<>]=?|[≤≥])\s*{NUMBER}")
# The metric's name may sit between ("train AUC 0.83", "holdout R^2 0.58"), not a sentence
# ("training stopped at epoch 23").
_METRIC_WORDS = (
    r"(?P<metric>(?:\s+(?!at\b|on\b|in\b|for\b|after\b|with\b|epoch)[A-Za-z^0-9²]+){0,2}?)"
)
_TRAIN = re.compile(rf"\btrain(?:ing)?\b{_METRIC_WORDS}[:=]?\s+{NUMBER}", re.IGNORECASE)
_HOLDOUT = re.compile(
    rf"\b(?:hold-?out|validation|test)\b{_METRIC_WORDS}[:=]?\s+{NUMBER}", re.IGNORECASE
)
_NOT_A_METRIC = frozenset({"score", "set", "split", "data", "fold", "folds", "mean", "the"})
_BAR_NOUNS = r"limit|max|maximum|ceiling|cap|target|min|minimum|floor|threshold|bar"
# The report's own comparison with a named bar and no relation word: "(gap 4.6%, limit 10%)";
# not a range ("min 2, max 9").
_NAMED_BAR = re.compile(
    rf"\b(?!(?:{_BAR_NOUNS})\b)[A-Za-z-]+\s*[:=]?\s*"
    rf"{NUMBER}\s*[,;]\s*(?P<noun>{_BAR_NOUNS})\s*(?:of\s+)?:?\s*{NUMBER}",
    re.IGNORECASE,
)
_AUC = re.compile(rf"\bAUC\s+(?:of\s+)?{NUMBER}", re.IGNORECASE)
# What the step exists to find, counted as none; not "no survivors were lost", nor "its hash
# no longer matches".
_ZERO = re.compile(
    r"\b(?:0|zero|no)\s+(?:(?!longer\b)[a-z-]+\s+){0,2}?(?:survivors|matches|hits|predictions)\b"
    r"(?!(?:\s+\w+)?\s+(?:lost|dropped|failed|missing|skipped|discarded))",
    re.IGNORECASE,
)
_MISSING = re.compile(
    r"(?<![\w.-])(?!0\b)\d[\d,]*\s+(?:[a-z-]+\s+)?(?:missing|unreachable|not returned)\b",
    re.IGNORECASE,
)

# What kind of bar a word names, and so which side of it is good.
_CHANCE = re.compile(r"\b(chance|random|baseline)\b", re.IGNORECASE)
_CEILING = re.compile(r"\b(limit|max|maximum|ceiling|cap|at most)\b", re.IGNORECASE)
_FLOOR = re.compile(r"\b(minimum|min|floor|at least)\b", re.IGNORECASE)
# A bar whose side what it measures says: a score over its target, a loss or a gap under it.
# Not "requirement": a claim that holds settles a finding and so changes what the model is
# asked, and it would on a labelled file whose saved answer the bench replays
# (consistency.py reads it, for a miss only).
_BAR = re.compile(r"\b(bar|threshold|cutoff|target|criterion|required|goal)\b", re.IGNORECASE)
_GAP = re.compile(r"\b(gap|difference|delta|overfit\w*)\b", re.IGNORECASE)
_LOWER_IS_BETTER = re.compile(
    r"\b(gap|difference|delta|overfit\w*|loss|error|variance|std|drop)\b", re.IGNORECASE
)

CHANCE_MARGIN = 2.0
"""A value at least this many times its chance baseline is clearly above it."""
AT_CHANCE = 1.25
"""A value at most this many times its chance baseline is at chance level."""
NEAR_MISS = 0.02
"""A value this close to its bar (relative) is neither a pass nor a fail: a 95 % interval that
covers 94.6 % meets its nominal target."""
GAP_OK, GAP_TOO_LARGE = 0.05, 0.15
"""A train/holdout gap with no stated bar: under the first is no overfitting, over the second
is (AUC, F1, accuracy and R² are all on a 0..1 scale)."""
AUC_CHANCE, AUC_SIGNAL = 0.55, 0.6
CONTEXT = 40
"""Characters before a value searched for what it measures ("gap", "loss")."""


@dataclass(frozen=True)
class Claim:
    """One comparison the report states, and whether its numbers bear it out."""

    finding: Finding
    """The success finding this comparison settles."""
    holds: bool
    text: str
    """The report's words, for the decision's reasoning."""

    def describe(self) -> str:
        return f"{'holds' if self.holds else 'fails'}: {self.text!r}"


def _value(number: str, percent: str | None) -> float:
    return float(number.replace(",", "")) / (100 if percent else 1)


def _pair(m: re.Match[str], value: int, bar: int) -> tuple[float, float] | None:
    """The value and bar in groups `value` and `bar` (each a NUMBER: digits, then "%"), or None
    when they are not the same kind of number: a count against a percentage ("200 known
    outputs (baseline 0.39%)") compares nothing."""
    v, b = _value(m[value], m[value + 1]), _value(m[bar], m[bar + 1])
    if bool(m[value + 1]) != bool(m[bar + 1]) and max(v, b) > 1:
        return None
    return v, b


def _quote(text: str) -> str:
    return printable(" ".join(text.split()))[:80]


def versus(
    finding: Finding, value: float, bar: float, under_is_good: bool, text: str
) -> Claim | None:
    """A value against its bar: holds on the good side, fails clearly on the wrong side, no
    claim when it is within NEAR_MISS of the bar."""
    if finding == "chance":
        if value >= CHANCE_MARGIN * bar:
            return Claim("chance", True, text)
        return Claim("chance", False, text) if value <= AT_CHANCE * bar else None
    good = value <= bar if under_is_good else value >= bar
    if not good and abs(value - bar) <= NEAR_MISS * abs(bar):
        return None
    return Claim(finding, good, text)


def _kind(words: str, before: str, operator_under: bool | None) -> tuple[Finding, bool] | None:
    """(finding, whether under the bar is good) from the words naming the bar and what the
    value measures; None when nothing says what the bar is."""
    finding: Finding = "gap" if _GAP.search(before) else "target"
    if _CHANCE.search(words):
        return "chance", False
    if _CEILING.search(words):
        return finding, True
    if _FLOOR.search(words):
        return "target", False
    if _BAR.search(words):
        return finding, bool(_LOWER_IS_BETTER.search(before))
    if operator_under is not None:
        # "gap 0.047 < 0.08" names no bar; the inequality says which side the report claims.
        return finding, operator_under
    return None


def _metric(m: re.Match[str]) -> set[str]:
    return {w for w in m["metric"].lower().split() if w not in _NOT_A_METRIC}


def _same_metric(train: re.Match[str] | None, holdout: re.Match[str] | None) -> str | None:
    """What a train and a holdout score both measure ("" when neither names it), or None when
    they name different metrics: "train loss 0.412 … holdout Brier score 0.186" is no gap."""
    if train is None or holdout is None:
        return None
    a, b = _metric(train), _metric(holdout)
    if a and b and a != b:
        return None
    return " ".join(sorted(a or b))


@lru_cache(maxsize=64)
def stated_claims(report: str) -> tuple[Claim, ...]:
    """The comparisons `report` states, each checked; one per finding and span of text.
    Cached: one decision asks three times (what is settled, what stays open, what to quote)."""
    claims: list[Claim] = []
    taken: list[tuple[Finding, int, int]] = []

    def add(claim: Claim | None, span: tuple[int, int]) -> None:
        if claim is None or any(
            f == claim.finding and s < span[1] and span[0] < e for f, s, e in taken
        ):
            return
        claims.append(claim)
        taken.append((claim.finding, *span))

    for m in _PAREN.finditer(report):
        kind = _kind(m["noun"], report[max(0, m.start() - CONTEXT) : m.start()], None)
        pair = _pair(m, 1, 5)
        if kind is not None and pair is not None:
            add(versus(kind[0], *pair, kind[1], _quote(m[0])), m.span())
    for m in _STATED.finditer(report):
        # A word ("above", "inside") with no bar named says nothing; an inequality does.
        said_under = _OPERATORS[m["op"]] if m["op"] else None
        before = report[max(0, m.start() - CONTEXT) : m.start()]
        kind = _kind(f"{m['between']} {m['after']}", before, said_under)
        pair = _pair(m, 1, 6)
        if kind is not None and pair is not None:
            add(versus(kind[0], *pair, kind[1], _quote(m[0])), m.span())
    for m in _NAMED_BAR.finditer(report):
        # What the value measures is named just before it, inside the match: "gap 4.6%".
        kind = _kind(m["noun"], report[max(0, m.start() - CONTEXT) : m.start(1)], None)
        pair = _pair(m, 1, 4)
        if kind is not None and pair is not None:
            add(versus(kind[0], *pair, kind[1], _quote(m[0])), m.span())
    for m in _OPERATOR.finditer(report):
        # A bare "(0.041 < 0.06)": the report's own inequality, true or not.
        pair, under = _pair(m, 1, 4), _OPERATORS[m["op"]]
        if pair is None:
            continue
        value, bar = pair
        before = report[max(0, m.start() - CONTEXT) : m.start()]
        finding: Finding = "gap" if _GAP.search(before) else "target"
        add(Claim(finding, (value <= bar) if under else (value >= bar), _quote(m[0])), m.span())
    train, holdout = _TRAIN.search(report), _HOLDOUT.search(report)
    metric = _same_metric(train, holdout)
    if train and holdout and metric is not None and not any(c.finding == "gap" for c in claims):
        gap = _value(train[2], train[3]) - _value(holdout[2], holdout[3])
        if _LOWER_IS_BETTER.search(metric):  # a loss or an error overfits upwards
            gap = -gap
        text = _quote(f"{train[0]} / {holdout[0]} (gap {gap:.3f})")
        if gap <= GAP_OK:
            add(Claim("gap", True, text), (0, 0))
        elif gap > GAP_TOO_LARGE:
            add(Claim("gap", False, text), (0, 0))
    for m in _AUC.finditer(report):
        auc = _value(m[1], m[2])
        if auc <= AUC_CHANCE:
            add(Claim("chance", False, _quote(m[0])), m.span())
        elif auc >= AUC_SIGNAL:
            add(Claim("chance", True, _quote(m[0])), m.span())
    for pattern, finding in ((_ZERO, "zero"), (_MISSING, "missing")):
        for m in pattern.finditer(report):
            add(Claim(finding, False, _quote(m[0])), m.span())
    return tuple(claims)
