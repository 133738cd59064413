"""Load the tokenizer that belongs to a model directory."""

from __future__ import annotations

from pathlib import Path

from transformers import PreTrainedTokenizerBase

from sdp_cli.errors import ConfigError


def load_tokenizer(model_dir: Path | str) -> PreTrainedTokenizerBase:
    # Imported here: transformers' auto classes import torch, which the orchestration and the
    # simulator must not load (tests/unit/test_layout.py).
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(model_dir))
    except (OSError, ValueError) as exc:
        raise ConfigError(
            "model.path",
            f"cannot load a tokenizer from '{model_dir}': {exc}",
            "point model.path at a Hugging Face model directory with tokenizer files",
        ) from exc
