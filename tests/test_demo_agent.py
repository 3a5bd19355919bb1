"""The demo's stand-in agent: valid, realistic results with each scenario's planted trouble."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from prng_daemon.demo_agent import PERSON_STEPS, Scenario, fixed_marker, result_for
from prng_daemon.handlers.validate import load_result
from prng_daemon.sdk import RunContext, new_run_id, write_result

SEEDS = range(1, 31)


def written(tmp_path: Path, scenario: Scenario, step: int, retries: int, fixed: bool) -> dict:
    context = RunContext(step=step, results_dir=tmp_path, run_id=new_run_id(step),
                         retry_count=retries, params={"window_size": 640})  # fmt: skip
    meta, payload = result_for(context, scenario, fixed)
    # write_result validates against schema v1.0.4 and the pipeline table before writing.
    path = write_result(tmp_path, context, meta, payload)
    return load_result(path).document.agent_metadata.model_dump()


@pytest.mark.parametrize("seed", SEEDS)
def test_every_step_writes_a_valid_result_with_the_planted_trouble(
    tmp_path: Path, seed: int
) -> None:
    scenario = Scenario.from_seed(seed)
    for step in range(1, 7):
        first = written(tmp_path, scenario, step, retries=0, fixed=False)
        rerun = written(tmp_path, scenario, step, retries=1, fixed=False)
        after_fix = written(tmp_path, scenario, step, retries=1, fixed=True)
        planted = step in (scenario.retry_step, scenario.person_step)
        assert first["success_criteria_met"] is not planted, (seed, step)
        # A rerun fixes the transient failure, never the one that needs a person.
        assert rerun["success_criteria_met"] is (step != scenario.person_step), (seed, step)
        assert after_fix["success_criteria_met"], (seed, step)
        for meta in (first, rerun, after_fix):
            assert len(meta["reasoning"]) > 60 and any(c.isdigit() for c in meta["reasoning"])
            ok = meta["success_criteria_met"]
            assert (meta["confidence"] >= 0.8) if ok else (meta["confidence"] <= 0.4)


def test_some_seeds_need_a_person_and_the_rest_do_not() -> None:
    scenarios = [Scenario.from_seed(s) for s in SEEDS]
    person = [s for s in scenarios if s.person_step is not None]
    assert 0 < len(person) < len(scenarios)
    assert all(s.person_step in PERSON_STEPS and s.person_step != s.retry_step for s in person)
    assert {s.retry_step for s in scenarios} == {1, 2, 3, 4, 5, 6}


def test_the_agent_process_waits_for_the_operators_fix(tmp_path: Path) -> None:
    """As the daemon launches it: the step that needs a person fails until its marker exists."""
    seed = next(s for s in SEEDS if Scenario.from_seed(s).person_step is not None)
    step = Scenario.from_seed(seed).person_step
    assert step is not None
    env = {**os.environ, "PRNG_STEP": str(step), "PRNG_RETRY_COUNT": "1",
           "PRNG_RESULTS_DIR": str(tmp_path / "results"), "PRNG_DEMO_SEED": str(seed),
           "PRNG_DEMO_STATE": str(tmp_path / "operator")}  # fmt: skip
    (tmp_path / "results").mkdir()
    verdicts = []
    for _ in range(2):
        subprocess.run([sys.executable, "-m", "prng_daemon.demo_agent"], env=env, check=True)
        newest = max((tmp_path / "results").glob("*.json"), key=lambda p: p.stat().st_mtime_ns)
        verdicts.append(load_result(newest).document.agent_metadata.success_criteria_met)
        newest.rename(newest.with_suffix(".seen"))
        fixed_marker(tmp_path / "operator", step).parent.mkdir(exist_ok=True)
        fixed_marker(tmp_path / "operator", step).touch()
    assert verdicts == [False, True]
