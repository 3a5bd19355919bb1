"""Agents as Slurm jobs: `sbatch` submits them, one `squeue` watches all that are running.

Chosen per agent (`launcher: "slurm"`); the other agents keep the daemon's own launcher, and
`WithSlurm` sends each launch to the one its agent asks for.

Exactly once, as strong as the local launcher's marker:
- Before `sbatch`, a launch record (<state_dir>/launches/<key>.slurm) says the job's name,
  prng-<key> (one name per file version); the job id goes into it once sbatch answers. A daemon
  killed in between finds the record without a job id at the next attempt, and looks the name up
  (slurmctld knows every job until MinJobAge after its end) before it submits again.
- The job runs our own batch script (SCRIPT, fixed text; the agent's argv arrives as its
  arguments, never as shell text). Its first act is to make the launch marker with mkdir in the
  shared job_dir, so a second job of the same launch stops there, before its agent runs; its
  last is to write the agent's exit code beside the marker.

The end of a job: every poll_seconds one `squeue --jobs=<the watched ones>`, never more for more
finished jobs; a job seen ended costs one `scontrol show job` for its exit code. A job already
gone from slurmctld (the daemon was down longer than MinJobAge) is reported from its exit
record. So no accounting (slurmdbd, sacct) is needed: docs/launchers.md, "Slurm jobs".
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from structlog.typing import FilteringBoundLogger

from ...config import SlurmOptions
from ...document.files import write_json_atomic
from ...errors import DaemonError, LaunchUnavailable
from ...log import get_logger
from ...servers.backoff import RestartBudget
from .launcher import (
    AgentLauncher,
    AgentRun,
    AlreadyLaunched,
    Launch,
    OnExit,
    Polled,
    agent_env,
    clock,
    daemon_environ,
    exit_file,
    marker_file,
)

__all__ = [
    "ENDED",
    "SCRIPT",
    "SlurmLauncher",
    "WithSlurm",
    "cancel_job",
    "exit_code",
    "job_name",
]

POLL_SECONDS = 5.0
"""How often the watched jobs are looked at (one `squeue` for all of them)."""
COMMAND_TIMEOUT_SECONDS = 60.0
"""A Slurm command is given up after this long (sbatch itself gives up on a controller that
does not answer after about 10 s, MessageTimeout)."""
SUBMIT_RETRIES = 6
"""Submissions tried again while the controller cannot be reached (2, 4, ... 60 s apart, about
three minutes in all with sbatch's own waits) before the launch is escalated."""
RETRY_SECONDS = (2.0, 60.0)
"""The first wait before a submission is tried again, and the longest."""
ALREADY_RAN = 97
"""The batch script's exit status when the launch marker exists: the agent did not run."""
ENDED = frozenset(
    {"COMPLETED", "FAILED", "TIMEOUT", "CANCELLED", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
     "DEADLINE", "PREEMPTED", "SPECIAL_EXIT", "REVOKED"}
)  # fmt: skip
"""Job states that are final (with --no-requeue nothing comes back from them)."""
_UNREACHABLE = re.compile(
    r"unable to contact slurm controller|socket timed out|temporarily unable|zero bytes were"
    r" transmitted|connection refused|communication connection failure|standby mode|timed out",
    re.IGNORECASE,
)
"""Errors of a controller that is down or busy: worth another try, unlike a refused job."""
_UNSAFE_NAME = re.compile(r"[^A-Za-z0-9_.-]")
SCRIPT = f"""#!/bin/sh
# prng-llm-daemon's batch script: fixed text. $1 is the launch marker, $2 the exit record; the
# agent's argv follows, passed as arguments by sbatch, never read as shell text.
marker=$1 record=$2
shift 2
if ! mkdir -- "$marker"; then
    echo "prng-llm-daemon: $marker exists: this launch ran before; not running it twice" >&2
    exit {ALREADY_RAN}
fi
"$@"
code=$?
echo "$code" >"$record"
exit "$code"
"""


class _Unreachable(Exception):
    """The controller did not answer: the Slurm command may be tried again."""


def job_name(key: str) -> str:
    """The job's name: the launch key, so a restarted daemon finds a job it submitted."""
    return f"prng-{key}"


def exit_code(text: str) -> int | None:
    """Slurm's ExitCode=CODE:SIGNAL as one number, like a local agent's: negative for the
    signal that ended it. None if it is not that shape."""
    code, colon, sig = text.partition(":")
    if not (code.isdigit() and sig.isdigit() and colon):
        return None
    return -int(sig) if int(sig) else int(code)


@dataclass
class _Job:
    run: AgentRun
    started: float
    job_dir: Path
    state: str = "PENDING"
    node: str = ""
    seen: float = field(default_factory=time.time)
    """When `state` was last read from slurmctld (at the submission, then every poll)."""


class SlurmLauncher:
    """Agents as Slurm jobs; their ends seen by polling `squeue`."""

    kind = "slurm"

    def __init__(
        self,
        launches_dir: Path,
        job_dir: Path,
        on_exit: OnExit,
        poll_seconds: float = POLL_SECONDS,
    ) -> None:
        self._dir = launches_dir
        self._job_dir = job_dir
        self._on_exit = on_exit
        self._jobs: Polled[int, _Job] = Polled(poll_seconds, self._look, "jobs")
        launches_dir.mkdir(parents=True, exist_ok=True)

    @property
    def script(self) -> Path:
        return self._dir / "slurm-job.sh"

    def read_record(self, key: str) -> dict[str, Any] | None:
        """The launch record: job_name, job_dir, agent, job_id (None until sbatch answered)."""
        return _read_record(self._dir, key)

    def knows(self, key: str) -> bool:
        """Whether this launch went to Slurm (its record exists)."""
        return _record_path(self._dir, key).exists()

    def was_launched(self, key: str) -> bool:
        """A job id was recorded. A record without one (sbatch was under way) is not: the
        launch is resumed, and `start` looks its job up by name before it submits again, so
        the job is watched, not only known to exist."""
        record = self.read_record(key)
        return record is not None and record["job_id"] is not None

    @property
    def running(self) -> int:
        return len(self._jobs.items)

    async def start(self, launch: Launch) -> int:
        """Submit the agent's job: its job id. AlreadyLaunched if it was before;
        LaunchUnavailable if Slurm cannot take it (after retries while it does not answer)."""
        run = launch.run
        record = self.read_record(run.key)
        if record is not None and record["job_id"] is not None:
            raise AlreadyLaunched(
                f"the launch for this file version already happened (Slurm job"
                f" {record['job_id']}); not submitting it twice"
            )
        options = launch.config.slurm or SlurmOptions()
        job_dir = Path(record["job_dir"]) if record else (options.job_dir or self._job_dir)
        log = get_logger(
            run_id=run.run_id, agent=run.agent, launch_id=run.launch_id, job_name=job_name(run.key)
        )
        budget = RestartBudget(SUBMIT_RETRIES, math.inf, *RETRY_SECONDS, math.inf)
        look_first = record is not None
        while True:
            try:
                job_id = await self._submit(launch, options, job_dir, look_first, log)
                break
            except _Unreachable as exc:
                look_first = True  # it may have got through: the next attempt looks first
                delay = budget.next_delay(time.monotonic(), None)
                if delay is None:
                    raise LaunchUnavailable(
                        f"agent {run.agent}: the Slurm controller did not answer"
                        f" {SUBMIT_RETRIES + 1} submissions: {exc}"
                    ) from None
                log.error("slurm.unreachable", error=str(exc), retry_in_s=delay)
                await asyncio.sleep(delay)
        self._jobs.add(job_id, _Job(run, time.monotonic(), job_dir))
        return job_id

    async def _submit(
        self,
        launch: Launch,
        options: SlurmOptions,
        job_dir: Path,
        look_first: bool,
        log: FilteringBoundLogger,
    ) -> int:
        run = launch.run
        name = job_name(run.key)
        if look_first:  # a record with no job id: an earlier sbatch may have got through
            found = await self._find(name)
            if found is not None:
                self._save(run, job_dir, found)
                log.info("agent.job_found", job_id=found, reason="submitted before the restart")
                return found
            if marker_file(job_dir, run.key).exists():
                raise AlreadyLaunched(f"its job ran (marker in {job_dir}); not submitting again")
        else:
            job_dir.mkdir(parents=True, exist_ok=True)
            self._save(run, job_dir, None)  # the intent, durable before the job exists
        output = job_dir / f"{_UNSAFE_NAME.sub('_', run.run_id) or 'run'}.{run.agent}.%j.out"
        command = [
            "sbatch", "--parsable", f"--job-name={name}", f"--output={output}",
            "--open-mode=append", "--no-requeue", "--export=ALL",
            f"--time={max(1, math.ceil(launch.config.timeout_seconds / 60))}",
            f"--chdir={launch.config.cwd or job_dir}",
            *(f"--{k}={v}" for k in ("partition", "account", "gpus", "gres")
              if (v := getattr(options, k)) is not None),
            *options.sbatch_options,
            str(self._ensure_script()), str(marker_file(job_dir, run.key)),
            str(exit_file(job_dir, run.key)), *launch.argv,
        ]  # fmt: skip
        env = daemon_environ() | agent_env(launch)
        out = await _slurm(command, env, f"agent {run.agent}: sbatch refused the job")
        try:
            job_id = int(out.split(";")[0])
        except ValueError:  # the job may exist all the same: the record stays, without an id
            raise LaunchUnavailable(f"agent {run.agent}: sbatch answered {out[:80]!r}") from None
        self._save(run, job_dir, job_id)
        log.info("agent.submitted", job_id=job_id,
                 output=str(output).replace("%j", str(job_id)),
                 partition=options.partition)  # fmt: skip
        return job_id

    def _ensure_script(self) -> Path:
        """Our batch script, written once per daemon version (sbatch sends its text along)."""
        if not self.script.exists() or self.script.read_text() != SCRIPT:
            tmp = self.script.with_suffix(".tmp")
            tmp.write_text(SCRIPT)
            tmp.chmod(0o755)
            os.replace(tmp, self.script)
        return self.script

    def _save(self, run: AgentRun, job_dir: Path, job_id: int | None) -> None:
        record = {"job_name": job_name(run.key), "job_dir": str(job_dir), "agent": run.agent,
                  "run_id": run.run_id, "job_id": job_id}  # fmt: skip
        write_json_atomic(_record_path(self._dir, run.key), record)

    async def _find(self, name: str) -> int | None:
        """The id of the job named `name` that slurmctld still knows, or None."""
        out = await _slurm(
            ["squeue", "--noheader", "--states=all", f"--name={name}", "--format=%i"],
            None, "squeue",
        )  # fmt: skip
        ids = [int(line) for line in out.split() if line.isdigit()]
        return min(ids) if ids else None

    def adopt(self, run: AgentRun, pid: int, timeout: float) -> bool:
        """Watch a job submitted before a restart (`pid` is its job id); its state, or its
        exit record if slurmctld forgot it, is read at the first poll."""
        record = self.read_record(run.key)
        if record is None:
            return False
        self._jobs.add(pid, _Job(run, time.monotonic(), Path(record["job_dir"]), state="?"))
        return True

    def find(self, run: AgentRun) -> int | None:
        """The job id its launch record holds."""
        record = self.read_record(run.key)
        return None if record is None else record["job_id"]

    def describe(self, run: AgentRun, pid: int) -> str:
        return f"Slurm job {pid}"

    def outages(self) -> list[str]:
        failing = self._jobs.failing
        if failing is None:
            return []
        since, exc = failing
        what = "controller unreachable" if isinstance(exc, _Unreachable) else "not answering"
        return [f"Slurm {what} since {clock(since)}: {exc}"]

    def agents(self) -> list[dict[str, Any]]:
        return [
            {
                "run_id": j.run.run_id,
                "agent": j.run.agent,
                "pid": job_id,
                "job_id": job_id,
                "node": j.node,
                "state": j.state,
                "seen": j.seen,
            }  # fmt: skip
            for job_id, j in self._jobs.items.items()
        ]

    async def _look(self, ids: list[int]) -> None:
        """One `squeue` for every watched job; those ended, or forgotten, are reported."""
        states = await self._squeue(ids)
        for job_id in ids:
            job = self._jobs.items[job_id]
            job.state, job.node = states.get(job_id, ("", job.node))
            job.seen = time.time()
            if job.state in ENDED or job_id not in states:
                await self._ended(job_id)

    async def _squeue(self, ids: list[int]) -> dict[int, tuple[str, str]]:
        """job id -> (state, node) of those of `ids` slurmctld knows."""
        try:
            out = await _slurm(
                ["squeue", "--noheader", "--states=all", f"--jobs={','.join(map(str, ids))}",
                 "--format=%i|%T|%N"], None, "squeue",
            )  # fmt: skip
        except DaemonError as exc:
            if "Invalid job id" in str(exc):  # none of them is known any more
                return {}
            raise
        found = {}
        for line in out.splitlines():
            job_id, state, node = (line.split("|") + ["", ""])[:3]
            if job_id.isdigit():
                found[int(job_id)] = (state, node)
        return found

    async def _ended(self, job_id: int) -> None:
        job = self._jobs.items[job_id]
        run, state = job.run, job.state or None
        code = None
        shown = ""
        if state is not None:
            try:
                shown = await _slurm(
                    ["scontrol", "--oneliner", "show", "job", str(job_id)], None, "scontrol"
                )
                code = exit_code(_field(shown, "ExitCode"))
            except (DaemonError, _Unreachable):
                pass  # forgotten meanwhile: the exit record says as much as it can
        recorded = _read_exit(exit_file(job.job_dir, run.key))
        never_ran = _never_started(state, shown)
        if never_ran is not None and recorded is None:
            # Slurm says nothing of it ran (JobLaunchFailure's ExitCode 0:53 is no signal): the
            # launch is undone, like a local exec that failed, for the engine to make again.
            del self._jobs.items[job_id]
            _record_path(self._dir, run.key).unlink(missing_ok=True)
            duration = time.monotonic() - job.started
            self._on_exit(run.launch_id, job_id, None, duration, state, never_ran)
            return
        if code is None:
            code = recorded
        log = get_logger(run_id=run.run_id, agent=run.agent, job_id=job_id)
        if state is None:  # slurmctld forgot it: ended while the daemon was down
            state = None if code is None else "COMPLETED" if code == 0 else "FAILED"
            log.warning("agent.job_forgotten", exit_record=recorded is not None,
                        reason="gone from slurmctld (MinJobAge): its exit record is all there is;"
                        f" sacct -j {job_id} has more if the cluster keeps accounting")  # fmt: skip
        elif code == ALREADY_RAN and recorded is None:
            log.error("agent.duplicate_job", reason="its launch marker existed: the agent did"
                      " not run in this job")  # fmt: skip
        del self._jobs.items[job_id]
        self._on_exit(run.launch_id, job_id, code, time.monotonic() - job.started, state)

    async def stop(self) -> None:
        await self._jobs.stop("the daemon is stopping; the jobs run on")


class WithSlurm:
    """The daemon's launcher for its agents, and Slurm for those whose config asks for it."""

    def __init__(self, default: AgentLauncher, slurm: SlurmLauncher) -> None:
        self._default = default
        self._slurm = slurm
        self.kind = default.kind

    @property
    def running(self) -> int:
        return self._default.running + self._slurm.running

    def was_launched(self, key: str) -> bool:
        return self._default.was_launched(key) or self._slurm.was_launched(key)

    async def start(self, launch: Launch) -> int:
        if launch.config.launcher == "slurm":
            return await self._slurm.start(launch)
        return await self._default.start(launch)

    def adopt(self, run: AgentRun, pid: int, timeout: float) -> bool:
        if self._slurm.knows(run.key):
            return self._slurm.adopt(run, pid, timeout)
        return self._default.adopt(run, pid, timeout)

    def find(self, run: AgentRun) -> int | None:
        if self._slurm.knows(run.key):
            return self._slurm.find(run)
        return self._default.find(run)

    def outages(self) -> list[str]:
        return self._default.outages() + self._slurm.outages()

    def describe(self, run: AgentRun, pid: int) -> str:
        if self._slurm.knows(run.key):
            return self._slurm.describe(run, pid)
        return self._default.describe(run, pid)

    def agents(self) -> list[dict[str, Any]]:
        return self._default.agents() + self._slurm.agents()

    async def stop(self) -> None:
        await self._default.stop()
        await self._slurm.stop()


def cancel_job(launches_dir: Path, key: str) -> int | None:
    """`scancel` the job of this launch: its id, None if it went to no Slurm job.
    DaemonError if Slurm refuses or cannot be reached."""
    record = _read_record(launches_dir, key)
    job_id = None if record is None else record["job_id"]
    if job_id is None:
        return None
    done = subprocess.run(
        ["scancel", str(job_id)], capture_output=True, text=True,
        timeout=COMMAND_TIMEOUT_SECONDS, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        raise DaemonError(f"scancel {job_id}: {done.stderr.strip() or done.returncode}")
    return int(job_id)


def _record_path(launches_dir: Path, key: str) -> Path:
    return launches_dir / f"{key}.slurm"


def _read_record(launches_dir: Path, key: str) -> dict[str, Any] | None:
    try:
        record: dict[str, Any] = json.loads(_record_path(launches_dir, key).read_bytes())
    except FileNotFoundError:
        return None
    return record


def _read_exit(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


NEVER_STARTED = frozenset({"JobLaunchFailure", "launch_failed_requeued_held", "BadConstraints"})
"""scontrol's Reason= of a job whose batch script never ran."""


def _never_started(state: str | None, shown: str) -> str | None:
    """Why the job's batch script never ran, from `scontrol show job`'s fields; None if it
    may have run."""
    reason = _field(shown, "Reason")
    if not (state == "BOOT_FAIL" or (state in ENDED and reason in NEVER_STARTED)):
        return None
    output = _field(shown, "StdOut")
    if output and not os.path.isdir(os.path.dirname(output)):
        return f"{reason}: its output directory {os.path.dirname(output)} does not exist"
    return f"{reason or state} on node {_field(shown, 'NodeList') or '?'}"


def _field(shown: str, name: str) -> str:
    """One Key=Value field of `scontrol --oneliner show job`."""
    for item in shown.split():
        key, _, value = item.partition("=")
        if key == name:
            return value
    return ""


async def _slurm(argv: list[str], env: dict[str, str] | None, what: str) -> str:
    """Run a Slurm command: its stdout. _Unreachable when the controller does not answer,
    LaunchUnavailable when the command is missing or refuses."""
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env=env,
        )  # fmt: skip
    except FileNotFoundError:
        raise LaunchUnavailable(
            f"{argv[0]} not found on the daemon's PATH: install the Slurm client commands"
            " (slurm-client) and munge, or set the agent's launcher to daemon"
        ) from None
    try:
        out, err = await asyncio.wait_for(proc.communicate(), COMMAND_TIMEOUT_SECONDS)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise _Unreachable(f"{argv[0]}: no answer in {COMMAND_TIMEOUT_SECONDS:g}s") from None
    if proc.returncode != 0:
        lines = err.decode(errors="replace").strip().splitlines()
        error = lines[-1] if lines else f"exit status {proc.returncode}"
        if _UNREACHABLE.search(error):
            raise _Unreachable(error)
        raise LaunchUnavailable(f"{what}: {error}")
    return out.decode(errors="replace")
