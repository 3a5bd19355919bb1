"""Everything that talks to the two llama-servers: the client and the router. Public for agents:
`get_router()` (proposal §3.5), `LLMRouter`, `AsyncRouter`."""

from .api import Completion, Health, TokenProbability, TopLogprob
from .client import BlockingLlamaClient, LlamaClient
from .router import AsyncRouter, LLMMetrics, LLMRouter, Routed, get_router

__all__ = [
    "AsyncRouter",
    "BlockingLlamaClient",
    "Completion",
    "Health",
    "LLMMetrics",
    "LLMRouter",
    "LlamaClient",
    "Routed",
    "TokenProbability",
    "TopLogprob",
    "get_router",
]
