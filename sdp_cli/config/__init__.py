"""Typed config schema, Hydra composition and validation."""

from sdp_cli.config.compose import config_to_yaml, load_config, split_conf_arg
from sdp_cli.config.model_settings import BUILTIN_MODEL
from sdp_cli.config.schema import SdpConfig

__all__ = ["BUILTIN_MODEL", "SdpConfig", "config_to_yaml", "load_config", "split_conf_arg"]
