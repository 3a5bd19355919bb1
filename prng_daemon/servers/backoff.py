"""The restart policy for a crashing child: exponential backoff and a budget that ends."""

from __future__ import annotations

from collections import deque

__all__ = ["RestartBudget"]


class RestartBudget:
    """When to restart a child: at most `attempts` restarts per `window` seconds (systemd's
    StartLimitBurst/IntervalSec), waiting `initial` seconds doubling up to `cap` in between, and
    all forgiven once a run stayed clean for `stable_after` seconds. Pure: time is passed in."""

    def __init__(
        self, attempts: int, window: float, initial: float, cap: float, stable_after: float
    ) -> None:
        self._attempts = attempts
        self._window = window
        self._initial = initial
        self._cap = cap
        self._stable_after = stable_after
        self._restarts: deque[float] = deque()
        self._streak = 0

    def next_delay(self, now: float, clean_since: float | None) -> float | None:
        """Seconds to wait before the next restart, or None when the budget is spent.

        `clean_since` is when the run that just ended became healthy (None if it never did)."""
        if clean_since is not None and now - clean_since >= self._stable_after:
            self._restarts.clear()
            self._streak = 0
        while self._restarts and now - self._restarts[0] >= self._window:
            self._restarts.popleft()
        if len(self._restarts) >= self._attempts:
            return None
        delay = min(self._cap, self._initial * 2.0**self._streak)
        self._streak += 1
        self._restarts.append(now)
        return delay
