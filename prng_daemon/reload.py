"""What a config reload may change, and the parts it builds before anything is swapped.

Reload is build-then-swap: every part that depends on the config is made from the new file
first; the daemon swaps them in only when all of them were made, then closes the old ones.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from .config import Config
from .document.pipeline import SERVER_NAMES, ServerName
from .handlers.decide.policy import CaseSource, Decider
from .llm.apikey import make_key
from .llm.router import AsyncRouter, read_api_key
from .watcher import Watcher

__all__ = ["RESTART_ONLY", "Parts", "build", "restart_only_changes", "servers_to_restart"]

RESTART_ONLY = ("state_dir", "logs_dir", "launcher")
"""daemon.* keys a reload cannot apply: the ledger, lock and launch markers, the log files of
running agents and servers, and the launcher watching the agents, are made once."""
SERVER_LAUNCH = ("llama_server", "models_dir", "child_log_max_bytes", "child_log_backups")
"""daemon.* keys that change how every managed llama-server is started."""


def restart_only_changes(old: Config, new: Config) -> list[str]:
    """The keys a reload from `old` to `new` changes that only a restart can apply."""
    return [f"daemon.{k}" for k in RESTART_ONLY if getattr(old.daemon, k) != getattr(new.daemon, k)]


def servers_to_restart(old: Config, new: Config) -> list[ServerName]:
    """The managed llama-servers whose launch settings differ between `old` and `new`."""
    shared = any(getattr(old.daemon, k) != getattr(new.daemon, k) for k in SERVER_LAUNCH)
    return [
        n for n in SERVER_NAMES
        if (old.server(n).managed or new.server(n).managed)
        and (shared or old.server(n) != new.server(n))
    ]  # fmt: skip


@dataclass
class Parts:
    """What a reload builds from the new config."""

    router: AsyncRouter
    decisions: Decider
    watcher: Watcher | None
    """A started watcher on the new results dir, when it changed."""
    watching: ExitStack
    """Stops `watcher`: the daemon closes it if the swap fails, else keeps it in its own."""


async def build(
    old: Config,
    new: Config,
    is_ready: Callable[[ServerName], bool],
    watch: Callable[[Path], Watcher],
    cases: CaseSource | None = None,
) -> Parts:
    """Make every config-dependent part from `new`; the running ones are not touched.

    Raises ConfigError (an API key file that cannot be read) or OSError (the new results dir
    cannot be made or watched), having closed whatever it made before.
    """
    # The key files first: a missing one must fail before any client exists. A server that
    # now uses the daemon's own key gets it made, as at start.
    make_key(new)
    for name in SERVER_NAMES:
        read_api_key(new, name)
    router = AsyncRouter(new, is_ready=is_ready)
    watching = ExitStack()
    try:
        decisions = Decider(new, router, cases)
        watcher = None
        if new.daemon.results_dir != old.daemon.results_dir:
            new.daemon.decisions_dir.mkdir(parents=True, exist_ok=True)
            watcher = watching.enter_context(watch(new.daemon.results_dir))
    except BaseException:
        await router.aclose()
        raise
    return Parts(router, decisions, watcher, watching)
