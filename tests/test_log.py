"""Logging: JSON lines off a terminal, syslog priority prefixes when stderr is the journal."""

from __future__ import annotations

import io
import json
import os
import socket
from pathlib import Path

import structlog

from prng_daemon.log import configure_logging, is_journal, pick_format
from prng_daemon.log.journal import field_name
from prng_daemon.log.sentences import sentence


def test_json_lines_carry_level_and_fields() -> None:
    out = io.StringIO()
    configure_logging("json", stream=out)
    structlog.get_logger().warning("server.restarting", server="math", attempt=2)
    line = json.loads(out.getvalue())
    assert line["event"] == "server.restarting" and line["level"] == "warning"
    assert line["server"] == "math" and line["attempt"] == 2


def test_journal_lines_have_priority_prefixes() -> None:
    out = io.StringIO()
    configure_logging("journal", stream=out)
    log = structlog.get_logger()
    log.error("result.rejected")
    log.warning("decision.degraded")
    log.info("result.seen")
    prefixes = [line[:3] for line in out.getvalue().splitlines()]
    assert prefixes == ["<3>", "<4>", "<6>"]
    assert json.loads(out.getvalue().splitlines()[0][3:])["event"] == "result.rejected"


def test_level_filter_drops_debug() -> None:
    out = io.StringIO()
    configure_logging("json", level="info", stream=out)
    structlog.get_logger().debug("noise")
    assert out.getvalue() == ""


def test_journal_detected_only_for_the_named_stream() -> None:
    a, b = socket.socketpair()
    with a, b, os.fdopen(os.dup(a.fileno()), "w") as stream:
        info = os.fstat(stream.fileno())
        assert is_journal(stream, f"{info.st_dev}:{info.st_ino}")
        assert pick_format(stream, f"{info.st_dev}:{info.st_ino}") == "journal"
        assert not is_journal(stream, f"{info.st_dev}:{info.st_ino + 1}")
        assert pick_format(stream, None) == "json"


def _journal_entry(datagram: bytes) -> dict[str, str]:
    """Parse the native protocol as journald does: KEY=value lines, or KEY, newline, a 64-bit
    little-endian length, the value, newline."""
    fields = {}
    while datagram:
        line, _, rest = datagram.partition(b"\n")
        if b"=" in line:
            key, _, value = line.partition(b"=")
            datagram = rest
        else:
            key, size = line, int.from_bytes(rest[:8], "little")
            value, datagram = rest[8 : 8 + size], rest[9 + size :]
        fields[key.decode()] = value.decode()
    return fields


def test_native_journal_entries_carry_fields(tmp_path: Path) -> None:
    """`journalctl RUN_ID=...` works because each entry carries the bound context as fields."""
    path = tmp_path / "journal.socket"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as journal:
        journal.bind(str(path))
        out = io.StringIO()
        configure_logging("journal", stream=out, journal_socket=path)
        log = structlog.get_logger().bind(run_id="step3_20251201_143022_abc123", file="r.json")
        log.warning("decision.escalated", reason="low confidence", step=3)
        entry = _journal_entry(journal.recv(65536))
    assert out.getvalue() == "", "sent natively, not duplicated on stderr"
    assert entry["PRIORITY"] == "4" and entry["EVENT"] == "decision.escalated"
    assert entry["RUN_ID"] == "step3_20251201_143022_abc123" and entry["FILE"] == "r.json"
    assert entry["SYSLOG_IDENTIFIER"] == "prng-llm-daemon"
    assert entry["REASON"] == "low confidence" and entry["STEP"] == "3"
    assert entry["MESSAGE"] == "step 3/6 full_scoring: escalated to the operator: low confidence"


def test_field_names_are_sanitised_and_never_take_the_journals_own() -> None:
    assert field_name("run_id") == "RUN_ID" and field_name("_sd-x.y") == "SD_X_Y"
    assert field_name("message") == "PRNG_MESSAGE" and field_name("unit") == "PRNG_UNIT"
    assert field_name("priority") == "PRNG_PRIORITY" and field_name("") == "FIELD"


def test_journal_messages_are_sentences_a_person_scans(tmp_path: Path) -> None:
    """A file's story reads as sentences; a hostile name stays one escaped line; an event with
    no template, or one missing a fact its template wants, still reads `event key=value`; a
    traceback is a multi-line field of its own, not part of the sentence."""
    path = tmp_path / "journal.socket"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as journal:
        journal.bind(str(path))
        configure_logging("journal", stream=io.StringIO(), journal_socket=path)
        rid = "step3_20251201_143022_abc123"
        log = structlog.get_logger().bind(file="r.json", run_id=rid, step=3)
        log.info("result.validated", source="watch", sha256="ab", pipeline_run=rid)
        log.info("decision.made", decision="proceed", decided_by="llm", confidence=0.82)
        log.info("agent.started", agent="ml_meta_agent", pid=7, decision="proceed",
                 launcher="systemd", started_as=f"prng-agent-{rid}.service")  # fmt: skip
        log.error("agent.exited", agent="ml_meta_agent", pid=7, exit_code=3, duration_s=1.5)
        structlog.get_logger().error(
            "result.rejected", file="evil\n\x1b[31m.json", reason="bad", pointer="/x"
        )
        structlog.get_logger().info("watcher.overflow", dropped=3)
        structlog.get_logger().info("command.applied", message="approved: x -> started a")
        structlog.get_logger().info("decision.made", step=2)  # no decision: the generic form
        try:
            raise ValueError("boom")
        except ValueError:
            structlog.get_logger().exception("task.crashed", task="engine", error="boom",
                                             crashes=1)  # fmt: skip
        entries = [_journal_entry(journal.recv(65536)) for _ in range(9)]
    assert [e["MESSAGE"] for e in entries[:-1]] == [
        f"step 3/6 full_scoring: r.json validated, run {rid}",
        "step 3/6 full_scoring: proceed (llm, 82 %)",
        f"step 3/6 full_scoring: proceed -> ml_meta_agent started as prng-agent-{rid}.service",
        "step 3/6 full_scoring: ml_meta_agent failed (exit 3) after 1.5 s",
        "evil\\n\\x1b[31m.json rejected: bad (at /x)",
        "watcher.overflow dropped=3",
        "operator: approved: x -> started a",
        "decision.made step=2",
    ]
    crashed = entries[-1]
    assert crashed["MESSAGE"] == "task engine crashed (1x): boom"
    assert crashed["EXCEPTION"].startswith("Traceback") and "\n" in crashed["EXCEPTION"]
    assert entries[6]["PRNG_MESSAGE"] == "approved: x -> started a", "kept, not the sentence"
    assert entries[4]["FILE"] == "evil\n\x1b[31m.json", "the field keeps the name as it is"


def test_multiline_values_use_the_binary_form() -> None:
    from prng_daemon.log.journal import encode_entry

    data = encode_entry({"MESSAGE": "a\nb", "X": "y"})
    assert data == b"MESSAGE\n" + (3).to_bytes(8, "little") + b"a\nb\nX=y\n"


def test_without_a_journal_the_prefixed_line_is_the_fallback(tmp_path: Path) -> None:
    out = io.StringIO()
    configure_logging("journal", stream=out, journal_socket=tmp_path / "missing.socket")
    structlog.get_logger().error("result.rejected", file="x.json")
    assert out.getvalue().startswith("<3>{")


def test_console_lines_escape_control_characters_but_keep_traceback_lines() -> None:
    out = io.StringIO()
    configure_logging("console", stream=out)
    log = structlog.get_logger()
    log.error("result.rejected", file="evil\n\x1b[31mred.json", reason="bad\rline")
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("result.crashed", file="x\x1b.json")
    text = out.getvalue()
    assert "\x1b" not in text and "\r" not in text
    first, *rest = text.splitlines()
    assert "file=evil\\n\\x1b[31mred.json" in first and "reason=bad\\rline" in first
    assert "x\\x1b.json" in rest[0]
    assert any(line.startswith("Traceback") for line in rest), "the traceback keeps its lines"


def test_an_agents_end_reads_as_what_happened() -> None:
    ended = {"event": "agent.exited", "agent": "prediction_agent", "step": 6, "duration_s": 2.5}
    assert [sentence({**ended, "exit_code": code}) for code in (0, -15, None)] == [
        "step 6/6 prediction: prediction_agent succeeded after 2.5 s",
        "step 6/6 prediction: prediction_agent was killed by signal 15 after 2.5 s",
        "step 6/6 prediction: prediction_agent ended, exit status unknown after 2.5 s",
    ]
