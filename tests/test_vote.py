"""The labelled cases' vote and how it combines with the rules and the model (issue 26)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from prng_daemon.config import PolicyConfig
from prng_daemon.document.case import Case, new_case
from prng_daemon.document.decision import Action, Decision
from prng_daemon.handlers.decide.calibrate import Calibration, platt
from prng_daemon.handlers.decide.combine import Signals, combine
from prng_daemon.handlers.decide.policy import Decider
from prng_daemon.handlers.decide.vote import CaseIndex, CaseVote, Neighbour
from prng_daemon.llm import AsyncRouter

from .fake_llama import FakeLlama, llm_config
from .test_llm_decision import meta_for

ONE = PolicyConfig(vote_neighbours=1, vote_min_cases=1)
"""The nearest case alone votes, in a pool of any size."""
# Too good to be true in a way no rule reads from its numbers: only the cases know it.
SUSPECT = "Holdout AUC 0.97, far above every earlier run on this PRNG family."
NODE = "Node rig-6600 lost mid-sweep; partial output discarded."
CLEAN = "Best trial score 0.847 with k_folds=5; search converged."


def case(label: Action, reasoning: str, step: int = 2, met: bool = True, n: int = 0) -> Case:
    meta = meta_for(step, reasoning=reasoning, success_criteria_met=met)
    return new_case(
        meta, sha256=f"{n:064x}", file=f"c{n}.json", decision=None, label=label, source="seed"
    )


def test_the_nearest_report_in_words_wins() -> None:
    pool = [case("escalate", SUSPECT, n=1), case("proceed", CLEAN, n=2)]
    pool.append(case("proceed", CLEAN, n=3))
    index = CaseIndex(pool, ONE)
    vote = index.vote(meta_for(2, reasoning="Holdout AUC 0.98: the label column leaked in."))
    assert vote is not None and (vote.action, vote.strength, vote.scope) == ("escalate", 1, "step")
    assert [n.file for n in vote.neighbours] == ["c1.json"]


def test_same_step_and_flag_come_first_then_the_flag_then_any() -> None:
    """Identical words in another step or with the other success flag are not nearer than the
    same step's cases; with too few of those, the flag's; with none of those, any."""
    pool = [
        case("escalate", CLEAN, step=3, n=1),
        case("retry", CLEAN, met=False, n=2),
        case("proceed", NODE, n=3),
    ]
    index = CaseIndex(pool, ONE)
    vote = index.vote(meta_for(2, reasoning=CLEAN))
    assert vote is not None and (vote.action, vote.scope) == ("proceed", "step")
    vote = CaseIndex(pool[:2], ONE).vote(meta_for(2, reasoning=CLEAN))
    assert vote is not None and (vote.action, vote.scope) == ("escalate", "flag")
    vote = CaseIndex(pool[1:2], ONE).vote(meta_for(2, reasoning=CLEAN))
    assert vote is not None and (vote.action, vote.scope) == ("retry", "all")


def test_numbers_against_their_bars_count_not_just_words() -> None:
    """The same words, a gap under its bar or over it: the stated comparison decides."""
    pool = [
        case("proceed", "Train AUC 0.81, holdout 0.77: gap 0.04 against the 0.08 bar.", n=1),
        case("escalate", "Train AUC 0.95, holdout 0.70: gap 0.25 against the 0.08 bar.", n=2),
    ]
    index = CaseIndex(pool, ONE)
    for gap, action in (("0.31", "escalate"), ("0.02", "proceed")):
        report = f"Train AUC 0.90, holdout 0.62: gap {gap} against the 0.1 bar."
        vote = index.vote(meta_for(2, reasoning=report))
        assert vote is not None and vote.action == action, gap


def test_the_strength_is_the_winners_share_and_a_case_can_be_left_out() -> None:
    pool = [case("escalate", SUSPECT, n=1), case("escalate", SUSPECT, n=2)]
    pool.append(case("proceed", CLEAN, n=3))
    index = CaseIndex(pool, PolicyConfig(vote_neighbours=3, vote_min_cases=1))
    vote = index.vote(meta_for(2, reasoning=SUSPECT))
    assert vote is not None and vote.action == "escalate" and 0.5 < vote.strength < 1
    vote = index.vote(meta_for(2, reasoning=SUSPECT), exclude=f"{1:064x}")
    assert vote is not None and [n.file for n in vote.neighbours][0] == "c2.json"
    assert CaseIndex([], PolicyConfig()).vote(meta_for(2)) is None
    # Fewer than policy.vote_min_cases: no vote yet.
    few = CaseIndex(pool, PolicyConfig(vote_min_cases=4))
    assert few.vote(meta_for(2, reasoning=SUSPECT)) is None


STRONGER = {"on_disagreement": "stronger"}
ESCALATE = {"on_disagreement": "escalate"}


def _vote(action: Action, strength: float) -> CaseVote:
    return CaseVote(action, strength, (Neighbour(None, "c.json", action, 0.9),), "step")


@pytest.mark.parametrize(
    ("signals", "policy", "action"),
    [
        (Signals("escalate", True, "proceed", 0.99, _vote("proceed", 1.0)), {}, "escalate"),
        (Signals("proceed", False, None, None, _vote("escalate", 1.0)), {}, "proceed"),
        (Signals("proceed", False, "proceed", 0.9, None), {}, "proceed"),
        (Signals("proceed", False, "proceed", 0.9, _vote("proceed", 0.6)), {}, "proceed"),
        (Signals("proceed", False, "proceed", 0.7, _vote("retry", 0.8)), STRONGER, "retry"),
        (Signals("proceed", False, "proceed", 0.9, _vote("retry", 0.8)), STRONGER, "proceed"),
        (Signals("retry", False, "retry", 0.9, _vote("proceed", 0.6)), ESCALATE, "escalate"),
        (Signals("retry", False, "retry", 0.6, _vote("escalate", 0.9), "preempted"), {}, "retry"),
        (Signals("retry", False, "escalate", 0.6, _vote("retry", 0.9), "preempted"), ESCALATE,
         "escalate"),
        # A clean success the model doubts and the cases do not: the stronger, where asked.
        (Signals("proceed", False, "escalate", 0.6, _vote("proceed", 0.9)), STRONGER, "proceed"),
        (Signals("proceed", False, "escalate", 0.9, _vote("proceed", 0.6)), STRONGER, "escalate"),
        (Signals("proceed", False, "escalate", 0.6, _vote("proceed", 0.9)), ESCALATE,
         "escalate"),
    ],
)  # fmt: skip
def test_one_decision_from_three_signals(
    signals: Signals, policy: dict[str, Any], action: Action
) -> None:
    """A guardrail stands; no model, the rules; agreement stands, the model's retry backed by
    the failure's stated transient cause too; a disagreement escalates or goes to the stronger
    signal."""
    assert combine(signals, PolicyConfig(**policy))[0] == action


MAJORITY = PolicyConfig(on_disagreement="majority")


@pytest.mark.parametrize(
    ("signals", "action", "why"),
    [
        # A clean success one signal doubts: the rules and the other signal carry it.
        (Signals("proceed", False, "escalate", 0.9, _vote("proceed", 0.8)), "proceed",
         "majority: the rules and the cases say proceed; the model escalate (p=0.90)"),
        (Signals("proceed", False, "proceed", 0.7, _vote("escalate", 1.0)), "proceed",
         "majority: the rules and the model say proceed; the cases escalate"),
        # The model and the cases against the rules' default.
        (Signals("proceed", False, "escalate", 0.6, _vote("escalate", 0.6)), "escalate",
         "majority: the model and the cases say escalate; the rules proceed"),
        (Signals("proceed", False, "proceed", 0.9, _vote("proceed", 0.6)), "proceed", ""),
        (Signals("proceed", False, "retry", 0.9, _vote("escalate", 0.9)), "escalate",
         "no majority: the rules proceed; the model retry (p=0.90); the cases escalate"),
        # No vote: the model and the rules agree, or it is two against none.
        (Signals("retry", False, "retry", 0.9, None), "retry", ""),
        (Signals("proceed", False, "escalate", 0.9, None), "escalate",
         "no majority: the rules proceed; the model escalate (p=0.90)"),
        (Signals("retry", False, "proceed", 0.9, None), "escalate", "no majority"),
        # A guardrail, or no model answer: as under every option.
        (Signals("escalate", True, "proceed", 0.99, _vote("proceed", 1.0)), "escalate", ""),
        (Signals("proceed", False, None, None, _vote("escalate", 1.0)), "proceed", ""),
    ],
)  # fmt: skip
def test_majority_takes_what_two_of_three_signals_say(
    signals: Signals, action: Action, why: str
) -> None:
    """Two of the rules' action, the model's and the cases' vote decide, and the reason names
    the two (and the dissent); without two that agree, escalate."""
    got, said = combine(signals, MAJORITY)
    assert got == action
    assert said.startswith(why) and (why != "" or said == "")


def test_support_is_what_the_signals_give_the_action() -> None:
    signals = Signals("proceed", False, "proceed", 0.8, _vote("escalate", 0.6))
    assert signals.supports("proceed") == pytest.approx((0.8 + 3 * 0.4) / 4)
    assert signals.supports("escalate") == pytest.approx((0.2 + 3 * 0.6) / 4)
    assert Signals("escalate", True, cases=_vote("proceed", 1.0)).supports("escalate") == 1.0


def _decide(fake: FakeLlama, pool: list[Case], meta_reasoning: str, **policy: Any) -> Decision:
    config = llm_config(fake.port, fake.port, policy={"vote_min_cases": 1, **policy})

    async def go() -> Decision:
        router = AsyncRouter(config)
        index = CaseIndex(pool, config.policy)
        try:

            async def source(_: PolicyConfig) -> CaseIndex:
                return index

            decider = Decider(config, router, source)
            return await decider.decide(meta_for(2, reasoning=meta_reasoning))
        finally:
            await router.aclose()

    return asyncio.run(go())


def test_the_decision_names_each_signal_and_the_cases_can_overrule_the_model(
    fake: FakeLlama,
) -> None:
    pool = [case("escalate", SUSPECT, n=1)]
    d = _decide(fake, pool, SUSPECT, **STRONGER)
    assert (d.action, d.decided_by) == ("escalate", "guardrail")
    assert d.signals["model"]["action"] == "proceed"
    assert d.signals["cases"]["action"] == "escalate"
    assert d.signals["cases"]["neighbours"][0]["file"] == "c1.json"
    assert d.reasoning.startswith("guardrail: the cases are the stronger: the model says proceed")
    d = _decide(fake, [case("retry", SUSPECT, n=1)], SUSPECT, **STRONGER)
    assert (d.action, d.decided_by) == ("retry", "cases")
    d = _decide(fake, [case("retry", SUSPECT, n=1)], SUSPECT, **ESCALATE)
    assert (d.action, d.decided_by) == ("escalate", "guardrail")
    assert d.reasoning.startswith("guardrail: the model says proceed (p=0.89), the cases retry")
    d = _decide(fake, [case("proceed", SUSPECT, n=1)], SUSPECT)
    assert (d.action, d.decided_by) == ("proceed", "llm"), "they agree"


def test_a_majority_decision_records_which_two_agreed(fake: FakeLlama) -> None:
    """The fake model says proceed (p=0.89) on a clean success: with the rules, it outvotes the
    cases' escalate and stays the model's decision; the record names the two and the dissent."""
    d = _decide(fake, [case("escalate", CLEAN, n=1)], CLEAN, on_disagreement="majority")
    assert (d.action, d.decided_by) == ("proceed", "llm")
    assert d.reasoning.startswith(
        "llm: majority: the rules and the model say proceed; the cases escalate"
    )
    assert (d.signals["rules"]["action"], d.signals["cases"]["action"]) == ("proceed", "escalate")
    d = _decide(fake, [case("escalate", CLEAN, n=1)], CLEAN, **ESCALATE)
    assert (d.action, d.decided_by) == ("escalate", "guardrail"), "escalate: a split asks"


def test_with_no_cases_the_decision_is_the_models(fake: FakeLlama) -> None:
    d = _decide(fake, [], SUSPECT)
    assert (d.action, d.decided_by) == ("proceed", "llm")
    assert d.signals.keys() == {"rules", "model", "support"}


def test_platt_is_monotone_and_never_certain() -> None:
    """Right above 0.7, wrong below: a steep rising curve, short of 0 and 1; no relation, or a
    falling one, is no evidence: the smoothed base rate everywhere."""
    points = [(s, s > 0.7) for s in (0.55, 0.6, 0.65, 0.75, 0.8, 0.85, 0.9, 0.95)]
    fitted = platt(points)
    values = [fitted(x) for x in (0.5, 0.6, 0.7, 0.8, 0.9, 1.0)]
    assert values == sorted(values) and 0 < values[0] < 0.15 and 0.9 < values[-1] < 1
    falling = platt([(0.9, False), (0.95, False), (0.5, True), (0.6, True)])
    assert falling.slope == 0 and falling(0.9) == pytest.approx(0.5)
    assert platt([(0.89, False)] * 4 + [(0.89, True)])(0.3) == pytest.approx(2 / 7)


def decided_case(label: Action, action: Action, support: float, step: int, n: int) -> Case:
    """A case the daemon decided `action` with `support`, whose right answer is `label`."""
    decision = Decision(
        action=action, confidence=0.9, calibrated_confidence=None, reasoning="", decided_by="llm",
        suggested_params={}, llm_metadata={}, signals={"support": support},
    )  # fmt: skip
    meta = meta_for(step, reasoning=f"report {n}")
    return new_case(
        meta, sha256=f"{n:064x}", file=f"d{n}.json", decision=decision, label=label,
        source="correct",
    )  # fmt: skip


def test_calibration_is_one_curve_pooled_over_the_steps() -> None:
    """Right when the signals backed the action above 0.7, in step 2 or 3 alike: one curve
    fitted on every decided case. Fewer than calibration_min_cases: none at all."""
    cases = [
        decided_case("proceed", "proceed" if s > 0.7 else "retry", s, 2 + i % 2, i)
        for i, s in enumerate([0.55, 0.6, 0.65, 0.75, 0.8, 0.85, 0.9, 0.95])
    ]
    approved = decided_case("proceed", "proceed", 0.2, 2, 102)
    assert approved.decision is not None
    approved = approved.model_copy(
        update={"decision": approved.decision.model_copy(update={"decided_by": "operator"})}
    )
    cases.append(case("proceed", CLEAN, n=101))
    calibration = Calibration([*cases, approved], PolicyConfig(calibration_min_cases=8))
    assert calibration.size == 8, "neither a seed case nor an operator's decision counts"
    pooled = platt([(c.decision.signals["support"], c.decision.action == c.label)
                    for c in cases if c.decision])  # fmt: skip
    assert calibration.calibrated(0.9) == pytest.approx(pooled(0.9), abs=1e-4)
    low, high = calibration.calibrated(0.6), calibration.calibrated(0.9)
    assert low is not None and high is not None and low < high
    assert Calibration(cases, PolicyConfig(calibration_min_cases=9)).calibrated(0.9) is None


def test_a_decision_under_the_calibrated_minimum_escalates(fake: FakeLlama) -> None:
    """The fake model says proceed (p=0.89); on record, such decisions were right one time in
    five: the confidence shown is that, and under the minimum the decision escalates."""
    pool = [decided_case("escalate", "proceed", 0.89, 2, i) for i in range(4)]
    pool.append(decided_case("proceed", "proceed", 0.89, 2, 4))
    d = _decide(fake, pool, CLEAN, calibration_min_cases=5, **STRONGER)
    assert (d.action, d.calibrated_confidence) == ("proceed", pytest.approx(2 / 7, abs=1e-4))
    d = _decide(
        fake, pool, CLEAN, calibration_min_cases=5, min_calibrated_confidence=0.5, **STRONGER
    )
    assert (d.action, d.decided_by) == ("escalate", "guardrail")
    assert d.reasoning.startswith("guardrail: calibrated confidence 0.29 under 0.5")
