"""Per-token quantities besides the loss: entropy of the current policy and KL estimates.

KL estimates use the k3 estimator on tokens sampled from the first policy:
k3 = r − 1 − log r with r = q(t)/p(t), an unbiased, always non-negative estimate of KL(p‖q).
"""

from __future__ import annotations

import torch
from torch import Tensor

# Rows of logits turned into probabilities at once: bounds the extra memory of the entropy to
# ROWS × length × vocabulary floats instead of the whole batch's.
ENTROPY_ROWS = 4


@torch.no_grad()
def token_entropy(logits: Tensor) -> Tensor:
    """Entropy of softmax(logits) at every position ([rows, L, V] -> [rows, L]), computed a few
    rows at a time."""
    parts = []
    for chunk in logits.split(ENTROPY_ROWS, dim=0):
        logp = torch.log_softmax(chunk.float(), dim=-1)
        parts.append(-(logp.exp() * logp).sum(dim=-1))
    return torch.cat(parts, dim=0)


def k3(logp_sampler: Tensor, logp_other: Tensor) -> Tensor:
    """Per-token k3 estimate of KL(sampler ‖ other) for tokens drawn from the sampler."""
    log_ratio = logp_other - logp_sampler
    return torch.exp(log_ratio) - 1.0 - log_ratio


def masked_mean(values: Tensor, mask: Tensor) -> float:
    count = int(mask.sum().item())
    return float(values[mask].sum().item()) / count if count else 0.0
