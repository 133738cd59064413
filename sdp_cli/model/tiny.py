"""Create the built-in tiny model deterministically from a seed.

A random-init `LlamaForCausalLM` (float32, head_dim 64 by default) plus a character-level
WordLevel tokenizer saved as `PreTrainedTokenizerFast`. Both are written to a temporary directory
and renamed into place, so a reader never sees a half-written model and a second call is a no-op.
"""

from __future__ import annotations

import hashlib
import json
import os
import string
from dataclasses import asdict, dataclass
from pathlib import Path

from sdp_cli.common.atomic import atomic_dir, published_or_free
from sdp_cli.config.model_settings import ModelConfig
from sdp_cli.errors import ConfigError

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIAL_TOKENS = [PAD, BOS, EOS, UNK]
# Covers the built-in tasks: digits, lowercase words, arithmetic and a few separators.
ALPHABET = string.digits + string.ascii_lowercase + " +-*/=?.,:;()[]<>!#|_"
VOCAB_MULTIPLE = 64
SPEC_FILE = "sdp_model_spec.json"


@dataclass(frozen=True)
class TinyModelSpec:
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 2
    intermediate_size: int = 256
    max_position_embeddings: int = 256
    init_seed: int = 0

    @classmethod
    def from_config(cls, model: ModelConfig) -> TinyModelSpec:
        return cls(
            hidden_size=model.hidden_size,
            num_layers=model.num_layers,
            num_heads=model.num_heads,
            intermediate_size=model.intermediate_size,
            max_position_embeddings=model.max_position_embeddings,
            init_seed=model.init_seed,
        )

    def fingerprint(self) -> str:
        text = json.dumps({"alphabet": ALPHABET, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


def default_cache_dir() -> Path:
    return Path(os.environ.get("SDP_CACHE_DIR", Path.home() / ".cache" / "sdp"))


def vocabulary() -> dict[str, int]:
    tokens = SPECIAL_TOKENS + list(ALPHABET)
    return {tok: i for i, tok in enumerate(tokens)}


def padded_vocab_size(n_tokens: int) -> int:
    return -(-n_tokens // VOCAB_MULTIPLE) * VOCAB_MULTIPLE


def build_tokenizer():  # -> PreTrainedTokenizerFast
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel(vocab=vocabulary(), unk_token=UNK))
    # One token per character; decoding concatenates them back without separators.
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        clean_up_tokenization_spaces=False,
    )


def _write_model(spec: TinyModelSpec, target: Path) -> None:
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer()
    vocab = vocabulary()
    config = LlamaConfig(
        vocab_size=padded_vocab_size(len(vocab)),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_heads,
        max_position_embeddings=spec.max_position_embeddings,
        bos_token_id=vocab[BOS],
        eos_token_id=vocab[EOS],
        pad_token_id=vocab[PAD],
        tie_word_embeddings=False,
        torch_dtype="float32",
    )
    torch.manual_seed(spec.init_seed)
    model = LlamaForCausalLM(config).to(torch.float32)
    model.generation_config = GenerationConfig(
        bos_token_id=vocab[BOS], eos_token_id=vocab[EOS], pad_token_id=vocab[PAD]
    )
    model.save_pretrained(target, safe_serialization=True)
    tokenizer.save_pretrained(target)
    (target / SPEC_FILE).write_text(json.dumps(asdict(spec), indent=2, sort_keys=True))


def init_tiny_model(spec: TinyModelSpec, directory: Path | None = None) -> tuple[Path, bool]:
    """Create the model in `directory` (default: the cache). Returns (path, created)."""
    target = directory or default_cache_dir() / "models" / f"tiny-{spec.fingerprint()}"
    try:
        if published_or_free(target, SPEC_FILE):
            return target, False
    except FileExistsError:
        raise ConfigError(
            "model.path",
            f"'{target}' exists and is not an sdp tiny model",
            "choose an empty directory",
        ) from None
    # An empty target is replaced; a concurrent call that won the race wrote the same model.
    with atomic_dir(target, keep_existing=True) as tmp:
        _write_model(spec, tmp)
    return target, True
