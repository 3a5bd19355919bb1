"""Preflight: each reason a child cannot start gets its own clear message, before any launch."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest

from prng_daemon.config import Config
from prng_daemon.servers.preflight import PreflightFailed, plan_launch

from .helpers import free_port


def config(models: Path, binary: Path | str, **orchestrator: Any) -> Config:
    return Config.model_validate(
        {
            "orchestrator": {"model": "m.gguf", "port": free_port(), **orchestrator},
            "math": {"model": "m.gguf", "port": free_port()},
            "daemon": {"llama_server": str(binary), "models_dir": models},
        }
    )


@pytest.fixture
def models(tmp_path: Path) -> Path:
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "m.gguf").write_bytes(b"GGUF" + bytes(16))
    return tmp_path / "models"


def problem(cfg: Config) -> PreflightFailed:
    with pytest.raises(PreflightFailed) as info:
        plan_launch(cfg, "orchestrator")
    return info.value


def test_launch_binds_loopback_and_pins_the_gpu(models: Path, tmp_path: Path) -> None:
    key = tmp_path / "key"
    key.write_text("# comment\nsecret\n")
    cfg = config(models, "/bin/true", gpu_id=1, api_key_file=key, extra_args=("--no-webui",))
    launch = plan_launch(cfg, "orchestrator")
    argv = launch.argv
    assert argv[argv.index("--host") + 1] == "127.0.0.1"
    assert argv[argv.index("--model") + 1] == str(models / "m.gguf")
    assert argv[argv.index("--api-key-file") + 1] == str(key) and argv[-1] == "--no-webui"
    assert launch.env["CUDA_VISIBLE_DEVICES"] == "1" and launch.api_key == "secret"
    assert launch.base_url == f"http://127.0.0.1:{cfg.orchestrator.port}"


def test_wildcard_host_is_probed_on_loopback(models: Path) -> None:
    cfg = config(models, "/bin/true", host="0.0.0.0")
    assert plan_launch(cfg, "orchestrator").base_url.startswith("http://127.0.0.1:")


def test_binary_missing_or_not_executable(models: Path, tmp_path: Path) -> None:
    assert problem(config(models, "no-such-llama-server")).message == (
        "llama-server binary not found on PATH: no-such-llama-server"
    )
    assert "binary missing" in problem(config(models, tmp_path / "absent")).message
    plain = tmp_path / "plain"
    plain.write_text("")
    assert problem(config(models, plain)).message == f"llama-server binary not executable: {plain}"


def test_model_missing_not_gguf_or_a_directory(models: Path) -> None:
    assert problem(config(models, "/bin/true", model="x.gguf")).message == (
        f"model file missing: {models / 'x.gguf'}"
    )
    (models / "fake.gguf").write_bytes(b"\x7fELF....")
    assert "not GGUF" in problem(config(models, "/bin/true", model="fake.gguf")).message
    (models / "dir.gguf").mkdir()
    assert "is a directory" in problem(config(models, "/bin/true", model="dir.gguf")).message


@pytest.mark.parametrize("model", ["../m.gguf", "/etc/passwd", "sub/../../m.gguf"])
def test_model_path_may_not_escape_the_models_dir(models: Path, model: str) -> None:
    failed = problem(config(models, "/bin/true", model=model))
    assert failed.message.startswith("model path escapes the models dir") and not failed.transient


def test_busy_port_is_transient_and_named(models: Path) -> None:
    cfg = config(models, "/bin/true")
    with socket.create_server(("127.0.0.1", cfg.orchestrator.port)):
        failed = problem(cfg)
    assert failed.transient
    assert failed.message == (
        f"port {cfg.orchestrator.port} on 127.0.0.1 already in use by another process"
    )
