"""Token logprobs and entropy from hidden states without holding [tokens, vocabulary] logits.

log π(token) = z(token) − logsumexp(z) with z = head(h) / T, the LM head applied to a few
hundred positions at a time. Forward keeps, per position, only the logsumexp; backward makes
each chunk's logits again and turns them into the gradient at once:
∂ log π(t) / ∂z = onehot(t) − softmax(z). The peak then holds one chunk's logits (a few of
[chunk, vocabulary] float32) instead of the whole batch's, for the price of one more LM head
matmul per step. The entropy of softmax(z) comes out of the same forward pass, without grad.
scripts/bench_perf.py measures the peak against a full-vocabulary log_softmax.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.nn import functional


def chunked_logprobs_and_entropy(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    temperature: float = 1.0,
    *,
    chunk_tokens: int,
) -> tuple[Tensor, Tensor]:
    """`hidden` [rows, L, H], LM head `weight` [V, H], `targets` [rows, L] → (log π of each
    target, entropy of the policy at each position), both [rows, L] float32, of
    softmax(hidden @ weightᵀ / temperature). The logprobs carry gradients to `hidden` and
    `weight`; the entropy carries none. `chunk_tokens` (train.logit_chunk_tokens) positions
    have logits at once: 128 of SmolLM2's 49,152-wide float32 logits are 24 MiB."""
    rows, length, width = hidden.shape
    logprobs, entropy = _ChunkedHead.apply(
        hidden.reshape(rows * length, width),
        weight,
        targets.reshape(rows * length),
        1.0 / temperature,
        chunk_tokens,
    )
    return logprobs.view(rows, length), entropy.view(rows, length)


class _ChunkedHead(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden: Tensor,
        weight: Tensor,
        targets: Tensor,
        inv_temperature: float,
        chunk_tokens: int,
    ) -> tuple[Tensor, Tensor]:
        n = hidden.shape[0]
        logprobs = hidden.new_empty(n, dtype=torch.float32)
        entropy = hidden.new_empty(n, dtype=torch.float32)
        lse = hidden.new_empty(n, dtype=torch.float32)
        for start in range(0, n, chunk_tokens):
            end = start + chunk_tokens
            logits = _scaled_logits(hidden[start:end], weight, inv_temperature)
            chunk_lse = torch.logsumexp(logits, dim=-1)
            picked = logits.gather(-1, targets[start:end, None]).squeeze(-1)
            logprobs[start:end] = picked - chunk_lse
            # H = logsumexp(z) − Σ softmax(z)·z, in place: the chunk holds two [chunk, V] tensors.
            probs = (logits - chunk_lse[:, None]).exp_()
            entropy[start:end] = chunk_lse - probs.mul_(logits).sum(dim=-1)
            lse[start:end] = chunk_lse
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.inv_temperature = inv_temperature
        ctx.chunk_tokens = chunk_tokens
        ctx.mark_non_differentiable(entropy)
        return logprobs, entropy

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, grad_logprobs: Tensor, _grad_entropy: Tensor | None
    ) -> tuple[Tensor | None, Tensor | None, None, None, None]:
        hidden, weight, targets, lse = ctx.saved_tensors
        want_hidden, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = torch.zeros_like(hidden) if want_hidden else None
        grad_weight = torch.zeros_like(weight) if want_weight else None
        for start in range(0, hidden.shape[0], ctx.chunk_tokens):
            end = start + ctx.chunk_tokens
            h = hidden[start:end]
            logits = _scaled_logits(h, weight, ctx.inv_temperature)
            upstream = grad_logprobs[start:end, None]
            # ∂/∂z of upstream · log π(t): upstream · (onehot(t) − softmax(z)).
            # In place: the chunk's logits become its gradient.
            grad_logits = logits.sub_(lse[start:end, None]).exp_().mul_(-upstream)
            grad_logits.scatter_add_(-1, targets[start:end, None], upstream)
            # z = (h Wᵀ) / T.
            grad_logits = grad_logits.mul_(ctx.inv_temperature).to(h.dtype)
            if grad_hidden is not None:
                grad_hidden[start:end] = grad_logits @ weight
            if grad_weight is not None:
                grad_weight.addmm_(grad_logits.t(), h)
        return grad_hidden, grad_weight, None, None, None


def _scaled_logits(hidden: Tensor, weight: Tensor, inv_temperature: float) -> Tensor:
    logits = functional.linear(hidden, weight).float()
    return logits if inv_temperature == 1.0 else logits * inv_temperature
