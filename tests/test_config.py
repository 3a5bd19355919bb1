"""Config: the proposal's file loads unchanged; bad fields get one clear line each, exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from prng_daemon.cli import main
from prng_daemon.config import ServerConfig, load_config, parse_config
from prng_daemon.errors import ConfigError

DATA = Path(__file__).parent / "data"
PROPOSAL = DATA / "llm_server_config.json"
ROOT = Path(__file__).parent.parent


def test_proposal_config_loads_unchanged() -> None:
    config = load_config(PROPOSAL)
    assert config.orchestrator.port == 8080 and config.math.port == 8081
    assert config.math.gpu_id == 1 and config.orchestrator.context_length == 16384
    assert "xorshift" in config.routing.math_keywords
    assert config.health.max_restart_attempts == 3
    assert config.orchestrator.host == "127.0.0.1", "never 0.0.0.0 by default"
    assert config.policy.when_no_llm == "rules"


def test_shipped_example_config_loads() -> None:
    config = load_config(ROOT / "config.example.json")
    assert set(config.agents) >= {"scorer_meta_agent", "prediction_agent"}


def test_check_config_prints_effective_config(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-config", "--config", str(PROPOSAL)]) == 0
    effective = json.loads(capsys.readouterr().out)
    assert effective["daemon"]["max_result_bytes"] == 16 << 20
    assert effective["math"]["model"] == "Qwen2.5-Math-7B-Instruct-Q5_K_M.gguf"


def test_config_path_from_environment(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PRNG_DAEMON_CONFIG", str(PROPOSAL))
    assert main(["check-config"]) == 0
    assert json.loads(capsys.readouterr().out)["orchestrator"]["port"] == 8080


def broken(tmp_path: Path, edit: dict[str, object], section: str = "math") -> Path:
    raw = json.loads(PROPOSAL.read_text())
    raw[section].update(edit)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(raw))
    return path


@pytest.mark.parametrize(
    ("section", "edit", "expected"),
    [
        ("math", {"port": "eighty"}, 'config: math.port: expected a valid integer, got "eighty"'),
        ("math", {"port": 70000}, "config: math.port: expected less than or equal to 65535"),
        ("health", {"max_restart_attemps": 5}, "config: health.max_restart_attemps: unknown field"),
        ("routing", {"math_keywords": "seed"}, "config: routing.math_keywords: expected a valid"),
        ("orchestrator", {"threads": 0}, "config: orchestrator.threads: expected greater than"),
    ],
)
def test_bad_field_is_named(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    section: str,
    edit: dict[str, object],
    expected: str,
) -> None:
    assert main(["check-config", "--config", str(broken(tmp_path, edit, section))]) == 2
    err = capsys.readouterr().err
    assert expected in err
    assert "Traceback" not in err


def test_every_bad_field_is_reported_at_once() -> None:
    raw = json.loads(PROPOSAL.read_text())
    raw["math"]["port"] = "x"
    raw["orchestrator"]["gpu_id"] = -1
    del raw["math"]["model"]
    with pytest.raises(ConfigError) as info:
        parse_config(json.dumps(raw))
    assert len(info.value.problems) == 3
    assert any("math.model: required field is missing" in p for p in info.value.problems)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("{", "config: not valid JSON at line 1 column 2"),
        ("[]", "config: the top level must be a JSON object"),
        ("{}", "config: orchestrator: required field is missing"),
    ],
)
def test_unusable_documents(text: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(text)
    assert info.value.problems[0].startswith(expected)


def test_missing_config_file_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["check-config", "--config", str(tmp_path / "nope.json")]) == 2
    assert capsys.readouterr().err.strip() == f"config: {tmp_path / 'nope.json'}: no such file"


def test_relative_paths_are_relative_to_the_config_file(tmp_path: Path) -> None:
    raw = json.loads(PROPOSAL.read_text())
    raw["daemon"] = {"results_dir": "results", "state_dir": "/abs/state"}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(raw))
    config = load_config(path)
    assert config.daemon.results_dir == tmp_path / "results"
    assert config.daemon.state_dir == Path("/abs/state")


def test_preflight_checks_the_machine_not_just_the_file(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    llama_server_bin: Path,
    tiny_model: Path,
) -> None:
    """`check-config --preflight` names the missing model and agent before anything starts."""
    agent = {"argv": ["python3", "-c", "pass"]}
    raw = {
        "orchestrator": {"model": tiny_model.name, "port": 8080},
        "math": {"model": "absent.gguf", "port": 8081},
        "daemon": {"llama_server": str(llama_server_bin), "models_dir": str(tiny_model.parent)},
        "agents": {name: agent for name in ("scorer_meta_agent", "full_scoring_agent",
                                            "ml_meta_agent", "reinforcement_agent")},
    }  # fmt: skip
    path = tmp_path / "config.json"
    path.write_text(json.dumps(raw))
    assert main(["check-config", "--config", str(path)]) == 0, "the file itself is fine"
    capsys.readouterr()
    assert main(["check-config", "--preflight", "--config", str(path)]) == 1
    problems = capsys.readouterr().err.strip().splitlines()
    assert problems == [
        f"preflight: math: model file missing: {tiny_model.parent / 'absent.gguf'}",
        "preflight: agents: no 'prediction_agent': step 5 results would be quarantined"
        " (the follow-up agent is not configured)",
    ]
    raw["math"]["model"] = tiny_model.name
    raw["agents"]["prediction_agent"] = agent
    path.write_text(json.dumps(raw))
    assert main(["check-config", "--preflight", "--config", str(path)]) == 0


@pytest.mark.parametrize(
    ("host", "url"),
    [
        ("127.0.0.1", "http://127.0.0.1:8080"),
        ("0.0.0.0", "http://127.0.0.1:8080"),
        ("", "http://127.0.0.1:8080"),
        ("::", "http://[::1]:8080"),
        ("::1", "http://[::1]:8080"),
        ("gpu-box.lan", "http://gpu-box.lan:8080"),
    ],
)
def test_a_server_is_reached_at_one_url(host: str, url: str) -> None:
    """The probe, the router and `status` all reach a server at `ServerConfig.url`: a wildcard
    or empty listen address on loopback, an IPv6 literal in brackets."""
    server = ServerConfig(model="m.gguf", port=8080, host=host)
    assert server.url == url


def test_an_unknown_server_name_is_an_error_not_the_math_server() -> None:
    config = load_config(PROPOSAL)
    assert config.server("math") is config.math
    with pytest.raises(KeyError, match="no llama-server named 'maths'"):
        config.server("maths")  # type: ignore[arg-type]


def test_a_decision_slot_the_children_do_not_have_is_refused() -> None:
    document = json.loads(PROPOSAL.read_text())
    document["policy"] = {"decision_slot": 2}
    with pytest.raises(ConfigError) as caught:
        parse_config(json.dumps(document))
    assert caught.value.problems == [
        "config: policy.decision_slot: 2 is not a slot of orchestrator (parallel 2: slots 0 to 1)"
    ]
    document["policy"] = {"decision_slot": 1}
    assert parse_config(json.dumps(document)).policy.decision_slot == 1
