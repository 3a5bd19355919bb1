"""One decision from three signals (issue 26): the rules' arithmetic, the model's finding and
the labelled cases' vote. Pure functions, so the bench replays them on saved model answers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ...config import PolicyConfig
from ...document.decision import Action
from .vote import CaseVote

__all__ = ["Signals", "combine"]

WEIGHTS = {"model": 1.0, "cases": 3.0, "cause": 2.0}
"""How much each signal counts in `Signals.supports`. The model's own probability tells its
right answers from its wrong ones poorly (AUROC 0.77 on the blind set, 0.34 on the held-out
set, bench/RESULTS-cases.md); the vote's strength well (0.87 and 1.00). A failure's stated
transient cause backs the rules' retry (r +0.01 to +0.03 on the four sets, any weight 1-4)."""


@dataclass(frozen=True)
class Signals:
    rules: Action
    """The rules' action: a guardrail's escalation, else proceed on success, retry on failure."""
    settled: bool
    """A guardrail settled it: neither the model nor the cases can overrule it."""
    model: Action | None = None
    probability: float | None = None
    """The model's probability for its action (among the open findings)."""
    cases: CaseVote | None = None
    cause: str | None = None
    """The transient cause a failure states ("preempted", "connection reset"): the rules' retry
    then rests on the report's words, not on a default."""

    def supports(self, action: Action) -> float:
        """How much the signals back `action` (0..1): a guardrail's escalation, fully (the
        cases cannot overrule it, and it is the rules' arithmetic on the report's own words);
        else the mean over the signals present, weighted by WEIGHTS, of the signal's strength
        when it says `action`, else one less it (a stated cause: 1 for the rules' action).
        Calibration maps it to the observed rate of being right."""
        if self.settled:
            return float(self.rules == action)
        parts = []
        if self.model is not None and self.probability is not None:
            p = self.probability
            parts.append((WEIGHTS["model"], p if self.model == action else 1.0 - p))
        if self.cases is not None:
            s = self.cases.strength
            parts.append((WEIGHTS["cases"], s if self.cases.action == action else 1.0 - s))
        if self.cause is not None:
            parts.append((WEIGHTS["cause"], float(self.rules == action)))
        if not parts:  # the rules alone, unsettled: a default, not evidence
            return 0.5
        return sum(w * x for w, x in parts) / sum(w for w, _ in parts)

    def record(self) -> dict[str, Any]:
        """The signals as the decision record names them."""
        out: dict[str, Any] = {"rules": {"action": self.rules, "settled": self.settled}}
        if self.cause is not None:
            out["rules"]["cause"] = self.cause
        if self.model is not None:
            out["model"] = {"action": self.model, "probability": self.probability}
        if self.cases is not None:
            out["cases"] = {
                "action": self.cases.action,
                "strength": round(self.cases.strength, 4),
                "scope": self.cases.scope,
                "neighbours": [
                    {
                        "run_id": n.run_id,
                        "file": n.file,
                        "label": n.label,
                        "similarity": round(n.similarity, 4),
                    }
                    for n in self.cases.neighbours
                ],  # fmt: skip
            }
        return out


def combine(signals: Signals, policy: PolicyConfig) -> tuple[Action, str]:
    """(action, why it differs from the model's or which signals agreed, "" when the model's
    answer stands alone or with the cases). A guardrail stands; with no model answer the rules
    decide; under policy.on_disagreement `majority`, the action two of the three back (below);
    else where the model and the cases agree, that is the action, and where the rules' stated
    cause (a transient failure's) agrees with the model, too; where they disagree, escalate,
    or follow the stronger of the two."""
    if signals.settled or signals.model is None:
        return signals.rules, ""
    if policy.on_disagreement == "majority":
        return _majority(signals, signals.model)
    vote, model = signals.cases, signals.model
    if vote is None or vote.action == model:
        return model, ""
    if signals.cause is not None and signals.rules == model:
        return model, ""  # two signals, one of them the report's stated cause
    said = f"the model says {model} (p={signals.probability or 0:.2f}), the cases {vote.describe()}"
    if policy.on_disagreement == "escalate":
        return "escalate", said
    if vote.strength > (signals.probability or 0.0):
        return vote.action, f"the cases are the stronger: {said}"
    return model, ""


def _majority(signals: Signals, model: Action) -> tuple[Action, str]:
    """The action at least two of the rules' (unsettled) action, the model's and the cases'
    vote back; escalate when all three differ, or when the cases do not vote and the rules and
    the model differ (two signals, no majority). The model's answer alone with the rules: it
    stands when they agree ("" when every signal agrees)."""
    vote = signals.cases
    said = {"rules": signals.rules, "model": model}
    if vote is not None:
        said["cases"] = vote.action
    words = {
        "rules": f"the rules {signals.rules}",
        "model": f"the model {model} (p={signals.probability or 0:.2f})",
        "cases": f"the cases {vote.describe()}" if vote is not None else "",
    }
    for action in dict.fromkeys(said.values()):
        backing = [who for who, a in said.items() if a == action]
        if len(backing) == len(said):
            return action, ""
        if len(backing) >= 2:
            dissent = "; ".join(words[who] for who in said if who not in backing)
            return action, f"majority: the {' and the '.join(backing)} say {action}; {dissent}"
    return "escalate", f"no majority: {'; '.join(words[who] for who in said)}"
