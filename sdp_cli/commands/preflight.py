"""What `sdp train` checks before it starts any process: everything the config names that lives
outside it (the model directory and its tokenizer, the task's data file and each of its lines,
`task.reward_fn`'s import, the registry file, vLLM and the devices, the run directory). Each
failure is a ConfigError naming the key, so a mistake shows in a second, with exit code 2, instead
of after the servers have started; `sdp train --dry-run` runs the same checks."""

from __future__ import annotations

from pathlib import Path

from sdp_cli.config.schema import BUILTIN_MODEL, Device, ModelConfig, SdpConfig, ServerConfig
from sdp_cli.errors import ConfigError
from sdp_cli.launcher.command import check_vllm_installed, server_device
from sdp_cli.launcher.devices import split_devices, visible_cuda_devices
from sdp_cli.launcher.registry import RegistryError, read_registry
from sdp_cli.model.tiny import check_model_dir
from sdp_cli.tasks import check_task, load_tokenizer
from sdp_cli.train.checkpoint import latest_checkpoint

# What `sdp train` writes into run.dir; any of the first two means a run is already there.
RUN_FILES = ("events.jsonl", "checkpoints", "weights", "servers.json", "config.yaml", "logs")


def preflight(cfg: SdpConfig) -> list[str]:
    """Run every check; returns one line per thing checked. Raises ConfigError (or another
    SdpError, e.g. vLLM missing) at the first problem."""
    return [
        *check_model(cfg.model),
        *check_task(cfg.task),
        *check_servers(cfg.server),
        *check_trainer_device(cfg),
        *check_run_dir(cfg),
    ]


def check_model(model: ModelConfig) -> list[str]:
    path = check_model_dir(model)
    if model.path == BUILTIN_MODEL and not path.is_dir():
        return [f"model {BUILTIN_MODEL}: made at first use in {path}"]
    # The tokenizer is what the tasks encode prompts with; a directory of weights alone fails.
    load_tokenizer(path)
    return [f"model {path}: config.json and tokenizer load"]


def check_servers(server: ServerConfig) -> list[str]:
    if server.registry:
        return [check_registry(Path(server.registry))]
    check_vllm_installed()
    if server_device(server) != Device.cuda:
        return [f"{server.count} vLLM CPU server(s) to launch"]
    groups = split_devices(server.count, server.tensor_parallel_size, visible_cuda_devices())
    return [f"{server.count} vLLM server(s) on CUDA devices {groups}"]


def check_registry(path: Path) -> str:
    try:
        entries = read_registry(path)
    except RegistryError as exc:
        raise ConfigError("server.registry", str(exc)) from None
    live = [entry for entry in entries if entry.state != "dead"]
    if not live:
        raise ConfigError(
            "server.registry",
            f"registry '{path}' lists no server that is not dead",
            "check that `sdp launch-servers` is still running",
        )
    return f"registry {path}: {len(live)} server(s) listed (health is checked at start)"


def check_trainer_device(cfg: SdpConfig) -> list[str]:
    from sdp_cli.train.actor import torch_device

    return [f"trainer device {torch_device(cfg.train.device)}"]


def holds_run(run_dir: Path) -> bool:
    return (run_dir / "events.jsonl").exists() or (run_dir / "checkpoints").exists()


def check_run_dir(cfg: SdpConfig) -> list[str]:
    """A new run never mixes into an old one unless asked to; a resume needs a checkpoint."""
    run_dir = Path(cfg.run.dir)
    if cfg.resume:
        checkpoint = latest_checkpoint(run_dir)
        if checkpoint is None:
            raise ConfigError(
                "resume", f"no checkpoint in '{run_dir}/checkpoints'", "run without resume=true"
            )
        return [f"resume from {checkpoint}"]
    if holds_run(run_dir):
        if not cfg.run.overwrite:
            raise ConfigError(
                "run.dir",
                f"'{run_dir}' already holds a run",
                "set resume=true to continue it, run.overwrite=true to start afresh, "
                "or run.name=NEW",
            )
        return [f"run directory {run_dir}: its run will be replaced (run.overwrite=true)"]
    return [f"run directory {run_dir}"]
