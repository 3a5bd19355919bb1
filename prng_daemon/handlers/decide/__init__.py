"""Second stage: proceed, retry or escalate — the rules, the model (through `llm/`) and the
guardrails between them."""
