"""A decision, as the ledger keeps it and the decision record shows it: proceed, retry or
escalate, how sure, why, and who decided."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field

__all__ = ["ACTIONS", "CONFIDENCE_LEVELS", "Action", "DecidedBy", "Decision", "Level"]

Action = Literal["proceed", "retry", "escalate"]
ACTIONS: tuple[Action, ...] = ("proceed", "retry", "escalate")
Level = Literal["low", "medium", "high"]
CONFIDENCE_LEVELS: dict[str, float] = {"low": 0.25, "medium": 0.6, "high": 0.9}
"""A word even a 0.5B model writes reliably (it starts a number like `0.9` where a grammar
wants an integer), mapped to a number for the decision record."""
DecidedBy = Literal["llm", "llm_degraded", "guardrail", "rules", "cases", "operator"]


class Decision(BaseModel):
    model_config = ConfigDict(frozen=True)

    action: Action
    confidence: float
    """The model's confidence word as a number (0..1); the agent's own under the rules."""
    calibrated_confidence: float | None
    """The probability the model's tokens gave to its action's findings, among the open ones."""
    reasoning: str
    suggested_params: dict[str, Any]
    # Ledger rows written before the field had this name call it `path`: read as they are.
    decided_by: DecidedBy = Field(validation_alias=AliasChoices("decided_by", "path"))
    llm_metadata: dict[str, Any]
    signals: dict[str, Any] = Field(default_factory=dict)
    """Each signal's answer (rules, model, cases) and strength; empty in older records."""
