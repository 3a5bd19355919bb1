"""Autonomy on the real model: the demo, steps 1→6, over seeded scenarios (proposal §8.2).

Each seed plants a failure a rerun fixes and, in one seed of three, a failure only a person can
fix. A run is autonomous when it reaches step 6 with no escalation except at the planted
needs-a-person step; the target (>= 80 %) is over the seeds where no person is needed.
`--tiny` runs the same on the tiny random-weight models, as a baseline.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from statistics import mean

from bench._common import command_line, save, table
from prng_daemon.demo.run import DemoOutcome, run_demo


def verdict(o: DemoOutcome) -> str:
    if not o.completed:
        return "did not reach step 6"
    person = o.scenario.person_step
    if any(path == "rules" for _, _, path in o.decisions):
        return "the rules decided (no model answer)"
    if o.unwarranted_escalations:
        return "needless escalation"
    if person is not None and person not in [s for s, _ in o.escalations]:
        return "missed the person step"
    return "autonomous" if person is None else "escalated only where warranted"


def needless_retries(o: DemoOutcome) -> int:
    """Reruns the daemon chose for the planted step that a rerun cannot fix."""
    return sum(1 for s, a, _ in o.decisions if s == o.scenario.person_step and a == "retry")


def report(outcomes: list[DemoOutcome], tiny: bool) -> None:
    """Print the table and write bench/results/autonomy.json for the seeds run so far."""
    rows = [
        [
            o.seed,
            o.scenario.retry_step,
            o.scenario.person_step or "-",
            ", ".join(f"{s}" for s, _ in o.escalations) or "-",
            needless_retries(o) if o.scenario.person_step else "-",
            len(o.decisions),
            sum(1 for _, _, path in o.decisions if path.startswith("llm")),
            f"{mean(o.decision_seconds):.1f}" if o.decision_seconds else "-",
            f"{o.seconds:.0f}",
            verdict(o),
        ]
        for o in outcomes
    ]
    headers = ["seed", "fails once", "needs a person", "escalated at", "reruns of it",
               "decisions", "by the model", "LLM s/decision", "wall s", "outcome"]  # fmt: skip
    clean = [o for o in outcomes if o.scenario.person_step is None]
    person = [o for o in outcomes if o.scenario.person_step is not None]
    autonomous = [o for o in clean if verdict(o) == "autonomous"]
    warranted = [o for o in person if verdict(o) == "escalated only where warranted"]
    times = [t for o in outcomes for t in o.decision_seconds]
    summary = {
        "autonomy_rate": round(len(autonomous) / len(clean), 3) if clean else None,
        "runs_without_person_needed": len(clean),
        "autonomous_runs": len(autonomous),
        "runs_needing_a_person": len(person),
        "escalated_only_where_warranted": len(warranted),
        "mean_seconds_per_decision": round(mean(times), 2) if times else None,
        "mean_wall_seconds_per_run": round(mean(o.seconds for o in outcomes), 1),
    }
    model = "tiny random-weight models" if tiny else "Qwen2.5-Coder-1.5B-Instruct Q4_K_M"
    print(
        f"\nautonomy: {len(autonomous)}/{len(clean)} runs without a needed person went 1->6"
        f" untouched; {len(warranted)}/{len(person)} runs needing one escalated only there"
    )
    save(
        "autonomy-tiny" if tiny else "autonomy",
        command_line(),
        {f"Demo runs, {model}, llama-server -t 2 on CPU": table(headers, rows)},
        {"summary": summary, "runs": [{"seed": r[0], "outcome": r[-1]} for r in rows]},
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, default=9, help="seeds 1..N (default 9)")
    parser.add_argument("--tiny", action="store_true", help="tiny random models instead")
    args = parser.parse_args()
    outcomes: list[DemoOutcome] = []
    with tempfile.TemporaryDirectory(prefix="bench-autonomy-") as tmp:
        for seed in range(1, args.seeds + 1):
            log = Path(tmp) / f"seed{seed}.txt"
            with log.open("w") as out:
                o = run_demo(Path(tmp) / f"seed{seed}", out, seed=seed, tiny=args.tiny)
            outcomes.append(o)
            print(f"seed {seed}: {verdict(o)} ({o.seconds:.0f} s)", flush=True)
            if verdict(o) not in ("autonomous", "escalated only where warranted"):
                print(log.read_text(), flush=True)
            # After every seed: a long run stopped early still leaves its numbers.
            report(outcomes, args.tiny)


if __name__ == "__main__":
    main()
