"""A stand-in pipeline agent for the demo: writes its step's result the way a real agent would.

Real agents spend hours on a GPU cluster; this one writes, at once, the numbers and reasoning
such an agent reports, using the parameters the previous step suggested. A seeded `Scenario`
plants trouble: one step fails once in a way a rerun fixes (a lost node, an OOM, a preemption),
and in some seeds another step fails in a way only a person can fix (a corrupted input, a data
leak) — it keeps failing until the operator has fixed it, which the demo marks with a file in
`$PRNG_DEMO_STATE`.
"""

from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..sdk import RunContext, write_result

__all__ = ["PERSON_STEPS", "Scenario", "fixed_marker", "main", "result_for"]

PERSON_STEPS = (2, 4, 5)
"""Steps whose planted needs-a-person failure the agent can write."""
NODES = ["zeus", "rig-6600", "rig-6600b"]


@dataclass(frozen=True)
class Scenario:
    """What the demo run with this seed plants."""

    seed: int
    retry_step: int
    """Fails once; a rerun fixes it."""
    person_step: int | None
    """Fails until a person fixes its input; None in two seeds of three."""

    @classmethod
    def from_seed(cls, seed: int) -> Scenario:
        rng = random.Random(seed)
        retry_step = rng.randint(1, 6)
        person_step = None
        if seed % 3 == 2:
            person_step = rng.choice([s for s in PERSON_STEPS if s != retry_step])
        return cls(seed, retry_step, person_step)

    def describe(self) -> str:
        text = f"step {self.retry_step} fails once in a way a rerun fixes"
        if self.person_step is None:
            return text + "; no step needs a person"
        return text + f"; step {self.person_step} fails in a way only a person can fix"


def fixed_marker(state_dir: Path, step: int) -> Path:
    """The file the demo's operator writes once it has fixed step `step`'s input."""
    return state_dir / f"step{step}.fixed"


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _ok(step: int, p: dict[str, Any], rng: random.Random) -> tuple[dict[str, Any], dict[str, Any]]:
    """(metadata, payload) of a clean success of `step`, given the suggested params `p`."""
    params: dict[str, Any]
    payload: dict[str, Any]
    if step == 1:
        window = rng.choice([384, 512, 640, 768, 1024])
        survivors = rng.randint(1_800, 9_500)
        stability = rng.uniform(0.93, 0.99)
        params = {"window_size": window, "offset": rng.randint(3, 61), "skip_min": 0,
                  "skip_max": rng.choice([8, 12, 16])}  # fmt: skip
        reasoning = rng.choice([
            f"Optuna finished 400/400 trials. Window {window} gives {survivors:,} bidirectional "
            f"survivors and stays best across 3 seeds (stability {_pct(stability)}); criteria "
            "(>= 1,000 survivors, stable window) met.",
            f"Best window {window}: {survivors:,} bidirectional survivors, rank unchanged on all "
            f"3 re-seeded runs ({_pct(stability)} overlap). Success criteria met.",
        ])  # fmt: skip
        payload = {"best_window": window, "bidirectional_survivors": survivors,
                   "trials": 400, "stability": round(stability, 4)}  # fmt: skip
        outputs = ["bidirectional_survivors.json", "optimal_window_config.json"]
    elif step == 2:
        threshold = round(rng.uniform(0.008, 0.02), 4)
        overlap = rng.uniform(0.81, 0.94)
        params = {**p, "threshold": threshold, "k_folds": 5}
        reasoning = rng.choice([
            f"5/5 folds done on window {p.get('window_size', 512)}. Threshold {threshold} keeps "
            f"{_pct(overlap)} survivor overlap between folds (criterion >= 80%).",
            f"Scorer meta-search converged after 120 trials: threshold {threshold}, k=5, fold "
            f"overlap {_pct(overlap)}. Criteria met.",
        ])  # fmt: skip
        payload = {"best_config": {"threshold": threshold, "k_folds": 5},
                   "fold_overlap": round(overlap, 4)}  # fmt: skip
        outputs = ["optimal_scorer_config.json"]
    elif step == 3:
        scored = rng.randint(4_000_000, 7_000_000)
        hours = rng.uniform(3.5, 6.0)
        params = {**p, "top_k": rng.choice([5_000, 10_000, 20_000])}
        reasoning = rng.choice([
            f"Scored all {scored:,} survivors on 26 GPUs in {hours:.1f} h; 0 failed shards; "
            f"score distribution matches the scorer's calibration (KS p=0.{rng.randint(31, 88)}).",
            f"Full scoring complete: {scored:,}/{scored:,} survivors, 26 GPUs, {hours:.1f} h, "
            "no shard retried. Criteria (100% coverage, calibrated scores) met.",
        ])  # fmt: skip
        payload = {"survivors_scored": scored, "coverage": 1.0, "hours": round(hours, 2)}
        outputs = ["scored_survivors.parquet"]
    elif step == 4:
        auc = rng.uniform(0.71, 0.84)
        params = {**p, "model": "gbdt", "n_estimators": rng.choice([400, 600, 800]),
                  "max_depth": rng.choice([6, 8]), "learning_rate": 0.05}  # fmt: skip
        reasoning = rng.choice([
            f"60/60 trials done. Gradient boosting (depth {params['max_depth']}) reaches "
            f"validation AUC {auc:.3f}, above the 0.70 bar; no trial failed.",
            f"ML meta-search finished: best {params['n_estimators']} trees, depth "
            f"{params['max_depth']}, validation AUC {auc:.3f} (bar 0.70). Criteria met.",
        ])  # fmt: skip
        payload = {"best_model": params["model"], "validation_auc": round(auc, 4), "trials": 60}
        outputs = ["ml_meta_config.json"]
    elif step == 5:
        # A success keeps its numbers consistent with its claim: the gap is under the bar.
        train = rng.uniform(0.78, 0.86)
        holdout = train - rng.uniform(0.01, 0.07)
        params = {**p, "epochs": rng.choice([30, 40]), "dropout": 0.2}
        reasoning = rng.choice([
            f"Training converged at epoch {rng.randint(18, 29)} (early stopping). Train AUC "
            f"{train:.3f}, holdout {holdout:.3f}: gap {train - holdout:.3f} under the 0.08 "
            "overfit bar.",
            f"Anti-overfit run done: holdout AUC {holdout:.3f} vs train {train:.3f} (gap "
            f"{train - holdout:.3f} < 0.08), 5 seeds agree within 0.01. Criteria met.",
        ])  # fmt: skip
        payload = {"train_auc": round(train, 4), "holdout_auc": round(holdout, 4)}
        outputs = ["model.pt", "training_report.json"]
    else:
        hit = rng.uniform(0.09, 0.16)
        params = {**p}
        reasoning = rng.choice([
            f"Predicted the next 1,000 outputs; top-10 hit rate on the last 5,000 known "
            f"outputs is {_pct(hit)} against 0.1% by chance.",
            f"Prediction complete: backtest top-10 hit rate {_pct(hit)} (chance 0.1%), "
            "predictions written.",
        ])  # fmt: skip
        payload = {"predictions": 1000, "backtest_top10_hit_rate": round(hit, 4)}
        outputs = ["predictions.json"]
    meta = {
        "confidence": round(rng.uniform(0.84, 0.96), 2),
        "success_criteria_met": True,
        "reasoning": reasoning,
        "suggested_params": params,
        "outputs": outputs,
    }
    return meta, payload


def _transient(step: int, rng: random.Random) -> tuple[str, dict[str, Any]]:
    """(reasoning, payload) of a failure a rerun fixes."""
    node = rng.choice(NODES[1:])
    done = rng.randint(55, 80)
    failures: dict[int, tuple[str, dict[str, Any]]] = {
        1: (f"Optuna study stopped at {done * 4}/400 trials: the job hit its 4 h wall-clock "
            "limit. The best window is not yet stable (two others within 0.3%). The study "
            "storage is intact; a rerun resumes it and should finish.",
            {"trials": done * 4, "stopped": "wall-clock limit"}),
        2: (f"Fold 4 of 5 did not finish: {node}'s 12 GPUs hung after a ROCm driver reset and "
            "the scheduler killed the job. Folds 1-3 are saved; a rerun on the same config "
            "should complete.", {"folds_done": 3, "folds": 5}),
        3: (f"Scoring stopped at {done}%: {node} lost its NFS mount mid-run. The checkpoint "
            "is saved; a rerun resumes from it. Nothing is wrong with the inputs.",
            {"coverage": done / 100}),
        4: (f"Trial {done - 18} of 60 died with CUDA out of memory (batch 4096 on a 12 GB "
            f"card); {done - 19} trials completed. A rerun with batch 2048 should finish.",
            {"trials": done - 19}),
        5: (f"Training diverged at epoch {done // 6} (loss became NaN) just after LR warm-up, "
            "a known transient with mixed precision. A rerun from the last good checkpoint "
            "with gradient clipping converges.", {"epochs_done": done // 6}),
        6: (f"The prediction job was preempted by a higher-priority job at {done}%; the "
            "partial output was discarded. A rerun is all it needs.", {"predictions": 0}),
    }  # fmt: skip
    return failures[step]


def _needs_person(step: int, rng: random.Random) -> tuple[str, dict[str, Any]]:
    """(reasoning, payload) of a failure a rerun cannot fix."""
    digest = "".join(rng.choice("0123456789abcdef") for _ in range(12))
    failures: dict[int, tuple[str, dict[str, Any]]] = {
        2: ("Input bidirectional_survivors.json is corrupted: its sha256 differs from the one "
            "step 1 recorded and it ends mid-record at byte 7,340,032 (0 survivors parsed). "
            "Rerunning this step reads the same broken file; it must be restored from step "
            "1's output by a person.", {"survivors_parsed": 0, "input_sha256": digest}),
        4: ("Data leak: 38% of the validation rows also appear in the training set (both "
            "splits were cut from the same seed range), so every metric here is meaningless. "
            "A rerun reproduces the same split; someone has to rebuild it.",
            {"validation_overlap": 0.38}),
        5: ("Holdout AUC 0.997 against 0.61 on training is impossible: the holdout labels "
            "look copied from an earlier run's predictions. Rerunning trains and tests on the "
            "same files; a person must check the holdout file.",
            {"holdout_auc": 0.997, "train_auc": 0.61}),
    }  # fmt: skip
    return failures[step]


def result_for(
    context: RunContext, scenario: Scenario, fixed: bool
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(agent_metadata fields, payload) this agent writes for its run under `scenario`."""
    step = context.step
    # Per seed, step and attempt: the same run writes the same numbers.
    rng = random.Random(f"{scenario.seed}:{step}:{context.retry_count}")
    meta, payload = _ok(step, context.params, rng)
    failure = None
    if step == scenario.person_step and not fixed:
        failure = _needs_person(step, rng)
    elif step == scenario.retry_step and context.retry_count == 0:
        failure = _transient(step, rng)
    if failure is not None:
        reasoning, payload = failure
        meta = {
            "confidence": round(rng.uniform(0.15, 0.4), 2),
            "success_criteria_met": False,
            "reasoning": reasoning,
            "suggested_params": dict(context.params),
            "outputs": [],
        }
    meta["cluster_resources"] = {"nodes": NODES, "total_gpus": 26}
    return meta, payload


def main() -> None:
    context = RunContext.from_env()
    scenario = Scenario.from_seed(int(os.environ.get("PRNG_DEMO_SEED", "1")))
    state = Path(os.environ.get("PRNG_DEMO_STATE", "."))
    time.sleep(0.3)  # a real agent would spend hours on the GPU cluster here
    meta, payload = result_for(context, scenario, fixed_marker(state, context.step).exists())
    write_result(context.results_dir, context, meta, payload)


if __name__ == "__main__":
    main()
