"""Child output: a bounded, rotated file per child; errors and milestones reach the log."""

from __future__ import annotations

import asyncio
from pathlib import Path

from structlog.testing import capture_logs

from prng_daemon.log import get_logger
from prng_daemon.servers.childlog import ChildLog, RotatingFile, classify


def test_file_rotates_and_keeps_only_the_backups(tmp_path: Path) -> None:
    out = RotatingFile(tmp_path / "math.log", max_bytes=4096, backups=2)
    for i in range(100):
        out.write(f"{i:04d} ".encode() * 40 + b"\n")
    out.close()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["math.log", "math.log.1", "math.log.2"]
    assert all(p.stat().st_size <= 4096 for p in tmp_path.iterdir())
    assert (tmp_path / "math.log").read_text().rstrip().endswith("0099")


def test_llama_server_lines_are_classified() -> None:
    assert classify(b"0.00.010.251 I srv  llama_server: model loaded") == "info"
    assert classify(b"0.00.002.682 W srv  llama_server: security: no API key is set") == "warning"
    assert classify(b"0.01.000.000 E srv  load_model: failed to load model") == "error"
    assert classify(b"ggml_backend_cuda_buffer_type_alloc_buffer: out of memory") == "error"
    assert classify(b"0.00.023.630 I slot print_timing: id  0 | task 0 | eval time") is None


def test_pump_copies_everything_and_logs_notable_lines(tmp_path: Path) -> None:
    async def body() -> ChildLog:
        stream = asyncio.StreamReader()
        stream.feed_data(b"0.1 I srv  load_model: loading\n0.2 I srv  main: model loaded\n")
        stream.feed_data(b"CUDA error: out of memory")  # no newline: the child died mid-line
        stream.feed_eof()
        output = ChildLog(tmp_path / "o.log", 1 << 20, 1, get_logger(server="orchestrator"))
        await output.pump(stream)
        output.close()
        return output

    with capture_logs() as logs:
        output = asyncio.run(body())
    assert [(e["log_level"], e["line"]) for e in logs] == [
        ("info", "0.2 I srv  main: model loaded"),
        ("error", "CUDA error: out of memory"),
    ]
    assert output.tail()[-1] == "CUDA error: out of memory"
    assert (tmp_path / "o.log").read_bytes().endswith(b"model loaded\nCUDA error: out of memory")
