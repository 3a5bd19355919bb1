"""The one configuration object: the proposal's llm_server_config.json plus daemon sections."""

from __future__ import annotations

import json
import os
import string
from collections.abc import Callable, Set
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from .document.metadata import MAX_RESULT_BYTES
from .document.pipeline import SERVER_NAMES, ServerName
from .errors import ConfigError

__all__ = [
    "DEFAULT_CONFIG_PATH",
    "AgentConfig",
    "Config",
    "DaemonSettings",
    "Disagreement",
    "HealthConfig",
    "PolicyConfig",
    "RoutingConfig",
    "SBATCH_OPTIONS",
    "ServerConfig",
    "SlurmOptions",
    "UNIT_PROPERTIES",
    "config_path",
    "format_validation_error",
    "load_config",
    "parse_config",
]

DEFAULT_CONFIG_PATH = Path("/etc/prng-llm-daemon/config.json")

DEFAULT_MATH_KEYWORDS = (
    "residue", "modulo", "modular", "seed", "probability", "calculate",
    "compute", "lcg", "xorshift", "prng", "statistical", "confidence",
    "threshold", "entropy", "bitwise", "survivor", "match_rate", "skip",
)  # fmt: skip

Seconds = Annotated[float, Field(gt=0, le=7 * 24 * 3600)]
Port = Annotated[int, Field(ge=1, le=65535)]
AgentName = Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]{0,63}$")]


class _Section(BaseModel):
    # Unknown keys are refused: a typo such as "max_restart_attemps" must not silently default.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


def _relative_to_config(value: Path | None, info: ValidationInfo) -> Path | None:
    """Relative paths in the file are taken relative to the file's own directory."""
    base = (info.context or {}).get("base")
    if value is None or value.is_absolute() or base is None:
        return value
    return Path(base) / value


class ServerConfig(_Section):
    """One llama-server child (proposal §3.3 `orchestrator` / `math`, plus launch settings)."""

    model: Annotated[str, Field(min_length=1)]
    port: Port
    gpu_id: Annotated[int, Field(ge=0)] | None = None
    context_length: Annotated[int, Field(ge=64)] = 4096
    batch_size: Annotated[int, Field(ge=1)] = 512
    threads: Annotated[int, Field(ge=1, le=1024)] = 4
    description: str = ""
    vram_estimate_gb: Annotated[float, Field(ge=0)] | None = None
    expected_speed_tps: Annotated[float, Field(ge=0)] | None = None
    host: str = "127.0.0.1"
    n_gpu_layers: Annotated[int, Field(ge=0)] = 99
    parallel: Annotated[int, Field(ge=1, le=64)] = 2
    api_key_file: Path | None = None
    extra_args: tuple[str, ...] = ()
    startup_timeout_seconds: Seconds = 600.0
    managed: bool = True
    """False: someone else runs this server; the daemon only talks to it."""
    allow_cpu: bool = False
    """True: a child given a GPU (gpu_id and n_gpu_layers > 0) that finds none runs on the CPU
    anyway; False (default): it is FAILED with the reason instead of answering 10-50x slower."""
    retry_without_repack: bool = True
    """True: a child killed by SIGSEGV, SIGILL or SIGBUS before it was ready is started once more
    with --no-repack (no repacked weights, so no AMX buffer: docs/cpu.md); False: FAILED at once."""

    @property
    def wants_gpu(self) -> bool:
        """Given a GPU of its own: gpu_id set and layers to offload. Without a gpu_id the child
        takes whatever GPUs it sees, and the CPU is as good an answer as any."""
        return self.gpu_id is not None and self.n_gpu_layers > 0

    @property
    def url(self) -> str:
        """Where the daemon (and every agent on this host) reaches this server. A wildcard or
        empty listen address is reached on loopback; an IPv6 literal needs brackets."""
        host = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(self.host, self.host)
        return f"http://[{host}]:{self.port}" if ":" in host else f"http://{host}:{self.port}"

    _paths = field_validator("api_key_file")(_relative_to_config)


class RoutingConfig(_Section):
    math_keywords: tuple[Annotated[str, Field(min_length=1)], ...] = DEFAULT_MATH_KEYWORDS
    default_temperature: Annotated[float, Field(ge=0, le=2)] = 0.7
    default_max_tokens: Annotated[int, Field(ge=1, le=32768)] = 2048
    request_timeout_seconds: Seconds = 120.0


class HealthConfig(_Section):
    check_interval_seconds: Seconds = 60.0
    restart_on_failure: bool = True
    max_restart_attempts: Annotated[int, Field(ge=0, le=1000)] = 3
    restart_window_seconds: Seconds = 600.0
    backoff_initial_seconds: Seconds = 1.0
    backoff_max_seconds: Seconds = 60.0
    stable_after_seconds: Seconds = 600.0
    failures_before_hung: Annotated[int, Field(ge=1, le=100)] = 3
    probe_timeout_seconds: Seconds = 10.0
    generation_probe_interval_seconds: Seconds = 300.0
    ready_poll_interval_seconds: Seconds = 0.5
    stop_timeout_seconds: Seconds = 10.0


class DaemonSettings(_Section):
    results_dir: Path = Path("/var/lib/prng-llm-daemon/results")
    state_dir: Path = Path("/var/lib/prng-llm-daemon")
    logs_dir: Path = Path("/var/log/prng-llm-daemon")
    models_dir: Path = Path("/var/lib/prng-llm-daemon/models")
    llama_server: str = "llama-server"
    max_result_bytes: Annotated[int, Field(ge=1024, le=1 << 30)] = MAX_RESULT_BYTES
    rescan_interval_seconds: Seconds = 30.0
    transient_deadline_seconds: Seconds = 300.0
    """A file untouched this long mid-way (seen, decided, launching) is resumed or settled."""
    child_log_max_bytes: Annotated[int, Field(ge=4096)] = 10 << 20
    child_log_backups: Annotated[int, Field(ge=0, le=100)] = 3
    launcher: Literal["auto", "local", "systemd"] = "auto"
    """How agents are started: "systemd" as transient units, "local" as the daemon's children;
    "auto" picks systemd when the daemon runs as a systemd service (docs/launchers.md)."""

    _paths = field_validator("results_dir", "state_dir", "logs_dir", "models_dir")(
        _relative_to_config
    )

    @property
    def decisions_dir(self) -> Path:
        return self.results_dir / "decisions"

    @property
    def ledger_path(self) -> Path:
        return self.state_dir / "ledger.sqlite3"


UNIT_PROPERTIES = frozenset(
    {"MemoryMax", "MemoryHigh", "MemoryLow", "MemorySwapMax", "CPUQuota", "CPUWeight",
     "AllowedCPUs", "AllowedMemoryNodes", "TasksMax", "IOWeight", "DevicePolicy", "DeviceAllow",
     "Nice", "OOMScoreAdjust", "LimitNOFILE", "LimitNPROC", "LimitCORE", "LimitMEMLOCK",
     "UMask", "SupplementaryGroups", "ReadWritePaths", "ReadOnlyPaths", "InaccessiblePaths",
     "ProtectSystem", "ProtectHome", "PrivateTmp", "PrivateDevices", "PrivateNetwork",
     "NoNewPrivileges", "TimeoutStopSec", "KillSignal"}
)  # fmt: skip
"""Unit properties an agent's config may set: resources and sandboxing. What it runs, as whom,
where its output and exit status go, and its timeout are the daemon's (argv, user, env, cwd,
timeout_seconds), so Exec*=, User=, Environment=, StandardOutput=, RuntimeMaxSec=... are
refused."""

SBATCH_OPTIONS = frozenset(
    {"qos", "constraint", "mem", "mem-per-cpu", "mem-per-gpu", "cpus-per-task", "cpus-per-gpu",
     "gpus-per-node", "gpus-per-task", "gres-flags", "nodes", "ntasks", "ntasks-per-node",
     "exclusive", "reservation", "nodelist", "exclude", "licenses", "nice", "comment",
     "mail-type", "mail-user", "tmp", "hint", "cluster-constraint", "wckey"}
)  # fmt: skip
"""sbatch options an agent's `slurm.sbatch_options` may add: resources and placement. What runs,
its name (the launch's key), output, working directory, environment, time limit and requeueing
are the daemon's, so --job-name, --output, --wrap, --chdir, --export, --time, --array,
--requeue... are refused."""
_SLURM_VALUE = r"^[A-Za-z0-9_.,:=/+@-]{1,200}$"


class SlurmOptions(_Section):
    """Where and how a Slurm agent's job is submitted (docs/launchers.md, "Slurm jobs")."""

    partition: Annotated[str, Field(pattern=_SLURM_VALUE)] | None = None
    account: Annotated[str, Field(pattern=_SLURM_VALUE)] | None = None
    gpus: Annotated[str, Field(pattern=_SLURM_VALUE)] | None = None
    """sbatch --gpus: "1", "a100:2"."""
    gres: Annotated[str, Field(pattern=_SLURM_VALUE)] | None = None
    """sbatch --gres: "gpu:1", "gpu:a100:2"."""
    job_dir: Path | None = None
    """Where the job writes its output, launch marker and exit record: the same path on the
    daemon's host and every node (a shared filesystem). None: <state_dir>/slurm."""
    sbatch_options: tuple[str, ...] = ()
    """More sbatch options, each "--name=value" or "--flag" with name in SBATCH_OPTIONS."""

    _paths = field_validator("job_dir")(_relative_to_config)

    @field_validator("sbatch_options")
    @classmethod
    def _allowed_options(cls, options: tuple[str, ...]) -> tuple[str, ...]:
        def split(item: str) -> tuple[str | None, str]:
            name, _, value = item.removeprefix("--").partition("=")
            return (f"--{name}" if item.startswith("--") else None), value

        return _allowlisted(options, split, {f"--{o}" for o in SBATCH_OPTIONS},
                            "sbatch option (--name=value, name")  # fmt: skip


def _allowlisted(
    items: tuple[str, ...],
    split: Callable[[str], tuple[str | None, str]],
    allowed: Set[str],
    what: str,
) -> tuple[str, ...]:
    """`items` if each one's name (`split`: name or None when malformed, value) is in `allowed`
    and its value holds no line break; ValueError naming the first that is not."""
    for item in items:
        name, value = split(item)
        if name is None or name not in allowed:
            names = ", ".join(sorted(n.removeprefix("--") for n in allowed))
            raise ValueError(f"{item!r}: not an allowed {what} one of {names})")
        if any(c in value for c in "\n\r\0"):
            raise ValueError(f"{name}: the value holds a line break or NUL")
    return items


AGENT_PLACEHOLDERS = frozenset(
    {"parent_run_id", "step", "retry_count", "params_file", "result_file", "results_dir",
     "decision", "decision_file"}
)  # fmt: skip


class AgentConfig(_Section):
    """A follow-up agent: the argv run for it (no shell), its cwd, extra environment, timeout.

    argv items may hold `{placeholder}`s from AGENT_PLACEHOLDERS; the daemon fills them from
    validated fields and paths it made itself, never from free text in a result file.
    """

    argv: Annotated[tuple[str, ...], Field(min_length=1)]
    cwd: Path | None = None
    env: dict[str, str] = Field(default_factory=dict)
    timeout_seconds: Seconds = 24 * 3600.0
    user: Annotated[str, Field(pattern=r"^[a-z_][a-z0-9_-]{0,31}\$?$")] | None = None
    """The systemd launcher runs the agent's unit as this user (User=); None: the daemon's."""
    group: Annotated[str, Field(pattern=r"^[a-z_][a-z0-9_-]{0,31}$")] | None = None
    properties: tuple[str, ...] = ()
    """Unit properties for the systemd launcher, "Key=Value" with Key in UNIT_PROPERTIES."""
    launcher: Literal["daemon", "slurm"] = "daemon"
    """"daemon": started by daemon.launcher on this host; "slurm": submitted as a Slurm job."""
    slurm: SlurmOptions | None = None
    """The job's partition, account, GPUs...; only with launcher "slurm"."""

    _paths = field_validator("cwd")(_relative_to_config)

    @model_validator(mode="after")
    def _slurm_settings(self) -> AgentConfig:
        if self.launcher != "slurm":
            if self.slurm is not None:
                raise ValueError('`slurm` settings need launcher: "slurm"')
            return self
        if self.user is not None or self.group is not None or self.properties:
            raise ValueError(
                "a Slurm job runs as the daemon's user, under the cluster's limits: `user`,"
                " `group` and `properties` are for the systemd launcher (use slurm.sbatch_options)"
            )
        taken = sorted(k for k in self.env if k.startswith(("SLURM_", "SBATCH_")))
        if taken:
            raise ValueError(f"env {taken[0]}: SLURM_/SBATCH_ variables would change the job;"
                             " use slurm.sbatch_options")  # fmt: skip
        return self

    @field_validator("properties")
    @classmethod
    def _allowed_properties(cls, properties: tuple[str, ...]) -> tuple[str, ...]:
        def split(item: str) -> tuple[str | None, str]:
            key, eq, value = item.partition("=")
            return (key if eq else None), value

        return _allowlisted(properties, split, UNIT_PROPERTIES, "unit property (Key=Value, Key")

    @field_validator("argv")
    @classmethod
    def _known_placeholders(cls, argv: tuple[str, ...]) -> tuple[str, ...]:
        for item in argv:
            try:
                names = {name for _, name, _, _ in string.Formatter().parse(item) if name}
            except ValueError as exc:
                raise ValueError(f"bad placeholder in {item!r}: {exc}") from None
            unknown = names - AGENT_PLACEHOLDERS
            if unknown:
                raise ValueError(
                    f"unknown placeholder {sorted(unknown)[0]!r} in {item!r};"
                    f" known: {', '.join(sorted(AGENT_PLACEHOLDERS))}"
                )
        return argv


Disagreement = Literal["escalate", "stronger", "majority"]


class PolicyConfig(_Section):
    """How a step result is decided: rules, the model, guardrails (docs/decisions.md)."""

    max_retries: Annotated[int, Field(ge=0, le=100)] = 2
    confidence_threshold: Annotated[float, Field(ge=0, le=1)] = 0.5
    when_no_llm: Literal["rules", "wait"] = "rules"
    """What decides when no model answers, or none in decision_deadline_seconds."""
    answer_attempts: Annotated[int, Field(ge=1, le=10)] = 2
    escalate_on_human_override: bool = True
    escalate_on_disagreement: bool = True
    decision_max_tokens: Annotated[int, Field(ge=16, le=4096)] = 160
    decision_temperature: Annotated[float, Field(ge=0, le=2)] = 0.0
    """0: the same file gets the same decision every time (agents' own queries keep
    routing.default_temperature)."""
    decision_seed: Annotated[int, Field(ge=0, le=2**32 - 1)] = 1004
    min_action_probability: Annotated[float, Field(ge=0, le=1)] = 0.0
    """A model action with a lower probability (among the open actions) escalates."""
    explain_decisions: bool = True
    decision_slot: Annotated[int, Field(ge=0)] | None = None
    """Send every decision request to this llama-server slot (`id_slot`): one prompt cache
    serves them all, the other slots stay free (the liveness probe); decisions queue there."""
    """Also ask the model for a confidence word and a reasoning (about 25 more tokens)."""
    example_turns: bool = True
    """Worked examples before the file's facts (cached with the system turn)."""
    decision_deadline_seconds: Seconds = 300.0
    """The whole decision, every model call and answer attempt included; its explanation,
    asked for after it, gets as long again."""
    vote_neighbours: Annotated[int, Field(ge=1, le=50)] = 5
    """How many of the nearest labelled cases vote (docs/learning.md)."""
    vote_min_cases: Annotated[int, Field(ge=1)] = 100
    """The cases vote once there are this many: with 25 or 50 the vote cost more right
    decisions than it saved (bench/RESULTS-cases.md)."""
    calibration_min_cases: Annotated[int, Field(ge=2)] = 30
    """Decided cases needed to calibrate the confidence (one curve, pooled over the steps)."""
    min_calibrated_confidence: Annotated[float, Field(ge=0, le=1)] = 0.0
    """A decision whose calibrated confidence is lower escalates (0: never)."""
    on_disagreement: Disagreement = "stronger"
    """Where the signals disagree: `escalate` where the model and the cases' vote do;
    `stronger`: the stronger of the two (the vote's strength against the model's probability);
    `majority`: the action two of the rules' action, the model's and the vote back, escalate
    without two (docs/learning.md). Chosen by bench_learning on all six labelled sets (295
    files, each with a pool of the others): the option right most often whose pooled r stays at
    least 0.6. majority is right most often (287, r 0.34: its eight errors are contradictions it
    proceeds on at 0.91-0.98, four of them where every signal says proceed), then stronger (284,
    r 0.62), then escalate (272, r 0.81: it asks about 18 clean successes a split). What
    stronger costs: of the 8 contradictory successes the rules miss, it escalates 2, escalate 4,
    majority none; it lets through those where the stronger signal says proceed (fresh2/34,
    fresh2/42). Left out in turn, fresh2 and fresh3 each choose escalate on the other five:
    stronger is chosen by a margin (bench/RESULTS-cases.md)."""


class Config(_Section):
    orchestrator: ServerConfig
    math: ServerConfig
    routing: RoutingConfig = RoutingConfig()
    health: HealthConfig = HealthConfig()
    daemon: DaemonSettings = DaemonSettings()
    agents: dict[AgentName, AgentConfig] = Field(default_factory=dict)
    policy: PolicyConfig = PolicyConfig()

    def server(self, name: ServerName) -> ServerConfig:
        """The `orchestrator` or `math` section by name; KeyError for any other name."""
        if name not in SERVER_NAMES:
            raise KeyError(f"no llama-server named {name!r}: expected one of {SERVER_NAMES}")
        return self.orchestrator if name == "orchestrator" else self.math

    @model_validator(mode="after")
    def _slot_exists(self) -> Config:
        slot = self.policy.decision_slot
        for name in SERVER_NAMES:
            server = self.server(name)
            if slot is not None and server.managed and slot >= server.parallel:
                raise ValueError(
                    f"policy.decision_slot: {slot} is not a slot of {name} (parallel"
                    f" {server.parallel}: slots 0 to {server.parallel - 1})"
                )
        return self


def format_validation_error(exc: ValidationError, prefix: str) -> list[str]:
    """One line per problem: `prefix: dotted.path: expected ..., got ...`."""
    lines = []
    for err in exc.errors():
        where = ".".join(str(part) for part in err["loc"]) or "(top level)"
        msg = err["msg"]
        if err["type"] == "missing":
            lines.append(f"{prefix}: {where}: required field is missing")
            continue
        if err["type"] == "extra_forbidden":
            lines.append(f"{prefix}: {where}: unknown field")
            continue
        msg = msg.replace("Input should be", "expected").replace("Value error, ", "")
        if not err["loc"]:  # a check across sections: its message names the fields
            lines.append(f"{prefix}: {msg}")
            continue
        got = json.dumps(err["input"], default=str)
        if len(got) > 80:
            got = got[:77] + "..."
        lines.append(f"{prefix}: {where}: {msg}, got {got}")
    return lines


def config_path(explicit: str | Path | None = None) -> Path:
    """Which config file: `explicit` (--config), else $PRNG_DAEMON_CONFIG, else the system path."""
    return Path(explicit or os.environ.get("PRNG_DAEMON_CONFIG") or DEFAULT_CONFIG_PATH)


def parse_config(text: str, base: Path | None = None) -> Config:
    """Parse and check a config document; raise ConfigError listing every bad field."""
    try:
        raw: Any = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(
            [f"config: not valid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}"]
        ) from None
    if not isinstance(raw, dict):
        raise ConfigError(["config: the top level must be a JSON object"])
    try:
        return Config.model_validate_json(text, strict=True, context={"base": base})
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, "config")) from None


def load_config(path: Path) -> Config:
    """Read the config file at `path`; relative paths in it are relative to its directory."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError([f"config: {path}: no such file"]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([f"config: {path}: cannot read: {exc}"]) from None
    return parse_config(text, base=path.resolve().parent)
