"""Models sdp can make itself (`builtin:tiny`, `builtin:smollm2-135m`) and where a config's
model directory is."""

from sdp_cli.model.builtin import (
    BUILTIN_NAMES,
    builtin_name,
    check_model_dir,
    ensure_model_dir,
    init_builtin,
    resolve_model_path,
)
from sdp_cli.model.tiny import TinyModelSpec, init_tiny_model

__all__ = [
    "BUILTIN_NAMES",
    "TinyModelSpec",
    "builtin_name",
    "check_model_dir",
    "ensure_model_dir",
    "init_builtin",
    "init_tiny_model",
    "resolve_model_path",
]
