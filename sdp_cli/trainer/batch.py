"""Rollout groups → padded training tensors, split into micro-batches by a token budget.

Layout: prompts are left-padded and outputs right-padded, so every row's output starts at the
same column. Per-token tensors ([rows, L], L = longest output) then index output tokens
directly, and the actor asks the model for logits of the last L + 1 columns only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields, replace

import torch
from torch import Tensor

from sdp_cli.rollout.trajectory import RolloutGroup, Trajectory
from sdp_cli.trainer.advantages import group_advantages


@dataclass(frozen=True)
class TokenSample:
    """One trajectory with its advantage, the unit micro-batches are made of."""

    prompt_ids: list[int]
    output_ids: list[int]
    behav_logprobs: list[float]
    prox_logprobs: list[float]
    versions: list[int]
    advantage: float
    reward: float

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)


@dataclass(frozen=True)
class TrainBatch:
    # [rows, S]: left-padded prompt, then output, then right padding.
    input_ids: Tensor
    attention_mask: Tensor
    # Positions as the inference server counts them: 0 at each row's first real token.
    position_ids: Tensor
    # [rows, L]: per output token; L = number of output columns (the last L of input_ids).
    loss_mask: Tensor
    behav_logprobs: Tensor
    prox_logprobs: Tensor
    versions: Tensor
    advantages: Tensor

    @property
    def n_output_cols(self) -> int:
        return int(self.loss_mask.shape[1])

    @property
    def output_start(self) -> int:
        """Column of the first output token in `input_ids`."""
        return int(self.input_ids.shape[1]) - self.n_output_cols

    @property
    def n_tokens(self) -> int:
        return int(self.loss_mask.sum().item())

    @property
    def output_ids(self) -> Tensor:
        return self.input_ids[:, self.output_start :]

    def model_inputs(self) -> dict[str, Tensor | bool]:
        """Keyword arguments of a causal LM's forward over the whole batch (no KV cache)."""
        return {
            "input_ids": self.input_ids,
            "attention_mask": self.attention_mask,
            "position_ids": self.position_ids,
            "use_cache": False,
        }

    def to(self, device: torch.device | str) -> TrainBatch:
        moved = {f.name: getattr(self, f.name).to(device) for f in fields(self)}
        return replace(self, **moved)


def _sample(trajectory: Trajectory, advantage: float) -> TokenSample:
    if not trajectory.prompt_ids:
        raise ValueError("a trajectory needs at least one prompt token (BOS)")
    return TokenSample(
        prompt_ids=list(trajectory.prompt_ids),
        output_ids=list(trajectory.output_ids),
        behav_logprobs=list(trajectory.behav_logprobs),
        prox_logprobs=trajectory.proximal_logprobs(),
        versions=list(trajectory.versions),
        advantage=advantage,
        reward=trajectory.reward,
    )


def flatten_groups(groups: Sequence[RolloutGroup], adv_eps: float) -> list[TokenSample]:
    """Every non-empty completion with its GRPO advantage (computed over its whole group,
    including empty completions, which are then left out: they have no token to train on)."""
    samples: list[TokenSample] = []
    for group in groups:
        advantages = group_advantages(group.rewards, adv_eps)
        for trajectory, advantage in zip(group.samples, advantages, strict=True):
            if trajectory.output_ids:
                samples.append(_sample(trajectory, advantage))
    return samples


def _padded_rows(rows: list[list[float]], width: int, fill: float, left: bool) -> list[list]:
    if left:
        return [[fill] * (width - len(r)) + r for r in rows]
    return [r + [fill] * (width - len(r)) for r in rows]


def collate(samples: Sequence[TokenSample], pad_id: int) -> TrainBatch:
    if not samples:
        raise ValueError("cannot collate an empty micro-batch")
    prompt_width = max(len(s.prompt_ids) for s in samples)
    out_width = max(len(s.output_ids) for s in samples)
    prompts = _padded_rows([s.prompt_ids for s in samples], prompt_width, pad_id, left=True)
    outputs = _padded_rows([s.output_ids for s in samples], out_width, pad_id, left=False)
    input_ids = torch.tensor([p + o for p, o in zip(prompts, outputs, strict=True)])
    prompt_mask = _padded_rows([[1] * len(s.prompt_ids) for s in samples], prompt_width, 0, True)
    out_mask = _padded_rows([[1] * len(s.output_ids) for s in samples], out_width, 0, False)
    attention_mask = torch.tensor([p + o for p, o in zip(prompt_mask, out_mask, strict=True)])
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)

    def per_token(rows: list[list[float]], dtype: torch.dtype) -> Tensor:
        # Padding gets 0 so that exp(π − p) and exp(p − μ) stay finite there.
        return torch.tensor(_padded_rows(rows, out_width, 0, left=False), dtype=dtype)

    return TrainBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        loss_mask=torch.tensor(out_mask, dtype=torch.bool),
        behav_logprobs=per_token([s.behav_logprobs for s in samples], torch.float32),
        prox_logprobs=per_token([s.prox_logprobs for s in samples], torch.float32),
        versions=per_token([s.versions for s in samples], torch.long),
        advantages=per_token([[s.advantage] * len(s.output_ids) for s in samples], torch.float32),
    )


def split_by_token_budget(
    samples: Sequence[TokenSample], micro_batch_tokens: int
) -> list[list[TokenSample]]:
    """Consecutive runs of samples whose padded size (rows × longest prompt + longest output)
    fits the budget; a sample larger than the budget gets a micro-batch of its own."""
    chunks: list[list[TokenSample]] = []
    current: list[TokenSample] = []
    prompt_width = out_width = 0
    for sample in samples:
        new_prompt = max(prompt_width, len(sample.prompt_ids))
        new_out = max(out_width, len(sample.output_ids))
        if current and (len(current) + 1) * (new_prompt + new_out) > micro_batch_tokens:
            chunks.append(current)
            current, new_prompt, new_out = [], len(sample.prompt_ids), len(sample.output_ids)
        current.append(sample)
        prompt_width, out_width = new_prompt, new_out
    if current:
        chunks.append(current)
    return chunks


def build_micro_batches(
    groups: Sequence[RolloutGroup], adv_eps: float, micro_batch_tokens: int, pad_id: int
) -> list[TrainBatch]:
    samples = flatten_groups(groups, adv_eps)
    return [collate(chunk, pad_id) for chunk in split_by_token_budget(samples, micro_batch_tokens)]
