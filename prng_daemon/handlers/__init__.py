"""The four stages a result file passes through, in order: validate, decide, act, record.
The engine sequences them; each knows nothing of the others."""
