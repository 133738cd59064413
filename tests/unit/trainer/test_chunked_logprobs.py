"""Chunked LM head: the same token logprobs, entropy and gradients as applying it to every
position at once."""

from __future__ import annotations

import pytest
import torch

from sdp_cli.trainer.chunked_logprobs import chunked_logprobs_and_entropy
from sdp_cli.trainer.token_stats import token_entropy


def whole(
    hidden: torch.Tensor, head: torch.nn.Linear, targets: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    logits = head(hidden).float() / temperature
    picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, -1), token_entropy(logits)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_values_and_gradients_match_the_unchunked_computation(temperature: float) -> None:
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False)
    # 3 × 70 = 210 positions in chunks of 64: the last chunk is short.
    hidden = torch.randn(3, 70, 16, requires_grad=True)
    targets = torch.randint(0, 50, (3, 70))
    upstream = torch.randn(3, 70)

    expected, expected_entropy = whole(hidden, head, targets, temperature)
    (expected * upstream).sum().backward()
    expected_grads = (hidden.grad.clone(), head.weight.grad.clone())
    hidden.grad = None
    head.weight.grad = None

    got, entropy = chunked_logprobs_and_entropy(
        hidden, head.weight, targets, temperature, chunk_tokens=64
    )
    (got * upstream).sum().backward()
    assert torch.allclose(got, expected, atol=1e-5)
    assert torch.allclose(entropy, expected_entropy, atol=1e-5)
    assert not entropy.requires_grad
    assert torch.allclose(hidden.grad, expected_grads[0], atol=1e-5)
    assert torch.allclose(head.weight.grad, expected_grads[1], atol=1e-5)


def test_without_grad_it_computes_the_same_values() -> None:
    torch.manual_seed(1)
    head = torch.nn.Linear(8, 20, bias=False)
    hidden = torch.randn(2, 9, 8)
    targets = torch.randint(0, 20, (2, 9))
    with torch.no_grad():
        got, entropy = chunked_logprobs_and_entropy(hidden, head.weight, targets, chunk_tokens=4)
        expected, expected_entropy = whole(hidden, head, targets, 1.0)
        assert torch.allclose(got, expected, atol=1e-6)
        assert torch.allclose(entropy, expected_entropy, atol=1e-6)
