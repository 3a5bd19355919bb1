"""A labelled case: what a result file said, what the daemon decided and why, and the right
answer an operator gave (approve, reject, correct) or a seed set brought. One JSON line each in
`prng-llm-daemon cases export`."""

from __future__ import annotations

import getpass
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_serializer

from .decision import Action, Decision
from .metadata import AgentMetadata

__all__ = ["CASE_FORMAT", "Case", "Source", "new_case"]

CASE_FORMAT: Literal["prng-llm-daemon/case-v1"] = "prng-llm-daemon/case-v1"
Source = Literal["approve", "reject", "correct", "seed"]


class Case(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    format: Literal["prng-llm-daemon/case-v1"] = CASE_FORMAT
    run_id: str | None
    sha256: str
    """The result file's content hash: one case per content, the latest verdict standing."""
    file: str
    agent_metadata: AgentMetadata
    decision: Decision | None
    """What the daemon decided, with its signals; None for a seed case it never decided."""
    label: Action
    """The right answer."""
    source: Source
    operator: str
    why: str = ""
    given_at: str = Field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))

    @field_serializer("agent_metadata")
    def _as_in_the_file(self, meta: AgentMetadata) -> dict[str, Any]:
        # The schema allows no null where a key is optional: leave the key out, as files do.
        dumped: dict[str, Any] = meta.model_dump(mode="json", exclude_none=True)
        return dumped


def new_case(
    meta: AgentMetadata,
    *,
    sha256: str,
    file: str,
    decision: Decision | None,
    label: Action,
    source: Source,
    why: str = "",
    operator: str = "",
) -> Case:
    """A case given now, by `operator` (default: whoever runs this process)."""
    return Case(
        run_id=meta.run_id,
        sha256=sha256,
        file=file,
        agent_metadata=meta,
        decision=decision,
        label=label,
        source=source,
        operator=operator or getpass.getuser(),
        why=why,
    )
