"""Logging: JSON lines off a terminal, syslog priority prefixes when stderr is the journal."""

from __future__ import annotations

import io
import json
import os
import socket

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
