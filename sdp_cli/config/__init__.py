"""Typed config schema, Hydra composition and validation."""

from sdp_cli.config.compose import config_to_yaml, load_config, split_conf_arg
from sdp_cli.config.schema import BUILTIN_MODEL, SdpConfig

__all__ = ["BUILTIN_MODEL", "SdpConfig", "config_to_yaml", "load_config", "split_conf_arg"]
