"""What happens to a result file: validate, decide, act, record."""
