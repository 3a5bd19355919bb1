"""Numbers in a report that cannot all be true: a success contradicted by its own payload or
prose (issue 26). Each check is one a domain expert states without seeing any report: a part
is never larger than its whole, hits never outnumber draws, output claimed in an empty file is
no output, a metric on the wrong side of its own bar misses it, rows in both the training and
the test set are leakage, and an AUC or a probability has a range.

Only what the report states is read: `result` (any JSON the agent wrote besides
agent_metadata, flattened to `name: number`) and the reasoning. A check that finds nothing
says nothing; none of them settles a success as good.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from typing import Any

from .claims import NUMBER, Claim, Finding, versus

__all__ = ["contradictions", "first_stated", "flatten"]

# How far a count is from the whole it is a part of: a name with a later word counts a part of
# the names with an earlier one ("bidirectional" survivors are in both the "forward" and the
# "reverse" pass; "passed" were first "scored", which were the "input").
_WHOLE = frozenset({"total", "planned", "budget", "draws", "input", "in", "n", "candidates",
                    "forward", "fwd", "reverse", "rev", "records", "attempted",
                    "submitted"})  # fmt: skip
_SCORED = frozenset({"scored", "evaluated", "processed", "tested", "done", "completed", "run"})
_PART = frozenset({"passed", "hits", "successes", "ok", "bidirectional", "bidir", "both",
                   "intersection", "written", "kept", "positives", "matched", "unique",
                   "survived", "accepted", "correct", "succeeded"})  # fmt: skip
# Units of work, not the items a step counts: 1,412 survivors passed in 48 shards.
_WORK = frozenset({"shards", "configs", "configurations", "trials", "epochs", "folds", "windows",
                   "nodes", "gpus", "attempts", "jobs", "classes", "steps"})  # fmt: skip
_COUNT_WORDS = _WHOLE | _SCORED | _PART
_METRIC = re.compile(r"(?:^|_)(auc|accuracy|acc|rate|score|f1|r2|coverage|precision|recall)(?:_|$)")
# Shares, as a fraction or a percentage: never under 0 nor over 100 (a score or a rate in
# general may be: a log-likelihood, a learning rate, a sample rate).
_PERCENTAGE = re.compile(
    r"(?:^|_)(?:accuracy|coverage|precision|recall|f1|fpr|tpr|fnr|tnr|"
    r"(?:hit|match|pass|failure|success|survival)_rate)(?:_|$)"
)
_FLOOR = frozenset({"min", "minimum", "floor"})
_CEILING = frozenset({"max", "maximum", "limit", "ceiling", "cap"})
# A bar whose side the metric says: a score over it, a loss or an error under it.
_EITHER = frozenset({"target", "required", "requirement", "threshold", "cutoff", "bar", "goal"})
# Of these, the ones that also name a parameter (a scorer's "threshold"): a bar only when its
# name says for which metric ("acceptance_threshold_cv_auc").
_NAMED_ONLY = frozenset({"threshold", "cutoff", "bar"})
_CHANCE = frozenset({"baseline", "chance", "random"})
_BAR_WORDS = _FLOOR | _CEILING | _EITHER | _CHANCE
_BAR_KINDS: tuple[tuple[frozenset[str], Finding, bool | None], ...] = (
    (_FLOOR, "target", False),
    (_CEILING, "target", True),
    (_EITHER, "target", None),
    (_CHANCE, "chance", False),
)
"""A bar's words, the finding it settles, and whether under it is good (None: the metric
says)."""
_LOWER_IS_BETTER = frozenset({"loss", "logloss", "error", "rmse", "mse", "mae", "brier"})
# How much a metric varies, not the metric: an AUC's std 0.02 is not an AUC under its bar.
_SPREAD = frozenset({"std", "stdev", "sd", "var", "variance", "se", "sem", "ci", "iqr", "delta",
                     "diff", "change", "gap"})  # fmt: skip
_OUTPUT = re.compile(r"(?:^|_)(?:written|output)(?:_|$)")
# Counts and sizes of what went wrong or aside: none of them is the step's output.
_ASIDE = frozenset({"error", "errors", "warning", "warnings", "failed", "missing", "skipped",
                    "dropped", "lost", "duplicate", "duplicates", "stderr", "log",
                    "nan"})  # fmt: skip
# What a bar's name may add to the metric it is for ("target_val_auc"): not the metric itself.
# "acceptance" names a bar only beside a bar word ("acceptance_threshold_cv_auc"): an MCMC's
# `acceptance_rate` is a metric.
_QUALIFIERS = frozenset({"train", "training", "val", "validation", "test", "holdout", "cv",
                         "best", "mean", "overall", "acceptance"})  # fmt: skip
_LEAK = frozenset({"leak", "leakage", "leaked"})
# An overlap of the training and the test (or validation) set; not a "fold_overlap", which in
# step 2 is how stable the survivors are between folds, the more the better.
_SPLITS = frozenset({"train", "training", "test", "holdout", "val", "validation"})
EMPTY_JSON_BYTES = 2
"""The size of "[]" or "{}": a JSON output no larger holds nothing."""
PERFECT_AUC = 0.999
RELATION_SLACK = 0.01
"""Rounding a metric to two or three digits may break a relation by this much (relative)."""
_TOP_K = re.compile(r"top\d+")
_RELATED = frozenset({"rmse", "f1", "accuracy", "acc"})
"""An out-of-sample AUC at or above this on every fold is a label in the features."""

# In the prose: a part "of" a whole ("1,412 of 1,000"); hits "in" draws.
_OF = re.compile(
    rf"{NUMBER}\s+(?:(?:[a-z-]+\s+){{0,2}}?(?:of|out of)|(?:hits|successes|matches|correct)\s+"
    rf"(?:in|over|across))\s+{NUMBER}\s+(?!%)(?P<noun>[a-z-]+)",
    re.IGNORECASE,
)
_NAMED = re.compile(
    rf"\b(?P<name>forward|reverse|bidirectional)(?:\s+survivors)?[:=]?\s+{NUMBER}|"
    rf"{NUMBER}\s+(?P<name2>forward|reverse|bidirectional)\b",
    re.IGNORECASE,
)
_PERCENT_METRIC = re.compile(
    rf"\b(?P<metric>AUC|accuracy|coverage|precision|recall|hit rate|match rate)\b"
    rf"(?:\s+(?:of|is|was|at|reaches|reached)){{0,2}}[:=]?\s+{NUMBER}",
    re.IGNORECASE,
)
# A metric and, later in its clause, its bar in parentheses: "holdout accuracy 10.3% on the
# 10-way target (minimum required: 15%)". Only a miss is taken from it: a pass is claims.py's.
_METRIC_THEN_BAR = re.compile(
    rf"\b(?:AUC|accuracy|F1|R\^?2|coverage|precision|recall|hit rate|match rate)\s+(?:of\s+)?"
    rf"{NUMBER}[^.;()]{{0,60}}\(\s*(?:minimum required|minimum|min|target|required|at least|"
    rf"(?:acceptance )?(?:threshold|cutoff|bar)|acceptance|requirement|floor)"
    rf"\s*:?\s*{NUMBER}\s*\)",
    re.IGNORECASE,
)
_PERFECT = re.compile(
    r"\bAUC\s+(?:of\s+)?1(?:\.0+)?\b[^.]{0,40}\b(?:every|all|each)\b[^.]{0,20}\bfolds?\b",
    re.IGNORECASE,
)
# "no leakage", "checked for leakage", "the file is not corrupt": a word denied or looked for
# states nothing.
_DENIED = re.compile(
    r"\b(?:no|not|never|nothing|neither|nor|isn't|wasn't|without|zero|0|none|any|for|"
    r"free of|ruled out)\s+"
    r"(?!but\s)(?:\w+\s+)?$",
    re.IGNORECASE,
)
_LEAKAGE = re.compile(
    r"(?<!memory )(?<!handle )\b(?:leak(?:s|ed|age)?|label(?:s)? leak\w*)\b"
    r"(?!\s+(?:in|of|from) (?:the )?(?:memory|dataloader|worker|process|file handles?))|"
    r"\b(?:in|among) both (?:the )?train(?:ing)?\b[^.]{0,25}\btest\b|"
    r"\bshow up in both\b|"
    r"\b(?:target|label)\b[^.]{0,40}\b(?:among|in|is one of) the features\b|"
    r"\bsees? the label\b|"
    r"\bvalidation (?:folds? |set )?contains? the training\b",
    re.IGNORECASE,
)
_EMPTY_OUTPUT = re.compile(
    r"\b(?:0|zero)[- ]bytes?\b(?!\s+(?:lost|missing|dropped|skipped|of))|"
    r"\b(?:0|zero) rows (?:were )?written\b|"
    r"\bwrote (?:0|zero|no) (?:rows|records|predictions|lines|bytes)\b|"
    r"\b(?:output|file|predictions?(?:\.json)?) (?:is|was) empty\b",
    re.IGNORECASE,
)


def first_stated(pattern: re.Pattern[str], text: str) -> re.Match[str] | None:
    """The first match of `pattern` in `text` that the words just before do not deny."""
    for found in pattern.finditer(text):
        if not _DENIED.search(text[max(0, found.start() - 20) : found.start()]):
            return found
    return None


def flatten(payload: Mapping[str, Any], prefix: str | None = None) -> Iterator[tuple[str, Any]]:
    """(name, value) for every leaf of `payload`, lower case, nested names joined by "_" below
    the top level: a top-level object (`result`, `metrics`) only holds the names that count."""
    for key, value in payload.items():
        name = str(key).lower() if not prefix else f"{prefix}_{key}".lower()
        if isinstance(value, Mapping):
            yield from flatten(value, "" if prefix is None else name)
        else:
            yield name, value


def _numbers(payload: Mapping[str, Any]) -> dict[str, float]:
    return {
        name: float(value)
        for name, value in flatten(payload)
        if isinstance(value, int | float) and not isinstance(value, bool)
    }


def _words(name: str) -> set[str]:
    return set(name.split("_")) - {""}


def _level(words: set[str]) -> int | None:
    """0 for a whole, 1 for what was scored of it, 2 for a part that passed; None when the
    name says neither."""
    for level, kind in enumerate((_WHOLE, _SCORED, _PART)):
        if words & kind:
            return level
    return None


def _parts_over_wholes(counts: dict[str, float]) -> Iterator[str]:
    """A part larger than its whole: names of the same thing (sharing a noun), or a bare
    "passed" against a whole of the items (not of the shards or trials they ran in)."""
    named = [(n, v, _level(_words(n)), _words(n) - _COUNT_WORDS) for n, v in counts.items()]
    for part, p, part_level, part_nouns in named:
        for whole, w, whole_level, whole_nouns in named:
            if part_level is None or whole_level is None or part_level <= whole_level:
                continue
            same = bool(part_nouns & whole_nouns) or (not part_nouns and not whole_nouns & _WORK)
            if same and p > w and p == int(p) and w == int(w):
                yield f"{part} {p:,.0f} > {whole} {w:,.0f}"


def _metric_bars(numbers: dict[str, float]) -> Iterator[Claim]:
    """A metric against the payload's own bar for it (target_auc, max_gap, baseline_rate,
    acceptance_threshold_cv_auc); a loss or an error under a floor or a baseline is no miss
    (lower is better), and under a target or a threshold it is the good side."""
    for bar, b in numbers.items():
        bar_words = _words(bar)
        for words, finding, under_is_good in _BAR_KINDS:
            if not bar_words & words or (bar_words & (_FLOOR | _CEILING) and words is _EITHER):
                continue  # "max_error_threshold" is a ceiling, not a bar either way
            named = bar_words - _BAR_WORDS
            kind, qualifiers = named - _QUALIFIERS, named & _QUALIFIERS
            if not kind and bar_words & words <= _NAMED_ONLY:
                continue
            for metric, v in numbers.items():
                metric_words = _words(metric)
                if metric == bar or metric_words & _BAR_WORDS or metric_words & _SPREAD - kind:
                    continue
                if not kind <= metric_words or (
                    qualifiers and metric_words & _QUALIFIERS and not qualifiers & metric_words
                ):
                    continue
                if not kind and not _METRIC.search(metric):
                    continue  # a bare "target" is for a metric, not for a count
                lower = bool(metric_words & _LOWER_IS_BETTER)
                under = lower if under_is_good is None else under_is_good
                if not under and lower:
                    continue
                claim = versus(finding, v, b, under, f"{metric} {v:g} vs {bar} {b:g}")
                if claim is not None:
                    yield claim


def _counterpart(name: str, word: str, other: str) -> str:
    return "_".join(other if w == word else w for w in name.split("_"))


def _relations(numbers: dict[str, float]) -> Iterator[str]:
    """Relations between metrics on the same set that hold for any data: an RMSE is never
    under the MAE (a root mean square is at least the mean), an F1 lies between its precision
    and its recall (their harmonic mean), a top-k accuracy is never under the top-1. Only for
    a metric the name qualifies by its set alone: an improvement, a spread or a macro average
    of either need not keep the relation."""
    for name, v in numbers.items():
        words = name.split("_")
        if not {w for w in words if not _TOP_K.fullmatch(w)} - _RELATED <= _QUALIFIERS:
            continue
        if "rmse" in words and (mae := _counterpart(name, "rmse", "mae")) in numbers:
            if v < numbers[mae] * (1 - RELATION_SLACK):
                yield f"{name} {v:g} < {mae} {numbers[mae]:g}: an RMSE is never under the MAE"
        if "f1" in words and set(words) - {"f1"} <= _SPLITS:
            # Not a best or a mean over trials or folds: its F1, precision and recall may
            # each come from another one.
            p = numbers.get(_counterpart(name, "f1", "precision"))
            r = numbers.get(_counterpart(name, "f1", "recall"))
            if p is not None and r is not None:
                slack = RELATION_SLACK * max(p, r)
                if not min(p, r) - slack <= v <= max(p, r) + slack:
                    yield f"{name} {v:g} outside precision {p:g} .. recall {r:g}"
        top = next((w for w in words if _TOP_K.fullmatch(w)), None)
        if top is not None and top != "top1":
            one = numbers.get(_counterpart(name, top, "top1"))
            if one is None:
                one = numbers.get("_".join(w for w in words if w != top))
            if one is not None and v < one * (1 - RELATION_SLACK):
                yield f"{name} {v:g} < top-1 {one:g}: a top-k accuracy is never under the top-1"


def _payload(payload: Mapping[str, Any]) -> Iterator[str]:
    """The contradictions in the numbers the agent wrote beside its metadata."""
    numbers = _numbers(payload)
    yield from _parts_over_wholes(
        {n: v for n, v in numbers.items() if not _METRIC.search(n) and v >= 0}
    )
    yield from (c.text for c in _metric_bars(numbers) if not c.holds)
    yield from _relations(numbers)
    for name, value in numbers.items():
        words = _words(name)
        if words & _ASIDE:
            continue
        if _OUTPUT.search(name) and not words & _WORK and value == 0:
            yield f"{name} is 0"
        elif "bytes" in words and value <= EMPTY_JSON_BYTES:
            yield f"{name} is {value:g}: an empty file"
        elif (words & _LEAK or "overlap" in words and words & _SPLITS) and value > 0:
            yield f"{name} {value:,.0f}: the same rows on both sides"
        elif words & {"auc", "probability", "prob", "p"} and not 0 <= value <= 1:
            yield f"{name} {value:g} is outside 0..1"
        elif _PERCENTAGE.search(name) and not 0 <= value <= 100:
            yield f"{name} {value:g} is outside 0..100 %"
    folds = [v for n, v in flatten(payload) if "auc" in n and isinstance(v, list)]
    for values in folds:
        if len(values) > 1 and all(isinstance(x, int | float) and x >= PERFECT_AUC for x in values):
            yield f"AUC {values[0]} on every one of {len(values)} folds"


def _value(number: str) -> float:
    return float(number.replace(",", ""))


def _prose(text: str) -> Iterator[str]:
    """The contradictions the reasoning states in words."""
    for m in _OF.finditer(text):
        if m[2] or m[4] or "." in m[1] or "." in m[3] or m["noun"].lower() in _WORK:
            continue  # a percentage, a decimal or the shards they ran in is no whole
        if _value(m[1]) > _value(m[3]):
            yield f"{' '.join(m[0].split())}: more than the whole"
    counts: dict[str, float] = {}
    for m in _NAMED.finditer(text):
        name = (m["name"] or m["name2"]).lower()
        number = m[2] if m["name"] else m[4]
        if "." not in number:
            counts.setdefault(f"{name}_survivors", _value(number))
    yield from _parts_over_wholes(counts)
    for m in _PERCENT_METRIC.finditer(text):
        value = _value(m[2])
        if (m[3] and value > 100) or (not m[3] and m["metric"].lower() == "auc" and value > 1):
            yield f"{' '.join(m[0].split())}: outside its range"
    for m in _METRIC_THEN_BAR.finditer(text):
        if bool(m[2]) == bool(m[4]) or max(_value(m[1]), _value(m[3])) <= 1:
            value = _value(m[1]) / (100 if m[2] else 1)
            bar = _value(m[3]) / (100 if m[4] else 1)
            claim = versus("target", value, bar, False, " ".join(m[0].split()))
            if claim is not None and not claim.holds:
                yield claim.text
    for pattern in (_PERFECT, _LEAKAGE, _EMPTY_OUTPUT):
        found = first_stated(pattern, text)
        if found:
            yield " ".join(found[0].split())


def contradictions(reasoning: str, payload: Mapping[str, Any] | None = None) -> tuple[str, ...]:
    """What in a success's own numbers cannot all be true, one line each (none: nothing
    found)."""
    found = [*_prose(reasoning), *(_payload(payload) if payload else ())]
    return tuple(dict.fromkeys(found))
