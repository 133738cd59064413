"""Range checks the type system cannot express. Each failure names the key path and the fix."""

from __future__ import annotations

import os

from omegaconf import DictConfig, OmegaConf

from sdp_cli.errors import ConfigError


def _at_least(cfg: DictConfig, key: str, low: float) -> None:
    value = OmegaConf.select(cfg, key)
    if value is not None and value < low:
        raise ConfigError(key, f"must be >= {low} (got {value})", f"set {key}={low} or higher")


def _port_in_range(cfg: DictConfig, key: str) -> None:
    port = OmegaConf.select(cfg, key)
    if port != 0 and not 1 <= port <= 65535:
        raise ConfigError(
            key, f"port must be between 1 and 65535 (got {port})", f"set {key}=0 to pick free ports"
        )


_MINIMUMS: dict[str, float] = {
    "rollout.max_staleness": 0,
    "rollout.batch_size": 1,
    "rollout.max_concurrent": 1,
    "rollout.n_samples": 1,
    "rollout.max_new_tokens": 1,
    "rollout.recompute_batch_size": 1,
    "rollout.recompute_concurrency": 1,
    "rollout.take_timeout_s": 0.001,
    "server.count": 1,
    "server.tensor_parallel_size": 1,
    "server.max_model_len": 8,
    "server.max_restarts": 0,
    "train.steps": 1,
    "train.micro_batch_tokens": 1,
    "train.checkpoint_every": 1,
    "train.keep_weights": 1,
    "train.keep_checkpoints": 1,
    "train.cpu_threads": 0,
    "task.min_len": 1,
    "model.hidden_size": 1,
    "model.num_layers": 1,
    "model.num_heads": 1,
    "simulate.server_batch": 1,
    "simulate.mean_new_tokens": 1,
}


def _cores_available(cfg: DictConfig, key: str) -> None:
    cores = OmegaConf.select(cfg, key) or []
    usable = sorted(os.sched_getaffinity(0))
    missing = [core for core in cores if core not in usable]
    if missing:
        raise ConfigError(
            key,
            f"cores {missing} are not available here",
            f"choose from {usable}, or set {key}=[] to leave placement to the OS",
        )


def validate(cfg: DictConfig) -> None:
    for key, low in _MINIMUMS.items():
        _at_least(cfg, key, low)
    _cores_available(cfg, "server.cpu_cores")
    _cores_available(cfg, "train.cpu_cores")
    _port_in_range(cfg, "server.base_port")
    if cfg.model.hidden_size % cfg.model.num_heads:
        raise ConfigError(
            "model.num_heads",
            f"must divide model.hidden_size ({cfg.model.hidden_size})",
            "vLLM's CPU backend needs head_dim = hidden_size / num_heads in {32, 64, 80, 96, 128}",
        )
    if cfg.task.max_len < cfg.task.min_len:
        raise ConfigError(
            "task.max_len",
            f"must be >= task.min_len ({cfg.task.min_len}, got {cfg.task.max_len})",
            f"set task.max_len={cfg.task.min_len} or higher",
        )
    if cfg.task.name == "math_jsonl" and not cfg.task.path:
        raise ConfigError(
            "task.path", "the math_jsonl task needs a data file", "set task.path=FILE.jsonl"
        )
