"""The daemon process under a (stand-in) service manager: sd_notify, SIGHUP, SIGTERM, journald."""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from .fake_llama import FakeLlama
from .helpers import child_pids, free_port, pids_running, wait_until
from .workspace import Workspace, drop, make_workspace, ready, result_document, run_id, stop


class NotifySocket:
    """systemd's end of $NOTIFY_SOCKET: a bound datagram socket, each message with its arrival."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(str(path))
        self._sock.setblocking(False)
        self.received: list[tuple[float, str]] = []

    def close(self) -> None:
        self._sock.close()

    def messages(self) -> list[str]:
        while True:
            try:
                data = self._sock.recv(4096)
            except BlockingIOError:
                return [text for _, text in self.received]
            self.received.append((time.monotonic(), data.decode()))

    def index(self, assignment: str, start: int = 0) -> int | None:
        """The first message from `start` on that holds the line `assignment` (e.g. READY=1)."""
        for i, text in enumerate(self.messages()[start:], start):
            if assignment in text.splitlines():
                return i
        return None

    def wait_for(self, assignment: str, start: int = 0, timeout: float = 20.0) -> int:
        found = wait_until(
            lambda: self.index(assignment, start) is not None, timeout, what=assignment
        )
        assert found
        index = self.index(assignment, start)
        assert index is not None
        return index

    def statuses(self) -> list[str]:
        return [
            line.removeprefix("STATUS=")
            for text in self.messages()
            for line in text.splitlines()
            if line.startswith("STATUS=")
        ]


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[NotifySocket]:
    sock = NotifySocket(tmp_path / "notify")
    try:
        yield sock
    finally:
        sock.close()


def start(ws: Workspace, notify: NotifySocket, **env: str) -> Any:
    return ws.start(env={"NOTIFY_SOCKET": str(notify.path), **env})


@contextmanager
def ready_daemon(ws: Workspace, notify: NotifySocket) -> Iterator[Any]:
    """The daemon started and READY=1 sent; stopped at the end, which must exit 0."""
    proc = start(ws, notify)
    try:
        notify.wait_for("READY=1")
        yield proc
    finally:
        assert stop(proc) == 0


def test_ready_is_sent_after_the_watcher_is_up_and_a_file_just_after_it_is_seen(
    tmp_path: Path, fake: FakeLlama, notify: NotifySocket
) -> None:
    """A rescan an hour away: only the inotify observer can see the file dropped after READY."""
    ws = make_workspace(tmp_path, fake.port, daemon={"rescan_interval_seconds": 3600})
    with ready_daemon(ws, notify):
        assert ready(ws), "READY=1 came before the daemon.started log line"
        drop(ws.results, "r.json", result_document(2, run_id(2, 1)))
        wait_until(ws.launches, 15, what="the follow-up agent")
    [validated] = ws.events("result.validated")
    assert validated["source"] == "moved", "the watcher, not a scan, saw the file"
    first = notify.messages()[0].splitlines()
    assert first[0] == "READY=1" and first[1].startswith("STATUS="), "READY=1 is the first word"
    assert not any("WATCHDOG=1" in m for m in notify.messages()), "no WATCHDOG_USEC, no pings"


def test_watchdog_pings_at_half_of_watchdog_usec(
    tmp_path: Path, fake: FakeLlama, notify: NotifySocket
) -> None:
    ws = make_workspace(tmp_path, fake.port)
    proc = start(ws, notify, WATCHDOG_USEC="400000")
    try:
        wait_until(
            lambda: sum("WATCHDOG=1" in m for m in notify.messages()) >= 8, 15, what="8 pings"
        )
    finally:
        stop(proc)
    pings = [t for t, text in notify.received if "WATCHDOG=1" in text.splitlines()]
    mean = (pings[7] - pings[0]) / 7
    print(f"\nWATCHDOG_USEC=400000: mean ping interval {mean:.3f}s (expected 0.2 s)")
    assert 0.15 < mean < 0.3


BOTH_READY = "orchestrator ready on CPU, math ready on CPU"
"""STATUS= once both tiny-model children serve (n_gpu_layers 0: on the CPU by config)."""


def managed_workspace(tmp_path: Path, llama_server_bin: Path, tiny_model: Path) -> Workspace:
    """Both servers managed: real llama-server children on the tiny model."""
    server = {
        "model": tiny_model.name, "managed": True, "context_length": 8192, "batch_size": 64,
        "threads": 1, "parallel": 1, "n_gpu_layers": 0, "startup_timeout_seconds": 30.0,
    }  # fmt: skip
    return make_workspace(
        tmp_path, free_port(),
        orchestrator={**server, "port": free_port()}, math={**server, "port": free_port()},
        daemon={"llama_server": str(llama_server_bin), "models_dir": str(tiny_model.parent)},
        health={"ready_poll_interval_seconds": 0.05, "stop_timeout_seconds": 5.0},
    )  # fmt: skip


def test_sigterm_says_stopping_exits_0_and_leaves_no_llama_server(
    tmp_path: Path, notify: NotifySocket, llama_server_bin: Path, tiny_model: Path
) -> None:
    """The daemon must take its real llama-server children down with it."""
    ws = managed_workspace(tmp_path, llama_server_bin, tiny_model)
    proc = start(ws, notify)

    def servers() -> set[int]:
        return child_pids(proc.pid) & pids_running("llama-server")

    try:
        wait_until(lambda: len(servers()) == 2, 20, what="two llama-server children")
        children = servers()
        wait_until(lambda: any(BOTH_READY in s for s in notify.statuses()),
                   20, what="STATUS= to say both servers are ready")  # fmt: skip
        stopping_at = len(notify.messages())
    finally:
        code = stop(proc)
    assert code == 0
    assert notify.index("STOPPING=1", stopping_at) is not None
    assert not children & pids_running("llama-server"), "a llama-server outlived the daemon"
    assert [e["event"] for e in ws.events()][-1] == "daemon.stopped"


DECIDING = "step 2/6 scorer_meta_optimizer: deciding"


def test_status_follows_a_file_through_the_pipeline(
    tmp_path: Path, fake: FakeLlama, notify: NotifySocket
) -> None:
    fake.latency = 1.0  # long enough for the status loop to say "deciding"
    ws = make_workspace(tmp_path, fake.port)
    proc = start(ws, notify)
    try:
        notify.wait_for("READY=1")
        assert any("0 decided" in s for s in notify.statuses())
        drop(ws.results, "r.json", result_document(2, run_id(2, 1)))
        wait_until(lambda: any("1 decided" in s for s in notify.statuses()), 20,
                   what="STATUS= to count the decision")  # fmt: skip
    finally:
        stop(proc)
    statuses = notify.statuses()
    deciding = [i for i, s in enumerate(statuses) if DECIDING in s]
    decided = [i for i, s in enumerate(statuses) if "1 decided" in s]
    assert deciding and decided and deciding[0] < decided[0], statuses


def test_sighup_reloads_a_good_config_between_reloading_and_ready(
    tmp_path: Path, fake: FakeLlama, notify: NotifySocket
) -> None:
    """The new threshold is over the fake's 90 % confidence: the next file is escalated."""
    ws = make_workspace(tmp_path, fake.port)
    proc = start(ws, notify)
    try:
        ready_at = notify.wait_for("READY=1")
        ws.edit_config(lambda c: c["policy"].update(confidence_threshold=0.95))
        proc.send_signal(signal.SIGHUP)
        reloading = notify.wait_for("RELOADING=1", ready_at + 1)
        notify.wait_for("READY=1", reloading + 1)
        wait_until(lambda: ws.events("config.reloaded"), 5, what="config.reloaded")
        drop(ws.results, "r.json", result_document(2, run_id(2, 1)))
        wait_until(lambda: ws.ledger_states() == {"escalated": 1}, 15, what="an escalation")
    finally:
        assert stop(proc) == 0
    assert any(line.startswith("MONOTONIC_USEC=") for line in notify.messages()[reloading].split())
    assert ws.events("config.reloaded")[0]["servers_restarted"] == []
    assert not ws.launches()


def test_sighup_with_a_bad_config_keeps_the_old_one_and_keeps_working(
    tmp_path: Path, fake: FakeLlama, notify: NotifySocket
) -> None:
    ws = make_workspace(tmp_path, fake.port)
    proc = start(ws, notify)
    try:
        ready_at = notify.wait_for("READY=1")
        ws.edit_config(lambda c: c["policy"].update(confidence_threshold=5))
        proc.send_signal(signal.SIGHUP)
        [failed] = wait_until(lambda: ws.events("config.reload_failed"), 10)
        notify.wait_for("READY=1", notify.wait_for("RELOADING=1", ready_at + 1) + 1)
        drop(ws.results, "r.json", result_document(2, run_id(2, 1)))
        wait_until(ws.launches, 15, what="a launch under the old config")
        assert proc.poll() is None
    finally:
        assert stop(proc) == 0
    assert failed["level"] == "error"
    assert any("policy.confidence_threshold" in problem for problem in failed["problems"])
    assert not ws.events("config.reloaded")


def test_under_journald_every_line_carries_its_syslog_priority(
    tmp_path: Path, fake: FakeLlama
) -> None:
    """stderr is a stream socket named by $JOURNAL_STREAM, as systemd sets it up for journald."""
    fake.decision = "escalate"
    ws = make_workspace(tmp_path, fake.port)
    journal, theirs = socket.socketpair()
    info = os.fstat(theirs.fileno())
    received = bytearray()

    def lines() -> list[str]:
        try:
            received.extend(journal.recv(1 << 16))
        except BlockingIOError:
            pass
        return received.decode().splitlines()

    with journal, theirs:
        proc = ws.start(env={"JOURNAL_STREAM": f"{info.st_dev}:{info.st_ino}"},
                        stderr=theirs.fileno())  # fmt: skip
        theirs.close()
        journal.setblocking(False)
        try:
            wait_until(lambda: any('"daemon.started"' in line for line in lines()), 20)
            drop(ws.results, "r.json", result_document(2, run_id(2, 1)))
            (ws.results / "bad.json").write_text("{not json")
            wait_until(lambda: any('"result.rejected"' in line for line in lines())
                       and any('"decision.escalated"' in line for line in lines()), 20)  # fmt: skip
        finally:
            assert stop(proc) == 0
        journal.setblocking(True)
        while chunk := journal.recv(1 << 16):  # to the end: the daemon has exited
            received.extend(chunk)
    written = received.decode().splitlines()
    by_event = {json.loads(line[3:])["event"]: line[:3] for line in written}
    assert by_event["daemon.started"] == "<6>"
    assert by_event["decision.escalated"] == "<4>"
    assert by_event["result.rejected"] == "<3>"
    assert by_event["daemon.stopped"] == "<6>"
    assert all(line[:3] in ("<3>", "<4>", "<6>") for line in written), written


def test_sighup_with_new_server_settings_restarts_that_server_only(
    tmp_path: Path, notify: NotifySocket, llama_server_bin: Path, tiny_model: Path
) -> None:
    """A reload that moves the math server to another port restarts it; the orchestrator stays."""
    ws = managed_workspace(tmp_path, llama_server_bin, tiny_model)
    proc = start(ws, notify)

    def servers() -> dict[str, dict[str, Any]]:
        status = json.loads((ws.root / "state" / "status.json").read_text())
        return dict(status["servers"])

    try:
        wait_until(lambda: any(BOTH_READY in s for s in notify.statuses()),
                   20, what="both servers ready")  # fmt: skip
        before = servers()
        port = free_port()
        ws.edit_config(lambda c: c["math"].update(port=port))
        proc.send_signal(signal.SIGHUP)
        wait_until(lambda: ws.events("config.reloaded"), 20, what="config.reloaded")
        wait_until(lambda: servers()["math"]["state"] == "ready"
                   and servers()["math"]["pid"] != before["math"]["pid"], 20,
                   what="a new math server, ready")  # fmt: skip
        drop(ws.results, "r.json", result_document(2, run_id(2, 1)))
        wait_until(lambda: ws.events("decision.made"), 20, what="a decision")
        after = servers()
    finally:
        assert stop(proc) == 0
    assert ws.events("config.reloaded")[0]["servers_restarted"] == ["math"]
    assert after["orchestrator"]["pid"] == before["orchestrator"]["pid"], "left alone"
    assert ws.events("decision.made")[0]["decided_by"] != "rules", "decided by the new server"


def reload(ws: Workspace, proc: Any, notify: NotifySocket, event: str) -> dict[str, Any]:
    """SIGHUP once READY; the one `event` it logs (config.reloaded, ...), after READY=1 again."""
    ready_at = notify.wait_for("READY=1")
    proc.send_signal(signal.SIGHUP)
    notify.wait_for("READY=1", notify.wait_for("RELOADING=1", ready_at + 1) + 1)
    [logged] = wait_until(lambda: ws.events(event), 10, what=event)
    return logged


def test_sighup_applies_decision_settings_to_the_next_decision(
    tmp_path: Path, fake: FakeLlama, notify: NotifySocket
) -> None:
    """Issue 12 case 8: settings were logged as applied while the old router and decision engine
    kept their own (decisions sample at `policy.decision_temperature`)."""
    ws = make_workspace(tmp_path, fake.port)
    with ready_daemon(ws, notify) as proc:
        ws.edit_config(lambda c: c["policy"].update(decision_temperature=0.15))
        reload(ws, proc, notify, "config.reloaded")
        drop(ws.results, "r.json", result_document(2, run_id(2, 1)))
        wait_until(ws.launches, 15, what="a launch")
    assert {r["temperature"] for r in fake.requests} == {0.15}


def test_sighup_applies_health_settings_to_running_servers(
    tmp_path: Path, notify: NotifySocket, llama_server_bin: Path, tiny_model: Path
) -> None:
    """`health.restart_on_failure: false` by reload: a killed server then stays failed."""
    ws = managed_workspace(tmp_path, llama_server_bin, tiny_model)
    proc = start(ws, notify)

    def math() -> dict[str, Any]:
        status = json.loads((ws.root / "state" / "status.json").read_text())
        return dict(status["servers"]["math"])

    try:
        wait_until(lambda: any(BOTH_READY in s for s in notify.statuses()),
                   20, what="both servers ready")  # fmt: skip
        ws.edit_config(lambda c: c["health"].update(restart_on_failure=False))
        reloaded = reload(ws, proc, notify, "config.reloaded")
        os.kill(math()["pid"], signal.SIGKILL)
        wait_until(lambda: math()["state"] == "failed", 20, what="math to stay down")
    finally:
        assert stop(proc) == 0
    assert reloaded["servers_restarted"] == [], "a health change restarts no server"
    assert not ws.events("server.restarting")


def test_sighup_moves_the_watcher_to_a_new_results_dir(
    tmp_path: Path, fake: FakeLlama, notify: NotifySocket
) -> None:
    ws = make_workspace(tmp_path, fake.port, daemon={"rescan_interval_seconds": 3600})
    with ready_daemon(ws, notify) as proc:
        ws.edit_config(lambda c: c["daemon"].update(results_dir="results2"))
        reload(ws, proc, notify, "config.reloaded")
        drop(tmp_path / "results2", "r.json", result_document(2, run_id(2, 1)))
        wait_until(ws.launches, 15, what="a launch for the file in the new dir")
    assert list((tmp_path / "results2" / "decisions").glob("r.*.decision.json"))


def test_sighup_with_an_unreadable_api_key_file_keeps_the_running_router(
    tmp_path: Path, fake: FakeLlama, notify: NotifySocket
) -> None:
    """The old reload closed the router before reading the new key: every decision then failed."""
    ws = make_workspace(tmp_path, fake.port)
    with ready_daemon(ws, notify) as proc:
        ws.edit_config(lambda c: c["math"].update(api_key_file="missing.key"))
        failed = reload(ws, proc, notify, "config.reload_failed")
        drop(ws.results, "r.json", result_document(2, run_id(2, 1)))
        wait_until(ws.launches, 15, what="a launch under the old config")
    assert failed["problems"][0].startswith("config: math.api_key_file: cannot read:")
    assert [e["decided_by"] for e in ws.events("decision.made")] == ["llm"], "the LLM decided"
    assert not ws.events("config.reloaded")


def test_sighup_that_changes_the_state_dir_is_refused_by_name(
    tmp_path: Path, fake: FakeLlama, notify: NotifySocket
) -> None:
    """Nothing of a refused reload is applied: the new threshold would escalate the file."""
    ws = make_workspace(tmp_path, fake.port)
    with ready_daemon(ws, notify) as proc:
        ws.edit_config(lambda c: (c["daemon"].update(state_dir="state2"),
                                  c["policy"].update(confidence_threshold=0.95)))  # fmt: skip
        refused = reload(ws, proc, notify, "config.reload_refused")
        drop(ws.results, "r.json", result_document(2, run_id(2, 1)))
        wait_until(ws.launches, 15, what="a launch under the old config")
    assert refused["reason"] == "daemon.state_dir needs a restart"
    assert refused["level"] == "error"
    assert not (tmp_path / "state2").exists() and not ws.events("config.reloaded")
