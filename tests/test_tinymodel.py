"""The tiny GGUF test model: valid header, small, and deterministic for a seed."""

from __future__ import annotations

import pathlib

import pytest

pytest.importorskip("numpy")
pytest.importorskip("gguf")

from prng_daemon.demo.tinymodel import write_tiny_model  # noqa: E402


def test_writes_small_gguf(tmp_path: pathlib.Path) -> None:
    target = tmp_path / "nested" / "dir" / "tiny.gguf"
    assert write_tiny_model(target) == target
    data = target.read_bytes()
    assert data[:4] == b"GGUF"
    assert int.from_bytes(data[4:8], "little") == 3  # GGUF format version
    assert 100_000 < len(data) < 2 * 1024 * 1024
    assert [p.name for p in target.parent.iterdir()] == ["tiny.gguf"]  # no temp file left


def test_same_seed_same_bytes(tmp_path: pathlib.Path) -> None:
    a = write_tiny_model(tmp_path / "a.gguf", seed=7).read_bytes()
    b = write_tiny_model(tmp_path / "b.gguf", seed=7).read_bytes()
    c = write_tiny_model(tmp_path / "c.gguf", seed=8).read_bytes()
    assert a == b
    assert a != c


def test_overwrites_existing_file(tmp_path: pathlib.Path) -> None:
    target = tmp_path / "tiny.gguf"
    target.write_bytes(b"old")
    write_tiny_model(target, seed=1)
    assert target.read_bytes()[:4] == b"GGUF"


def test_readable_by_gguf(tmp_path: pathlib.Path) -> None:
    import gguf

    reader = gguf.GGUFReader(write_tiny_model(tmp_path / "tiny.gguf"))
    names = {t.name for t in reader.tensors}
    assert {"token_embd.weight", "output.weight", "blk.1.ffn_down.weight"} <= names
    arch = reader.fields["general.architecture"]
    assert bytes(arch.parts[arch.data[0]]).decode() == "llama"
