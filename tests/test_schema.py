"""Schema v1.0.4: the JSON Schema and the pydantic models agree on a corpus of documents."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from prng_daemon.document.metadata import (
    MAX_FILES,
    MAX_NODES,
    MAX_TRACE,
    RELATIVE_PATH_PATTERN,
    ResultFile,
)
from prng_daemon.document.pipeline import PIPELINE
from prng_daemon.handlers.validate import result_schema, schema_problems

DATA = Path(__file__).parent / "data"
EXAMPLE: dict[str, Any] = json.loads((DATA / "step2_result.json").read_text())

Edit = Callable[[dict[str, Any]], object]


def meta(doc: dict[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = doc["agent_metadata"]
    return result


def setm(key: str, value: object) -> Edit:
    return lambda d: meta(d).__setitem__(key, value)


def dropm(key: str) -> Edit:
    return lambda d: meta(d).pop(key)


def setllm(key: str, value: object) -> Edit:
    return lambda d: meta(d)["llm_metadata"].__setitem__(key, value)


def settrace(key: str, value: object) -> Edit:
    return lambda d: meta(d)["llm_metadata"]["llm_reasoning_trace"][0].__setitem__(key, value)


def setinput(n: int, path: str) -> Edit:
    """inputs[n].file = path (the example's one input is repeated up to n)."""

    def edit(d: dict[str, Any]) -> None:
        inputs = meta(d)["inputs"]
        inputs.extend(copy.deepcopy(inputs[0]) for _ in range(n + 1 - len(inputs)))
        inputs[n]["file"] = path

    return edit


def repeat(key: str, count: int, item: Callable[[dict[str, Any]], object]) -> Edit:
    """agent_metadata[key] = `count` copies of item(document)."""
    return lambda d: meta(d).__setitem__(key, [item(d) for _ in range(count)])


def one_input(d: dict[str, Any]) -> object:
    return dict(meta(d)["inputs"][0])


def step_row(n: int) -> Edit:
    row = PIPELINE[n - 1]

    def edit(d: dict[str, Any]) -> None:
        meta(d).update(
            pipeline_step=n, pipeline_step_name=row.name, follow_up_agent=row.follow_up_agent
        )

    return edit


VALID: dict[str, Edit] = {
    "proposal_example": lambda d: None,
    "minimal": lambda d: d.__setitem__(
        "agent_metadata",
        {
            k: meta(d)[k]
            for k in (
                "pipeline_step",
                "pipeline_step_name",
                "follow_up_agent",
                "confidence",
                "success_criteria_met",
            )
        },
    ),  # fmt: skip
    "step1": step_row(1),
    "step3": step_row(3),
    "step4": step_row(4),
    "step5": step_row(5),
    "step6_final": step_row(6),
    "confidence_zero": setm("confidence", 0),
    "confidence_one": setm("confidence", 1),
    "integral_float_step": setm("pipeline_step", 2.0),
    "parent_null": setm("parent_run_id", None),
    "own_run_id": setm("run_id", "step2_20251201_150000_0f0f0f"),
    "full_sha256": lambda d: meta(d)["inputs"][0].__setitem__("hash", "sha256:" + "a" * 64),
    "trace_with_latency_and_degraded": lambda d: meta(d)["llm_metadata"]["llm_reasoning_trace"][
        0
    ].update(latency_ms=12, degraded=True),
    "trace_offset_timestamp": settrace("timestamp", "2025-12-01T15:32:00.5+01:00"),
    "extra_payload": lambda d: d.__setitem__("anything", [1, {"x": None}]),
    "empty_llm_metadata": setm("llm_metadata", {}),
    "nested_params": setm("suggested_params", {"a": {"b": [1, 2.5, None]}}),
    "many_retries": setm("retry_count", 7),
    "input_in_subdir": setinput(0, "step1/survivors.json"),
    "input_dot_dir": setinput(0, "./survivors.json"),
    "input_dots_inside_names": setinput(0, "a..b/..c/d../...json"),
    "input_dotdot_newline_is_a_name": setinput(0, "a/..\n"),
    "output_in_subdir": setm("outputs", ["configs/optimal.json"]),
    "inputs_at_the_limit": repeat("inputs", MAX_FILES, one_input),
    "outputs_at_the_limit": repeat("outputs", MAX_FILES, lambda d: "out.json"),
    "trace_at_the_limit": lambda d: meta(d)["llm_metadata"].__setitem__(
        "llm_reasoning_trace", meta(d)["llm_metadata"]["llm_reasoning_trace"] * MAX_TRACE
    ),
}

INVALID: dict[str, Edit] = {
    "no_agent_metadata": lambda d: d.pop("agent_metadata"),
    "agent_metadata_list": lambda d: d.__setitem__("agent_metadata", []),
    "missing_step": dropm("pipeline_step"),
    "missing_confidence": dropm("confidence"),
    "missing_success": dropm("success_criteria_met"),
    "confidence_above_1": setm("confidence", 1.5),
    "confidence_huge": setm("confidence", 2e62),
    "confidence_negative": setm("confidence", -0.01),
    "confidence_string": setm("confidence", "0.9"),
    "confidence_bool": setm("confidence", True),
    "step_zero": setm("pipeline_step", 0),
    "step_seven": setm("pipeline_step", 7),
    "step_fractional": setm("pipeline_step", 2.5),
    "step_string": setm("pipeline_step", "2"),
    "step_bool": setm("pipeline_step", True),
    "step_name_mismatch": setm("pipeline_step_name", "full_scoring"),
    "unknown_step_name": setm("pipeline_step_name", "magic"),
    "follow_up_mismatch": setm("follow_up_agent", "prediction_agent"),
    "unknown_follow_up": setm("follow_up_agent", "rm -rf /"),
    "retry_negative": setm("retry_count", -1),
    "retry_null": setm("retry_count", None),
    "hash_without_prefix": lambda d: meta(d)["inputs"][0].__setitem__("hash", "abc123"),
    "hash_not_hex": lambda d: meta(d)["inputs"][0].__setitem__("hash", "sha256:xyz123"),
    "hash_trailing_newline": lambda d: meta(d)["inputs"][0].__setitem__("hash", "sha256:abc123\n"),
    "parent_run_id_bad": setm("parent_run_id", "step1-2025"),
    "parent_run_id_newline": setm("parent_run_id", "step1_20251201_143022_abc123\n"),
    "run_id_wrong_step": setm("run_id", "step3_20251201_150000_0f0f0f"),
    "typo_field": setm("retry_cont", 1),
    "success_string": setm("success_criteria_met", "yes"),
    "outputs_not_list": setm("outputs", "x.json"),
    "llm_calls_negative": setllm("math_calls", -3),
    "llm_override_string": setllm("human_override_requested", "false"),
    "llm_unknown_field": setllm("temperature", 0.7),
    "trace_bad_model": settrace("model", "gpt"),
    "trace_bad_query_type": settrace("query_type", "vibes"),
    "trace_bad_timestamp": settrace("timestamp", "yesterday"),
    "trace_missing_tokens": lambda d: meta(d)["llm_metadata"]["llm_reasoning_trace"][0].pop(
        "tokens"
    ),
    "cluster_gpus_negative": lambda d: meta(d)["cluster_resources"].__setitem__("total_gpus", -1),
    "suggested_params_list": setm("suggested_params", [1, 2]),
    "schema_version_wrong": lambda d: d.__setitem__("schema_version", "1.0.3"),
    "reasoning_too_long": setm("reasoning", "x" * 20001),
    "input_absolute": setinput(3, "/etc/passwd"),
    "input_climbs_out": setinput(0, "../../etc/passwd"),
    "input_climbs_out_midway": setinput(0, "step1/../../secret.json"),
    "input_is_dotdot": setinput(0, ".."),
    "input_ends_in_dotdot": setinput(0, "step1/.."),
    "output_absolute": setm("outputs", ["ok.json", "/var/lib/prng-llm-daemon/ledger.sqlite3"]),
    "output_climbs_out": setm("outputs", ["../x.json"]),
    "output_empty": setm("outputs", [""]),
    "inputs_over_the_limit": repeat("inputs", MAX_FILES + 1, one_input),
    "outputs_over_the_limit": repeat("outputs", MAX_FILES + 1, lambda d: "out.json"),
    "trace_over_the_limit": lambda d: meta(d)["llm_metadata"].__setitem__(
        "llm_reasoning_trace", meta(d)["llm_metadata"]["llm_reasoning_trace"] * (MAX_TRACE + 1)
    ),
    "nodes_over_the_limit": lambda d: meta(d)["cluster_resources"].__setitem__(
        "nodes", ["zeus"] * (MAX_NODES + 1)
    ),
}


def make(edit: Edit) -> dict[str, Any]:
    doc = copy.deepcopy(EXAMPLE)
    edit(doc)
    return doc


def pydantic_accepts(doc: dict[str, Any]) -> bool:
    try:
        ResultFile.model_validate(doc)
    except ValidationError:
        return False
    return True


def test_corpus_is_large_enough() -> None:
    assert len(VALID) + len(INVALID) >= 30


@pytest.mark.parametrize("name", VALID)
def test_valid_documents_pass_schema_and_models(name: str) -> None:
    doc = make(VALID[name])
    assert schema_problems(doc) == []
    assert pydantic_accepts(doc)


@pytest.mark.parametrize("name", INVALID)
def test_invalid_documents_fail_schema_and_models(name: str) -> None:
    doc = make(INVALID[name])
    assert schema_problems(doc) != [], "the JSON Schema accepted it"
    assert not pydantic_accepts(doc), "the pydantic models accepted it"


def test_schema_encodes_the_pipeline_table() -> None:
    """The per-step if/then rules in the schema are the pipeline table, row for row."""
    rules = result_schema()["$defs"]["agent_metadata"]["allOf"]
    encoded = [
        (
            r["if"]["properties"]["pipeline_step"]["const"],
            r["then"]["properties"]["pipeline_step_name"]["const"],
            r["then"]["properties"]["follow_up_agent"]["const"],
        )
        for r in rules
    ]
    assert encoded == [(s.number, s.name, s.follow_up_agent) for s in PIPELINE]


def test_schema_problem_names_the_field() -> None:
    problems = schema_problems(make(setm("confidence", 1.5)))
    assert problems == [("/agent_metadata/confidence", "1.5 is greater than the maximum of 1")]


def test_models_list_the_pipeline_table_names() -> None:
    """metadata.py spells the step names and follow-up agents out for the type checker."""
    from typing import get_args

    from prng_daemon.document.metadata import FollowUp, StepName

    assert get_args(StepName) == tuple(s.name for s in PIPELINE)
    assert get_args(FollowUp) == tuple(s.follow_up_agent for s in PIPELINE)


def test_a_path_outside_the_results_dir_is_named_with_its_pointer() -> None:
    problems = schema_problems(make(setinput(3, "/etc/passwd")))
    assert problems == [
        (
            "/agent_metadata/inputs/3/file",
            'must be a relative path inside the results dir, got "/etc/passwd"',
        )
    ]


def test_a_list_over_its_limit_is_one_short_problem() -> None:
    """The count, not the list: jsonschema's own message would quote all 200,000 entries."""
    problems = schema_problems(make(repeat("inputs", 200_000, one_input)))
    assert problems == [
        ("/agent_metadata/inputs", f"has 200000 items, more than the {MAX_FILES} allowed")
    ]


def test_no_message_quotes_a_huge_value() -> None:
    problems = schema_problems(make(setm("run_id", "x" * 1_000_000)))
    assert {pointer for pointer, _ in problems} == {"/agent_metadata/run_id"}
    assert all(len(message) <= 300 for _, message in problems)


def test_models_use_the_schemas_relative_path_pattern() -> None:
    assert result_schema()["$defs"]["relative_path"]["pattern"] == RELATIVE_PATH_PATTERN
