"""Whether a failure's stated cause repeats on a rerun (handlers/decide/causes.py)."""

from __future__ import annotations

import pytest

from prng_daemon.handlers.decide.causes import failure_text, permanent_cause, transient_cause


@pytest.mark.parametrize(
    ("report", "cause"),
    [
        ("The loader got 1,999,998 bytes; the length is not divisible by the 4-byte word.",
         "corrupt"),
        ("Capture looks truncated on the share. Will try again.", "corrupt"),
        ("Its sha256 no longer matches the one logged at capture time.", "corrupt"),
        ("Every trial raised TypeError in build_features. Possibly flaky.", "exception"),
        ("KeyError: 'k_folds' in the template.", "exception"),
        ("AssertionError: weights must sum to 1.", "exception"),
        ("The sampler rejects the search space: unknown parameter 'lr_max'.", "configuration"),
        ("scorer_config.json has no feature_weights block.", "configuration"),
        ("Couldn't reach the model host: name resolution failed for 'rig-66b'. Will retry.",
         "does not resolve"),
        ("Could not resolve host zeus-db.", "does not resolve"),
        ("size mismatch for fc1.weight: checkpoint [256, 96], model [128, 96].", "version"),
        ("The config was produced by the 0.9 scorer.", "version"),
        ("Batch of 65,536 asks for 19.5 GiB and the biggest GPU we have is 12 GiB.",
         "larger than any device"),
        ("It failed identically on zeus and on the rigs.", "every attempt"),
        ("Reader stopped: unexpected EOF in seed_outputs.bin.", "corrupt"),
        ("CRC error in shard 12 of the capture archive.", "corrupt"),
        ("FileNotFoundError: holdout_ids.json", "exception"),
        ("Permission denied writing to /data/results.", "configuration"),
        ("The extension was compiled against CUDA 11; the nodes run CUDA 12.", "version"),
        ("Retraining would hit the same empty holdout.", "every attempt"),
    ],
)  # fmt: skip
def test_a_cause_a_rerun_repeats_is_permanent(report: str, cause: str) -> None:
    found = permanent_cause(report)
    assert found is not None and cause in found, found


@pytest.mark.parametrize(
    ("report", "transient"),
    [
        ("CUDA OOM: another job held 10 GiB of the shared GPU.", "another job"),
        ("Preempted by a higher-priority job at trial 80.", "Preempted"),
        ("Node rig-6600 rebooted mid-sweep (power blip).", "rebooted"),
        ("Lost the connection to the Optuna storage (TCP timeout, 30 s).", "Lost the connection"),
        ("ConnectionResetError while streaming the model; the file itself is fine (sha256"
         " verified afterwards).", "ConnectionResetError"),
        ("Requested 6 GiB on a 12 GiB card that another process was using.", "another process"),
        ("Needs 10 GiB, only 4 GiB free on the shared GPU.", "shared GPU"),
        ("Training diverged (NaN loss, ValueError raised); node rebooted after.", "rebooted"),
        ("Node crashed; log truncated at 200 lines. A rerun on the same node will likely work.",
         "Node crashed"),
        ("Ran in deterministic mode; the job timed out at the wall-time limit.", "timed out"),
        ("The input is not corrupt (checked); the node was preempted.", "preempted"),
    ],
)  # fmt: skip
def test_a_passing_cause_is_transient_not_permanent(report: str, transient: str) -> None:
    """Mirror traps: a checksum verified afterwards, a request that fits the device."""
    assert permanent_cause(report) is None
    assert transient_cause(report) == transient


def test_the_payload_error_message_is_read_too() -> None:
    error = {"type": "OutOfMemoryError", "message": "requested 19.5 GiB; largest device 12 GiB"}
    payload = {"result": {"error": error}}
    text = failure_text("Out of memory on the first trial.", payload)
    assert "error_message: requested 19.5 GiB" in text
    found = permanent_cause(text)
    assert found is not None and "larger than any device" in found


def test_a_request_for_more_gpus_than_the_cluster_has_is_permanent() -> None:
    report = "The job requests 32 GPUs and waits in the queue for ever."
    found = permanent_cause(report, total_gpus=26)
    assert found is not None and "larger than the cluster" in found
    assert permanent_cause(report, total_gpus=64) is None
    assert permanent_cause(report) is None, "no cluster_resources: nothing to compare"


@pytest.mark.parametrize(
    ("report", "transient"),
    [
        ("Paused at 212 of 300 chunks when zeus went down for its maintenance reboot. Checkpoint"
         " is on disk, nothing is corrupt.", "went down"),
        ("The spot instance was reclaimed at 04:10; nothing is truncated.", "spot instance"),
        ("Spot interruption notice, the job stopped cleanly.", "Spot interruption"),
        ("rig-6600 was drained for a driver update; nothing was malformed.", "drained"),
        ("SIGTERM at chunk 80; will resume from the last checkpoint.",
         "resume from the last checkpoint"),
        ("Killed at chunk 80, checkpoint kept at chunk 78.", "checkpoint kept"),
        ("GPU 3 fell off the bus at trial 41; the rest of the node is fine.", "fell off the bus"),
        ("rig-6600b hit a kernel panic overnight.", "kernel panic"),
    ],
)  # fmt: skip
def test_an_interruption_that_keeps_its_work_is_transient(report: str, transient: str) -> None:
    """Maintenance, a reclaimed spot node, a drained node or a kept checkpoint: a rerun picks
    up where it stopped; a fault the report denies ("nothing is corrupt") is none."""
    assert permanent_cause(report) is None
    assert transient_cause(report) == transient


@pytest.mark.parametrize(
    "report",
    [
        "Checkpoint kept at chunk 78, but the capture is corrupt from offset 4096.",
        "Node drained for maintenance; what it left is nothing but corrupt shards.",
    ],
)
def test_an_interruption_does_not_excuse_a_stated_permanent_cause(report: str) -> None:
    """Mirror traps: a kept checkpoint or a maintenance window beside a corrupt input still
    fails the same way; "nothing but" denies nothing."""
    found = permanent_cause(report)
    assert found is not None and "corrupt" in found
