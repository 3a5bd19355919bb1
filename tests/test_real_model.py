"""Decisions by a real instruct model (Qwen2.5-Coder-1.5B-Instruct Q4_K_M): the clear cases.

The model file comes from $PRNG_REAL_MODEL, else the fetch cache. Without it these tests skip,
unless $PRNG_REQUIRE_REAL_MODEL=1 (CI, after fetching it), where they fail.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from prng_daemon.config import Config
from prng_daemon.demo.fetch import DEFAULT_MODEL, model_path
from prng_daemon.document.metadata import LLMMetadata

from .fake_llama import llm_config
from .helpers import wait_until
from .test_llm_decision import decide, meta_for
from .test_llm_real_server import _ready, llama_server


@pytest.fixture(scope="session")
def real_model() -> Path:
    path = Path(os.environ.get("PRNG_REAL_MODEL") or model_path(DEFAULT_MODEL))
    if not path.is_file():
        reason = f"no real model at {path} (set PRNG_REAL_MODEL or fetch it)"
        if os.environ.get("PRNG_REQUIRE_REAL_MODEL") == "1":
            pytest.fail(reason + "; PRNG_REQUIRE_REAL_MODEL=1")
        pytest.skip(reason)
    return path


@pytest.fixture(scope="session")
def real_server(
    llama_server_bin: Path, real_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Config]:
    """One llama-server serving both roles, as on a one-model CPU box."""
    log = tmp_path_factory.mktemp("real-model") / "server.log"
    args = ("-c", "4096", "-np", "1", "-t", "2")
    with llama_server(llama_server_bin, real_model, log, args=args) as port:
        wait_until(lambda: _ready(port), timeout=120, what="the real model to load")
        yield llm_config(port, port, routing={"request_timeout_seconds": 600.0})


def test_a_clean_success_proceeds(real_server: Config) -> None:
    """The proposal's own step 2 result: criteria met, validation score 0.847."""
    reasoning = (
        "Optuna study finished 100 trials. Best trial #73: threshold=0.012, k_folds=5, "
        "validation score 0.847 (std 0.011 across folds), above the 0.75 target."
    )
    d = decide(real_server, meta_for(2, reasoning=reasoning))
    assert (d.action, d.decided_by) == ("proceed", "llm"), d.reasoning
    assert d.calibrated_confidence is not None and d.calibrated_confidence > 0.5
    # Two requests: the decision, then its explanation.
    assert LLMMetadata.model_validate(d.llm_metadata).math_calls == 2


def test_a_crash_with_retries_left_is_retried_and_decided_the_same_way_twice(
    real_server: Config,
) -> None:
    meta = meta_for(
        4,
        success_criteria_met=False,
        confidence=0.3,
        retry_count=0,
        suggested_params={"model_type": "lightgbm"},
        reasoning="The search stopped at configuration 12 of 60: node rig-6600 lost power and "
        "its workers never reported back. Nothing is wrong with the data or the configuration.",
    )
    first = decide(real_server, meta)
    assert (first.action, first.decided_by) == ("retry", "llm"), first.reasoning
    again = decide(real_server, meta)
    # The same finding, its probability within a rounding step: once the prompt comes from
    # llama-server's cache (other batch splits) the logits, and the explanation's wording, can
    # differ slightly (0.96 against 0.97 with five example turns).
    assert again.action == first.action
    assert again.reasoning.split(" (p=")[0] == first.reasoning.split(" (p=")[0]
    assert first.calibrated_confidence is not None
    assert again.calibrated_confidence == pytest.approx(first.calibrated_confidence, abs=0.02)


def test_the_demo_step_5_success_under_its_stated_bar_proceeds(real_server: Config) -> None:
    """The success every demo run escalated before the rules checked its numbers: the model
    named `gap` or `random` for it (1.5B models do not compare 0.047 with 0.08)."""
    meta = meta_for(
        5,
        reasoning="Training converged at epoch 23 (early stopping). Train AUC 0.793, holdout "
        "0.746: gap 0.047 under the 0.08 overfit bar.",
        suggested_params={
            "window_size": 768,
            "offset": 41,
            "skip_min": 0,
            "skip_max": 12,
            "threshold": 0.0123,
            "k_folds": 5,
            "top_k": 10000,
            "model": "gbdt",
            "n_estimators": 600,
            "max_depth": 8,
            "learning_rate": 0.05,
            "epochs": 30,
            "dropout": 0.2,
        },  # fmt: skip
    )
    d = decide(real_server, meta)
    assert (d.action, d.decided_by) == ("proceed", "llm"), d.reasoning
