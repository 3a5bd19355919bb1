"""The demo (the README's first command) takes a pipeline run from step 1 to step 6.

On the tiny models here (fast); the real model's demo is measured by bench/bench_autonomy.py.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from prng_daemon.cli import main
from prng_daemon.demo.run import demo_config, run_demo
from prng_daemon.llm.apikey import key_file, make_key, own_key_file

from .test_crash_at_load import AMX_LINE, stand_in


def test_tiny_demo_completes_steps_1_to_6(tmp_path: Path) -> None:
    out = io.StringIO()
    outcome = run_demo(tmp_path, out, seed=2, tiny=True)
    text = out.getvalue()
    assert outcome.completed, text
    chain = text.split("The chain of runs:")[1].strip().splitlines()
    steps = [line.split()[2] for line in chain if line.strip().startswith("step")]
    # The tiny model's answers are random: a step may be retried, so a step can repeat.
    assert steps == sorted(steps, key=int) and set(steps) == {"1", "2", "3", "4", "5", "6"}, text
    records = list((tmp_path / "results" / "decisions").glob("*.decision.json"))
    assert len(records) >= 6
    last = max((json.loads(r.read_text()) for r in records), key=lambda r: r["pipeline_step"])
    assert last["pipeline_step"] == 6 and last["decision"] == "proceed"
    assert "ready" in text and "pipeline complete" in text and "seed 2: step" in text


def test_the_real_model_demo_sends_the_childs_key_for_both_roles(tmp_path: Path) -> None:
    """One llama-server serves both roles on the real model: the math role, unmanaged at the
    child's address, must send the child's key, or every math decision gets 401 and falls
    back to the rules (what the demo did for a while, looking autonomous)."""
    model = tmp_path / "model.gguf"
    model.write_bytes(b"GGUF")
    config = demo_config(tmp_path, "/bin/true", 1, model)
    make_key(config)
    assert key_file(config, "math") == key_file(config, "orchestrator") == own_key_file(config)


def test_a_demo_whose_llama_server_crashes_ends_non_zero_saying_why(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], llama_server_bin: Path
) -> None:
    """No model can decide: the demo says so and why in its last lines, and exits 1 instead of
    letting the rules run the pipeline and passing that off as the demo."""
    binary = stand_in(tmp_path, llama_server_bin, always=True)
    code = main(["demo", "--tiny", "--workdir", str(tmp_path / "demo"),
                 "--llama-server", str(binary)])  # fmt: skip
    lines = capsys.readouterr().out.splitlines()
    assert code == 1, lines
    reason = (
        "exited while loading the model (killed by SIGSEGV), also with --no-repack: a crash of"
        f' llama-server itself, not restarted; its last line: "{AMX_LINE}"'
    )
    assert sorted(lines[-3:-1]) == [
        f"llama-server math failed: {reason}", f"llama-server orchestrator failed: {reason}",
    ]  # fmt: skip
    assert lines[-1] == (
        "demo failed: no model decided anything: llama-server failed (above);"
        f" see {tmp_path / 'demo' / 'daemon.log'}"
    )
    assert not any("pid None" in line for line in lines), lines
    assert not (tmp_path / "demo" / "results" / "decisions").exists() or not list(
        (tmp_path / "demo" / "results" / "decisions").iterdir()
    ), "no pipeline run on the rules alone"
