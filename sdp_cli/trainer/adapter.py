"""LoRA through peft (`train.lora.rank > 0`): the adapter the actor trains, its tensors in
peft's `save_pretrained` names (what vLLM's `/v1/load_lora_adapter` and peft load), and its
place in checkpoints.

The actor keeps the Hugging Face model with the adapter layers injected into it (the
`PeftModel` wraps it, and only toggles them), so everything that reads the model's decoder,
LM head or layers works unchanged, FSDP2 sharding and activation checkpointing included.
Only the adapter's parameters require gradients, so only they reach the optimizer.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file
from safetensors.torch import load_model as load_safetensors_model
from torch import Tensor
from torch.distributed.tensor import DTensor
from transformers import AutoModelForCausalLM, PreTrainedModel

from sdp_cli.config.train_settings import LoraConfig
from sdp_cli.errors import ConfigError
from sdp_cli.weight_sync.adapter_export import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    linear_projection_names,
    write_adapter_dir,
)

# peft's name for the one adapter the actor trains.
ADAPTER = "default"
# The prefix PeftModel adds to the wrapped model's parameter names.
PEFT_PREFIX = "base_model.model."
# The adapter and its optimizer state inside a step-N checkpoint.
CHECKPOINT_ADAPTER_DIR = "adapter"


def with_lora(model: PreTrainedModel, lora: LoraConfig, model_dir: Path) -> PeftModel:
    """`model` with a fresh adapter injected (B = 0, so it computes what the model did);
    every weight of the model itself frozen."""
    # The modules the servers put LoRA layers on (launcher.command.with_lora_serving).
    targets = list(lora.target_modules) or linear_projection_names(model)
    config = PeftLoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=targets,
        task_type="CAUSAL_LM",
        base_model_name_or_path=str(model_dir),
    )
    try:
        peft_model = get_peft_model(model, config)
    except ValueError as exc:
        raise ConfigError(
            "train.lora.target_modules",
            f"peft cannot put an adapter on {targets}: {exc}",
            "name linear modules of the model (e.g. [q_proj, v_proj]) or leave it [] for "
            "every linear projection",
        ) from None
    return peft_model


def adapter_config(peft_model: PeftModel) -> dict[str, Any]:
    """The adapter_config.json peft's `save_pretrained` writes (sets as sorted lists)."""
    config = peft_model.peft_config[ADAPTER].to_dict()
    return {k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}


def adapter_parameters(model: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Parameter]]:
    """The adapter's parameters under the wrapped model's own names, in a fixed order (every
    rank of a sharded trainer gathers them in the same order)."""
    for name, parameter in model.named_parameters():
        if parameter.requires_grad and "lora_" in name:
            yield name, parameter


def adapter_tensors(peft_model: PeftModel, model: torch.nn.Module) -> dict[str, Tensor]:
    """The adapter in peft's saved names, in full on the CPU. With FSDP2 each parameter is
    gathered from the ranks: every rank must call this (the others get the same dict)."""
    full: dict[str, Tensor] = {}
    for name, parameter in adapter_parameters(model):
        data = parameter.detach()
        if isinstance(data, DTensor):
            data = data.full_tensor()
        full[PEFT_PREFIX + name] = data.cpu()
    return get_peft_model_state_dict(
        peft_model, state_dict=full, adapter_name=ADAPTER, save_embedding_layers=False
    )


def load_adapter_tensors(peft_model: PeftModel, tensors: dict[str, Tensor]) -> None:
    """Put an adapter in peft's saved names (a checkpoint's) into the model; every adapter
    parameter must be given."""
    expected = {name for name, _ in adapter_parameters(peft_model.base_model.model)}
    result = set_peft_model_state_dict(peft_model, tensors, adapter_name=ADAPTER)
    missing = {PEFT_PREFIX + name for name in expected} & set(result.missing_keys)
    if missing or result.unexpected_keys:
        raise ValueError(
            f"the checkpoint's adapter does not fit this model (missing {sorted(missing)[:3]}, "
            f"unexpected {sorted(result.unexpected_keys)[:3]}): resume with the same "
            "train.lora settings"
        )


def write_checkpoint_adapter(
    target: Path, peft_model: PeftModel, model: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> None:
    """A checkpoint's tensors with LoRA: the adapter as a servable peft directory
    (`adapter/`) and its optimizer state; the frozen model is the run's model.path."""
    write_adapter_dir(
        target / CHECKPOINT_ADAPTER_DIR,
        adapter_tensors(peft_model, model),
        adapter_config(peft_model),
    )
    torch.save(optimizer.state_dict(), target / "optimizer.pt")


def read_checkpoint_adapter(
    path: Path, peft_model: PeftModel, optimizer: torch.optim.Optimizer | None
) -> None:
    adapter_dir = path / CHECKPOINT_ADAPTER_DIR
    if not (adapter_dir / ADAPTER_WEIGHTS).is_file():
        raise ConfigError(
            "train.lora.rank",
            f"checkpoint {path} holds no LoRA adapter (it was written with train.lora.rank=0)",
            "resume with the train.lora settings the run was started with",
        )
    saved = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
    rank = peft_model.peft_config[ADAPTER].r
    if saved.get("r") != rank:
        raise ConfigError(
            "train.lora.rank",
            f"checkpoint {path} holds a rank-{saved.get('r')} adapter, this run has rank {rank}",
            f"resume with train.lora.rank={saved.get('r')}",
        )
    load_adapter_tensors(peft_model, load_file(str(adapter_dir / ADAPTER_WEIGHTS)))
    if optimizer is not None:
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))


@contextmanager
def adapter_dropout(model: torch.nn.Module, active: bool) -> Iterator[None]:
    """train.lora.dropout in a loss pass: the actor keeps every module in eval mode (its
    logprobs must match the servers'), so the adapter's dropout is switched on only here."""
    dropouts = [m for n, m in model.named_modules() if n.endswith(".lora_dropout")]
    if not active or not dropouts:
        yield
        return
    for module in dropouts:
        module.train()
    try:
        yield
    finally:
        for module in dropouts:
            module.eval()


def merged_model(base_dir: Path, adapter_dir: Path) -> PreTrainedModel:
    """The base model with the adapter's update added into its weights (no adapter left), in
    float32, as `sdp export --merge` saves it."""
    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    return PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()


def model_with_checkpoint(base_dir: Path, model_file: Path) -> PreTrainedModel:
    """The base model with a one-process full fine-tuning checkpoint's weights."""
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    load_safetensors_model(model, str(model_file), strict=True)
    return model
