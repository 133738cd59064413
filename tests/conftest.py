from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

import pytest

from sdp_cli.events.event_log import EventLog
from sdp_cli.events.event_schema import (
    BatchTakenEvent,
    CapacityEvent,
    Event,
    RolloutFinishedEvent,
    RolloutSubmittedEvent,
    RunFinishedEvent,
    RunStartedEvent,
    SampleDroppedEvent,
    ServerStateEvent,
    TrainStepEvent,
    WeightUpdateEvent,
)
from sdp_cli.launcher import ServerFleet
from sdp_cli.model import TinyModelSpec, init_tiny_model


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Deselect the `cuda` tests where there is no GPU: pytest reports them as deselected,
    never as passed or skipped."""
    import torch

    if torch.cuda.is_available():
        return
    deselected = [item for item in items if item.get_closest_marker("cuda")]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = [item for item in items if not item.get_closest_marker("cuda")]


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Keep the built-in model cache of the test session out of the user's home."""
    cache = tmp_path_factory.mktemp("sdp-cache")
    old = os.environ.get("SDP_CACHE_DIR")
    os.environ["SDP_CACHE_DIR"] = str(cache)
    yield cache
    if old is None:
        os.environ.pop("SDP_CACHE_DIR", None)
    else:
        os.environ["SDP_CACHE_DIR"] = old


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path, _ = init_tiny_model(TinyModelSpec(), tmp_path_factory.mktemp("models") / "tiny")
    return path


@pytest.fixture(scope="session")
def write_tiny_weights(
    tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Callable[..., Path]:
    """`write(seed)` saves the tiny model with every weight perturbed by noise from `seed` into
    a fresh directory (safetensors + config, as vLLM's reload_weights reads it) and returns it.
    The same seed gives the same weights."""
    import torch
    from transformers import LlamaForCausalLM

    root = tmp_path_factory.mktemp("weights")

    def write(seed: int, scale: float = 0.05) -> Path:
        target = root / f"seed-{seed}-{scale}"
        if target.is_dir():
            return target
        model = LlamaForCausalLM.from_pretrained(tiny_model_dir)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for param in model.parameters():
                param.add_(torch.randn(param.shape, generator=generator) * scale)
        tmp = root / f".seed-{seed}-{scale}.tmp"
        model.save_pretrained(tmp, safe_serialization=True)
        tmp.rename(target)
        return target

    return write


@pytest.fixture(scope="session")
def vllm_fleet(
    tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerFleet]:
    """Two supervised vLLM CPU servers with the tiny model, started once per session through
    the launcher (`ServerFleet`); `vllm_fleet.pool` is what an InferenceClient routes over.
    Tests share them: they may find them at any weight version (read `pool.target()`), and one
    test kills and restarts a server."""
    from sdp_cli.config import load_config

    cfg = load_config(overrides=["server.count=2", "server.health_interval_s=1.0"])
    run_dir = tmp_path_factory.mktemp("vllm-run")
    events = EventLog(run_dir / "events.jsonl")
    fleet = ServerFleet(cfg.server, tiny_model_dir, run_dir, events=events)
    fleet.start()
    try:
        yield fleet
    finally:
        fleet.stop()
        events.close()


# ---- run logs -------------------------------------------------------------------------------


def _small_run_events() -> list[Event]:
    """A 4-step run small enough to compute every number by hand (see test_inspect_staleness):
    η=2, B=2, max_concurrent=4, segment_wise, one server. Built through the schema, so a
    renamed field breaks here."""
    return [
        RunStartedEvent(
            ts=1000.0,
            run="small",
            steps=4,
            max_staleness=2,
            batch_size=2,
            strategy="segment_wise",
            prox_mode="segment",
            n_samples=2,
            max_concurrent=4,
            server_count=1,
        ),
        ServerStateEvent(
            ts=1000.1, address="127.0.0.1:8001", state="starting", version=0, restarts=0, server=0
        ),
        ServerStateEvent(
            ts=1001.0, address="127.0.0.1:8001", state="ready", version=0, restarts=0, server=0
        ),
        RolloutSubmittedEvent(ts=1001.1, rollout_id=1, version=0),
        RolloutSubmittedEvent(ts=1001.2, rollout_id=2, version=0),
        RolloutSubmittedEvent(ts=1001.3000000000001, rollout_id=3, version=0),
        RolloutSubmittedEvent(ts=1001.4, rollout_id=4, version=0),
        CapacityEvent(
            ts=1001.5,
            version=0,
            max_concurrent=4,
            running=4,
            accepted_live=0,
            staleness_limit=6,
            concurrency_room=0,
            staleness_room=2,
            capacity=0,
            submitted=4,
            rejected=0,
            dropped_total=0,
            consumed=0,
            queue_size=0,
        ),
        RolloutFinishedEvent(
            ts=1003.0,
            rollout_id=1,
            version=0,
            accepted=True,
            reason=None,
            head_version=0,
            tail_version=0,
            head_lag=0,
            tail_lag=0,
            n_tokens=10,
            n_segments=1,
            reward=0.0,
        ),
        RolloutFinishedEvent(
            ts=1003.5,
            rollout_id=2,
            version=0,
            accepted=True,
            reason=None,
            head_version=0,
            tail_version=0,
            head_lag=0,
            tail_lag=0,
            n_tokens=12,
            n_segments=1,
            reward=1.0,
        ),
        CapacityEvent(
            ts=1003.6,
            version=0,
            max_concurrent=4,
            running=2,
            accepted_live=2,
            staleness_limit=6,
            concurrency_room=2,
            staleness_room=2,
            capacity=2,
            submitted=4,
            rejected=0,
            dropped_total=0,
            consumed=0,
            queue_size=2,
        ),
        RolloutSubmittedEvent(ts=1003.7, rollout_id=5, version=0),
        RolloutSubmittedEvent(ts=1003.8, rollout_id=6, version=0),
        CapacityEvent(
            ts=1003.9,
            version=0,
            max_concurrent=4,
            running=4,
            accepted_live=2,
            staleness_limit=6,
            concurrency_room=0,
            staleness_room=0,
            capacity=0,
            submitted=6,
            rejected=0,
            dropped_total=0,
            consumed=0,
            queue_size=2,
        ),
        BatchTakenEvent(
            ts=1004.0,
            step=0,
            version=0,
            rollout_ids=[1, 2],
            head_lags=[0, 0],
            tail_lags=[0, 0],
            tokens_by_lag={"0": 22},
            wait_s=3.0,
        ),
        TrainStepEvent(
            ts=1005.0,
            step=0,
            version=0,
            reward=0.5,
            loss=0.4,
            clip_frac=0.1,
            behav_weight_mean=1.0,
            behav_weight_max=1.2,
            masked_frac=0.0,
            samples=4,
            tokens=22,
            step_s=1.0,
            samples_per_s=4.0,
            gen_tokens_per_s=22.0,
        ),
        WeightUpdateEvent(
            ts=1005.8,
            version=1,
            phases={
                "pause_s": 0.1,
                "recompute_s": 0.2,
                "export_s": 0.3,
                "reload_s": 0.1,
                "set_version_s": 0.05,
                "resume_s": 0.05,
            },
            total_s=0.8,
        ),
        ServerStateEvent(
            ts=1005.85, address="127.0.0.1:8001", state="ready", version=1, restarts=0, server=0
        ),
        RolloutFinishedEvent(
            ts=1006.0,
            rollout_id=3,
            version=1,
            accepted=True,
            reason=None,
            head_version=0,
            tail_version=1,
            head_lag=1,
            tail_lag=0,
            n_tokens=16,
            n_segments=2,
            reward=1.0,
        ),
        RolloutFinishedEvent(
            ts=1006.2,
            rollout_id=5,
            version=1,
            accepted=True,
            reason=None,
            head_version=0,
            tail_version=1,
            head_lag=1,
            tail_lag=0,
            n_tokens=10,
            n_segments=2,
            reward=0.5,
        ),
        RolloutFinishedEvent(
            ts=1006.3,
            rollout_id=6,
            version=1,
            accepted=True,
            reason=None,
            head_version=0,
            tail_version=0,
            head_lag=1,
            tail_lag=1,
            n_tokens=8,
            n_segments=1,
            reward=0.0,
        ),
        CapacityEvent(
            ts=1006.4,
            version=1,
            max_concurrent=4,
            running=1,
            accepted_live=5,
            staleness_limit=8,
            concurrency_room=3,
            staleness_room=2,
            capacity=2,
            submitted=6,
            rejected=0,
            dropped_total=0,
            consumed=2,
            queue_size=3,
        ),
        RolloutSubmittedEvent(ts=1006.5, rollout_id=7, version=1),
        RolloutSubmittedEvent(ts=1006.6, rollout_id=8, version=1),
        CapacityEvent(
            ts=1006.7,
            version=1,
            max_concurrent=4,
            running=3,
            accepted_live=5,
            staleness_limit=8,
            concurrency_room=1,
            staleness_room=0,
            capacity=0,
            submitted=8,
            rejected=0,
            dropped_total=0,
            consumed=2,
            queue_size=3,
        ),
        BatchTakenEvent(
            ts=1006.8,
            step=1,
            version=1,
            rollout_ids=[3, 5],
            head_lags=[1, 1],
            tail_lags=[0, 0],
            tokens_by_lag={"0": 14, "1": 12},
            wait_s=1.0,
        ),
        TrainStepEvent(
            ts=1007.8,
            step=1,
            version=1,
            reward=0.75,
            loss=0.3,
            clip_frac=0.1,
            behav_weight_mean=1.0,
            behav_weight_max=1.2,
            masked_frac=0.0,
            samples=4,
            tokens=26,
            step_s=1.0,
            samples_per_s=4.0,
            gen_tokens_per_s=26.0,
        ),
        WeightUpdateEvent(
            ts=1008.4,
            version=2,
            phases={
                "pause_s": 0.1,
                "export_s": 0.3,
                "reload_s": 0.1,
                "set_version_s": 0.05,
                "resume_s": 0.05,
            },
            total_s=0.6,
        ),
        SampleDroppedEvent(
            ts=1008.45,
            rollout_id=6,
            reason="no_recompute",
            point="purge",
            head_lag=2,
            tail_lag=2,
            version=2,
            head_version=0,
            tail_version=0,
        ),
        ServerStateEvent(
            ts=1008.46, address="127.0.0.1:8001", state="ready", version=2, restarts=0, server=0
        ),
        CapacityEvent(
            ts=1008.5,
            version=2,
            max_concurrent=4,
            running=3,
            accepted_live=4,
            staleness_limit=10,
            concurrency_room=1,
            staleness_room=3,
            capacity=1,
            submitted=8,
            rejected=0,
            dropped_total=1,
            consumed=4,
            queue_size=0,
        ),
        RolloutSubmittedEvent(ts=1008.6, rollout_id=9, version=2),
        CapacityEvent(
            ts=1008.7,
            version=2,
            max_concurrent=4,
            running=4,
            accepted_live=4,
            staleness_limit=10,
            concurrency_room=0,
            staleness_room=2,
            capacity=0,
            submitted=9,
            rejected=0,
            dropped_total=1,
            consumed=4,
            queue_size=0,
        ),
        RolloutFinishedEvent(
            ts=1009.0,
            rollout_id=7,
            version=2,
            accepted=True,
            reason=None,
            head_version=1,
            tail_version=2,
            head_lag=1,
            tail_lag=0,
            n_tokens=12,
            n_segments=2,
            reward=1.0,
        ),
        RolloutFinishedEvent(
            ts=1009.2,
            rollout_id=8,
            version=2,
            accepted=True,
            reason=None,
            head_version=1,
            tail_version=2,
            head_lag=1,
            tail_lag=0,
            n_tokens=14,
            n_segments=2,
            reward=0.0,
        ),
        CapacityEvent(
            ts=1009.3,
            version=2,
            max_concurrent=4,
            running=2,
            accepted_live=6,
            staleness_limit=10,
            concurrency_room=2,
            staleness_room=2,
            capacity=2,
            submitted=9,
            rejected=0,
            dropped_total=1,
            consumed=4,
            queue_size=2,
        ),
        RolloutSubmittedEvent(ts=1009.4, rollout_id=10, version=2),
        RolloutSubmittedEvent(ts=1009.5, rollout_id=11, version=2),
        CapacityEvent(
            ts=1009.6,
            version=2,
            max_concurrent=4,
            running=4,
            accepted_live=6,
            staleness_limit=10,
            concurrency_room=0,
            staleness_room=0,
            capacity=0,
            submitted=11,
            rejected=0,
            dropped_total=1,
            consumed=4,
            queue_size=2,
        ),
        BatchTakenEvent(
            ts=1009.9,
            step=2,
            version=2,
            rollout_ids=[7, 8],
            head_lags=[1, 1],
            tail_lags=[0, 0],
            tokens_by_lag={"0": 16, "1": 10},
            wait_s=1.5,
        ),
        TrainStepEvent(
            ts=1010.9,
            step=2,
            version=2,
            reward=0.5,
            loss=0.2,
            clip_frac=0.1,
            behav_weight_mean=1.0,
            behav_weight_max=1.2,
            masked_frac=0.0,
            samples=4,
            tokens=26,
            step_s=1.0,
            samples_per_s=4.0,
            gen_tokens_per_s=26.0,
        ),
        WeightUpdateEvent(
            ts=1011.6,
            version=3,
            phases={
                "pause_s": 0.1,
                "recompute_s": 0.15,
                "export_s": 0.3,
                "reload_s": 0.1,
                "set_version_s": 0.03,
                "resume_s": 0.02,
            },
            total_s=0.7,
        ),
        ServerStateEvent(
            ts=1011.65, address="127.0.0.1:8001", state="ready", version=3, restarts=0, server=0
        ),
        RolloutFinishedEvent(
            ts=1011.7,
            rollout_id=4,
            version=3,
            accepted=False,
            reason="head_lag",
            head_version=0,
            tail_version=3,
            head_lag=3,
            tail_lag=0,
            n_tokens=24,
            n_segments=4,
            reward=1.0,
        ),
        SampleDroppedEvent(
            ts=1011.7,
            rollout_id=4,
            reason="head_lag",
            point="finish",
            head_lag=3,
            tail_lag=0,
            version=3,
            head_version=0,
            tail_version=3,
        ),
        RolloutFinishedEvent(
            ts=1011.8,
            rollout_id=10,
            version=3,
            accepted=False,
            reason="filtered",
            head_version=2,
            tail_version=3,
            head_lag=1,
            tail_lag=0,
            n_tokens=9,
            n_segments=2,
            reward=0.0,
        ),
        RolloutFinishedEvent(
            ts=1012.0,
            rollout_id=9,
            version=3,
            accepted=True,
            reason=None,
            head_version=2,
            tail_version=3,
            head_lag=1,
            tail_lag=0,
            n_tokens=10,
            n_segments=2,
            reward=1.0,
        ),
        RolloutFinishedEvent(
            ts=1012.5,
            rollout_id=11,
            version=3,
            accepted=True,
            reason=None,
            head_version=2,
            tail_version=3,
            head_lag=1,
            tail_lag=0,
            n_tokens=8,
            n_segments=2,
            reward=1.0,
        ),
        CapacityEvent(
            ts=1012.6,
            version=3,
            max_concurrent=4,
            running=0,
            accepted_live=8,
            staleness_limit=12,
            concurrency_room=4,
            staleness_room=4,
            capacity=4,
            submitted=11,
            rejected=1,
            dropped_total=2,
            consumed=6,
            queue_size=2,
        ),
        BatchTakenEvent(
            ts=1012.8,
            step=3,
            version=3,
            rollout_ids=[9, 11],
            head_lags=[1, 1],
            tail_lags=[0, 0],
            tokens_by_lag={"0": 9, "1": 9},
            wait_s=1.2,
        ),
        TrainStepEvent(
            ts=1013.8,
            step=3,
            version=3,
            reward=1.0,
            loss=0.1,
            clip_frac=0.1,
            behav_weight_mean=1.0,
            behav_weight_max=1.2,
            masked_frac=0.0,
            samples=4,
            tokens=18,
            step_s=1.0,
            samples_per_s=4.0,
            gen_tokens_per_s=18.0,
        ),
        RunFinishedEvent(ts=1013.9, steps=4, wall_s=13.9, version=3),
    ]


# A line of a type this sdp does not know, and the cut last line of a run killed mid-write.
FOREIGN_LINE = '{"ts": 1006.25, "type": "future_event", "note": "written by a newer sdp"}'
CUT_LINE = '{"ts": 1014.0, "type": "train_st'


@pytest.fixture
def small_run_events() -> list[Event]:
    return _small_run_events()


@pytest.fixture
def small_run_log(tmp_path: Path) -> Path:
    """RUN_DIR/events.jsonl of the small run, written by EventLog, with one event of an
    unknown type in the middle and a truncated last line."""
    path = tmp_path / "runs" / "small" / "events.jsonl"
    events = _small_run_events()
    with EventLog(path) as log:
        for event in events[:20]:
            log.emit(event)
    with path.open("a", encoding="utf-8") as handle:
        handle.write(FOREIGN_LINE + "\n")
    with EventLog(path) as log:
        for event in events[20:]:
            log.emit(event)
    with path.open("a", encoding="utf-8") as handle:
        handle.write(CUT_LINE)
    return path


@pytest.fixture(scope="session")
def simulated_run_log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The log `sdp simulate --run-dir` writes for a short run with two servers: the same
    writers as `sdp train` (executor, strategy) plus simulated servers and trainer."""
    from sdp_cli.config import load_config
    from sdp_cli.simulate import run_simulation

    cfg = load_config(None, SIMULATED_RUN_OVERRIDES)
    path = tmp_path_factory.mktemp("simulated-run") / "events.jsonl"
    with EventLog(path) as log:
        run_simulation(cfg, log)
    return path


SIMULATED_RUN_OVERRIDES = [
    "run.name=simulated",
    "train.steps=6",
    "server.count=2",
    "rollout.batch_size=4",
    "rollout.max_concurrent=16",
    "rollout.max_staleness=1",
    # A seed whose run drops a stale sample, so that the log has every event type.
    "simulate.seed=1",
]


@contextmanager
def unwritable(directory: Path) -> Iterator[None]:
    """Make `directory` refuse new entries, also for root (which ignores permission bits: the
    immutable attribute binds it). Checked, so a test cannot pass on a directory that stayed
    writable."""
    as_root = os.geteuid() == 0
    if as_root:
        subprocess.run(["chattr", "+i", str(directory)], check=True)
    else:
        mode = directory.stat().st_mode
        directory.chmod(0o555)
    try:
        probe = directory / ".probe"
        with pytest.raises(OSError):
            probe.mkdir()
        yield
    finally:
        if as_root:
            subprocess.run(["chattr", "-i", str(directory)], check=True)
        else:
            directory.chmod(mode)


@pytest.fixture
def make_unwritable() -> Callable[[Path], AbstractContextManager[None]]:
    return unwritable
