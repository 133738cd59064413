"""Checks beyond the types: every bound and allowed value declared beside its field in the
schema, then the few rules that relate two keys or the machine. Each failure names the key path
and the fix."""

from __future__ import annotations

import os
from typing import Any

from omegaconf import DictConfig, OmegaConf

from sdp_cli.config.schema import Rule, declared_keys
from sdp_cli.errors import ConfigError


def rule_error(key: str, rule: Rule, value: Any) -> ConfigError:
    shown = value.value if hasattr(value, "value") else value
    problem = f"must be {rule.bounds() or rule.allowed()} (got {shown})"
    if rule.why:
        problem += f": {rule.why}"
    return ConfigError(key, problem, f"set {key} to {rule.allowed()} — {rule.help}")


def check_declared_rules(cfg: DictConfig) -> None:
    for key, _, rule in declared_keys():
        if rule is None:
            continue
        value = OmegaConf.select(cfg, key)
        if not rule.accepts(value):
            raise rule_error(key, rule, value)


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


def _heads_divide_hidden_size(cfg: DictConfig) -> None:
    if cfg.model.hidden_size % cfg.model.num_heads:
        raise ConfigError(
            "model.num_heads",
            f"must divide model.hidden_size ({cfg.model.hidden_size})",
            "choose them so that head_dim = hidden_size / num_heads is a whole number",
        )


def _length_range_ordered(cfg: DictConfig) -> None:
    if cfg.task.max_len < cfg.task.min_len:
        raise ConfigError(
            "task.max_len",
            f"must be >= task.min_len ({cfg.task.min_len}, got {cfg.task.max_len})",
            f"set task.max_len={cfg.task.min_len} or higher",
        )


def _file_task_has_a_path(cfg: DictConfig) -> None:
    if cfg.task.name == "math_jsonl" and not cfg.task.path:
        raise ConfigError(
            "task.path", "the math_jsonl task needs a data file", "set task.path=FILE.jsonl"
        )


def _task_options(cfg: DictConfig) -> None:
    mode = str(cfg.task.chat_template).lower()
    if mode not in ("auto", "true", "false"):
        raise ConfigError(
            "task.chat_template",
            f"'{cfg.task.chat_template}' is not a chat template mode",
            "use one of auto, true, false",
        )
    if cfg.task.name == "reasoning_gym" and not cfg.task.dataset:
        raise ConfigError(
            "task.dataset",
            "the reasoning_gym task needs a dataset name",
            "set task.dataset=NAME, e.g. task.dataset=chain_sum",
        )


def _weight_floor_below_cap(cfg: DictConfig) -> None:
    cap, floor = cfg.train.behav_weight_cap, cfg.train.behav_weight_floor
    if cap is not None and floor is not None and floor > cap:
        raise ConfigError(
            "train.behav_weight_floor",
            f"must be <= train.behav_weight_cap ({cap}, got {floor})",
            "lower the floor, raise the cap, or set one of them to null",
        )


def validate(cfg: DictConfig) -> None:
    check_declared_rules(cfg)
    _cores_available(cfg, "server.cpu_cores")
    _cores_available(cfg, "train.cpu_cores")
    _heads_divide_hidden_size(cfg)
    _length_range_ordered(cfg)
    _file_task_has_a_path(cfg)
    _task_options(cfg)
    _weight_floor_below_cap(cfg)
