"""The built-in tiny model: a random-init Llama that vLLM's CPU backend can serve."""

from sdp_cli.model.tiny import (
    TinyModelSpec,
    check_model_dir,
    ensure_model_dir,
    init_tiny_model,
    resolve_model_path,
)

__all__ = [
    "TinyModelSpec",
    "check_model_dir",
    "ensure_model_dir",
    "init_tiny_model",
    "resolve_model_path",
]
