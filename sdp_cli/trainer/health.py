"""Off-policy health: per-token figures of the decoupled loss, by version lag, kept as sums and
counts so that micro-batches and FSDP ranks merge exactly (docs/design.md, Off-policy health).

Over the trained tokens (loss mask) of lag k = trained version − token version:

- mismatch_kl: mean k3 estimate of KL(μ ‖ p), behaviour → proximal, on tokens drawn from μ:
  w − log w − 1 with w = exp(p − μ). This direction is the unbiased one, since the tokens were
  sampled from μ, and it is ≥ 0 per token.
- clip_low_fraction / clip_high_fraction: tokens where the PPO clip binds (its term is the
  smaller one) with r = exp(π − p) below 1 − ε_low (A < 0) or above 1 + ε_high (A > 0);
  clip_fraction is their sum.
- cap_fraction / floor_fraction: tokens whose behaviour weight (as the cap and floor see it:
  per token, or the row's at train.behav_weight_level=sequence) is above train.behav_weight_cap
  or below train.behav_weight_floor, masked or clamped according to train.behav_weight_mode.
- behav_weight_p99 / behav_weight_max: the raw weight's tail. p99 comes from a histogram of
  log w with fixed bins, so it merges exactly but is approximate: within one bin (a factor
  exp(LOG_W_STEP) ≈ 1.02) inside [exp(LOG_W_MIN), exp(LOG_W_MAX)], clamped outside.
- adv_mean, adv_std, adv_min, adv_max, adv_zero_fraction: the per-token advantages.

The fraction of uninformative groups (all rewards equal) is per step only, from the groups.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields

import torch
from torch import Tensor

from sdp_cli.events.health_fields import STATS_PREFIX, UNINFORMATIVE_KEY

LOG_W_MIN = -8.0
LOG_W_MAX = 8.0
LOG_W_STEP = 0.02
N_BINS = round((LOG_W_MAX - LOG_W_MIN) / LOG_W_STEP)

_MAX_FIELDS = frozenset({"weight_max", "adv_max"})
_MIN_FIELDS = frozenset({"adv_min"})


@dataclass
class LagHealth:
    """Sums, counts and extremes over the trained tokens of one lag."""

    # Counts of log w in N_BINS fixed bins from LOG_W_MIN: a p99 that merges by addition.
    log_w_hist: list[int] = field(default_factory=lambda: [0] * N_BINS)
    # Trained tokens, and the sum of their k3 terms w − log w − 1.
    n: int = 0
    kl_sum: float = 0.0
    # Tokens where the PPO clip binds, below 1 − ε_low and above 1 + ε_high.
    n_clip_low: int = 0
    n_clip_high: int = 0
    # Tokens whose weight is beyond the cap, or the floor.
    n_cap: int = 0
    n_floor: int = 0
    # The largest raw weight.
    weight_max: float = 0.0
    # Advantages: sums for the mean and variance, extremes, and how many are exactly 0.
    adv_sum: float = 0.0
    adv_sq_sum: float = 0.0
    adv_min: float = math.inf
    adv_max: float = -math.inf
    n_adv_zero: int = 0

    def merge(self, other: LagHealth) -> LagHealth:
        """Sums and counts add, extremes take the extreme, histograms add bin by bin."""
        merged: dict[str, object] = {}
        for item in fields(self):
            mine, theirs = getattr(self, item.name), getattr(other, item.name)
            if item.name in _MAX_FIELDS:
                merged[item.name] = max(mine, theirs)
            elif item.name in _MIN_FIELDS:
                merged[item.name] = min(mine, theirs)
            elif isinstance(mine, list):
                merged[item.name] = [a + b for a, b in zip(mine, theirs, strict=True)]
            else:
                merged[item.name] = mine + theirs
        return LagHealth(**merged)  # type: ignore[arg-type]

    def summary(self) -> dict[str, float]:
        n = max(self.n, 1)
        mean = self.adv_sum / n
        # Population variance from the sums; the max() absorbs rounding below zero.
        variance = max(self.adv_sq_sum / n - mean * mean, 0.0)
        return {
            "tokens": float(self.n),
            "mismatch_kl": self.kl_sum / n,
            "clip_fraction": (self.n_clip_low + self.n_clip_high) / n,
            "clip_low_fraction": self.n_clip_low / n,
            "clip_high_fraction": self.n_clip_high / n,
            "cap_fraction": self.n_cap / n,
            "floor_fraction": self.n_floor / n,
            "behav_weight_p99": _hist_quantile(self.log_w_hist, 0.99),
            "behav_weight_max": self.weight_max,
            "adv_mean": mean,
            "adv_std": math.sqrt(variance),
            "adv_min": self.adv_min if self.n else 0.0,
            "adv_max": self.adv_max if self.n else 0.0,
            "adv_zero_fraction": self.n_adv_zero / n,
        }


def _hist_quantile(hist: Sequence[int], q: float) -> float:
    """The weight at quantile `q` of a log-w histogram: the upper edge of the bin it falls in,
    so the estimate errs high by at most one bin."""
    total = sum(hist)
    if total == 0:
        return 0.0
    rank = q * total
    seen = 0
    for index, count in enumerate(hist):
        seen += count
        if seen >= rank:
            return math.exp(LOG_W_MIN + (index + 1) * LOG_W_STEP)
    return math.exp(LOG_W_MAX)


def merge_by_lag(
    left: Mapping[int, LagHealth], right: Mapping[int, LagHealth]
) -> dict[int, LagHealth]:
    merged = dict(left)
    for lag, health in right.items():
        merged[lag] = merged[lag].merge(health) if lag in merged else health
    return dict(sorted(merged.items()))


@torch.no_grad()
def token_health(
    valid: Tensor,
    lags: Tensor,
    log_weights: Tensor,
    bound_weights: Tensor,
    ratio: Tensor,
    is_clipped: Tensor,
    advantages: Tensor,
    bounds: tuple[float | None, float | None],
) -> dict[int, LagHealth]:
    """The health sums of one micro-batch by lag; every tensor is [rows, T]. `log_weights` is
    log w = p − μ per token, `bound_weights` the weight the cap and floor (`bounds`) compare,
    `ratio` the ratio the clip saw and `is_clipped` where it bound. Only tensors the loss
    already has: no extra forward pass."""
    cap, floor = bounds
    out: dict[int, LagHealth] = {}
    for lag in torch.unique(lags[valid]).tolist():
        sel = valid & (lags == lag)
        log_w = log_weights[sel].double()
        weight = torch.exp(log_w)
        adv = advantages[sel].double()
        clipped = is_clipped[sel]
        bounded = bound_weights[sel]
        # A non-finite weight (a step about to be skipped) lands in an end bin, not in bincount's
        # way; kl_sum and weight_max still show it.
        finite_log_w = torch.nan_to_num(log_w, nan=LOG_W_MAX, posinf=LOG_W_MAX, neginf=LOG_W_MIN)
        bins = ((finite_log_w.clamp(LOG_W_MIN, LOG_W_MAX - 1e-9) - LOG_W_MIN) / LOG_W_STEP).long()
        no_bound = torch.zeros((), dtype=torch.bool, device=bounded.device)
        # One transfer per lag, not one per figure: on a GPU each .item() waits for the device.
        scalars = torch.stack(
            [
                sel.sum().double(),
                (weight - log_w - 1.0).sum(),
                (clipped & (ratio[sel] < 1.0)).sum().double(),
                (clipped & (ratio[sel] > 1.0)).sum().double(),
                (bounded > cap if cap is not None else no_bound).sum().double(),
                (bounded < floor if floor is not None else no_bound).sum().double(),
                weight.max(),
                adv.sum(),
                (adv * adv).sum(),
                adv.min(),
                adv.max(),
                (adv == 0).sum().double(),
            ]
        ).tolist()
        n, kl, low, high, n_cap, n_floor, w_max, a_sum, a_sq, a_min, a_max, a_zero = scalars
        out[int(lag)] = LagHealth(
            n=int(n),
            kl_sum=kl,
            n_clip_low=int(low),
            n_clip_high=int(high),
            n_cap=int(n_cap),
            n_floor=int(n_floor),
            weight_max=w_max,
            adv_sum=a_sum,
            adv_sq_sum=a_sq,
            adv_min=a_min,
            adv_max=a_max,
            n_adv_zero=int(a_zero),
            log_w_hist=torch.bincount(bins, minlength=N_BINS).tolist(),
        )
    return out


def uninformative_fraction(rewards_by_group: Iterable[Sequence[float]]) -> float:
    """Share of the groups whose rewards are all equal: their group-relative advantages are
    0, so they train nothing (dynamic sampling drops them as `uninformative`)."""
    groups = [list(r) for r in rewards_by_group if len(r) > 0]
    if not groups:
        return 0.0
    return sum(1 for r in groups if max(r) == min(r)) / len(groups)


def health_stats(by_lag: Mapping[int, LagHealth], uninformative: float) -> dict[str, float]:
    """The flat `train_step` stats: `health/<key>` for the step, `health/lag<k>/<key>` by lag."""
    total = LagHealth()
    for health in by_lag.values():
        total = total.merge(health)
    stats = {f"{STATS_PREFIX}{key}": value for key, value in total.summary().items()}
    stats[f"{STATS_PREFIX}{UNINFORMATIVE_KEY}"] = uninformative
    for lag, health in by_lag.items():
        for key, value in health.summary().items():
            stats[f"{STATS_PREFIX}lag{lag}/{key}"] = value
    return stats
