"""The Rust gate in front of jsonschema: what it passes, jsonschema passes too.

load_result asks jsonschema-rs first and runs jsonschema (our messages, our ECMA `$`) only when
the gate does not pass a document. Every decision must stay jsonschema's: these tests put the
gate and jsonschema side by side on every document the schema tests know, on thousands made by
editing the example one field at a time, and on the step table in full.
"""

from __future__ import annotations

import copy
import itertools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from prng_daemon.document.pipeline import PIPELINE
from prng_daemon.errors import ResultRejected
from prng_daemon.handlers.validate import (
    MAX_DEPTH,
    Deferred,
    _read_regular_file,
    _surely_valid,
    load_result,
    parse_result_bytes,
    schema_problems,
)

from .test_schema import EXAMPLE, INVALID, VALID, make

ODD_VALUES: list[object] = [
    None, True, False, 0, 1, 2, 6, 7, -1, 2.0, 2.5, 0.5, 1.5, -0.0, 1e300, -1e300,
    10**30, -(10**30), 10**400, "", "x", "1.0.4", "none", "math", "step1_", "/abs", "..",
    "a/../..", "a/..\n", "ok.json\n", "sha256:abc123", "sha256:abc123\n", "sha256:ABC123",
    "step2_20251201_150000_0f0f0f", "step2_20251201_150000_0f0f0f\n", "step2_20251201_150000_0f0f0",
    "2025-12-01T15:32:00Z", "2025-12-01T15:32:00Z\n", "2025-12-01T15:32:00.5+01:00",
    "\ud800", "..\ud800", "x" * 257, "x" * 20001, "\U0001f600" * 20000, [], [1], [{}], {},
    {"a": 1}, {"file": "x.json"}, [{"file": "../x"}],
]  # fmt: skip
"""Values that sit on or just past a rule of the schema, or that a Rust port could read
differently from Python (big integers, integral floats, -0.0, lone surrogates, astral
characters, trailing newlines)."""


def _slots(node: object, path: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """Every place in a document a value sits, parents first."""
    yield path
    if isinstance(node, dict):
        for key, child in node.items():
            yield from _slots(child, (*path, key))
    elif isinstance(node, list):
        for index, child in enumerate(node):
            yield from _slots(child, (*path, index))


def _edited(doc: dict[str, Any], path: tuple[Any, ...], edit: Any) -> dict[str, Any]:
    """A copy of doc with edit(holder, key) applied where path points."""
    out = copy.deepcopy(doc)
    *parents, last = path
    node: Any = out
    for part in parents:
        node = node[part]
    edit(node, last)
    return out


def _mutants() -> Iterator[dict[str, Any]]:
    """The example with one value replaced, one key dropped, or one unknown key added."""
    for path in list(_slots(EXAMPLE))[1:]:
        for value in ODD_VALUES:
            yield _edited(EXAMPLE, path, lambda node, key, v=value: node.__setitem__(key, v))
        if isinstance(path[-1], str):
            yield _edited(EXAMPLE, path, lambda node, key: node.pop(key))
            yield _edited(EXAMPLE, path, lambda node, key: node.__setitem__("__probe__", 0))


def _step_table() -> Iterator[dict[str, Any]]:
    """Every step with every step name, follow-up agent and run_id prefix: the if/then rules."""
    names = [row.name for row in PIPELINE]
    agents = [row.follow_up_agent for row in PIPELINE]
    for step, name, agent, prefix in itertools.product(range(1, 7), names, agents, range(1, 7)):
        doc = copy.deepcopy(EXAMPLE)
        doc["agent_metadata"].update(
            pipeline_step=step,
            pipeline_step_name=name,
            follow_up_agent=agent,
            run_id=f"step{prefix}_20251201_150000_0f0f0f",
        )
        yield doc


def _assert_gate_agrees(doc: dict[str, Any]) -> bool:
    """The invariant: passed by the gate => no problem for jsonschema. Returns the gate's word."""
    passed = _surely_valid(doc)
    if passed:
        assert schema_problems(doc) == [], json.dumps(doc, ensure_ascii=True)[:300]
    return passed


@pytest.mark.parametrize("name", VALID)
def test_the_gate_passes_every_valid_document_of_the_schema_tests(name: str) -> None:
    """It is the fast path for real results: every one the schema tests accept goes through it."""
    assert _assert_gate_agrees(make(VALID[name]))


@pytest.mark.parametrize("name", INVALID)
def test_the_gate_refuses_every_invalid_document_of_the_schema_tests(name: str) -> None:
    assert not _assert_gate_agrees(make(INVALID[name]))


def test_the_gate_never_passes_what_jsonschema_refuses_one_edit_away() -> None:
    passed = refused = 0
    for doc in _mutants():
        if _assert_gate_agrees(doc):
            passed += 1
        else:
            refused += 1
    # Both sides are exercised: the edits are not all harmless, nor all fatal.
    assert passed > 100 and refused > 500, (passed, refused)


def test_the_gate_follows_the_step_table_rule_for_rule() -> None:
    verdicts = [_assert_gate_agrees(doc) for doc in _step_table()]
    assert sum(verdicts) == len(PIPELINE)  # only the table's own rows


def test_what_the_gate_cannot_read_goes_to_jsonschema_whose_verdict_stands() -> None:
    """A lone surrogate where the schema looks (a pattern's subject) is beyond the gate, not a
    schema violation: jsonschema passes it, and the models' refusal is the answer, as it was
    before the gate."""
    text = json.dumps(EXAMPLE).replace('"bidirectional_survivors.json"', '"..\\ud800"')
    doc = json.loads(text)
    assert not _surely_valid(doc)
    assert schema_problems(doc) == []
    with pytest.raises(ResultRejected, match="unable to parse raw data as a unicode string") as e:
        parse_result_bytes(text.encode())
    assert e.value.pointer == "/agent_metadata/inputs/0/file"


def test_a_document_the_gate_refuses_gets_jsonschemas_message_and_pointer(tmp_path: Path) -> None:
    doc = copy.deepcopy(EXAMPLE)
    doc["agent_metadata"]["parent_run_id"] = "step1_20251201_143022_abc123\n"
    path = tmp_path / "r.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(ResultRejected) as caught:
        load_result(path, root=tmp_path)
    assert caught.value.pointer == "/agent_metadata/parent_run_id"
    assert "is not valid under any of the given schemas" in caught.value.reason


def _nested(levels: int) -> bytes:
    """A valid result whose payload brings the document to exactly `levels` levels."""
    payload: object = 0  # the scalar is the deepest level
    for _ in range(levels - 2):
        payload = [payload]
    return json.dumps({**EXAMPLE, "payload": payload}).encode()


def test_depth_limit_counts_the_scalar_level() -> None:
    parse_result_bytes(_nested(MAX_DEPTH))
    with pytest.raises(ResultRejected, match=f"nested deeper than {MAX_DEPTH} levels"):
        parse_result_bytes(_nested(MAX_DEPTH + 1))


def test_the_read_goes_on_past_the_size_fstat_gave() -> None:
    """A /proc file says it is 0 bytes: what decides is what the reads return, all of it, and
    the limit holds against that (a file that grows while read is this case)."""
    proc = Path("/proc/self/cmdline")
    whole = proc.read_bytes()
    assert proc.stat().st_size == 0 < len(whole)
    assert _read_regular_file(proc, 1 << 20) == whole
    with pytest.raises(ResultRejected, match=f"grew past the {len(whole) - 1}-byte limit"):
        _read_regular_file(proc, len(whole) - 1)


def test_a_file_outside_root_is_still_refused_when_named_through_a_subdirectory(
    tmp_path: Path,
) -> None:
    """The shortcut (a file named directly in root needs no resolving) leaves other names to
    resolve(): a symlinked subdirectory leading out is refused."""
    root = tmp_path / "results"
    outside = tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (outside / "r.json").write_text(json.dumps(EXAMPLE))
    (root / "sub").symlink_to(outside)
    with pytest.raises(ResultRejected, match="lies outside the results directory"):
        load_result(root / "sub" / "r.json", root=root)
    (root / "r.json").write_text(json.dumps(EXAMPLE))
    assert load_result(root / "r.json", root=root).document.agent_metadata.pipeline_step == 2


def test_the_cheap_check_finishes_a_small_valid_file_as_the_full_one_does(tmp_path: Path) -> None:
    path = tmp_path / "r.json"
    path.write_text(json.dumps(EXAMPLE))
    cheap = load_result(path, root=tmp_path, cheap_bytes=1 << 16)
    assert cheap == load_result(path, root=tmp_path)


def test_the_cheap_check_defers_a_big_file_and_one_needing_jsonschema(tmp_path: Path) -> None:
    """Over cheap_bytes, or not passed by the gate: Deferred, and the full check decides."""
    big = tmp_path / "big.json"
    big.write_text(json.dumps(EXAMPLE))
    with pytest.raises(Deferred):
        load_result(big, cheap_bytes=big.stat().st_size - 1)
    assert load_result(big).size == big.stat().st_size
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(make(INVALID["confidence_above_1"])))
    with pytest.raises(Deferred):
        load_result(bad, cheap_bytes=1 << 16)
    with pytest.raises(ResultRejected) as caught:
        load_result(bad)
    assert caught.value.pointer == "/agent_metadata/confidence"


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b'{"x": "\xff"}', "not UTF-8"),
        (b"[1, 2]", "top level is a JSON list"),
        (b"[" * 5000 + b"]" * 5000, "nested deeper than 64 levels"),
        (b" " * 40_000, "over the 32768-byte limit"),
    ],
)
def test_the_cheap_check_refuses_what_is_refused_before_the_schema(
    tmp_path: Path, data: bytes, reason: str
) -> None:
    """Cheap refusals need no second look: the same reason, from the cheap check itself."""
    path = tmp_path / "r.json"
    path.write_bytes(data)
    for cheap in (None, 1 << 14):
        with pytest.raises(ResultRejected, match=reason):
            load_result(path, max_bytes=1 << 15, cheap_bytes=cheap)
