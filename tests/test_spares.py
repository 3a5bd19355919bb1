"""SpareFiles: files made ahead and renamed (or linked) into place on the launch path; only
the empty file this process made is ever used, and nothing is written through a link."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from prng_daemon.document.files import SPARE_PREFIX, SpareFiles, write_json_atomic
from prng_daemon.errors import UnsafePath


@pytest.fixture
def umask() -> Iterator[int]:
    old = os.umask(0o027)
    try:
        yield 0o027
    finally:
        os.umask(old)


def spares_in(directory: Path) -> dict[str, int]:
    """name -> inode of every spare in `directory`."""
    return {p.name: p.stat().st_ino for p in directory.iterdir() if p.name.startswith(SPARE_PREFIX)}


def made(directory: Path, keep: int = 2, **kw: bool) -> tuple[SpareFiles, dict[str, int]]:
    directory.mkdir(exist_ok=True)
    spares = SpareFiles(directory, 0o666, keep=keep, **kw)
    spares.refill()
    found = spares_in(directory)
    assert len(found) == keep
    return spares, found


def test_a_put_file_is_a_spare_renamed_with_its_content(tmp_path: Path) -> None:
    spares, before = made(tmp_path / "d")
    fd = spares.put("a.params.json", b'{"x": 1}\n', replace=True)
    assert fd is not None
    os.close(fd)
    target = tmp_path / "d" / "a.params.json"
    assert target.read_bytes() == b'{"x": 1}\n'
    assert target.stat().st_ino in before.values()  # no inode made on the way: the spare's
    assert len(spares_in(tmp_path / "d")) == 1
    spares.refill()
    assert len(spares_in(tmp_path / "d")) == 2


def test_with_none_left_put_says_so_and_the_write_creates_the_file(tmp_path: Path) -> None:
    spares, _ = made(tmp_path / "d", keep=1)
    write_json_atomic(tmp_path / "d" / "a.json", {"a": 1}, durable=False, spares=spares)
    assert spares.put("b.json", b"{}", replace=True) is None
    write_json_atomic(tmp_path / "d" / "b.json", {"b": 2}, durable=False, spares=spares)
    assert json.loads((tmp_path / "d" / "b.json").read_text()) == {"b": 2}
    assert spares_in(tmp_path / "d") == {}
    assert not [p for p in os.listdir(tmp_path / "d") if p.endswith(".tmp")]


def test_a_durable_write_never_takes_a_spare(tmp_path: Path) -> None:
    # Its temporary file is fsynced before the rename; a spare's path has no fsync.
    spares, before = made(tmp_path / "d")
    write_json_atomic(tmp_path / "d" / "a.decision.json", {"a": 1}, spares=spares)
    assert spares_in(tmp_path / "d") == before


def test_an_existing_file_is_replaced_whole_when_asked(tmp_path: Path) -> None:
    spares, _ = made(tmp_path / "d")
    target = tmp_path / "d" / "a.json"
    target.write_text("old")
    held = target.open()  # a reader that has it open keeps the old file whole
    fd = spares.put("a.json", b"new", replace=True)
    assert fd is not None
    os.close(fd)
    assert target.read_text() == "new"
    assert held.read() == "old"
    held.close()


def test_an_existing_file_is_kept_when_not_to_be_replaced_and_the_spare_stays(
    tmp_path: Path,
) -> None:
    spares, before = made(tmp_path / "d", keep=1)
    log = tmp_path / "d" / "run.agent.log"
    log.write_text("earlier attempt\n")
    assert spares.put(log.name, replace=False) is None
    assert log.read_text() == "earlier attempt\n"
    assert spares_in(tmp_path / "d") == before
    fd = spares.put("other.agent.log", replace=False)  # still there for the next one
    assert fd is not None
    os.write(fd, b"appended\n")
    os.close(fd)
    assert (tmp_path / "d" / "other.agent.log").read_text() == "appended\n"
    assert (tmp_path / "d" / "other.agent.log").stat().st_ino in before.values()
    assert spares_in(tmp_path / "d") == {}  # linked, then its spare name removed


@pytest.mark.parametrize("how", ["symlink", "hardlink", "written"])
def test_a_spare_that_is_no_longer_the_file_made_is_never_used(tmp_path: Path, how: str) -> None:
    spares, before = made(tmp_path / "d", keep=1)
    [name] = before
    spare = tmp_path / "d" / name
    victim = tmp_path / "victim"
    victim.write_text("precious")
    if how == "symlink":
        spare.unlink()
        spare.symlink_to(victim)
    elif how == "hardlink":
        os.link(spare, tmp_path / "kept-elsewhere")
    else:
        spare.write_text("someone's data")
    assert spares.put("a.json", b"params", replace=True) is None
    assert victim.read_text() == "precious"
    assert not (tmp_path / "d" / "a.json").exists()
    if how == "hardlink":
        assert (tmp_path / "kept-elsewhere").read_bytes() == b""
    spares.refill()  # dropped, not taken again: a new spare is made
    assert len(spares_in(tmp_path / "d")) == 2


def test_a_symlink_at_the_target_is_refused_through_the_write(tmp_path: Path) -> None:
    spares, before = made(tmp_path / "d")
    victim = tmp_path / "victim"
    victim.write_text("precious")
    (tmp_path / "d" / "a.json").symlink_to(victim)
    with pytest.raises(UnsafePath, match="a.json is a symbolic link"):
        write_json_atomic(tmp_path / "d" / "a.json", {"x": 1}, durable=False, spares=spares)
    assert victim.read_text() == "precious"
    assert spares_in(tmp_path / "d") == before


def test_a_symlinked_directory_gets_no_spare_and_the_write_refuses_it(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "decisions").symlink_to(elsewhere, target_is_directory=True)
    spares = SpareFiles(tmp_path / "decisions", 0o666)
    spares.refill()
    with pytest.raises(UnsafePath):
        write_json_atomic(tmp_path / "decisions" / "a.json", {"x": 1}, durable=False, spares=spares)
    assert list(elsewhere.iterdir()) == []


def test_a_followed_directory_link_is_used_when_the_operator_allows_it(tmp_path: Path) -> None:
    elsewhere = tmp_path / "disk2"
    elsewhere.mkdir()
    (tmp_path / "agents").symlink_to(elsewhere, target_is_directory=True)
    spares = SpareFiles(tmp_path / "agents", 0o640, refuse_link=False)
    spares.refill()
    fd = spares.put("run.agent.log", replace=False)
    assert fd is not None
    os.close(fd)
    assert (elsewhere / "run.agent.log").exists()


def test_a_missing_directory_is_not_made_by_the_spares(tmp_path: Path) -> None:
    # A results dir that vanished is reported by the watcher, not quietly made again here.
    spares = SpareFiles(tmp_path / "results" / "decisions", 0o666)
    spares.refill()
    assert not (tmp_path / "results").exists()


def test_spares_left_by_an_earlier_process_are_removed_not_used(tmp_path: Path) -> None:
    directory = tmp_path / "d"
    directory.mkdir()
    for n in range(3):  # a crash left them; one was half written
        (directory / f"{SPARE_PREFIX}{n:016x}").write_text("x" * n)
    (directory / "keep.json").write_text("{}")
    spares = SpareFiles(directory, 0o666)
    spares.refill()
    left = spares_in(directory)
    assert len(left) == 2
    assert not any(name.startswith(f"{SPARE_PREFIX}00000000000000") for name in left)
    assert (directory / "keep.json").read_text() == "{}"


def test_a_spare_has_the_mode_a_created_file_gets(tmp_path: Path, umask: int) -> None:
    for mode in (0o666, 0o640):
        directory = tmp_path / f"{mode:o}"
        directory.mkdir()
        spares = SpareFiles(directory, mode)
        spares.refill()
        fd = spares.put("f", replace=False)
        assert fd is not None
        os.close(fd)
        assert stat.S_IMODE((directory / "f").stat().st_mode) == mode & ~umask


def test_discard_removes_the_spares(tmp_path: Path) -> None:
    spares, _ = made(tmp_path / "d")
    spares.discard()
    assert spares_in(tmp_path / "d") == {}
    assert spares.put("a.json", b"{}", replace=True) is None
