"""Command line: `prng-llm-daemon VERB ...`. Maps the daemon's errors to messages and exit codes."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from . import __version__
from .config import DEFAULT_CONFIG_PATH, Config, load_config
from .errors import ConfigError, ResultRejected
from .handlers.validate import load_result
from .log import configure_logging, pick_format

__all__ = ["main"]

EXIT_OK, EXIT_INVALID, EXIT_CONFIG = 0, 1, 2

Command = Callable[[argparse.Namespace], int]


def config_path(arg: str | None) -> Path:
    """--config, else $PRNG_DAEMON_CONFIG, else the system path."""
    return Path(arg or os.environ.get("PRNG_DAEMON_CONFIG") or DEFAULT_CONFIG_PATH)


def read_config(args: argparse.Namespace) -> Config:
    return load_config(config_path(args.config))


def cmd_check_config(args: argparse.Namespace) -> int:
    config = read_config(args)
    print(json.dumps(config.model_dump(mode="json"), indent=2))
    return EXIT_OK


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
        for r in reports:
            if r["ok"]:
                print(
                    f"{r['file']}: OK (step {r['pipeline_step']} {r['pipeline_step_name']}"
                    f" -> {r['follow_up_agent']})"
                )
            else:
                print(f"{r['file']}: INVALID")
                for e in r["errors"]:
                    print(f"  {e['pointer'] or '(file)'}: {e['message']}")
    return EXIT_OK if all(r["ok"] for r in reports) else EXIT_INVALID


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

    with_config(
        verb(
            "check-config", cmd_check_config, "print the effective config, or what is wrong with it"
        )
    )
    v = verb("validate", cmd_validate, "check result files against agent_metadata schema v1.0.4")
    v.add_argument("files", nargs="+", metavar="FILE")
    v.add_argument("--json", action="store_true", help="print a JSON report")
    v.add_argument("--max-bytes", type=int, default=16 << 20, help="size limit per file")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(
        pick_format(sys.stderr, os.environ.get("JOURNAL_STREAM")), level=args.log_level
    )
    try:
        code: int = args.func(args)
    except ConfigError as exc:
        for line in exc.problems:
            print(line, file=sys.stderr)
        return EXIT_CONFIG
    return code
