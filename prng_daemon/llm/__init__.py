"""Everything that talks to the two llama-servers: client, router, decision engine."""

from .client import Completion, Health, LlamaClient, TokenProbability, TopLogprob
from .decision import Decision, DecisionEngine, finding_probabilities, rules_decision
from .router import AsyncRouter, LLMMetrics, LLMRouter, Routed, get_router

__all__ = [
    "AsyncRouter",
    "Completion",
    "Decision",
    "DecisionEngine",
    "Health",
    "LLMMetrics",
    "LLMRouter",
    "LlamaClient",
    "Routed",
    "TokenProbability",
    "TopLogprob",
    "finding_probabilities",
    "get_router",
    "rules_decision",
]
