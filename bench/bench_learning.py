"""Decisions that learn from their operator (issue 26): the learning curve of the cases' vote and
of the combined policy, calibration of `calibrated_confidence`, the autonomy-accuracy curve, each
`on_disagreement` option at the full pool (and the one MIN_R chooses), and what the vote costs
per decision.

    .venv/bin/python -m bench.bench_learning [--draws 5] [--sets fresh4] [--no-payload]
        [--write-seed examples/seed-cases.jsonl]

It replays the policy on the model's saved answers: run bench_quality once per labelled set
first (`--name signals_blind --set bench/labelled/blind`, `signals_heldout`, `signals_main`,
`signals_fresh`, `signals_fresh2`, `signals_fresh3`; the blind set not yet used: `--name
signals_fresh4 --set bench/labelled/fresh4`, then `--sets fresh4` here, once): the prompt does
not depend on the cases, so the model's answer for a file is the same at every pool size, and
only the rules, the vote and the combination are recomputed here. Every set is tested with a
pool of the others (POOLS); a tested set is never in its own pool. The rules read the file's
`result` too, as `Decider.take(meta, payload)` does; `--no-payload` replays them on
agent_metadata alone. Writes bench/results/learning.json and learning_autonomy.png.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench._common import REPO, RESULTS_DIR, command_line, save, table
from bench.bench_quality import LABELLED, auroc, labelled, point_biserial
from prng_daemon.config import Disagreement, PolicyConfig
from prng_daemon.document.case import Case, new_case
from prng_daemon.document.decision import ACTIONS, Action, Decision
from prng_daemon.handlers.decide.causes import failure_text, permanent_cause
from prng_daemon.handlers.decide.claims import stated_claims
from prng_daemon.handlers.decide.combine import Signals, combine
from prng_daemon.handlers.decide.consistency import contradictions
from prng_daemon.handlers.decide.policy import rules_decision, settled_by_rules, stated_cause
from prng_daemon.handlers.decide.vote import CaseIndex
from prng_daemon.handlers.validate import load_result

SETS = {
    "main": LABELLED,
    "heldout": LABELLED / "heldout",
    "blind": LABELLED / "blind",
    "fresh": LABELLED / "fresh",
    "fresh2": LABELLED / "fresh2",
    "fresh3": LABELLED / "fresh3",
    "fresh4": LABELLED / "fresh4",
}
NEVER_POOLED = frozenset({"fresh4"})
"""A blind set measured once: tested with a pool of every other set, never in one."""
POOLS = {
    "main": ("heldout", "blind", "fresh"),
    "heldout": ("main", "blind", "fresh"),
    "blind": ("main", "heldout", "fresh"),
    "fresh": ("main", "heldout", "blind"),
    "fresh2": ("main", "heldout", "blind", "fresh"),
    "fresh3": ("main", "heldout", "blind", "fresh", "fresh2"),
}
"""The sets each set is tested with (all six are tuning data now; `fresh`, `fresh2` and `fresh3`
keep the pools they were measured with). A set not named here (fresh4) gets all of them."""
SIZES = (0, 25, 50, 100)
THRESHOLDS = (0.0, 0.5, 0.6, 0.7, 0.8, 0.9)
WHO = ("rules", "model", "cases", "policy")
OPTIONS: tuple[Disagreement, ...] = ("escalate", "stronger", "majority")
MIN_R = 0.6
"""The default `on_disagreement` is the option right most often over the tuning sets whose
pooled r is at least this, else escalate: a confidence that means little cannot tell a person
which decisions to look at (min_calibrated_confidence)."""


class Item:
    """One labelled file, with the model's saved answer on it."""

    def __init__(self, case: Case, row: dict[str, Any], payload: dict[str, Any]) -> None:
        self.case, self.row, self.payload = case, row, payload
        self.meta = case.agent_metadata


def items(name: str, with_payload: bool = True) -> list[Item]:
    directory = SETS[name]
    saved = RESULTS_DIR / f"signals_{name}.json"
    if not saved.exists():
        raise SystemExit(f"no {saved.relative_to(REPO)}: run bench_quality on {name} first")
    rows = {r["file"]: r for r in json.loads(saved.read_text())["rows"]}
    out = []
    for file, meta, label, _ in labelled(directory):
        loaded = load_result(directory / file, max_bytes=1 << 20)
        sha = loaded.sha256
        payload = dict(loaded.document.model_extra or {}) if with_payload else {}
        case = new_case(meta, sha256=sha, file=f"{name}/{file}", decision=None, label=label,
                        source="seed", operator="prng-llm-daemon labelled sets")  # fmt: skip
        out.append(Item(case, rows[file], payload))
    return out


def replay(item: Item, index: CaseIndex | None, policy: PolicyConfig) -> dict[str, Any]:
    """Each signal's answer and the policy's decision on `item`, as the Decider takes it, from
    the model's saved answer (the policy's own path when no case was in its pool)."""
    meta, row = item.meta, item.row
    vote = index.vote(meta, exclude=item.case.sha256) if index is not None else None
    rules: Action = rules_decision(meta, policy, item.payload)[0]
    settled = settled_by_rules(meta, policy, item.payload) is not None
    model, p, path = row["policy"], row["policy_calibrated"], row["path"]
    if row["settled"] and not settled:
        # Settled by the rules when it was measured, so the policy never asked the model: the
        # model's answer with every finding open (bench_quality's "model" column) stands in.
        model, p, path = row["model"], row["model_calibrated"], "llm"
    if settled:
        signals, action = Signals("escalate", True, cases=vote), "escalate"
    elif path == "rules":  # no model answer: the rules decide
        signals, action = Signals(rules, False, cases=vote), rules
    elif path == "guardrail":  # the model's own guardrail (two models disagreeing)
        signals, action = Signals(rules, False, model, p, vote), "escalate"
    else:
        signals = Signals(rules, False, model, p, vote, stated_cause(meta, item.payload))
        action = combine(signals, policy)[0]
    calibration = index.calibration if index is not None else None
    support = signals.supports(action)
    calibrated = calibration.calibrated(support) if calibration else None
    return {
        "label": item.case.label,
        "rules": rules,
        "model": model,
        "cases": "escalate" if settled else vote.action if vote else rules,
        "policy": action,
        "support": support,
        "calibrated": calibrated,
    }


def decided_pool(pool: Sequence[Item], policy: PolicyConfig) -> CaseIndex:
    """The pool as the daemon would hold it: each case with the decision it would have made
    with the rest of the pool (leave one out), so the calibration fits on decisions it did
    not see the answer to."""
    plain = CaseIndex([i.case for i in pool], policy)
    cases = []
    for item in pool:
        r = replay(item, plain, policy)
        decision = Decision(
            action=r["policy"], confidence=item.meta.confidence, calibrated_confidence=None,
            reasoning="", suggested_params={}, decided_by="llm", llm_metadata={},
            signals={"support": round(r["support"], 4)},
        )  # fmt: skip
        cases.append(item.case.model_copy(update={"decision": decision}))
    return CaseIndex(cases, policy)


def score(results: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for who in WHO:
        out[who] = {label: _share([r[who] == r["label"] for r in results if r["label"] == label])
                    for label in ACTIONS}  # fmt: skip
        out[who]["all"] = _share([r[who] == r["label"] for r in results])
    scored = [r for r in results if r["calibrated"] is not None]
    right = [r["policy"] == r["label"] for r in scored]
    cal = [r["calibrated"] for r in scored]
    out["calibration"] = {
        "n": len(scored),
        "r": point_biserial(cal, right),
        "auroc": auroc(cal, right),
    }
    return out


def rule_hits(test: list[Item]) -> list[list[Any]]:
    """What each family of rules escalates on `test`, right (the label is escalate) or not:
    one row per family, so a rule that only fits the sets it was written against shows."""
    families: dict[str, list[bool]] = {"stated bar (claims)": [], "own numbers (consistency)": [],
                                       "permanent cause (causes)": []}  # fmt: skip
    for item in test:
        meta, right = item.meta, item.case.label == "escalate"
        reasoning = meta.reasoning or ""
        if meta.success_criteria_met:
            if any(not c.holds for c in stated_claims(reasoning)):
                families["stated bar (claims)"].append(right)
            if contradictions(reasoning, item.payload):
                families["own numbers (consistency)"].append(right)
        elif permanent_cause(failure_text(reasoning, item.payload)):
            families["permanent cause (causes)"].append(right)
    return [[name, sum(hits), len(hits) - sum(hits)] for name, hits in families.items()]


def options(loaded: dict[str, list[Item]], tested: list[str]) -> tuple[dict[str, str], Any]:
    """Each `on_disagreement` option at the full pool, per set and pooled: per class, escalate
    recall on contradictory successes the rules miss (label escalate, rules proceed), r and
    AUROC; the option MIN_R chooses, and the one it chooses on all sets but each (leave one
    set out)."""
    results = {
        option: {name: full_pool(loaded, name, PolicyConfig(on_disagreement=option))
                 for name in tested}
        for option in OPTIONS
    }  # fmt: skip
    rows = [[name, option, *option_cells(results[option][name])]
            for name in tested for option in OPTIONS]  # fmt: skip
    rows += [["pooled", option, *option_cells(pooled(results[option], tested))]
             for option in OPTIONS]  # fmt: skip
    tables = {
        "on_disagreement at the full pool, per set and pooled": table(
            ["set", "option", *(f"label {a}" for a in ACTIONS), "all", "right",
             "escalate recall, rules proceed", "r", "AUROC"], rows,
        ),
    }  # fmt: skip
    chosen = choose({o: pooled(results[o], tested) for o in OPTIONS})
    data: dict[str, Any] = {"min_r": MIN_R, "chosen": chosen, "leave_one_out": {}}
    if len(tested) > 1:
        body = []
        for name in tested:
            rest = [n for n in tested if n != name]
            pick = choose({o: pooled(results[o], rest) for o in OPTIONS})
            data["leave_one_out"][name] = pick
            body.append([name, pick, *(_right(results[o][name]) for o in OPTIONS)])
        total = [
            sum(r["policy"] == r["label"] for n in tested for r in results[o][n]) for o in OPTIONS
        ]
        loo = sum(r["policy"] == r["label"] for n in tested
                  for r in results[data["leave_one_out"][n]][n])  # fmt: skip
        body.append(["all", f"right: {loo}", *total])
        tables[
            f"Leave one set out: the option chosen (r >= {MIN_R}) on the others, right on it"
        ] = table(["set left out", "chosen on the others", *OPTIONS], body)
    tables[f"The option chosen on every tested set pooled (r >= {MIN_R})"] = chosen
    return tables, data


def full_pool(loaded: dict[str, list[Item]], name: str, policy: PolicyConfig) -> list[Any]:
    others = [i for pool in POOLS.get(name, POOLS) for i in loaded[pool]]
    index = decided_pool(others, policy)
    return [replay(item, index, policy) for item in loaded[name]]


def pooled(results: dict[str, list[Any]], names: Sequence[str]) -> list[Any]:
    return [r for name in names for r in results[name]]


def option_cells(results: list[dict[str, Any]]) -> list[Any]:
    s = score(results)
    missed = [r["policy"] == "escalate" for r in results
              if r["label"] == "escalate" and r["rules"] == "proceed"]  # fmt: skip
    return [
        *(pct(s["policy"][a]) for a in (*ACTIONS, "all")),
        _right(results),
        f"{sum(missed)}/{len(missed)}",
        _num(s["calibration"]["r"]),
        _num(s["calibration"]["auroc"]),
    ]


def _right(results: list[dict[str, Any]]) -> str:
    return f"{sum(r['policy'] == r['label'] for r in results)}/{len(results)}"


def choose(results: dict[Disagreement, list[dict[str, Any]]]) -> Disagreement:
    """The option right most often whose r is at least MIN_R (the first in OPTIONS on a tie);
    escalate when none has."""
    fit = [o for o, rs in results.items() if (score(rs)["calibration"]["r"] or 0.0) >= MIN_R]
    return max(fit, key=lambda o: sum(r["policy"] == r["label"] for r in results[o]),
               default="escalate")  # fmt: skip


def _share(hits: list[bool]) -> float | None:
    return sum(hits) / len(hits) if hits else None


def autonomy(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """At each min_calibrated_confidence: the share of files decided without a person (not
    escalated) and the policy's accuracy when a decision under it escalates."""
    out = []
    for t in THRESHOLDS:
        actions = [
            "escalate" if r["calibrated"] is not None and r["calibrated"] < t else r["policy"]
            for r in results
        ]
        out.append({
            "threshold": t,
            "autonomous": sum(a != "escalate" for a in actions) / len(results),
            "accuracy": sum(a == r["label"] for a, r in zip(actions, results, strict=True))
            / len(results),
        })  # fmt: skip
    return out


def curve(test: list[Item], others: list[Item], draws: int, policy: PolicyConfig) -> list[Any]:
    rng = random.Random(26)
    points = []
    for size in (*[s for s in SIZES if s < len(others)], len(others)):
        runs = []
        for _ in range(draws if 0 < size < len(others) else 1):
            pool = rng.sample(others, size)
            index = decided_pool(pool, policy) if pool else None
            runs.append([replay(item, index, policy) for item in test])
        points.append({"pool": size, "draws": len(runs), "scores": [score(r) for r in runs],
                       "results": runs})  # fmt: skip
    return points


def mean(scores: list[dict[str, Any]], *path: str) -> float | None:
    values = []
    for s in scores:
        for key in path:
            s = s[key]
        if s is not None:
            values.append(float(s))  # type: ignore[arg-type]
    return statistics.fmean(values) if values else None


def pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.0f} %"


def timing(pool: list[Item], test: list[Item], policy: PolicyConfig) -> dict[str, float]:
    start = time.perf_counter()
    index = decided_pool(pool, policy)
    built = time.perf_counter() - start
    start = time.perf_counter()
    for item in test:
        replay(item, index, policy)
    per = (time.perf_counter() - start) / len(test)
    return {"pool": len(pool), "index_build_s": built, "vote_and_calibration_s": per}


def plot(curves: dict[str, list[dict[str, Any]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    for name, rows in curves.items():
        xs = [100 * r["autonomous"] for r in rows]
        ys = [100 * r["accuracy"] for r in rows]
        ax.plot(xs, ys, marker="o", label=f"{name} set")
        # Thresholds that change nothing share a point: one label ("0-0.7") for them.
        points: dict[tuple[float, float], list[float]] = {}
        for r, x, y in zip(rows, xs, ys, strict=True):
            points.setdefault((x, y), []).append(r["threshold"])
        for (x, y), ts in points.items():
            text = f"{ts[0]:g}" if len(ts) == 1 else f"{ts[0]:g}-{ts[-1]:g}"
            ax.annotate(text, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel("files decided without a person (%)")
    ax.set_ylabel("decisions right (%)")
    ax.set_title("autonomy vs accuracy at each min_calibrated_confidence", fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--draws", type=int, default=5, help="pools drawn per pool size")
    parser.add_argument("--write-seed", type=Path, help="write every poolable case as JSONL")
    parser.add_argument(
        "--sets",
        nargs="+",
        choices=list(SETS),
        help="test only these (default: every set there but the blind one)",
    )
    parser.add_argument(
        "--no-payload", action="store_true", help="rules on agent_metadata alone (no `result`)"
    )
    args = parser.parse_args()
    policy = PolicyConfig()
    present = [name for name, directory in SETS.items() if (directory / "labels.json").exists()]
    tested = args.sets or [name for name in present if name not in NEVER_POOLED]
    needed = {*tested, *(p for name in tested for p in POOLS.get(name, POOLS))}
    if args.write_seed:
        needed |= POOLS.keys()
    loaded = {name: items(name, not args.no_payload) for name in present if name in needed}
    tables: dict[str, str] = {}
    data: dict[str, Any] = {"policy": policy.model_dump(mode="json"), "sets": {}}
    if args.no_payload:
        data["payload"] = "none: the rules read agent_metadata alone"
    autonomy_curves = {}
    for blind in tested:
        test = loaded[blind]
        others = [i for name in POOLS.get(blind, POOLS) for i in loaded[name]]
        points = curve(test, others, args.draws, policy)
        body = []
        for point in points:
            s = point["scores"]
            body.append(
                [
                    point["pool"],
                    point["draws"],
                    *(pct(mean(s, who, "all")) for who in WHO),
                    *(pct(mean(s, "policy", label)) for label in ACTIONS),
                    _num(mean(s, "calibration", "r")),
                    _num(mean(s, "calibration", "auroc")),
                ]
            )
        title = f"Learning curve on the {blind} set ({len(test)} files; pool from the other sets)"
        tables[title] = table(
            ["pool", "draws", *WHO, *(f"policy, label {a}" for a in ACTIONS), "r", "AUROC"], body
        )
        full = points[-1]["scores"][0]
        tables[f"Accuracy per class at the full pool ({len(others)} cases), {blind} set"] = table(
            ["signal", *(f"label {a}" for a in ACTIONS), "all"],
            [[who, *(pct(full[who][a]) for a in (*ACTIONS, "all"))] for who in WHO],
        )  # fmt: skip
        tables[f"What each family of rules escalates, {blind} set"] = table(
            ["rules", "right (label escalate)", "wrong"], rule_hits(test)
        )
        curve_rows = autonomy(points[-1]["results"][0])
        autonomy_curves[blind] = curve_rows
        tables[f"Autonomy and accuracy at each min_calibrated_confidence, {blind} set"] = table(
            ["min_calibrated_confidence", "decided without a person", "right"],
            [[r["threshold"], pct(r["autonomous"]), pct(r["accuracy"])] for r in curve_rows],
        )  # fmt: skip
        data["sets"][blind] = {
            "curve": [{k: v for k, v in p.items() if k != "results"} for p in points],
            "autonomy": curve_rows,
            "timing": timing(others, test, policy),
        }
    compared, data["on_disagreement"] = options(loaded, tested)
    tables.update(compared)
    png = RESULTS_DIR / "learning_autonomy.png"
    plot(autonomy_curves, png)
    data["plot"] = str(png.relative_to(REPO))
    tables["What the vote and the calibration cost per decision (this CPU)"] = table(
        ["blind set", "pool", "index build s", "vote + calibration s per decision"],
        [[name, t["pool"], t["index_build_s"], t["vote_and_calibration_s"]]
         for name, t in ((n, data["sets"][n]["timing"]) for n in data["sets"])],
    )  # fmt: skip
    if args.write_seed:
        everything = [i for name in POOLS for i in loaded[name]]
        index = decided_pool(everything, policy)
        args.write_seed.write_text("".join(c.model_dump_json() + "\n" for c in index.cases))
        print(f"written: {args.write_seed} ({len(index.cases)} cases)")
    save("learning", command_line(), tables, data)


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


if __name__ == "__main__":
    main()
