"""Chunked LM head: the same token logprobs and gradients as applying it to every position."""

from __future__ import annotations

import torch

from sdp_cli.train.chunked_logprobs import chunked_token_logprobs


def whole(hidden: torch.Tensor, head: torch.nn.Linear, targets: torch.Tensor) -> torch.Tensor:
    logits = head(hidden).float()
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, -1)


def test_values_and_gradients_match_the_unchunked_computation() -> None:
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False)
    # 70 positions in chunks of 32: the last chunk is short.
    hidden = torch.randn(3, 70, 16, requires_grad=True)
    targets = torch.randint(0, 50, (3, 70))
    upstream = torch.randn(3, 70)

    expected = whole(hidden, head, targets)
    (expected * upstream).sum().backward()
    expected_grads = (hidden.grad.clone(), head.weight.grad.clone())
    hidden.grad = None
    head.weight.grad = None

    got = chunked_token_logprobs(hidden, head, targets, chunk=32)
    (got * upstream).sum().backward()
    assert torch.allclose(got, expected, atol=1e-6)
    assert torch.allclose(hidden.grad, expected_grads[0], atol=1e-6)
    assert torch.allclose(head.weight.grad, expected_grads[1], atol=1e-6)


def test_without_grad_it_computes_the_same_values() -> None:
    torch.manual_seed(1)
    head = torch.nn.Linear(8, 20, bias=False)
    hidden = torch.randn(2, 9, 8)
    targets = torch.randint(0, 20, (2, 9))
    with torch.no_grad():
        got = chunked_token_logprobs(hidden, head, targets, chunk=4)
        assert torch.allclose(got, whole(hidden, head, targets), atol=1e-6)
