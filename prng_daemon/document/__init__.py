"""The result-file format the daemon, the CLI and the agents share: schema v1.0.4's
documents, the pipeline table, the decision record, file names, atomic writes."""
