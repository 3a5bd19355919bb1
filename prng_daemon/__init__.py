"""prng-llm-daemon: the service that advances the PRNG-analysis pipeline with two local LLMs."""

__version__ = "0.1.0"

__all__ = ["__version__"]
