"""Token logprobs from hidden states without holding [rows, L, vocab] logits at once.

log π(token) = logit(token) − logsumexp(logits), with the LM head applied to a few positions at
a time. Each chunk runs under activation checkpointing: the forward keeps only the chunk's
hidden states and its [rows, chunk] results, and the backward recomputes the chunk's logits, so
the peak holds the logits of one chunk instead of all L positions (at the price of running the
LM head twice). See scripts/bench_perf.py for the measured peak.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

# Positions per chunk: 32 positions × 49,152 vocabulary × 4 bytes × rows is 6 MiB a row.
DEFAULT_CHUNK = 32


def chunked_token_logprobs(
    hidden: Tensor,
    head: Callable[[Tensor], Tensor],
    targets: Tensor,
    chunk: int = DEFAULT_CHUNK,
) -> Tensor:
    """`hidden` [rows, L, H], `targets` [rows, L] → log π of each target [rows, L] (float32),
    where `head(hidden)` gives the logits. Same values as the unchunked computation."""
    pieces = []
    for start in range(0, hidden.shape[1], chunk):
        h = hidden[:, start : start + chunk]
        t = targets[:, start : start + chunk]
        if torch.is_grad_enabled() and h.requires_grad:
            pieces.append(checkpoint(_token_logprobs, h, t, head, use_reentrant=False))
        else:
            pieces.append(_token_logprobs(h, t, head))
    return torch.cat(pieces, dim=1)


def _token_logprobs(hidden: Tensor, targets: Tensor, head: Callable[[Tensor], Tensor]) -> Tensor:
    logits = head(hidden).float()
    picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)
