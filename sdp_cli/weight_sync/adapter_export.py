"""Export a LoRA adapter for the servers (`train.lora.rank > 0`): `weights_dir/v{N}/` holds
only the adapter, as peft's `save_pretrained` writes it (adapter_model.safetensors and
adapter_config.json), which vLLM's `POST /v1/load_lora_adapter` and peft both load. Written
atomically and pruned like a full export (`export.export_weights`).

Adapters go on the decoder's linear projections (`linear_projection_names`): the trainer gives
peft those names, and the launcher gives vLLM the same ones (`--lora-target-modules`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from torch import Tensor
from transformers import AutoConfig, AutoModelForCausalLM

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


def linear_projection_names(model: torch.nn.Module) -> list[str]:
    """The last name part of every linear module but the LM head (q_proj, gate_proj, ...),
    what peft's all-linear targets."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return sorted(
        {
            name.rsplit(".", 1)[-1]
            for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and module is not head
        }
    )


def model_projection_names(model_dir: Path) -> list[str]:
    """`linear_projection_names` of a model directory's architecture, built without weights."""
    config = AutoConfig.from_pretrained(str(model_dir))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return linear_projection_names(model)
