"""Proceed, retry or escalate for a step result: rules, a grammar-bound model answer, and
guardrails (docs/decisions.md)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from ...config import Config, PolicyConfig
from ...document.decision import ACTIONS, CONFIDENCE_LEVELS, Action, DecidedBy, Decision
from ...document.metadata import AgentMetadata
from ...document.pipeline import PrimaryLLM, ServerName, step
from ...errors import LLMBadAnswer, LLMError, LLMUnavailable
from ...llm.router import AsyncRouter, LLMMetrics, Routed
from ...log import get_logger
from .calibrate import Calibration
from .causes import failure_text, permanent_cause, transient_cause
from .claims import stated_claims
from .combine import Signals, combine
from .consistency import contradictions
from .prompt import (
    EXPLAIN_GRAMMAR,
    FAILURE_FINDINGS,
    FINDING_TOKENS,
    FINDINGS,
    N_PROBS,
    PREFILL,
    SUCCESS_FINDINGS,
    Answer,
    ModelAnswer,
    build_messages,
    finding_grammar,
    finding_probabilities,
)
from .vote import CaseIndex, CaseVote

__all__ = [
    "CaseSource",
    "Decider",
    "Payload",
    "Unexplained",
    "open_findings",
    "rules_decision",
    "settled_by_rules",
    "stated_cause",
]

CaseSource = Callable[[PolicyConfig], Awaitable[CaseIndex | None]]
"""The labelled cases as they stand now (None: none yet)."""
Payload = Mapping[str, Any] | None
"""What the result file holds besides agent_metadata (its `result`), when the caller has it."""

log = get_logger()


@dataclass(frozen=True)
class Unexplained:
    """A decision taken from the model's finding, its explanation not yet asked for
    (`Decider.explain`)."""

    decision: Decision
    meta: AgentMetadata
    model: ModelAnswer
    metrics: LLMMetrics
    cases: CaseVote | None
    calibration: Calibration | None
    cause: str | None
    """The transient cause the failure states (`stated_cause`)."""


def open_findings(meta: AgentMetadata) -> tuple[str, ...]:
    """The findings the rules leave open: a success is supported or contradicted (less what
    its own stated numbers already settle); a failure has a cause a rerun fixes or one it does
    not."""
    if not meta.success_criteria_met:
        return tuple(FAILURE_FINDINGS)
    settled = {c.finding for c in stated_claims(meta.reasoning or "") if c.holds}
    return tuple(f for f in SUCCESS_FINDINGS if f not in settled)


def rules_decision(
    meta: AgentMetadata, policy: PolicyConfig, payload: Payload = None
) -> tuple[Action, str]:
    """The deterministic policy used when no LLM can answer: (action, reasoning)."""
    settled = settled_by_rules(meta, policy, payload)
    if settled is not None:
        return "escalate", settled
    return _unsettled_decision(meta, policy)


def _unsettled_decision(meta: AgentMetadata, policy: PolicyConfig) -> tuple[Action, str]:
    """The rules' action where no guardrail settled the result: its success flag decides."""
    if meta.success_criteria_met:
        return "proceed", "success criteria met with enough confidence"
    return "retry", f"success criteria not met; retry {meta.retries + 1} of {policy.max_retries}"


def settled_by_rules(
    meta: AgentMetadata, policy: PolicyConfig, payload: Payload = None
) -> str | None:
    """Why this result is escalated whatever its text says, or None when the model decides."""
    reasoning = meta.reasoning or ""
    if policy.escalate_on_human_override and meta.human_override_requested:
        return "a human override was requested"
    if not meta.success_criteria_met and meta.retries >= policy.max_retries:
        return f"the step failed and its retry budget of {policy.max_retries} is spent"
    if meta.success_criteria_met and meta.confidence < policy.confidence_threshold:
        return f"the agent itself is unsure (confidence {meta.confidence:g})"
    if meta.success_criteria_met:
        failed = [c.text for c in stated_claims(reasoning) if not c.holds]
        failed += contradictions(reasoning, payload)
        if failed:
            return "success claimed, but its own numbers say otherwise: " + "; ".join(failed)
        return None
    resources = meta.cluster_resources
    total_gpus = resources.total_gpus if resources is not None else None
    cause = permanent_cause(failure_text(reasoning, payload), total_gpus)
    if cause is not None:
        return f"a rerun would fail the same way: {cause}"
    return None


def stated_cause(meta: AgentMetadata, payload: Payload = None) -> str | None:
    """The transient cause a failure states (for `Signals.cause`), or None."""
    if meta.success_criteria_met:
        return None
    return transient_cause(failure_text(meta.reasoning or "", payload))


class Decider:
    """Asks the step's primary LLM(s) what the report shows, and applies the policy."""

    def __init__(
        self, config: Config, router: AsyncRouter, cases: CaseSource | None = None
    ) -> None:
        self.config = config
        self.policy = config.policy
        self.router = router
        self.cases = cases

    async def consult(self, meta: AgentMetadata) -> tuple[CaseVote | None, Calibration | None]:
        """The labelled cases' vote on `meta` (a few ms: in a worker thread), and the
        calibration fitted on them; None, None with no cases."""
        index = await self.cases(self.policy) if self.cases is not None else None
        if index is None:
            return None, None
        if len(index) < index.policy.vote_min_cases:  # too few to vote: no hop to a thread
            return None, index.calibration
        return await asyncio.to_thread(index.vote, meta), index.calibration

    async def _chat(
        self, endpoint: ServerName, messages: list[dict[str, str]], prefill: str, **kw: Any
    ) -> Routed:
        return await self.router.chat(
            [*messages, {"role": "assistant", "content": prefill}],
            endpoint=endpoint,
            temperature=self.policy.decision_temperature,
            seed=self.policy.decision_seed,
            query_type="statistical" if endpoint == "math" else "orchestration",
            id_slot=self.policy.decision_slot,
            **kw,
        )

    async def _ask(
        self,
        endpoint: ServerName,
        messages: list[dict[str, str]],
        findings: tuple[str, ...],
        metrics: LLMMetrics,
    ) -> ModelAnswer:
        """One model's finding, after at most policy.answer_attempts tries.

        The action is the one whose findings are most probable together; the finding named is
        that action's most probable one (the word written can belong to another action when
        the probability is spread over several of its words)."""
        policy, problem = self.policy, ""
        for _ in range(policy.answer_attempts):
            try:
                routed = await self._chat(
                    endpoint, messages, PREFILL, max_tokens=FINDING_TOKENS,
                    grammar=finding_grammar(findings), n_probs=N_PROBS,
                )  # fmt: skip
            except LLMBadAnswer as exc:
                problem = str(exc)
                log.warning("llm.answer_rejected", endpoint=endpoint, reason=problem)
                continue
            metrics.record(routed)
            written = routed.completion.content
            probabilities = routed.completion.probabilities
            if written.removesuffix('"') in findings and probabilities:
                chances = finding_probabilities(probabilities[0], findings)
                by_action = {a: sum(p for f, p in chances.items() if FINDINGS[f][0] == a)
                             for a in ACTIONS}  # fmt: skip
                action = max(ACTIONS, key=lambda a: by_action[a])
                finding = max(
                    (f for f in findings if FINDINGS[f][0] == action), key=lambda f: chances[f]
                )
                return ModelAnswer(
                    finding, action, by_action[action], routed, findings,
                    degraded=routed.degraded,
                )  # fmt: skip
            problem = f"{routed.endpoint}: finding: {written[:40]!r} is not one of {findings}"
            log.warning("llm.answer_rejected", endpoint=routed.endpoint, reason=problem)
        raise LLMBadAnswer(f"no usable answer in {policy.answer_attempts} tries: {problem}")

    async def ask_model(
        self,
        meta: AgentMetadata,
        findings: tuple[str, ...] = tuple(FINDINGS),
        metrics: LLMMetrics | None = None,
    ) -> ModelAnswer:
        """The model's finding among `findings` (all of them: the model alone decides): on a
        "both" step the math specialist assesses first and the orchestrator decides knowing
        it. Raises LLMError."""
        metrics = metrics or LLMMetrics()
        primary = step(meta.pipeline_step).primary_llm
        messages = build_messages(meta, self.policy, findings)
        answer = await self._ask(primary.first_asked, messages, findings, metrics)
        if primary is not PrimaryLLM.BOTH:
            return answer
        messages = build_messages(meta, self.policy, findings, answer)
        decided = await self._ask("orchestrator", messages, findings, metrics)
        return ModelAnswer(
            decided.finding, decided.action, decided.probability, decided.routed, findings,
            disagree=answer.action != decided.action,
            degraded=answer.degraded or decided.degraded,
        )  # fmt: skip

    async def _explain(
        self, meta: AgentMetadata, model: ModelAnswer, metrics: LLMMetrics
    ) -> Answer | None:
        """The model's confidence word and reasoning for its finding; None if it gives none."""
        prefill = f'{PREFILL}{model.finding}", "decision": "{model.action}", "confidence": "'
        messages = build_messages(meta, self.policy, model.findings)
        try:
            routed = await self._chat(
                model.routed.endpoint, messages, prefill,
                max_tokens=self.policy.decision_max_tokens, grammar=EXPLAIN_GRAMMAR, n_probs=0,
            )  # fmt: skip
        except LLMError as exc:
            log.warning("llm.no_explanation", reason=str(exc))
            return None
        metrics.record(routed)
        try:
            return Answer.model_validate_json(prefill + routed.completion.content)
        except ValidationError as exc:
            log.warning("llm.no_explanation", reason=exc.errors()[0]["msg"],
                        content=routed.completion.content[:200])  # fmt: skip
            return None

    async def decide(self, meta: AgentMetadata, payload: Payload = None) -> Decision:
        """The decision for one validated result, explained; LLMUnavailable only under
        when_no_llm="wait"."""
        taken = await self.take(meta, payload)
        return await self.explain(taken) if isinstance(taken, Unexplained) else taken

    async def take(self, meta: AgentMetadata, payload: Payload = None) -> Decision | Unexplained:
        """The decision for one validated result, its explanation (policy.explain_decisions)
        still to ask for with `explain`: the action never depends on it, so a launch need not
        wait for it. `payload` (the file's `result`) lets the rules check its numbers too.
        LLMUnavailable only under when_no_llm="wait"."""
        metrics, policy = LLMMetrics(), self.policy
        settled = settled_by_rules(meta, policy, payload)
        cases, calibration = await self.consult(meta)
        if settled is not None:
            signals = Signals("escalate", True, cases=cases)
            return self._decision(
                meta, "escalate", meta.confidence, None, f"guardrail: {settled}", "guardrail",
                metrics, signals, calibration,
            )  # fmt: skip
        try:
            async with asyncio.timeout(policy.decision_deadline_seconds):
                model = await self.ask_model(meta, open_findings(meta), metrics)
        except (LLMError, TimeoutError) as exc:
            if isinstance(exc, TimeoutError):
                problem = f"no decision within {policy.decision_deadline_seconds:g}s"
                log.warning("decision.deadline", seconds=policy.decision_deadline_seconds,
                            outcome=policy.when_no_llm)  # fmt: skip
            else:
                problem = str(exc)
            if policy.when_no_llm == "wait":
                raise LLMUnavailable(f"no LLM decision, waiting: {problem}") from None
            log.warning("decision.rules_fallback", reason=problem)
            action, why = rules_decision(meta, policy, payload)
            return self._decision(
                meta, action, meta.confidence, None, f"rules: {why}", "rules", metrics,
                Signals(action, False, cases=cases), calibration,
            )  # fmt: skip
        cause = stated_cause(meta, payload)
        decision = self._model_decision(meta, model, None, metrics, cases, calibration, cause)
        if not policy.explain_decisions:
            return decision
        return Unexplained(decision, meta, model, metrics, cases, calibration, cause)

    async def explain(self, taken: Unexplained) -> Decision:
        """`taken.decision` with the model's confidence word and reasoning, or as it is when
        the model gives none within policy.decision_deadline_seconds. Raises no LLMError."""
        deadline = self.policy.decision_deadline_seconds
        explained = None
        try:
            async with asyncio.timeout(deadline):
                explained = await self._explain(taken.meta, taken.model, taken.metrics)
        except TimeoutError:
            log.warning("llm.no_explanation", reason=f"none within {deadline:g}s")
        # Made again even without one: an answer that could not be used still counts as a call.
        return self._model_decision(
            taken.meta, taken.model, explained, taken.metrics, taken.cases, taken.calibration,
            taken.cause,
        )  # fmt: skip

    def _model_decision(
        self, meta: AgentMetadata, model: ModelAnswer, explained: Answer | None,
        metrics: LLMMetrics, cases: CaseVote | None, calibration: Calibration | None,
        cause: str | None,
    ) -> Decision:  # fmt: skip
        """The policy applied to the model's finding, the cases' vote and the failure's stated
        cause; `explained` only words the record."""
        policy, probability = self.policy, model.probability
        found = f"{model.finding} (p={probability:.2f})"
        held = [c.text for c in stated_claims(meta.reasoning or "") if c.holds]
        if meta.success_criteria_met and held:
            found += f" [its numbers hold: {'; '.join(held)}]"
        if explained is not None:
            confidence = CONFIDENCE_LEVELS[explained.confidence]
            reasoning = f"{found}: {explained.reasoning}"
        else:
            confidence, reasoning = probability, found
        path: DecidedBy = "llm_degraded" if model.degraded else "llm"
        action, why = model.action, ""
        if policy.escalate_on_disagreement and model.disagree:
            why = "the math specialist and the orchestrator disagree"
        elif probability < policy.min_action_probability:
            why = f"the model gives {model.action} only p={probability:.2f}"
        # Only asked when no guardrail settled it (`take`): the rules' scan is not run again.
        rules = _unsettled_decision(meta, policy)[0]
        signals = Signals(rules, False, model.action, probability, cases, cause)
        if why and action != "escalate":
            action, path = "escalate", "guardrail"
            reasoning = f"guardrail: {why} (the model said {model.action}: {reasoning})"
        elif (combined := combine(signals, policy)) != (action, ""):
            action, why = combined
            if action != model.action:  # else a majority the model is part of: its decision
                path = "guardrail" if action == "escalate" else "cases"
            reasoning = f"{path}: {why} (the model said {model.action}: {reasoning})"
        return self._decision(
            meta, action, confidence, probability, reasoning, path, metrics, signals, calibration
        )

    def _decision(
        self,
        meta: AgentMetadata,
        action: Action,
        confidence: float,
        calibrated: float | None,
        reasoning: str,
        path: DecidedBy,
        metrics: LLMMetrics,
        signals: Signals,
        calibration: Calibration | None,
    ) -> Decision:
        """The decision as recorded. Its calibrated confidence is the calibration's, once
        fitted (else `calibrated`: the model's probability, or None); one under
        policy.min_calibrated_confidence escalates."""
        fitted = self._calibrated(action, signals, calibration)
        least = self.policy.min_calibrated_confidence
        if fitted is not None and fitted < least and action != "escalate":
            reasoning = (
                f"guardrail: calibrated confidence {fitted:.2f} under {least:g}"
                f" (it would have been {action}: {reasoning})"
            )
            action, path = "escalate", "guardrail"
            fitted = self._calibrated(action, signals, calibration)
        record = {**signals.record(), "support": round(signals.supports(action), 4)}
        if fitted is not None and calibration is not None:
            record["calibrated_on"] = calibration.size  # cases: the confidence is calibrated
        llm_metadata = metrics.llm_metadata(self.config)
        llm_metadata["llm_decision"] = action
        llm_metadata["human_override_requested"] = action == "escalate"
        return Decision(
            action=action,
            confidence=confidence,
            calibrated_confidence=calibrated if fitted is None else fitted,
            reasoning=reasoning,
            suggested_params=dict(meta.suggested_params or {}),
            decided_by=path,
            llm_metadata=llm_metadata,
            signals=record,
        )

    @staticmethod
    def _calibrated(
        action: Action, signals: Signals, calibration: Calibration | None
    ) -> float | None:
        if calibration is None:
            return None
        return calibration.calibrated(signals.supports(action))
