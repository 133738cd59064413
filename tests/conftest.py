from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

import pytest

from sdp_cli.events.event_log import EventLog
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


# ---- run logs ----------------------------------------------------------------------------


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
