"""The decoupled PPO loss (docs/design.md, The loss), on padded per-token tensors of shape
[batch, T], one completion per row.

Per output token: r = exp(π − p), pg = −min(r·A, clip(r, 1−ε_low, 1+ε_high)·A) (optionally
dual-clipped for A < 0), behaviour weight w = exp(p − μ) without gradient, and

    loss = Σ c·keep·w·pg        (c = 1 / Σ loss_mask by default: the token mean)

where `keep` drops padding, tokens whose w is outside [floor, cap] (mask mode) and tokens more
than `token_max_lag` versions old, and c is each token's coefficient (train.loss_agg). At
sequence level w (train.behav_weight_level) and r (train.ratio_level, GSPO) are one value per
row, the exponential of the row's mean log weight or log ratio. Only π carries gradient.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from sdp_cli.config.train_settings import Level, ProxMode, TrainConfig, WeightBoundMode
from sdp_cli.trainer.health import LagHealth, merge_by_lag, token_health


@dataclass(frozen=True)
class LossSettings:
    eps_clip_low: float = 0.2
    eps_clip_high: float = 0.2
    # Dual clip constant c > 1 bounding the loss of negative-advantage tokens; None disables.
    dual_clip: float | None = None
    behav_weight_cap: float | None = None
    behav_weight_floor: float | None = None
    behav_weight_mode: WeightBoundMode = WeightBoundMode.mask
    token_max_lag: int | None = None
    behav_weight_level: Level = Level.token
    ratio_level: Level = Level.token

    @classmethod
    def from_config(cls, train: TrainConfig) -> LossSettings:
        return cls(
            eps_clip_low=train.eps_clip_low,
            eps_clip_high=train.eps_clip_high,
            dual_clip=train.dual_clip,
            behav_weight_cap=train.behav_weight_cap,
            behav_weight_floor=train.behav_weight_floor,
            behav_weight_mode=WeightBoundMode(train.behav_weight_mode),
            token_max_lag=train.token_max_lag,
            behav_weight_level=Level(train.behav_weight_level),
            ratio_level=Level(train.ratio_level),
        )


@dataclass
class LossStats:
    """Sums over the valid (loss_mask) tokens of one or more micro-batches; `summary()` turns
    them into the per-step numbers, so merging micro-batches is exact."""

    n_valid: int = 0
    n_kept: int = 0
    n_clipped: int = 0
    n_dual_clipped: int = 0
    # Σ c·keep·w·pg: the loss, or the part of it these micro-batches make.
    loss_sum: float = 0.0
    # Raw behaviour weights w = exp(p − μ), before any clamp.
    weight_sum: float = 0.0
    weight_max: float = 0.0
    ratio_sum: float = 0.0
    tokens_by_lag: dict[int, int] = field(default_factory=dict)
    # Off-policy health sums by lag (sdp_cli/trainer/health.py).
    health: dict[int, LagHealth] = field(default_factory=dict)

    def merge(self, other: LossStats) -> LossStats:
        lags = dict(self.tokens_by_lag)
        for lag, count in other.tokens_by_lag.items():
            lags[lag] = lags.get(lag, 0) + count
        return LossStats(
            n_valid=self.n_valid + other.n_valid,
            n_kept=self.n_kept + other.n_kept,
            n_clipped=self.n_clipped + other.n_clipped,
            n_dual_clipped=self.n_dual_clipped + other.n_dual_clipped,
            loss_sum=self.loss_sum + other.loss_sum,
            weight_sum=self.weight_sum + other.weight_sum,
            weight_max=max(self.weight_max, other.weight_max),
            ratio_sum=self.ratio_sum + other.ratio_sum,
            tokens_by_lag=dict(sorted(lags.items())),
            health=merge_by_lag(self.health, other.health),
        )

    def summary(self) -> dict[str, float]:
        """Per-step statistics; fractions and means are over valid tokens."""
        n = max(self.n_valid, 1)
        return {
            "loss": self.loss_sum,
            "n_tokens": float(self.n_valid),
            "clip_frac": self.n_clipped / n,
            "dual_clip_frac": self.n_dual_clipped / n,
            "masked_frac": (self.n_valid - self.n_kept) / n,
            "behav_weight_mean": self.weight_sum / n,
            "behav_weight_max": self.weight_max,
            "ratio_mean": self.ratio_sum / n,
        }


def loglinear_proximal(
    logprobs: Tensor, behav_logprobs: Tensor, versions: Tensor, train_version: int
) -> Tensor:
    """log p ≈ μ + α(π − μ) with α = (v − b)/(v + 1 − b): the proximal policy interpolated in
    log space between the token's behaviour policy (version b) and the current one, without an
    extra forward pass. Fresh tokens (b = v) get α = 0, p = μ. No gradient."""
    lag = (train_version - versions).to(behav_logprobs.dtype).clamp(min=0)
    alpha = lag / (lag + 1.0)
    mu = behav_logprobs.detach()
    return mu + alpha * (logprobs.detach() - mu)


def select_proximal(
    mode: ProxMode,
    *,
    logprobs: Tensor,
    segment_prox: Tensor,
    behav_logprobs: Tensor,
    versions: Tensor,
    train_version: int,
    recomputed: Tensor | None = None,
) -> Tensor:
    """p for the chosen `train.prox_mode`: the rollout's recomputed values (segment), a no-grad
    pass of the current weights made before the step (recompute), or the log-linear estimate."""
    if mode == ProxMode.segment:
        return segment_prox.detach()
    if mode == ProxMode.recompute:
        if recomputed is None:
            raise ValueError("prox_mode=recompute needs the logprobs of the no-grad pass")
        return recomputed.detach()
    return loglinear_proximal(logprobs, behav_logprobs, versions, train_version)


def _bound_weights(weights: Tensor, keep: Tensor, settings: LossSettings) -> tuple[Tensor, Tensor]:
    cap, floor = settings.behav_weight_cap, settings.behav_weight_floor
    if settings.behav_weight_mode == WeightBoundMode.clamp:
        if cap is None and floor is None:
            return weights, keep
        return weights.clamp(min=floor, max=cap), keep
    if cap is not None:
        keep = keep & (weights <= cap)
    if floor is not None:
        keep = keep & (weights >= floor)
    return weights, keep


def _row_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of `values` over each row's `mask`ed entries ([rows, 1]); 0 for a row with none."""
    total = torch.where(mask, values, 0.0).sum(dim=1, keepdim=True)
    return total / mask.sum(dim=1, keepdim=True).clamp(min=1)


def _tokens_by_lag(lags: Tensor, valid: Tensor) -> dict[int, int]:
    values, counts = torch.unique(lags[valid], return_counts=True)
    return {int(v): int(c) for v, c in zip(values.tolist(), counts.tolist(), strict=True)}


def _policy_gradient(
    ratio: Tensor, adv: Tensor, settings: LossSettings
) -> tuple[Tensor, Tensor, Tensor]:
    """pg = −min(r·A, clip(r)·A), dual-clipped for A < 0 when set; also which tokens the clip
    and the dual clip bound."""
    unclipped = ratio * adv
    clipped = ratio.clamp(1.0 - settings.eps_clip_low, 1.0 + settings.eps_clip_high) * adv
    pg = -torch.minimum(unclipped, clipped)
    is_clipped = clipped < unclipped
    is_dual_clipped = torch.zeros_like(is_clipped)
    if settings.dual_clip is not None:
        dual_bound = -settings.dual_clip * adv
        is_dual_clipped = (adv < 0) & (dual_bound < pg)
        pg = torch.where(adv < 0, torch.minimum(pg, dual_bound), pg)
    return pg, is_clipped, is_dual_clipped


def decoupled_ppo_loss(
    logprobs: Tensor,
    prox_logprobs: Tensor,
    behav_logprobs: Tensor,
    advantages: Tensor,
    loss_mask: Tensor,
    versions: Tensor,
    train_version: int,
    settings: LossSettings,
    normalizer: float | None = None,
    token_scale: Tensor | None = None,
) -> tuple[Tensor, LossStats]:
    """The loss and its statistics. All tensors are [batch, T], one completion per row;
    `loss_mask` marks real output tokens. `token_scale` is each token's coefficient in the
    step's loss (TrainBatch.loss_scale, train.loss_agg); without it every token's is
    1/`normalizer`, where `normalizer` is Σ loss_mask of the full batch when this is one
    micro-batch of it (so micro-batch losses add up to the full-batch loss), by default this
    batch's own count."""
    valid = loss_mask.bool()
    prox = prox_logprobs.detach()
    adv = advantages.detach().to(logprobs.dtype)
    sequence_ratio = settings.ratio_level == Level.sequence

    with torch.no_grad():
        log_weights = prox - behav_logprobs.detach()
        raw_weights = torch.exp(log_weights)
        lags = train_version - versions.long()
        keep = valid
        if settings.token_max_lag is not None:
            keep = keep & (lags <= settings.token_max_lag)
        weights = raw_weights
        if settings.behav_weight_level == Level.sequence:
            # The geometric mean of the row's token weights (those the lag mask keeps), so
            # the cap and floor keep, drop or clamp whole completions.
            row_weight = torch.exp(_row_mean(log_weights, keep))
            weights = row_weight.expand_as(raw_weights)
        # What the cap and floor compare, kept for the health figures.
        bounded = weights
        weights, keep = _bound_weights(weights, keep, settings)
        # A dropped token's weight may have overflowed too; its gradient path must hold no inf.
        weights = torch.where(keep, weights, 0.0)

    # Mask before anything can overflow: a dropped token's log ratio is 0, so an overflowing
    # exp(π − p) can neither reach the loss (0·inf = NaN) nor its gradient.
    log_ratio = torch.where(keep, logprobs - prox, 0.0)
    if sequence_ratio:
        # GSPO per token: the value is the row's mean log ratio over its kept tokens, the
        # gradient each token's own ∇π (π − sg(π) is 0 with gradient 1).
        row_log_ratio = _row_mean(log_ratio.detach(), keep)
        log_ratio = torch.where(keep, log_ratio - log_ratio.detach() + row_log_ratio, 0.0)
    ratio = torch.exp(log_ratio)
    pg, _, _ = _policy_gradient(ratio, adv, settings)
    per_token = torch.where(keep, weights * pg, 0.0)

    with torch.no_grad():
        # Statistics see every valid token's ratio, kept or not: its own at token level, its
        # row's (over the kept tokens) at sequence level.
        if sequence_ratio:
            stat_ratio = torch.exp(row_log_ratio).expand_as(ratio)
        else:
            stat_ratio = torch.exp(torch.where(valid, logprobs.detach() - prox, 0.0))
        _, is_clipped, is_dual_clipped = _policy_gradient(stat_ratio, adv, settings)

    if token_scale is None:
        denominator = float(valid.sum().item()) if normalizer is None else float(normalizer)
        loss = per_token.sum() / max(denominator, 1.0)
    else:
        loss = (per_token * token_scale.detach().to(per_token.dtype)).sum()

    bounds = (settings.behav_weight_cap, settings.behav_weight_floor)
    health = token_health(valid, lags, log_weights, bounded, stat_ratio, is_clipped, adv, bounds)
    stats = LossStats(
        n_valid=int(valid.sum().item()),
        n_kept=int(keep.sum().item()),
        n_clipped=int((valid & is_clipped).sum().item()),
        n_dual_clipped=int((valid & is_dual_clipped).sum().item()),
        loss_sum=float(loss.detach().item()),
        weight_sum=float(raw_weights[valid].sum().item()),
        weight_max=float(raw_weights[valid].max().item()) if bool(valid.any()) else 0.0,
        ratio_sum=float(stat_ratio[valid].sum().item()),
        tokens_by_lag=_tokens_by_lag(lags, valid),
        health=health,
    )
    return loss, stats
