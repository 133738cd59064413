"""Activation checkpointing of the decoder (`train.gradient_checkpointing`).

`full` keeps each decoder layer's input and recomputes the whole layer in the backward pass.
`selective` runs the same checkpointed layers under a PyTorch selective-checkpoint policy
(`torch.utils.checkpoint.create_selective_checkpoint_contexts`): the outputs of matrix
multiplications and attention are kept, and only the pointwise ops between them (RMSNorm, SiLU
and its product, rotary embedding, residual adds) are recomputed. Those outputs are most of what
a layer saves and the cheapest to recompute, so selective removes most of the memory a step adds
at its peak for a few percent of its speed, while full saves more at a much larger cost in time.
Selective is the default (scripts/bench_perf.py; figures in docs/benchmarks.md).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts
from transformers import PreTrainedModel

from sdp_cli.config.train_settings import GradientCheckpointing

_ATEN = torch.ops.aten
# The ops whose outputs selective checkpointing keeps (those an attention implementation or a
# backend does not have are left out).
_KEPT_OP_NAMES = (
    "mm",
    "addmm",
    "bmm",
    "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention",
)
KEPT_OPS = frozenset(
    getattr(_ATEN, name).default for name in _KEPT_OP_NAMES if hasattr(_ATEN, name)
)


def keep_matmuls_policy(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in KEPT_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def enable_gradient_checkpointing(
    model: PreTrainedModel, mode: GradientCheckpointing | str
) -> None:
    """Hugging Face recomputes a layer only when that layer is in training mode. The actor's
    logprobs must match the servers', so nothing else may train: dropout stays off whatever
    the model's config says."""
    mode = GradientCheckpointing(mode)
    if mode == GradientCheckpointing.none:
        return
    kwargs: dict[str, Any] = {"use_reentrant": False}
    if mode == GradientCheckpointing.selective:
        kwargs["context_fn"] = partial(create_selective_checkpoint_contexts, keep_matmuls_policy)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    train_only_the_checkpointed_modules(model)


def train_only_the_checkpointed_modules(model: torch.nn.Module) -> None:
    """Training mode for the modules Hugging Face checkpoints (the decoder layers, which
    test their own `training`), eval mode for every other, their attention and dropout
    included."""
    for module in model.modules():
        module.training = getattr(module, "gradient_checkpointing", False) is True
