"""Pydantic documents mirroring schema/result-v1.0.4.schema.json (they must agree on every file)."""

from __future__ import annotations

import json
from typing import Annotated, Any, ClassVar, Literal, get_args

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    model_validator,
)

from .pipeline import ServerName, step

__all__ = [
    "MAX_FILES",
    "MAX_RESULT_BYTES",
    "MAX_NODES",
    "MAX_TRACE",
    "QUERY_TYPES",
    "RELATIVE_PATH_PATTERN",
    "RELATIVE_PATH_RULE",
    "RUN_ID_PATTERN",
    "SCHEMA_VERSION",
    "AgentMetadata",
    "ClusterResources",
    "InputFile",
    "LLMMetadata",
    "ResultFile",
    "TraceEntry",
]

SCHEMA_VERSION = "1.0.4"
MAX_RESULT_BYTES = 16 << 20
"""The default size limit of one result file (`daemon.max_result_bytes`, `validate --max-bytes`)."""
RUN_ID_PATTERN = r"^step[1-6]_[0-9]{8}_[0-9]{6}_[0-9a-f]{6}$"
HASH_PATTERN = r"^sha256:[0-9a-f]{6,64}$"
TIMESTAMP_PATTERN = (
    r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]+)?(Z|[+-][0-9]{2}:[0-9]{2})$"
)
RELATIVE_PATH_PATTERN = r"^(?!/)(?!([^/]*/)*\.\.(/|$))"
"""Not absolute, no `..` component: the schema's `relative_path`, a path inside the results dir."""
RELATIVE_PATH_RULE = "must be a relative path inside the results dir"

# Lists a result may hold: generous for a pipeline step, and small enough that checking one is
# milliseconds (200,000 inputs took seconds of CPU each). The schema says the same (maxItems).
MAX_FILES = 10_000
"""inputs and outputs, each."""
MAX_TRACE = 1_000
"""llm_metadata.llm_reasoning_trace (agents keep the last 10)."""
MAX_NODES = 4_096
"""cluster_resources.nodes."""

QueryType = Literal[
    "residue_analysis",
    "prng_state",
    "statistical",
    "config_generation",
    "orchestration",
    "general",
]
QUERY_TYPES: tuple[str, ...] = get_args(QueryType)


def _integral_float(value: object) -> object:
    # JSON Schema counts 2.0 as an integer; pydantic's strict int would not.
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


Count = Annotated[int, BeforeValidator(_integral_float), Field(ge=0)]
Text = Annotated[str, Field(max_length=256)]


def _inside_results_dir(value: str) -> str:
    if value.startswith("/") or ".." in value.split("/"):
        raise ValueError(f"{RELATIVE_PATH_RULE}, got {json.dumps(value)}")
    return value


RelativePath = Annotated[
    str, Field(min_length=1, max_length=4096), AfterValidator(_inside_results_dir)
]
RunId = Annotated[str, Field(pattern=RUN_ID_PATTERN)]


class _Document(BaseModel):
    """Strict like the schema: no coercion, no unknown keys, `null` only where the schema allows."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)
    _nullable: ClassVar[frozenset[str]] = frozenset()

    @model_validator(mode="before")
    @classmethod
    def _no_null(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for key, value in data.items():
                if value is None and key in cls.model_fields and key not in cls._nullable:
                    raise ValueError(f"{key}: null is not allowed")
        return data


class InputFile(_Document):
    file: RelativePath
    hash: Annotated[str, Field(pattern=HASH_PATTERN)] | None = None
    required: bool | None = None


class TraceEntry(_Document):
    timestamp: Annotated[str, Field(pattern=TIMESTAMP_PATTERN)]
    model: ServerName
    query_type: QueryType
    tokens: Count
    latency_ms: Count | None = None
    degraded: bool | None = None


class LLMMetadata(_Document):
    orchestrator_model: Text | None = None
    math_model: Text | None = None
    orchestrator_calls: Count | None = None
    math_calls: Count | None = None
    total_tokens_generated: Count | None = None
    llm_reasoning_trace: Annotated[list[TraceEntry], Field(max_length=MAX_TRACE)] | None = None
    llm_decision: Text | None = None
    human_override_requested: bool | None = None


class ClusterResources(_Document):
    nodes: (
        Annotated[
            list[Annotated[str, Field(min_length=1, max_length=253)]],
            Field(max_length=MAX_NODES),
        ]
        | None
    ) = None
    total_gpus: Count | None = None


StepName = Literal[
    "window_optimizer",
    "scorer_meta_optimizer",
    "full_scoring",
    "ml_meta_optimizer",
    "anti_overfit_training",
    "prediction",
]
FollowUp = Literal[
    "scorer_meta_agent",
    "full_scoring_agent",
    "ml_meta_agent",
    "reinforcement_agent",
    "prediction_agent",
    "none",
]


class AgentMetadata(_Document):
    _nullable = frozenset({"parent_run_id"})

    run_id: RunId | None = None
    inputs: Annotated[list[InputFile], Field(max_length=MAX_FILES)] | None = None
    outputs: Annotated[list[RelativePath], Field(max_length=MAX_FILES)] | None = None
    parent_run_id: RunId | None = None
    pipeline_step: Annotated[int, BeforeValidator(_integral_float), Field(ge=1, le=6)]
    pipeline_step_name: StepName
    follow_up_agent: FollowUp
    confidence: Annotated[float, Field(ge=0, le=1)]
    suggested_params: dict[str, Any] | None = None
    reasoning: Annotated[str, Field(max_length=20000)] | None = None
    success_criteria_met: bool
    retry_count: Count | None = None
    cluster_resources: ClusterResources | None = None
    llm_metadata: LLMMetadata | None = None

    @model_validator(mode="after")
    def _matches_pipeline_table(self) -> AgentMetadata:
        row = step(self.pipeline_step)
        if self.pipeline_step_name != row.name:
            raise ValueError(
                f"pipeline_step_name: step {row.number} is {row.name!r}, "
                f"got {self.pipeline_step_name!r}"
            )
        if self.follow_up_agent != row.follow_up_agent:
            raise ValueError(
                f"follow_up_agent: step {row.number} is followed by {row.follow_up_agent!r}, "
                f"got {self.follow_up_agent!r}"
            )
        if self.run_id is not None and not self.run_id.startswith(f"step{row.number}_"):
            raise ValueError(f"run_id: a step {row.number} run id starts with 'step{row.number}_'")
        return self

    @property
    def retries(self) -> int:
        return self.retry_count or 0

    @property
    def human_override_requested(self) -> bool:
        return bool(self.llm_metadata and self.llm_metadata.human_override_requested)


class ResultFile(_Document):
    """The whole file: any payload the agent likes, plus `agent_metadata`."""

    model_config = ConfigDict(strict=True, extra="allow", frozen=True)

    schema_version: Literal["1.0.4"] | None = None
    agent_metadata: AgentMetadata
