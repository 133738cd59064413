"""The decoupled PPO loss (docs/design.md, The loss), on padded per-token tensors of shape
[batch, T].

Per output token: r = exp(π − p), pg = −min(r·A, clip(r, 1−ε_low, 1+ε_high)·A) (optionally
dual-clipped for A < 0), behaviour weight w = exp(p − μ) without gradient, and

    loss = Σ keep·w·pg / Σ loss_mask

where `keep` drops padding, tokens whose w is outside [floor, cap] (mask mode) and tokens more
than `token_max_lag` versions old. Only π carries gradient.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from sdp_cli.config.train_settings import ProxMode, TrainConfig, WeightBoundMode


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
        )


@dataclass
class LossStats:
    """Sums over the valid (loss_mask) tokens of one or more micro-batches; `summary()` turns
    them into the per-step numbers, so merging micro-batches is exact."""

    n_valid: int = 0
    n_kept: int = 0
    n_clipped: int = 0
    n_dual_clipped: int = 0
    # Σ keep·w·pg: the loss numerator.
    weighted_pg_sum: float = 0.0
    # Raw behaviour weights w = exp(p − μ), before any clamp.
    weight_sum: float = 0.0
    weight_max: float = 0.0
    ratio_sum: float = 0.0
    tokens_by_lag: dict[int, int] = field(default_factory=dict)

    def merge(self, other: LossStats) -> LossStats:
        lags = dict(self.tokens_by_lag)
        for lag, count in other.tokens_by_lag.items():
            lags[lag] = lags.get(lag, 0) + count
        return LossStats(
            n_valid=self.n_valid + other.n_valid,
            n_kept=self.n_kept + other.n_kept,
            n_clipped=self.n_clipped + other.n_clipped,
            n_dual_clipped=self.n_dual_clipped + other.n_dual_clipped,
            weighted_pg_sum=self.weighted_pg_sum + other.weighted_pg_sum,
            weight_sum=self.weight_sum + other.weight_sum,
            weight_max=max(self.weight_max, other.weight_max),
            ratio_sum=self.ratio_sum + other.ratio_sum,
            tokens_by_lag=dict(sorted(lags.items())),
        )

    def summary(self) -> dict[str, float]:
        """Per-step statistics; fractions and means are over valid tokens."""
        n = max(self.n_valid, 1)
        return {
            "loss": self.weighted_pg_sum / n,
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
) -> tuple[Tensor, LossStats]:
    """The loss and its statistics. All tensors are [batch, T]; `loss_mask` marks real output
    tokens. `normalizer` is Σ loss_mask of the full batch when this is one micro-batch of it (so
    micro-batch losses add up to the full-batch loss); by default this batch's own count."""
    valid = loss_mask.bool()
    prox = prox_logprobs.detach()
    adv = advantages.detach().to(logprobs.dtype)

    with torch.no_grad():
        raw_weights = torch.exp(prox - behav_logprobs.detach())
        lags = train_version - versions.long()
        keep = valid
        if settings.token_max_lag is not None:
            keep = keep & (lags <= settings.token_max_lag)
        weights, keep = _bound_weights(raw_weights, keep, settings)
        # A dropped token's weight may have overflowed too; its gradient path must hold no inf.
        weights = torch.where(keep, weights, 0.0)
        # Statistics see every valid token's own ratio, kept or not.
        stat_ratio = torch.exp(torch.where(valid, logprobs.detach() - prox, 0.0))
        _, is_clipped, is_dual_clipped = _policy_gradient(stat_ratio, adv, settings)

    # Mask before anything can overflow: a dropped token's ratio is computed as exp(0), so an
    # overflowing exp(π − p) can neither reach the loss (0·inf = NaN) nor its gradient.
    ratio = torch.exp(torch.where(keep, logprobs - prox, 0.0))
    pg, _, _ = _policy_gradient(ratio, adv, settings)
    per_token = torch.where(keep, weights * pg, 0.0)
    numerator = per_token.sum()
    denominator = float(valid.sum().item()) if normalizer is None else float(normalizer)
    loss = numerator / max(denominator, 1.0)

    stats = LossStats(
        n_valid=int(valid.sum().item()),
        n_kept=int(keep.sum().item()),
        n_clipped=int((valid & is_clipped).sum().item()),
        n_dual_clipped=int((valid & is_dual_clipped).sum().item()),
        weighted_pg_sum=float(numerator.detach().item()),
        weight_sum=float(raw_weights[valid].sum().item()),
        weight_max=float(raw_weights[valid].max().item()) if bool(valid.any()) else 0.0,
        ratio_sum=float(stat_ratio[valid].sum().item()),
        tokens_by_lag=_tokens_by_lag(lags, valid),
    )
    return loss, stats
