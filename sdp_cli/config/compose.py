"""Hydra composition: `conf=NAME_OR_PATH` plus `key=value` overrides → a typed, validated config."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from sdp_cli.config.hydra_errors import config_error_from_exception
from sdp_cli.config.schema import SdpConfig, register_schema
from sdp_cli.config.validate import validate
from sdp_cli.errors import ConfigError

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
DEFAULT_CONF = "default"
_USER_CONF_NAME = "sdp_user_config"


def split_conf_arg(args: list[str]) -> tuple[str | None, list[str]]:
    """Separate `conf=NAME_OR_PATH` from the Hydra overrides in a command's extra arguments."""
    conf: str | None = None
    overrides: list[str] = []
    for arg in args:
        if arg.startswith("conf="):
            conf = arg.split("=", 1)[1]
        else:
            overrides.append(arg)
    return conf, overrides


# Keys whose value is a free-form mapping (a library's options): an override may add a key
# there, so it needs Hydra's `++` (add or replace) instead of plain `key=value`.
OPEN_MAPPINGS = ("task.dataset_config",)


def open_mapping_overrides(overrides: list[str]) -> list[str]:
    """`task.dataset_config.min_terms=2` → `++task.dataset_config.min_terms=2`, so users need
    not know which keys the YAML already holds."""
    return [
        f"++{item}" if item.split("=", 1)[0].startswith(OPEN_MAPPINGS) else item
        for item in overrides
    ]


def available_conf_names() -> list[str]:
    return sorted(p.stem for p in CONF_DIR.glob("*.yaml"))


def _is_path(conf: str) -> bool:
    return conf.endswith((".yaml", ".yml")) or "/" in conf or Path(conf).is_file()


def _register_user_file(path: Path) -> str:
    """Store a user YAML as a primary config; one without a defaults list extends the built-in
    default, so a file holding only `rollout: {max_staleness: 4}` is a complete config."""
    if not path.is_file():
        raise ConfigError(
            "conf", f"config file '{path}' does not exist", "pass an existing YAML path"
        )
    try:
        data = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except Exception as exc:
        raise ConfigError("conf", f"cannot read '{path}': {exc}") from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError("conf", f"'{path}' must hold a mapping at the top level")
    if "defaults" not in data:
        data = {"defaults": [DEFAULT_CONF, "_self_"], **data}
    ConfigStore.instance().store(name=_USER_CONF_NAME, node=data)
    return _USER_CONF_NAME


def _primary_name(conf: str | None) -> str:
    if conf is None or conf == "":
        return DEFAULT_CONF
    if _is_path(conf):
        return _register_user_file(Path(conf).expanduser())
    name = conf.removesuffix(".yaml")
    if name not in available_conf_names():
        raise ConfigError(
            "conf",
            f"no built-in config named '{conf}'",
            f"use one of {available_conf_names()} or a path to a YAML file",
        )
    return name


def compose_dictconfig(conf: str | None = None, overrides: list[str] | None = None) -> DictConfig:
    """Compose, type-check against the schema and validate ranges. Raises ConfigError."""
    register_schema()
    name = _primary_name(conf)
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
            cfg = compose(config_name=name, overrides=open_mapping_overrides(overrides or []))
        # Merging onto the structured schema also types user files that skipped `sdp_schema`.
        cfg = OmegaConf.merge(OmegaConf.structured(SdpConfig), cfg)
        OmegaConf.resolve(cfg)
    except (HydraException, OmegaConfBaseException, ValueError) as exc:
        raise config_error_from_exception(exc) from None
    finally:
        GlobalHydra.instance().clear()
    OmegaConf.set_struct(cfg, True)
    validate(cfg)
    return cfg


def load_config(conf: str | None = None, overrides: list[str] | None = None) -> SdpConfig:
    """The composed, validated config as typed dataclasses."""
    obj: Any = OmegaConf.to_object(compose_dictconfig(conf, overrides))
    return obj


def config_to_yaml(cfg: SdpConfig) -> str:
    """Fully resolved YAML of a config (what `sdp config show` prints and runs save)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
