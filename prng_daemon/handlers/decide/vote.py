"""The cases' vote: what the nearest labelled cases say about a new result (issue 26).

A case is near when it is of the same step and the same success flag (else the same flag, else
any), and its report is near in TF-IDF cosine over what the report says: its words, how its
numbers relate to their bars (each stated comparison as `gap:holds`, `chance:fails`, ...), and
the facts the rules read (retries, the agent's confidence, a requested override). The nearest
`vote_neighbours` vote, each with its similarity; the vote's strength is the winner's share.
It costs a few milliseconds and no model call: the prompt, and its cache, stay as they are.
"""

from __future__ import annotations

import asyncio
import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from ...config import PolicyConfig
from ...document.case import Case
from ...document.decision import ACTIONS, Action
from ...document.metadata import AgentMetadata
from ...ledger import Ledger
from .calibrate import Calibration
from .claims import stated_claims

__all__ = ["CaseIndex", "CaseVote", "LedgerCases", "Neighbour"]

_WORD = re.compile(r"[a-z][a-z-]+")


@dataclass(frozen=True)
class Neighbour:
    run_id: str | None
    file: str
    label: Action
    similarity: float


@dataclass(frozen=True)
class CaseVote:
    action: Action
    strength: float
    """The winning action's share of the neighbours' similarity (0..1]."""
    neighbours: tuple[Neighbour, ...]
    scope: str
    """Where the neighbours came from: "step" (same step and flag), "flag", "all"."""

    def describe(self) -> str:
        near = ", ".join(f"{n.file} {n.label} {n.similarity:.2f}" for n in self.neighbours)
        return f"{self.action} (strength {self.strength:.2f}; {self.scope}: {near})"


def terms(meta: AgentMetadata, policy: PolicyConfig) -> list[str]:
    """What a report says, as terms: its words, its numbers against their bars, its facts."""
    text = (meta.reasoning or "").lower()
    out = _WORD.findall(text)
    out += [
        f"@{c.finding}:{'holds' if c.holds else 'fails'}"
        for c in stated_claims(meta.reasoning or "")
    ]
    out.append(f"@retries:{min(meta.retries, policy.max_retries)}")
    if meta.retries >= policy.max_retries:
        out.append("@budget-spent")
    if meta.human_override_requested:
        out.append("@override")
    if meta.confidence < policy.confidence_threshold:
        out.append("@unsure")
    return out


class CaseIndex:
    """The labelled cases, indexed for the vote. Built once per change of the pool."""

    def __init__(self, cases: Sequence[Case], policy: PolicyConfig) -> None:
        self.policy = policy
        self.cases = list(cases)
        counts = [Counter(terms(c.agent_metadata, policy)) for c in self.cases]
        df: Counter[str] = Counter()
        for c in counts:
            df.update(c.keys())
        n = len(self.cases)
        self._idf = {t: math.log((1 + n) / (1 + k)) + 1.0 for t, k in df.items()}
        self._vectors = [self._vector(c) for c in counts]
        self.calibration = Calibration(self.cases, policy)

    def __len__(self) -> int:
        return len(self.cases)

    def _vector(self, counts: Counter[str]) -> dict[str, float]:
        # A term no case has says nothing about nearness: its weight would only shrink the rest.
        v = {t: (1 + math.log(k)) * self._idf[t] for t, k in counts.items() if t in self._idf}
        norm = math.sqrt(sum(w * w for w in v.values())) or 1.0
        return {t: w / norm for t, w in v.items()}

    def vote(self, meta: AgentMetadata, exclude: str | None = None) -> CaseVote | None:
        """The nearest cases' action for `meta`, or None when the pool has fewer than
        policy.vote_min_cases (`exclude`: a content hash left out, for measuring on the pool
        itself)."""
        k = self.policy.vote_neighbours
        pool = [i for i, c in enumerate(self.cases) if c.sha256 != exclude]
        if len(pool) < self.policy.vote_min_cases:
            return None
        flag = meta.success_criteria_met
        scopes = (
            ("step", [i for i in pool if self._meta(i).pipeline_step == meta.pipeline_step
                      and self._meta(i).success_criteria_met == flag]),
            ("flag", [i for i in pool if self._meta(i).success_criteria_met == flag]),
            ("all", pool),
        )  # fmt: skip
        scope, chosen = next(((s, ids) for s, ids in scopes if len(ids) >= k), scopes[-1])
        if not chosen:
            return None
        query = self._vector(Counter(terms(meta, self.policy)))
        scored = sorted(
            ((sum(w * self._vectors[i].get(t, 0.0) for t, w in query.items()), i) for i in chosen),
            reverse=True,
        )[:k]
        weight = dict.fromkeys(ACTIONS, 0.0)
        for sim, i in scored:
            weight[self.cases[i].label] += max(sim, 1e-6)
        action = max(ACTIONS, key=lambda a: weight[a])
        neighbours = tuple(
            Neighbour(self.cases[i].run_id, self.cases[i].file, self.cases[i].label, sim)
            for sim, i in scored
        )
        return CaseVote(action, weight[action] / sum(weight.values()), neighbours, scope)

    def _meta(self, i: int) -> AgentMetadata:
        return self.cases[i].agent_metadata


class LedgerCases:
    """The ledger's cases as an index, built again when a case was added (by the CLI, from
    another process: one cheap query per decision tells) or the policy changed. Read on the
    event loop's thread (the ledger's), built in a worker thread: 0.2 s for 150 cases, 0.9 s
    for 1,000 is too long to hold the loop."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger
        self._built: tuple[tuple[int, float], PolicyConfig] | None = None
        self._index: CaseIndex | None = None

    async def __call__(self, policy: PolicyConfig) -> CaseIndex | None:
        mark = self.ledger.cases_mark()
        if self._built != (mark, policy):
            cases = self.ledger.cases() if mark[0] else []
            self._index = await asyncio.to_thread(CaseIndex, cases, policy) if cases else None
            self._built = (mark, policy)
        return self._index
