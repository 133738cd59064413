"""The `model.*` keys: which model, and the shape of a built-in one."""

from __future__ import annotations

from dataclasses import dataclass

from sdp_cli.config.setting import setting

BUILTIN_MODEL = "builtin:tiny"


@dataclass
class ModelConfig:
    path: str = setting(
        BUILTIN_MODEL,
        help="a local Hugging Face model directory, or builtin:tiny / builtin:smollm2-135m (made "
        "by `sdp init-model NAME`, or on first use)",
    )
    cache_dir: str | None = setting(
        None, help="where built-in models are cached; null: $SDP_CACHE_DIR or ~/.cache/sdp"
    )
    hidden_size: int = setting(128, ge=1, help="built-in model: hidden size")
    num_layers: int = setting(2, ge=1, help="built-in model: decoder layers")
    num_heads: int = setting(
        2, ge=1, help="built-in model: attention heads (must divide hidden_size)"
    )
    intermediate_size: int = setting(256, ge=1, help="built-in model: MLP width")
    max_position_embeddings: int = setting(
        256, ge=8, help="built-in model: longest sequence it can encode"
    )
    init_seed: int = setting(0, help="built-in model: seed of its random initial weights")
