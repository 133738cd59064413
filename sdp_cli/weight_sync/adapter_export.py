"""Export a LoRA adapter for the servers (`train.lora.rank > 0`): `weights_dir/v{N}/` holds
only the adapter, as peft's `save_pretrained` writes it (adapter_model.safetensors and
adapter_config.json), which vLLM's `POST /v1/load_lora_adapter` and peft both load. Written
atomically and pruned like a full export (`export.export_weights`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from torch import Tensor

from sdp_cli.common.atomic import atomic_dir
from sdp_cli.weight_sync.export import write_safetensors
from sdp_cli.weight_sync.versions import WeightsExportError, prune_versions, version_dir

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


def is_adapter_dir(path: str | Path) -> bool:
    """Whether a weights directory holds a LoRA adapter rather than a whole model."""
    return (Path(path) / ADAPTER_CONFIG).is_file()


def write_adapter_dir(
    target: Path, tensors: Mapping[str, Tensor], config: Mapping[str, Any]
) -> None:
    """The adapter's two files in `target` (created if missing)."""
    target.mkdir(parents=True, exist_ok=True)
    write_safetensors(target / ADAPTER_WEIGHTS, {k: tensors[k] for k in sorted(tensors)})
    text = json.dumps(dict(config), indent=2, sort_keys=True)
    (target / ADAPTER_CONFIG).write_text(text)


def export_adapter(
    tensors: Mapping[str, Tensor],
    config: Mapping[str, Any],
    weights_dir: Path,
    version: int,
    keep: int,
) -> Path:
    """Write `weights_dir/v{version}/` (the adapter only) atomically, keep the newest `keep`
    versions, and return the new directory."""
    final = version_dir(weights_dir, version)
    try:
        weights_dir.mkdir(parents=True, exist_ok=True)
        with atomic_dir(final) as tmp:
            write_adapter_dir(tmp, tensors, config)
        prune_versions(weights_dir, keep, version)
    except (OSError, SafetensorError) as exc:
        raise WeightsExportError(
            f"cannot export the adapter for the servers to '{final}': {exc}\n"
            "  the checkpoints written before are intact: fix the directory and continue with "
            "resume=true"
        ) from exc
    return final
