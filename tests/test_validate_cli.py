"""`prng-llm-daemon validate`: OK, or every error with its pointer; never a traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from prng_daemon.cli import main

DATA = Path(__file__).parent / "data"
GOOD = (DATA / "step2_result.json").read_bytes()


def test_proposal_example_is_ok(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", str(DATA / "step2_result.json")]) == 0
    assert (
        capsys.readouterr()
        .out.strip()
        .endswith("OK (step 2 scorer_meta_optimizer -> full_scoring_agent)")
    )


def test_every_error_is_listed_with_its_pointer(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    doc = json.loads(GOOD)
    doc["agent_metadata"]["confidence"] = 2e62
    doc["agent_metadata"]["retry_count"] = -1
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(doc))
    assert main(["validate", "--json", str(path)]) == 1
    [report] = json.loads(capsys.readouterr().out)
    pointers = {e["pointer"] for e in report["errors"]}
    assert pointers == {"/agent_metadata/confidence", "/agent_metadata/retry_count"}


def _symlink(tmp_path: Path) -> Path:
    (tmp_path / "real.json").write_bytes(GOOD)
    link = tmp_path / "link.json"
    link.symlink_to(tmp_path / "real.json")
    return link


def _fifo(tmp_path: Path) -> Path:
    path = tmp_path / "pipe.json"
    os.mkfifo(path)
    return path


def _write(name: str, data: bytes) -> Callable[[Path], Path]:
    def make(tmp_path: Path) -> Path:
        path = tmp_path / name
        path.write_bytes(data)
        return path

    return make


BAD: dict[str, tuple[Callable[[Path], Path], str]] = {
    "non_utf8": (_write("a.json", b'{"x": "\xff"}'), "not UTF-8: invalid byte at offset 7"),
    "truncated": (_write("b.json", GOOD[: len(GOOD) // 2]), "not valid JSON at line"),
    "top_level_list": (_write("c.json", b"[1, 2]"), "top level is a JSON list"),
    "nan": (_write("d.json", GOOD.replace(b"0.92", b"NaN")), "NaN is not a JSON number"),
    "huge_number": (_write("e.json", GOOD.replace(b"0.92", b"1e999")), "out of range"),
    "duplicate_key": (
        _write(
            "f.json", GOOD.replace(b'"confidence": 0.92', b'"confidence": 0.1, "confidence": 0.92')
        ),
        "duplicate key 'confidence'",
    ),
    "deep": (_write("g.json", b"[" * 5000 + b"]" * 5000), "nested deeper than 64 levels"),
    "over_size": (_write("h.json", b" " * (2 << 20)), "over the 1048576-byte limit"),
    "directory": (lambda p: (p / "dir.json").mkdir() or p / "dir.json", "is a directory"),
    "symlink": (_symlink, "is a symbolic link"),
    "fifo": (_fifo, "is not a regular file"),
    "missing": (lambda p: p / "gone.json", "no such file"),
}


@pytest.mark.parametrize("name", BAD)
def test_bad_file_gets_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str
) -> None:
    make, expected = BAD[name]
    path = make(tmp_path)
    assert main(["validate", "--max-bytes", str(1 << 20), str(path)]) == 1
    out = capsys.readouterr().out
    assert expected in out
    assert "Traceback" not in out


def test_exit_code_is_1_when_any_file_is_invalid(tmp_path: Path) -> None:
    good = tmp_path / "good.json"
    good.write_bytes(GOOD)
    bad = tmp_path / "bad.json"
    bad.write_bytes(b"{}")
    assert main(["validate", str(good)]) == 0
    assert main(["validate", str(good), str(bad)]) == 1


def test_module_entry_point_runs() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "prng_daemon", "validate", str(DATA / "step2_result.json")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "OK" in proc.stdout
