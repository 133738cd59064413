"""Rollout groups → padded training tensors, split into micro-batches by a token budget.

Layout: prompts are left-padded and outputs right-padded, so every row's output starts at the
same column. Per-token tensors ([rows, L], L = longest output) then index output tokens
directly, and the actor asks the model for logits of the last L + 1 columns only.

Each sample carries its tokens' share of the step's loss (`loss_scale`, from train.loss_agg),
computed over the whole batch before it is cut into ranks and micro-batches, so the loss is the
same however it is cut.

An episode's context tokens (environment and tool turns) are in the output columns, attended to
and scored like the rest, but its loss mask is 0 there and its loss share counts model tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields, replace

import torch
from torch import Tensor

from sdp_cli.config.rollout_settings import Overlong, RolloutConfig
from sdp_cli.config.train_settings import AdvNorm, LossAgg, TrainConfig
from sdp_cli.rollout.trajectory import RolloutGroup, Trajectory
from sdp_cli.trainer.advantages import group_advantages


@dataclass(frozen=True)
class SampleSettings:
    """How rollout groups become trained samples: the advantage (train.adv_eps,
    train.adv_norm), which completions are trained (rollout.overlong=filter) and each token's
    share of the loss (train.loss_agg)."""

    adv_eps: float = 1e-6
    adv_norm: AdvNorm = AdvNorm.group_std
    loss_agg: LossAgg = LossAgg.token_mean
    # seq-mean-token-sum-norm: the constant each completion's token sum is divided by.
    agg_tokens: int = 16
    drop_truncated: bool = False

    @classmethod
    def from_config(cls, train: TrainConfig, rollout: RolloutConfig) -> SampleSettings:
        return cls(
            adv_eps=train.adv_eps,
            adv_norm=AdvNorm(train.adv_norm),
            loss_agg=LossAgg(train.loss_agg),
            agg_tokens=train.loss_agg_tokens or rollout.max_new_tokens,
            drop_truncated=Overlong(rollout.overlong) == Overlong.filter,
        )


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
    # Coefficient of each of its tokens' loss in the step's loss (see `loss_scales`).
    loss_scale: float = 0.0
    # Per output token, whether the loss sees it (an episode's model tokens); None: all.
    trained: list[bool] | None = None

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    def trained_mask(self) -> list[int]:
        """1 at each output token the loss sees, 0 at an episode's context tokens."""
        if self.trained is None:
            return [1] * len(self.output_ids)
        return [int(t) for t in self.trained]


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
    # Each token's coefficient in the step's loss (train.loss_agg); 0 at padding.
    loss_scale: Tensor

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
        trained=None if trajectory.trained is None else list(trajectory.trained),
    )


def loss_scales(lengths: Sequence[int], agg: LossAgg, agg_tokens: int) -> list[float]:
    """Per sample, the coefficient c of each of its tokens' loss, so that the step's loss is
    Σ c·ℓ_t over every token of the batch, with S samples of n_i tokens and N = Σ n_i:
    token-mean 1/N, seq-mean-token-mean 1/(S·n_i), seq-mean-token-sum-norm 1/(S·agg_tokens)."""
    if not lengths:
        return []
    if agg == LossAgg.token_mean:
        return [1.0 / sum(lengths)] * len(lengths)
    if agg == LossAgg.seq_mean_token_mean:
        return [1.0 / (len(lengths) * n) for n in lengths]
    return [1.0 / (len(lengths) * agg_tokens)] * len(lengths)


def flatten_groups(
    groups: Sequence[RolloutGroup], settings: SampleSettings | float
) -> list[TokenSample]:
    """Every trained completion with its GRPO advantage and loss scale. The advantage is
    computed over the whole group, including completions then left out: empty ones (no token
    to train on) and, with rollout.overlong=filter, truncated ones (their reward is still an
    outcome the others are compared with). `settings` may be just train.adv_eps."""
    if not isinstance(settings, SampleSettings):
        settings = SampleSettings(adv_eps=settings)
    divide = settings.adv_norm == AdvNorm.group_std
    chosen: list[tuple[Trajectory, float]] = []
    for group in groups:
        advantages = group_advantages(group.rewards, settings.adv_eps, divide_by_std=divide)
        for trajectory, advantage in zip(group.samples, advantages, strict=True):
            if trajectory.n_trained == 0:
                continue
            if settings.drop_truncated and trajectory.truncated:
                continue
            chosen.append((trajectory, advantage))
    scales = loss_scales([t.n_trained for t, _ in chosen], settings.loss_agg, settings.agg_tokens)
    return [
        replace(_sample(trajectory, advantage), loss_scale=scale)
        for (trajectory, advantage), scale in zip(chosen, scales, strict=True)
    ]


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
    # An episode's context tokens are inputs (attended to) but not trained.
    loss_mask = _padded_rows([s.trained_mask() for s in samples], out_width, 0, False)

    def per_token(rows: list[list[float]], dtype: torch.dtype) -> Tensor:
        # Padding gets 0 so that exp(π − p) and exp(p − μ) stay finite there.
        return torch.tensor(_padded_rows(rows, out_width, 0, left=False), dtype=dtype)

    return TrainBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        loss_mask=torch.tensor(loss_mask, dtype=torch.bool),
        behav_logprobs=per_token([s.behav_logprobs for s in samples], torch.float32),
        prox_logprobs=per_token([s.prox_logprobs for s in samples], torch.float32),
        versions=per_token([s.versions for s in samples], torch.long),
        advantages=per_token([[s.advantage] * len(s.output_ids) for s in samples], torch.float32),
        loss_scale=per_token([[s.loss_scale] * len(s.output_ids) for s in samples], torch.float32),
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
    groups: Sequence[RolloutGroup],
    settings: SampleSettings | float,
    micro_batch_tokens: int,
    pad_id: int,
) -> list[TrainBatch]:
    samples = flatten_groups(groups, settings)
    return [collate(chunk, pad_id) for chunk in split_by_token_budget(samples, micro_batch_tokens)]
