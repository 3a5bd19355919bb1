"""Logging: JSON lines off a terminal, syslog priority prefixes when stderr is the journal."""

from __future__ import annotations

import io
import json
import os
import socket
from pathlib import Path

import structlog

from prng_daemon.log import configure_logging, is_journal, pick_format


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
    fields = {}
    for line in datagram.decode().splitlines():
        key, _, value = line.partition("=")
        fields[key] = value
    return fields


def test_native_journal_entries_carry_fields(tmp_path: Path) -> None:
    """`journalctl RUN_ID=...` works because each entry carries the bound context as fields."""
    path = tmp_path / "journal.socket"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as journal:
        journal.bind(str(path))
        out = io.StringIO()
        configure_logging("journal", stream=out, journal_socket=path)
        log = structlog.get_logger().bind(run_id="step3_20251201_143022_abc123", file="r.json")
        log.warning("decision.escalated", reason="low confidence")
        entry = _journal_entry(journal.recv(65536))
    assert out.getvalue() == "", "sent natively, not duplicated on stderr"
    assert entry["PRIORITY"] == "4" and entry["EVENT"] == "decision.escalated"
    assert entry["RUN_ID"] == "step3_20251201_143022_abc123" and entry["FILE"] == "r.json"
    assert entry["SYSLOG_IDENTIFIER"] == "prng-llm-daemon"
    assert json.loads(entry["MESSAGE"])["reason"] == "low confidence"


def test_multiline_values_use_the_binary_form() -> None:
    from prng_daemon.journal import encode_entry

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
