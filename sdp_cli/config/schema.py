"""The root of the typed configuration, registered in Hydra's ConfigStore: one group per concern,
each declared in its own module (`run_settings.py`, `model_settings.py`, `server_settings.py`,
`rollout_settings.py`, `train_settings.py`, `eval_settings.py`, `log_settings.py`,
`task_settings.py`, `simulate_settings.py`) with `setting.setting(...)`.

Every key a config file or override may set is declared with its default, its bounds or allowed
values and one line of help. Hydra rejects unknown keys and wrong types against these
dataclasses; `validate.py` checks every declared bound and allowed value, so a constraint is
written once, beside its field, and `sdp config show --explain` and the key table of
docs/configuration.md print the same declarations.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import Field, dataclass, field, fields, is_dataclass
from typing import Any

from hydra.core.config_store import ConfigStore

from sdp_cli.config.eval_settings import EvalConfig
from sdp_cli.config.log_settings import LogConfig
from sdp_cli.config.model_settings import ModelConfig
from sdp_cli.config.rollout_settings import RolloutConfig
from sdp_cli.config.run_settings import RunConfig
from sdp_cli.config.server_settings import RayConfig, ServerConfig, WeightsConfig
from sdp_cli.config.setting import RULE, Rule, setting
from sdp_cli.config.simulate_settings import SimulateConfig
from sdp_cli.config.task_settings import TaskConfig
from sdp_cli.config.train_settings import TrainConfig


@dataclass
class SdpConfig:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    weights: WeightsConfig = field(default_factory=WeightsConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    simulate: SimulateConfig = field(default_factory=SimulateConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)
    resume: bool = setting(False, help="continue from the newest checkpoint in run.dir")


def declared_keys(
    schema: type = SdpConfig, prefix: str = ""
) -> Iterator[tuple[str, Field[Any], Rule | None]]:
    """Every leaf key of the schema with its dataclass field and rule (None for a field declared
    without `setting`, which a test forbids), in declaration order; groups recurse."""
    for item in fields(schema):
        key = f"{prefix}{item.name}"
        group = item.default_factory
        if isinstance(group, type) and is_dataclass(group):
            yield from declared_keys(group, f"{key}.")
        else:
            yield key, item, item.metadata.get(RULE)


SCHEMA_NAME = "sdp_schema"


def register_schema() -> None:
    """Register the root schema; `conf/default.yaml` names it first in its defaults list, so
    every group file and override is checked against the dataclasses above."""
    ConfigStore.instance().store(name=SCHEMA_NAME, node=SdpConfig)
