"""JSON Schema of a step result file (agent_metadata v1.0.4), shipped as package data."""
