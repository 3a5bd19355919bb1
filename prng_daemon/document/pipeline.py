"""The six-step pipeline table (proposal §1.3), as data, in one place."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Literal, get_args

__all__ = [
    "FINAL_AGENT",
    "PIPELINE",
    "SERVER_NAMES",
    "PrimaryLLM",
    "ServerName",
    "Step",
    "step",
]

ServerName = Literal["orchestrator", "math"]
"""The two llama-servers (proposal §3.3): the config's sections, the router's endpoints."""
SERVER_NAMES: tuple[ServerName, ...] = get_args(ServerName)

FINAL_AGENT = "none"
"""The `follow_up_agent` of the last step: nothing runs after it."""


class PrimaryLLM(StrEnum):
    MATH = "math"
    ORCHESTRATOR = "orchestrator"
    BOTH = "both"

    @property
    def first_asked(self) -> ServerName:
        """The server asked first; on a "both" step the math specialist assesses and the
        orchestrator then decides knowing it."""
        return "orchestrator" if self is PrimaryLLM.ORCHESTRATOR else "math"


@dataclass(frozen=True)
class Step:
    number: int
    name: str
    agent: str
    """The agent that runs this step (and runs it again on *retry*)."""
    follow_up_agent: str
    primary_llm: PrimaryLLM

    @property
    def is_last(self) -> bool:
        return self.follow_up_agent == FINAL_AGENT


PIPELINE: tuple[Step, ...] = (
    Step(1, "window_optimizer", "window_optimizer_agent", "scorer_meta_agent", PrimaryLLM.MATH),
    Step(2, "scorer_meta_optimizer", "scorer_meta_agent", "full_scoring_agent", PrimaryLLM.MATH),
    Step(3, "full_scoring", "full_scoring_agent", "ml_meta_agent", PrimaryLLM.BOTH),
    Step(4, "ml_meta_optimizer", "ml_meta_agent", "reinforcement_agent", PrimaryLLM.ORCHESTRATOR),
    Step(5, "anti_overfit_training", "reinforcement_agent", "prediction_agent", PrimaryLLM.BOTH),
    Step(6, "prediction", "prediction_agent", FINAL_AGENT, PrimaryLLM.MATH),
)


def step(number: int) -> Step:
    """The table row for pipeline step `number` (1–6)."""
    return PIPELINE[number - 1]
