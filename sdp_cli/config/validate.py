"""Checks beyond the types: every bound and allowed value declared beside its field in the
schema, then the few rules that relate two keys or the machine. Each failure names the key path
and the fix."""

from __future__ import annotations

import importlib.util
import os
import re
from typing import Any

from omegaconf import DictConfig, OmegaConf

from sdp_cli.config.schema import declared_keys
from sdp_cli.config.setting import Rule
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


def _curriculum_levels_ordered(cfg: DictConfig) -> None:
    curriculum = cfg.task.curriculum
    if curriculum.mode == "off":
        return
    if curriculum.end_level < curriculum.start_level:
        raise ConfigError(
            "task.curriculum.end_level",
            f"must be >= task.curriculum.start_level ({curriculum.start_level}, got "
            f"{curriculum.end_level})",
            f"set task.curriculum.end_level={curriculum.start_level} or higher",
        )
    if cfg.task.name != "reasoning_gym":
        raise ConfigError(
            "task.curriculum.mode",
            f"a curriculum needs task.name=reasoning_gym (got '{cfg.task.name}')",
            "set task.curriculum.mode=off, or use a reasoning_gym dataset",
        )
    if not curriculum.attributes:
        raise ConfigError(
            "task.curriculum.attributes",
            "names no attribute",
            "name one or more, e.g. task.curriculum.attributes=[num_terms]",
        )


def _weight_floor_below_cap(cfg: DictConfig) -> None:
    cap, floor = cfg.train.behav_weight_cap, cfg.train.behav_weight_floor
    if cap is not None and floor is not None and floor > cap:
        raise ConfigError(
            "train.behav_weight_floor",
            f"must be <= train.behav_weight_cap ({cap}, got {floor})",
            "lower the floor, raise the cap, or set one of them to null",
        )


def _trainer_recompute_on_one_rank(cfg: DictConfig) -> None:
    if cfg.rollout.recompute_on == "trainer" and cfg.train.world_size > 1:
        raise ConfigError(
            "rollout.recompute_on",
            "trainer scores with the one-process trainer; the sharded trainer "
            f"(train.world_size = {cfg.train.world_size}) does not score outside its step",
            "set rollout.recompute_on=server or train.world_size=1",
        )


def _node_rank_below_nnodes(cfg: DictConfig) -> None:
    train = cfg.train
    if train.node_rank >= train.nnodes:
        raise ConfigError(
            "train.node_rank",
            f"must be below train.nnodes ({train.nnodes}, got {train.node_rank})",
            f"set train.node_rank to one of 0..{train.nnodes - 1}",
        )


def _several_nodes_name_a_port(cfg: DictConfig) -> None:
    if cfg.train.nnodes > 1 and cfg.train.master_port == 0:
        raise ConfigError(
            "train.master_port",
            "several nodes need one rendezvous port known to all of them",
            "set train.master_port=PORT (free on node 0) and train.master_addr=NODE0_ADDRESS",
        )


def _gpu_ids_fit(cfg: DictConfig) -> None:
    """Lengths and overlap; whether the devices are visible is checked when the run starts."""
    servers, trainer = list(cfg.server.gpu_ids), list(cfg.train.gpu_ids)
    needed = cfg.server.count * cfg.server.tensor_parallel_size
    if servers and len(servers) != needed:
        raise ConfigError(
            "server.gpu_ids",
            f"needs server.count × server.tensor_parallel_size = {needed} devices "
            f"(got {len(servers)})",
            f"list {needed} device indices, or set server.gpu_ids=[]",
        )
    if trainer and len(trainer) != cfg.train.world_size:
        raise ConfigError(
            "train.gpu_ids",
            f"needs one device per rank, train.world_size = {cfg.train.world_size} "
            f"(got {len(trainer)})",
            f"list {cfg.train.world_size} device indices, or set train.gpu_ids=[]",
        )
    for key, ids in (("server.gpu_ids", servers), ("train.gpu_ids", trainer)):
        if len(set(ids)) != len(ids) or any(i < 0 for i in ids):
            raise ConfigError(key, f"must list distinct device indices >= 0 (got {ids})")
    shared = sorted(set(servers) & set(trainer))
    if shared:
        raise ConfigError(
            "train.gpu_ids",
            f"devices {shared} are also in server.gpu_ids",
            "give the servers and the trainer disjoint devices",
        )


RAY_INSTALL_HINT = (
    "install it with `pip install 'sdp-cli[ray]'` (scripts/setup.sh does), "
    "or set server.backend=process"
)


def ray_installed() -> bool:
    return importlib.util.find_spec("ray") is not None


def _ray_settings(cfg: DictConfig) -> None:
    """The Ray backend needs the package and an address it can use; weights.transport=ray
    needs the Ray backend."""
    backend = str(cfg.server.backend)
    if str(cfg.weights.transport) == "ray" and backend != "ray":
        raise ConfigError(
            "weights.transport",
            "`ray` needs the servers on Ray (got server.backend=process)",
            "set server.backend=ray, or weights.transport=filesystem",
        )
    if backend != "ray":
        return
    if not ray_installed():
        raise ConfigError(
            "server.backend",
            "`ray` needs the ray package, which is not installed",
            RAY_INSTALL_HINT,
        )
    address = str(cfg.ray.address)
    if address not in ("local", "auto") and not re.fullmatch(r"(ray://)?[^\s:/]+:\d+", address):
        raise ConfigError(
            "ray.address",
            f"must be local, auto or HOST:PORT (got {address!r})",
            "set ray.address=local to start a private Ray instance for the run",
        )


def validate(cfg: DictConfig) -> None:
    check_declared_rules(cfg)
    _cores_available(cfg, "server.cpu_cores")
    _cores_available(cfg, "train.cpu_cores")
    _heads_divide_hidden_size(cfg)
    _length_range_ordered(cfg)
    _file_task_has_a_path(cfg)
    _task_options(cfg)
    _curriculum_levels_ordered(cfg)
    _weight_floor_below_cap(cfg)
    _node_rank_below_nnodes(cfg)
    _trainer_recompute_on_one_rank(cfg)
    _several_nodes_name_a_port(cfg)
    _gpu_ids_fit(cfg)
    _ray_settings(cfg)
