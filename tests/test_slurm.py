"""Agents as Slurm jobs, against a real one-node Slurm (scripts/slurm-node.sh: munged,
slurmctld and slurmd as root, started once for this module). Config checks and the exit code
mapping need no cluster."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from prng_daemon.cli import main
from prng_daemon.config import AgentConfig
from prng_daemon.errors import LaunchUnavailable
from prng_daemon.handlers.act.launcher import AgentRun, Launch, launch_key
from prng_daemon.handlers.act.slurm import SlurmLauncher, exit_code, job_name
from prng_daemon.ledger import Ledger, State
from prng_daemon.log.sentences import sentence

from .fake_llama import FakeLlama
from .helpers import free_port, until, wait_until
from .workspace import Workspace, drop, make_workspace, result_document, run_id, running

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(__file__).parent / "data" / "slurm"


def _missing() -> str | None:
    if os.geteuid() != 0:
        return "the test cluster's daemons run as root"
    for tool in ("sbatch", "squeue", "scontrol", "scancel", "/usr/sbin/slurmctld",
                 "/usr/sbin/slurmd", "/usr/sbin/munged", "mungekey"):  # fmt: skip
        if shutil.which(tool) is None:
            return f"{tool} missing: apt-get install slurm-wlm munge"
    return None


MISSING = _missing()
needs_slurm = pytest.mark.skipif(MISSING is not None, reason=f"no Slurm test cluster: {MISSING}")

# Prints its arguments (one holds spaces and a $: passed on as written), waits for its go file,
# exits with $CODE.
AGENT = (
    'echo "agent [$1] [$2] step $PRNG_STEP job $SLURM_JOB_ID in $PWD";'
    ' while [ ! -e "$GO" ]; do sleep 0.1; done; exit "$CODE"'
)


class Cluster:
    def __init__(self, state: Path) -> None:
        self.state = state

    def node(self, action: str) -> None:
        subprocess.run([ROOT / "scripts" / "slurm-node.sh", action, self.state], check=True,
                       stdout=subprocess.DEVNULL)  # fmt: skip

    def jobs(self, name: str) -> list[tuple[int, str]]:
        """(job id, state) of every job called `name` slurmctld knows."""
        out = subprocess.run(
            ["squeue", "-h", "--states=all", f"--name={name}", "-o", "%i|%T"],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        return [(int(i), s) for i, s in (line.split("|") for line in out.splitlines())]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    if MISSING is not None:
        pytest.skip(f"no Slurm test cluster: {MISSING}")
    state = tmp_path_factory.mktemp("slurm")
    box = Cluster(state)
    with pytest.MonkeyPatch.context() as env:
        env.setenv("SLURM_CONF", str(state / "slurm.conf"))
        env.setenv("SLURM_PORT", str(free_port()))
        box.node("start")
        try:
            yield box
        finally:
            box.node("stop")


def slurm_workspace(tmp_path: Path, fake: FakeLlama, **codes: int) -> Workspace:
    """Agents named in `codes` are Slurm jobs running AGENT, exiting with that code."""
    ws = make_workspace(tmp_path, fake.port)

    def edit(config: dict[str, Any]) -> None:
        for agent, code in codes.items():
            config["agents"][agent] = {
                "argv": ["/bin/sh", "-c", AGENT, "agent", "{parent_run_id}", "a $HOME b"],
                "env": {"GO": str(tmp_path / f"go-{agent}"), "CODE": str(code)},
                "launcher": "slurm",
                "slurm": {"partition": "debug", "sbatch_options": ["--mem=64M"]},
                "timeout_seconds": 600,
            }

    ws.edit_config(edit)
    return ws


def go(ws: Workspace, agent: str) -> None:
    (ws.root / f"go-{agent}").touch()


def events(ws: Workspace, name: str, rid: str) -> list[dict[str, Any]]:
    return [e for e in ws.events(name) if e.get("run_id") == rid]


def key_of(file: str, document: dict[str, Any]) -> str:
    """The launch key of this file version, as `drop` writes it."""
    return launch_key(file, hashlib.sha256(json.dumps(document).encode()).hexdigest())


def name_of(file: str, document: dict[str, Any]) -> str:
    """The job name of the launch for this file version."""
    return job_name(key_of(file, document))


def cli(capsys: pytest.CaptureFixture[str], ws: Workspace, *args: str) -> tuple[int, str]:
    code = main([args[0], "--config", str(ws.config_path), *args[1:]])
    out, err = capsys.readouterr()
    return code, out + err


@needs_slurm
def test_a_result_is_one_job_its_end_reported_with_state_and_exit_code(
    tmp_path: Path, fake: FakeLlama, cluster: Cluster, capsys: pytest.CaptureFixture[str]
) -> None:
    ws = slurm_workspace(tmp_path, fake, full_scoring_agent=0, ml_meta_agent=3)
    ok, bad = run_id(2, 0x51), run_id(3, 0x51)
    doc = result_document(2, ok)
    with running(ws):
        drop(ws.results, "ok.json", doc)
        [submitted] = wait_until(lambda: events(ws, "agent.submitted", ok), 20)
        [(job, _)] = cluster.jobs(name_of("ok.json", doc))
        assert submitted["job_id"] == job
        started = events(ws, "agent.started", ok)[0]
        assert (started["pid"], started["launcher"]) == (job, "slurm")
        assert started["started_as"] == f"Slurm job {job}"
        # status: the job, its state and node, from the daemon's last poll.
        wait_until(lambda: "RUNNING on" in cli(capsys, ws, "status")[1], 15, interval=0.5)
        [agent] = json.loads(cli(capsys, ws, "status", "--json")[1])["agents"]
        assert agent["job_id"] == job and agent["state"] == "RUNNING" and agent["node"]
        go(ws, "full_scoring_agent")
        [ended] = wait_until(lambda: events(ws, "agent.exited", ok), 20)
        assert (ended["job_state"], ended["exit_code"], ended["level"]) == ("COMPLETED", 0, "info")

        # A job that fails is a failed agent: its exit code and state, at error level.
        drop(ws.results, "bad.json", result_document(3, bad, parent_run_id=ok))
        go(ws, "ml_meta_agent")
        [failed] = wait_until(lambda: events(ws, "agent.exited", bad), 20)
        assert (failed["job_state"], failed["exit_code"], failed["level"]) == ("FAILED", 3, "error")
    output = Path(submitted["output"])
    assert output.read_text().startswith(
        f"agent [{ok}] [a $HOME b] step 3 job {job} in {tmp_path / 'state' / 'slurm'}"
    ), "the argv as configured, the env, the job dir as working directory"
    ledger = Ledger(ws.root / "state" / "ledger.sqlite3", readonly=True)
    try:
        rows = {e.run_id: e for e in ledger.recent()}
    finally:
        ledger.close()
    assert (rows[ok].pid, rows[ok].exit_code) == (job, 0)
    assert rows[bad].exit_code == 3 and rows[bad].reason.endswith(": FAILED")


@needs_slurm
def test_a_daemon_killed_right_after_sbatch_submits_no_second_job(
    tmp_path: Path, fake: FakeLlama, cluster: Cluster, capsys: pytest.CaptureFixture[str]
) -> None:
    """sbatch submits, then SIGKILLs the daemon before its answer is read: the job exists, the
    daemon never heard its id. After a restart: found by its name, watched, cancelled."""
    ws = slurm_workspace(tmp_path, fake, full_scoring_agent=0)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    killer = bin_dir / "sbatch"
    killer.write_text(f'#!/bin/sh\n{shutil.which("sbatch")} "$@"\nkill -KILL $PPID\nsleep 5\n')
    killer.chmod(0o755)
    rid = run_id(2, 0x52)
    doc = result_document(2, rid)
    proc = ws.start(env={"PATH": f"{bin_dir}:{os.environ['PATH']}"})
    drop(ws.results, "r.json", doc)
    assert proc.wait(30) == -signal.SIGKILL
    [(job, _)] = cluster.jobs(name_of("r.json", doc))
    assert not events(ws, "agent.started", rid), "killed before it heard the job id"
    marker = ws.root / "state" / "slurm" / f"{key_of('r.json', doc)}.launched"
    wait_until(marker.exists, 20, what="the job running (its marker made)")

    with running(ws):
        [found] = wait_until(lambda: events(ws, "agent.job_found", rid), 20)
        assert found["job_id"] == job
    # A plain restart: the job, still running, is adopted (its id is the ledger's pid).
    with running(ws):
        [adopted] = wait_until(lambda: events(ws, "agent.adopted", rid), 20)
        assert adopted["pid"] == job
        wait_until(lambda: "RUNNING on" in cli(capsys, ws, "status")[1], 15, interval=0.5)
        assert cli(capsys, ws, "stop-agent", rid) == (0, f"{rid}: cancelled Slurm job {job}\n")
        [ended] = wait_until(lambda: events(ws, "agent.exited", rid), 20)
    assert cluster.jobs(name_of("r.json", doc)) == [(job, "CANCELLED")], "one job, ever"
    # scancel's SIGTERM reaches the batch shell and the agent in either order: the shell killed
    # by it (-15), or the shell seeing its agent killed and exiting 128 + 15. Either way, by it.
    assert ended["job_state"] == "CANCELLED" and ended["exit_code"] in (-15, 143)
    assert len(events(ws, "agent.started", rid)) == 1
    assert not ws.events("agent.submitted")


@needs_slurm
def test_a_controller_that_is_down_is_said_and_the_launch_retried_until_it_is_back(
    tmp_path: Path, fake: FakeLlama, cluster: Cluster
) -> None:
    ws = slurm_workspace(tmp_path, fake, full_scoring_agent=0)
    rid = run_id(2, 0x53)
    doc = result_document(2, rid)
    go(ws, "full_scoring_agent")
    cluster.node("stop-controller")
    try:
        with running(ws):
            drop(ws.results, "r.json", doc)
            [said] = wait_until(lambda: events(ws, "slurm.unreachable", rid) or
                                ws.events("slurm.unreachable"), 30)  # fmt: skip
            assert "Unable to contact slurm controller" in said["error"]
            assert said["level"] == "error" and said["retry_in_s"] == 2.0
            cluster.node("start-controller")
            [submitted] = wait_until(lambda: ws.events("agent.submitted"), 40)
            wait_until(lambda: events(ws, "agent.exited", rid), 60)  # a restarted slurmctld
    finally:
        cluster.node("start-controller")
    assert cluster.jobs(name_of("r.json", doc)) == [(submitted["job_id"], "COMPLETED")]


@needs_slurm
def test_status_during_a_controller_outage_says_so_and_marks_job_states_as_last_seen(
    tmp_path: Path, fake: FakeLlama, cluster: Cluster, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 27 case 5: slurmctld stopped while a job runs. `status` (and STATUS=) say the
    controller is unreachable since when, and the job's state is marked as last seen then;
    with the controller back, both go, and the job's end is reported."""
    ws = slurm_workspace(tmp_path, fake, full_scoring_agent=0)
    rid = run_id(2, 0x56)
    try:
        with running(ws):
            drop(ws.results, "r.json", result_document(2, rid))
            wait_until(lambda: "RUNNING on" in cli(capsys, ws, "status")[1], 30, interval=0.5)
            cluster.node("stop-controller")

            def outage() -> str:
                out = cli(capsys, ws, "status")[1]
                return out if "unreachable since" in out else ""

            out = wait_until(outage, 60, interval=0.5, what="the outage in status")
            first = out.splitlines()[0]
            assert "degraded: Slurm controller unreachable since " in first, first
            assert ": the states below are as last seen" in out
            seen = r"Slurm job \d+ RUNNING on \S+ \(as last seen at \d\d:\d\d:\d\d\)"
            assert re.search(seen, out), out
            cluster.node("start-controller")
            wait_until(lambda: "unreachable" not in cli(capsys, ws, "status")[1], 60, interval=0.5)
            go(ws, "full_scoring_agent")
            [ended] = wait_until(lambda: events(ws, "agent.exited", rid), 60)
    finally:
        cluster.node("start-controller")
    assert (ended["job_state"], ended["exit_code"]) == ("COMPLETED", 0)
    assert "as last seen" not in cli(capsys, ws, "status")[1]


@needs_slurm
def test_a_job_slurm_refuses_is_escalated_with_its_reason(
    tmp_path: Path, fake: FakeLlama, cluster: Cluster
) -> None:
    ws = slurm_workspace(tmp_path, fake, full_scoring_agent=0)
    ws.edit_config(lambda c: c["agents"]["full_scoring_agent"]["slurm"].update(partition="nosuch"))
    rid = run_id(2, 0x54)
    with running(ws):
        drop(ws.results, "r.json", result_document(2, rid))
        [failed] = wait_until(lambda: events(ws, "agent.failed", rid), 20)
        wait_until(lambda: ws.ledger_states().get(State.ESCALATED.value), 10)
    assert failed["reason"] == (
        "agent full_scoring_agent: sbatch refused the job: sbatch: error: Batch job submission"
        " failed: Invalid partition name specified"
    )


@needs_slurm
def test_a_waiting_job_whose_job_dir_was_deleted_never_started_and_is_launched_again(
    tmp_path: Path, fake: FakeLlama, cluster: Cluster
) -> None:
    """Issue 27 case 4: `job_dir` deleted while one job runs and one waits. The waiting one
    fails in Slurm (JobLaunchFailure, ExitCode 0:53) without its agent running: said so, not
    read as signal 53, and launched again (job_dir made again); the running one is unharmed."""
    ws = slurm_workspace(tmp_path, fake, full_scoring_agent=0, ml_meta_agent=0)
    ws.edit_config(
        lambda c: c["agents"]["full_scoring_agent"]["slurm"]["sbatch_options"].append("--exclusive")
    )
    first, waiting = run_id(2, 0x55), run_id(3, 0x55)
    a, b = result_document(2, first), result_document(3, waiting, parent_run_id=first)
    job_dir = ws.root / "state" / "slurm"
    with running(ws):
        drop(ws.results, "a.json", a)
        marker = job_dir / f"{key_of('a.json', a)}.launched"
        wait_until(marker.exists, 30, what="the first job's agent running (its marker made)")
        drop(ws.results, "b.json", b)
        [submitted] = wait_until(lambda: events(ws, "agent.submitted", waiting), 20)
        assert cluster.jobs(name_of("b.json", b)) == [(submitted["job_id"], "PENDING")]
        shutil.rmtree(job_dir)
        go(ws, "full_scoring_agent")
        go(ws, "ml_meta_agent")
        [again] = wait_until(lambda: events(ws, "agent.never_started", waiting), 40)
        [ended] = wait_until(lambda: events(ws, "agent.exited", waiting), 60)
        wait_until(lambda: events(ws, "agent.exited", first), 20)
    missing = f"its output directory {job_dir} does not exist"
    assert again["level"] == "error" and again["reason"] == (
        f"Slurm job {submitted['job_id']} never started: JobLaunchFailure: {missing}"
    )
    assert again["action"] == "launching it again in 2s"
    [(_, failed), (job, completed)] = sorted(cluster.jobs(name_of("b.json", b)))
    assert (failed, completed) == ("FAILED", "COMPLETED")
    assert (ended["pid"], ended["job_state"], ended["exit_code"]) == (job, "COMPLETED", 0)
    assert [e["exit_code"] for e in ws.events("agent.exited")] == [0, 0], "no signal 53"
    assert len(ws.events("agent.never_started")) == 1, "the running job was unharmed"
    ledger = Ledger(ws.root / "state" / "ledger.sqlite3", readonly=True)
    try:
        rows = {e.run_id: e for e in ledger.recent()}
    finally:
        ledger.close()
    assert (rows[waiting].state, rows[waiting].pid, rows[waiting].exit_code) == (
        State.ACTED, job, 0,
    )  # fmt: skip


@pytest.mark.parametrize(
    "option",
    ["--job-name=x", "--output=/etc/x", "--wrap=id", "-J", "--array=1-9", "--chdir=/",
     "--export=NONE", "--time=9", "--requeue", "--mem=8G\n--wrap=id", "mem=8G"],
)  # fmt: skip
def test_sbatch_options_that_would_break_the_launch_are_refused_at_config_load(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], option: str
) -> None:
    code, err = check(tmp_path, capsys, {"sbatch_options": ["--mem=8G", option]})
    assert code == 2 and "agents.ml_meta_agent.slurm.sbatch_options" in err, err
    assert "not an allowed sbatch option" in err or "line break" in err


def test_slurm_settings_and_what_a_job_cannot_have(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    allowed = {"partition": "gpu", "account": "prng", "gpus": "a100:2", "gres": "gpu:1",
               "sbatch_options": ["--mem=8G", "--exclusive", "--constraint=a100&ib"]}  # fmt: skip
    assert check(tmp_path, capsys, allowed) == (0, "")
    code, err = check(tmp_path, capsys, {"partition": "gpu; rm -rf /"})
    assert code == 2 and "slurm.partition" in err
    code, err = check(tmp_path, capsys, {}, user="prng-agent")
    assert code == 2 and "a Slurm job runs as the daemon's user" in err
    code, err = check(tmp_path, capsys, {}, env={"SBATCH_OUTPUT": "/etc/x"})
    assert code == 2 and "env SBATCH_OUTPUT" in err
    code, err = check(tmp_path, capsys, {}, launcher="daemon")
    assert code == 2 and '`slurm` settings need launcher: "slurm"' in err


def check(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], slurm: dict[str, Any], **agent: Any
) -> tuple[int, str]:
    config = {"orchestrator": {"model": "m", "port": 1}, "math": {"model": "m", "port": 2},
              "agents": {"ml_meta_agent": {"argv": ["/bin/true"], "launcher": "slurm",
                                           "slurm": slurm, **agent}}}  # fmt: skip
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    code = main(["check-config", "--config", str(path)])
    return code, capsys.readouterr().err


@pytest.mark.parametrize(
    ("captured", "state", "code"),
    [("failed.txt", "FAILED", 3), ("cancelled.txt", "CANCELLED", -15),
     ("timeout.txt", "TIMEOUT", -15)],
)  # fmt: skip
def test_exit_codes_from_scontrol_as_this_cluster_prints_them(
    captured: str, state: str, code: int
) -> None:
    """`scontrol --oneliner show job` captured from the test cluster (a 1-minute time limit
    takes 85 s to end in TIMEOUT: too slow to run here)."""
    fields = dict(item.partition("=")[::2] for item in (DATA / captured).read_text().split())
    assert fields["JobState"] == state
    assert exit_code(fields["ExitCode"]) == code
    assert exit_code("0:0") == 0 and exit_code("") is None


def test_a_launch_record_without_a_job_id_is_not_a_launch(tmp_path: Path) -> None:
    """The crash window: the record is written before sbatch; only a job id makes it launched
    (else a failed sbatch would count as a launch); without one, `start` looks the job up."""
    launcher = SlurmLauncher(tmp_path / "launches", tmp_path / "jobs", lambda *_: None)
    run = AgentRun(1, "k" * 32, "step2_x", "a")
    assert not launcher.was_launched(run.key)
    launcher._save(run, tmp_path / "jobs", None)  # noqa: SLF001 - the state between the two
    assert launcher.knows(run.key) and not launcher.was_launched(run.key)
    (tmp_path / "jobs").mkdir()
    (tmp_path / "jobs" / f"{run.key}.launched").mkdir()
    assert not launcher.was_launched(run.key), "its job ran: found by `start`, then watched"
    launcher._save(run, tmp_path / "jobs", 42)  # noqa: SLF001
    assert launcher.was_launched(run.key)


@needs_slurm
def test_a_job_slurmctld_forgot_is_reported_from_its_exit_record(
    tmp_path: Path, cluster: Cluster
) -> None:
    """A job that ended while the daemon was down for longer than MinJobAge: squeue no longer
    knows it (a job id it never had stands in for it), its batch script's exit record says 3."""

    async def main() -> tuple[Any, ...]:
        ended: asyncio.Future[tuple[Any, ...]] = asyncio.get_running_loop().create_future()
        launcher = SlurmLauncher(tmp_path / "launches", tmp_path / "jobs", lambda *a:
                                 ended.set_result(a), poll_seconds=0.05)  # fmt: skip
        run = AgentRun(7, "f" * 32, "step2_x", "a")
        launcher._save(run, tmp_path / "jobs", 999999)  # noqa: SLF001 - as a submission does
        (tmp_path / "jobs").mkdir()
        (tmp_path / "jobs" / f"{run.key}.exit").write_text("3\n")
        assert launcher.adopt(run, 999999, 60.0)
        await until(ended.done, 20, "the end")
        await launcher.stop()
        return ended.result()

    launch_id, job, code, _, state = asyncio.run(main())
    assert (launch_id, job, code, state) == (7, 999999, 3, "FAILED")


def test_no_sbatch_is_one_clear_error_and_nothing_launched(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Runs everywhere: a host without the Slurm client."""
    monkeypatch.setenv("PATH", str(tmp_path))
    launcher = SlurmLauncher(tmp_path / "launches", tmp_path / "jobs", lambda *_: None)
    config = AgentConfig(argv=("/bin/true",), launcher="slurm")
    launch = Launch(AgentRun(1, "n" * 32, "step2_x", "a"), config, {})
    with pytest.raises(LaunchUnavailable) as refused:
        asyncio.run(launcher.start(launch))
    assert str(refused.value) == (
        "sbatch not found on the daemon's PATH: install the Slurm client commands (slurm-client)"
        " and munge, or set the agent's launcher to daemon"
    )
    assert not launcher.was_launched("n" * 32)


def test_journal_sentences_name_the_job_and_its_state() -> None:
    started = {"event": "agent.started", "step": 2, "decision": "proceed", "agent": "a",
               "pid": 7, "launcher": "slurm", "started_as": "Slurm job 7"}  # fmt: skip
    assert sentence(started) == (
        "step 2/6 scorer_meta_optimizer: proceed -> a started as Slurm job 7"
    )
    ended = {"event": "agent.exited", "step": 2, "agent": "a", "pid": 7, "exit_code": -15,
             "duration_s": 3.0, "job_state": "CANCELLED"}  # fmt: skip
    assert sentence(ended) == (
        "step 2/6 scorer_meta_optimizer: a ended: Slurm job 7 CANCELLED (exit -15) after 3.0 s"
    )
