"""write_json_atomic: whole files or none, and nothing written through a symbolic link."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from prng_daemon.document.files import write_json_atomic
from prng_daemon.errors import DaemonError, UnsafePath


def test_writes_the_whole_document_and_leaves_no_temp_file(tmp_path: Path) -> None:
    path = tmp_path / "decisions" / "a.decision.json"
    write_json_atomic(path, {"decision": "proceed"})
    write_json_atomic(path, {"decision": "retry"}, durable=False)
    assert json.loads(path.read_text()) == {"decision": "retry"}
    assert os.listdir(path.parent) == ["a.decision.json"]


def test_a_symlinked_directory_is_refused_and_nothing_lands_behind_it(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "decisions").symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(UnsafePath, match="decisions is a symbolic link or not a directory"):
        write_json_atomic(tmp_path / "decisions" / "a.decision.json", {"x": 1})
    assert list(elsewhere.iterdir()) == []
    assert issubclass(UnsafePath, DaemonError)


def test_a_dangling_directory_link_is_refused_not_created(tmp_path: Path) -> None:
    (tmp_path / "decisions").symlink_to(tmp_path / "nowhere", target_is_directory=True)
    with pytest.raises(UnsafePath):
        write_json_atomic(tmp_path / "decisions" / "a.json", {"x": 1})
    assert not (tmp_path / "nowhere").exists()


def test_a_symlinked_file_is_refused_and_its_target_untouched(tmp_path: Path) -> None:
    target = tmp_path / "ledger.sqlite3"
    target.write_bytes(b"precious")
    (tmp_path / "decisions").mkdir()
    (tmp_path / "decisions" / "a.decision.json").symlink_to(target)
    with pytest.raises(UnsafePath, match="a.decision.json is a symbolic link"):
        write_json_atomic(tmp_path / "decisions" / "a.decision.json", {"x": 1})
    assert target.read_bytes() == b"precious"
    assert os.listdir(tmp_path / "decisions") == ["a.decision.json"], "no temp file left"
