"""The real unit under a real systemd: a Debian root booted with systemd-nspawn (root only).

Build the root once with scripts/nspawn-root.sh; without it, or without root, the test skips.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from prng_daemon.document.pipeline import PIPELINE

from .helpers import wait_until
from .workspace import result_document, run_id

REPO = Path(__file__).resolve().parents[1]
ROOT = Path(os.environ.get("NSPAWN_ROOT", REPO / ".cache" / "nspawn-root"))
UNIT = "prng-llm-daemon"
RESULTS = "/srv/prng/results"
# The venv's packages, run by the container's own /usr/bin/python3.X (the venv's X): the venv's
# interpreter may be a build under /root, which the container cannot see. As the user site
# dir (PYTHONUSERBASE) its .pth files are read, so the editable install's finder maps
# prng_daemon.schema to the checkout's schema/ as it does in the venv; PYTHONPATH would not.
VENV = REPO / ".venv"
PY = f"python{sys.version_info.major}.{sys.version_info.minor}"
DROP_IN = f"""\
[Service]
ExecStart=
ExecStart=/usr/bin/{PY} -m prng_daemon run --config /etc/prng-llm-daemon/config.json
Environment=PYTHONUSERBASE={VENV}
Environment=PYTHONDONTWRITEBYTECODE=1
WatchdogSec=2s
RestartSec=1s
"""
# A FakeLlama inside the container: with --private-network only its own loopback exists.
FAKE_LLAMA = """\
import pathlib, signal, threading
from tests.fake_llama import FakeLlama
with FakeLlama() as fake:
    pathlib.Path("/run/fake-llama.port").write_text(str(fake.port))
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()
"""


def _missing() -> str | None:
    if os.geteuid() != 0:
        return "systemd-nspawn needs root"
    for tool in ("systemd-nspawn", "nsenter"):
        if shutil.which(tool) is None:
            return f"{tool} is missing (apt-get install systemd-container util-linux)"
    if not (ROOT / ".nspawn-root-complete").exists():
        return f"no container root at {ROOT}: build it with scripts/nspawn-root.sh (~2 min)"
    if not list(VENV.glob(f"lib/{PY}/site-packages/__editable__*prng_llm_daemon*.pth")):
        return f"no editable install of the checkout in {VENV} (scripts/setup-venv.sh)"
    if not (ROOT / "usr" / "bin" / PY).exists():
        return f"the container has no {PY}, the venv's Python"
    # Not bound elsewhere instead: the editable install's finder names the checkout's own path,
    # and a checkout under the container's /tmp would be emptied by its tmpfiles at boot.
    hidden = ("/tmp", "/var/tmp", "/home", "/root", "/run/user")
    if any(REPO.is_relative_to(top) for top in hidden):
        return (f"{REPO} is hidden from the unit by PrivateTmp=/ProtectHome=: clone the project"
                " elsewhere (/srv, /opt, ...) to run the container tests")  # fmt: skip
    return None


MISSING = _missing()
if MISSING is not None and os.environ.get("PRNG_REQUIRE_NSPAWN") == "1":
    # .ci/run built the container root: a skip here would hide an install that does not work.
    pytest.fail(f"PRNG_REQUIRE_NSPAWN=1 but the container tests cannot run: {MISSING}",
                pytrace=False)  # fmt: skip
pytestmark = pytest.mark.skipif(MISSING is not None, reason=MISSING or "")


class Container:
    """A booted container; commands run in all of its namespaces through nsenter."""

    def __init__(self, pid1: int) -> None:
        self.pid1 = pid1

    def run(
        self,
        *argv: str,
        stdin: str | None = None,
        check: bool = True,
        timeout: float = 30,
        stderr: bool = False,
    ) -> str:
        """The command's output (with its error output after it when `stderr`)."""
        done = subprocess.run(
            ["nsenter", "-t", str(self.pid1), "-a", *argv],
            input=stdin, capture_output=True, text=True, timeout=timeout,
        )  # fmt: skip
        if check and done.returncode != 0:
            raise AssertionError(f"{argv} exited {done.returncode}: {done.stderr}{done.stdout}")
        return done.stdout + (done.stderr if stderr else "")

    def write(self, path: str, text: str, mode: str = "0644", group: str = "root") -> None:
        """Write `path` whole: a hidden temp file beside it, then a rename."""
        script = ('mkdir -p "${1%/*}" && t=$(mktemp -p "${1%/*}" .write.XXXXXX) && cat > "$t"'
                  ' && chmod "$2" "$t" && chgrp "$3" "$t" && mv "$t" "$1"')  # fmt: skip
        self.run("sh", "-c", script, "sh", path, mode, group, stdin=text)

    def show(self, prop: str) -> str:
        return self.run("systemctl", "show", UNIT, "-p", prop, "--value").strip()

    def journal(self, *args: str, check: bool = True) -> list[str]:
        """The unit's messages, as a person reads them (`-o cat`)."""
        argv = ("journalctl", "-u", UNIT, "-o", "cat", "--no-pager", *args)
        return self.run(*argv, check=check).splitlines()

    def events(self, *args: str) -> list[dict[str, object]]:
        """The daemon's events with their native fields (`-o json`), keys in lower case."""
        argv = ("journalctl", "-u", UNIT, "-o", "json", "--no-pager", *args)
        entries = [json.loads(line) for line in self.run(*argv).splitlines()]
        return [{k.lower(): v for k, v in e.items()} for e in entries if "EVENT" in e]


def _pid1(nspawn: subprocess.Popen[bytes]) -> int | None:
    try:
        children = Path(f"/proc/{nspawn.pid}/task/{nspawn.pid}/children").read_text().split()
        pid = int(children[0])
        return pid if Path(f"/proc/{pid}/comm").read_text().strip() == "systemd" else None
    except (OSError, IndexError, ValueError):
        return None


@contextmanager
def booted(log_path: Path, root: Path = ROOT) -> Iterator[Container]:
    """Boot the container of `root` (nspawn's output to `log_path`); powered off on exit."""
    log = open(log_path, "wb")  # noqa: SIM115 - closed below
    # --volatile=overlay: every boot starts from the cached root; writes go to a tmpfs.
    nspawn = subprocess.Popen(
        ["systemd-nspawn", "-D", str(root), "-b", "--volatile=overlay", "--register=no",
         "--keep-unit", "--private-network", f"--bind={REPO}"],
        stdin=subprocess.DEVNULL, stdout=log, stderr=log,
    )  # fmt: skip
    try:
        pid1 = wait_until(lambda: _pid1(nspawn), 20, what="the container's systemd")
        assert pid1 is not None
        box = Container(pid1)
        wait_until(
            lambda: box.run("systemctl", "is-system-running", check=False).strip()
            in ("running", "degraded"),
            30, interval=0.1, what="the container to boot",
        )  # fmt: skip
        yield box
    finally:
        nspawn.send_signal(signal.SIGTERM)  # powers the container off cleanly
        try:
            nspawn.wait(30)
        except subprocess.TimeoutExpired:
            nspawn.kill()
            nspawn.wait()
        log.close()


@pytest.fixture
def container(tmp_path: Path) -> Iterator[Container]:
    with booted(tmp_path / "nspawn.log") as box:
        try:
            yield box
        finally:  # shown when the test fails
            print("\n".join(box.journal(check=False)[-60:]))


def install(
    box: Container,
    agents: dict[str, object] | None = None,
    launcher: str = "auto",
    drop_in: str = "",
    rules: tuple[str, ...] = ("prng-llm-daemon.rules",),
) -> None:
    """systemd/README.md steps 3, 4 and 7 and the polkit `rules` of "Agents as units", with the
    drop-in that runs the checkout (plus `drop_in`); every agent sleeps unless `agents` says
    otherwise."""
    for rule in rules:
        box.run("install", "-m", "0644", f"{REPO}/systemd/{rule}",
                f"/etc/polkit-1/rules.d/50-{rule}")  # fmt: skip
    box.run("install", "-m", "0644", f"{REPO}/systemd/{UNIT}.sysusers",
            f"/usr/lib/sysusers.d/{UNIT}.conf")  # fmt: skip
    box.run("install", "-m", "0644", f"{REPO}/systemd/{UNIT}.tmpfiles",
            f"/usr/lib/tmpfiles.d/{UNIT}.conf")  # fmt: skip
    box.run("systemd-sysusers")
    box.run("systemd-tmpfiles", "--create", f"{UNIT}.conf")
    box.run("install", "-m", "0644", f"{REPO}/systemd/{UNIT}.service", "/etc/systemd/system/")
    box.write(f"/etc/systemd/system/{UNIT}.service.d/checkout.conf", DROP_IN + drop_in)
    box.run("systemd-run", "--unit=fake-llama", "--collect", f"--setenv=PYTHONUSERBASE={VENV}",
            f"--setenv=PYTHONPATH={REPO}", f"/usr/bin/{PY}", "-c", FAKE_LLAMA)  # fmt: skip
    port = wait_until(lambda: box.run("cat", "/run/fake-llama.port", check=False), 15)
    server = {"model": "fake.gguf", "port": int(port), "managed": False}
    # Every agent sleeps: what is still running shows what systemd's cgroup does with agents.
    if agents is None:
        agents = {row.agent: {"argv": ["/bin/sleep", "600"]} for row in PIPELINE}
    config = {"orchestrator": server, "math": server, "agents": agents,
              "daemon": {"results_dir": RESULTS, "state_dir": "/var/lib/prng-llm-daemon",
                         "launcher": launcher,
                         "logs_dir": "/var/log/prng-llm-daemon",
                         "models_dir": "/var/lib/prng-llm-daemon/models"},
              "policy": {"confidence_threshold": 0.1}}  # fmt: skip
    box.write("/etc/prng-llm-daemon/config.json", json.dumps(config), "0640", "prng-llm")
    box.run("systemctl", "daemon-reload")


def drop(box: Container, name: str, document: dict[str, object]) -> None:
    box.write(f"{RESULTS}/{name}", json.dumps(document))


def test_the_unit_under_systemd_notifies_logs_restarts_on_watchdog_and_stops_its_cgroup(
    container: Container,
) -> None:
    box = container
    install(box)

    box.run("systemctl", "start", UNIT)  # Type=notify: returns once READY=1 came
    assert box.show("ActiveState") == "active"
    story = box.journal()
    started = next(i for i, line in enumerate(story) if line.startswith("Started "))
    assert any(line.startswith("daemon started, watching ") for line in story[:started]), (
        "active before READY"
    )
    assert box.show("StatusText").startswith("orchestrator unmanaged, math unmanaged · idle · ")

    rid = run_id(2, 1)
    drop(box, "r.json", result_document(2, rid))
    wait_until(lambda: any(e["event"] == "agent.started" for e in box.events()), 15,
               interval=0.2, what="agent.started in the journal")  # fmt: skip
    mine = [e for e in box.events() if e.get("run_id") == rid]
    assert [e["event"] for e in mine] == ["result.validated", "decision.made", "agent.started"]
    by_field = [e["event"] for e in box.events(f"RUN_ID={rid}")]
    assert by_field == ["result.validated", "decision.made", "agent.started"], "native fields"
    assert mine[1]["step"] == "2" and mine[1]["file"] == "r.json" and mine[1]["decision"]
    # The same story as a person reads it: one sentence per event, the facts in words.
    said = box.journal(f"RUN_ID={rid}")
    assert [line.split(": ", 1)[0] for line in said] == ["step 2/6 scorer_meta_optimizer"] * 3
    assert said[0] == f"step 2/6 scorer_meta_optimizer: r.json validated, run {rid}"
    assert said[1].startswith(f"step 2/6 scorer_meta_optimizer: {mine[1]['decision']} (")
    assert " -> full_scoring_agent started as pid " in said[2]
    wait_until(lambda: "1 decided" in box.show("StatusText"), 5, interval=0.2)
    status = box.run("systemctl", "status", UNIT, "--no-pager", "-l", "-n", "5", check=False)
    assert 'Status: "' in status and "1 decided" in status
    assert "/bin/sleep 600" in status, "the agent runs in the unit's cgroup"

    box.write(f"{RESULTS}/bad.json", "{not json")
    wait_until(lambda: box.journal("-p", "err"), 10, interval=0.2, what="an error line")
    errors = [e["event"] for e in box.events("-p", "err")]
    assert errors == ["result.rejected"], "-p err keeps error lines only"
    assert box.journal("-p", "err")[0].startswith("bad.json rejected: ")

    # A stopped process stops pinging: the watchdog kills it (SIGABRT) and systemd restarts it.
    main_pid = int(box.show("MainPID"))
    box.run("kill", "-STOP", str(main_pid))
    wait_until(lambda: box.show("NRestarts") == "1", 15, interval=0.2, what="a watchdog restart")
    wait_until(lambda: box.show("ActiveState") == "active", 15, interval=0.2)
    assert int(box.show("MainPID")) != main_pid
    assert any("Watchdog timeout" in line for line in box.journal())
    box.run("systemctl", "reload", UNIT)
    wait_until(lambda: any(e["event"] == "config.reloaded" for e in box.events()), 10,
               interval=0.2)  # fmt: skip
    drop(box, "r3.json", result_document(3, run_id(3, 1), parent_run_id=rid))
    wait_until(lambda: len([e for e in box.events() if e["event"] == "agent.started"]) == 2, 15,
               interval=0.2, what="the next step's agent")  # fmt: skip
    launched = [e["run_id"] for e in box.events() if e["event"] == "agent.started"]
    assert launched == [rid, run_id(3, 1)], "the restart did not launch the first agent again"

    assert box.run("pgrep", "-u", "prng-llm", "-x", "sleep", check=False), "step 4's agent runs"
    box.run("systemctl", "stop", UNIT)
    assert box.show("Result") == "success"
    assert box.run("pgrep", "-u", "prng-llm", check=False) == "", "left in the cgroup"
    print("\n" + status)
    print("\n".join(line for line in box.journal() if rid in line))
