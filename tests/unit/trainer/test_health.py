"""Off-policy health figures against a plain per-token reference, across micro-batches and ranks."""

from __future__ import annotations

import math

import pytest
import torch

from sdp_cli.events.health_fields import split_health
from sdp_cli.trainer.health import (
    LOG_W_STEP,
    health_stats,
    uninformative_fraction,
)
from sdp_cli.trainer.loss import LossSettings, LossStats, decoupled_ppo_loss

SETTINGS = LossSettings(
    eps_clip_low=0.1, eps_clip_high=0.2, behav_weight_cap=1.3, behav_weight_floor=0.8
)
VERSION = 5


def _batch(seed: int, rows: int = 3, width: int = 40) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    behav = -torch.rand(rows, width, generator=gen) * 3
    prox = behav + torch.randn(rows, width, generator=gen) * 0.3
    current = prox + torch.randn(rows, width, generator=gen) * 0.3
    adv = torch.randn(rows, 1, generator=gen).expand(rows, width).clone()
    adv[0] = 0.0
    mask = torch.ones(rows, width)
    mask[:, -7:] = 0
    versions = VERSION - torch.randint(0, 3, (rows, width), generator=gen)
    return {
        "logprobs": current,
        "prox_logprobs": prox,
        "behav_logprobs": behav,
        "advantages": adv,
        "loss_mask": mask,
        "versions": versions,
    }


def _reference(batches: list[dict[str, torch.Tensor]], lag: int | None) -> dict[str, float]:
    """Plain per-token loops over every trained token (of one lag, or all)."""
    kl, low, high, cap, floor, weights, advs = [], 0, 0, 0, 0, [], []
    for b in batches:
        rows, width = b["loss_mask"].shape
        for i in range(rows):
            for j in range(width):
                token_lag = VERSION - int(b["versions"][i, j])
                if not b["loss_mask"][i, j] or (lag is not None and token_lag != lag):
                    continue
                mu, p, pi = (
                    float(b[k][i, j]) for k in ("behav_logprobs", "prox_logprobs", "logprobs")
                )
                a = float(b["advantages"][i, j])
                w = math.exp(p - mu)
                kl.append(w - (p - mu) - 1)
                r = math.exp(pi - p)
                clipped_r = min(max(r, 1 - SETTINGS.eps_clip_low), 1 + SETTINGS.eps_clip_high)
                if clipped_r * a < r * a:
                    low += r < 1
                    high += r > 1
                cap += w > SETTINGS.behav_weight_cap
                floor += w < SETTINGS.behav_weight_floor
                weights.append(w)
                advs.append(a)
    n = len(kl)
    mean = sum(advs) / n
    return {
        "tokens": n,
        "mismatch_kl": sum(kl) / n,
        "clip_low_fraction": low / n,
        "clip_high_fraction": high / n,
        "clip_fraction": (low + high) / n,
        "cap_fraction": cap / n,
        "floor_fraction": floor / n,
        "behav_weight_max": max(weights),
        "behav_weight_p99": sorted(weights)[math.ceil(0.99 * n) - 1],
        "adv_mean": mean,
        "adv_std": math.sqrt(sum((a - mean) ** 2 for a in advs) / n),
        "adv_min": min(advs),
        "adv_max": max(advs),
        "adv_zero_fraction": sum(a == 0 for a in advs) / n,
    }


def _stats(batch: dict[str, torch.Tensor]) -> LossStats:
    _, stats = decoupled_ppo_loss(**batch, train_version=VERSION, settings=SETTINGS)
    return stats


def _check(got: dict[str, float], want: dict[str, float]) -> None:
    for key, value in want.items():
        if key == "behav_weight_p99":
            # One histogram bin: the estimate is the upper edge of the bin holding the value.
            assert value <= got[key] * (1 + 1e-6) <= value * math.exp(LOG_W_STEP) * (1 + 1e-6)
        else:
            assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key


def test_per_step_and_by_lag_match_the_per_token_reference_across_micro_batches() -> None:
    batches = [_batch(1), _batch(2)]
    merged = _stats(batches[0]).merge(_stats(batches[1]))
    flat = health_stats(merged.health, 0.25)
    _, step, by_lag = split_health({"loss": 1.0, **flat})
    _check(step, _reference(batches, None))
    assert step["uninformative_group_fraction"] == 0.25
    assert set(by_lag) == {"0", "1", "2"}
    for lag, values in by_lag.items():
        _check(values, _reference(batches, int(lag)))
    # The clip fraction is the loss's own clip_frac, split low and high.
    assert step["clip_fraction"] == pytest.approx(merged.summary()["clip_frac"])


def test_rank_reduction_equals_one_rank_holding_everything() -> None:
    """FSDP merges the ranks' LossStats with `merge` (fsdp.py): sums and counts, in any order."""
    parts = [_stats(_batch(seed)) for seed in (3, 4, 5)]
    forward = parts[0].merge(parts[1]).merge(parts[2])
    backward = LossStats().merge(parts[2]).merge(parts[1].merge(parts[0]))
    assert health_stats(forward.health, 0.0) == pytest.approx(health_stats(backward.health, 0.0))
    _, step, _ = split_health(health_stats(forward.health, 0.0))
    _check(step, _reference([_batch(seed) for seed in (3, 4, 5)], None))


def test_uninformative_fraction_counts_groups_with_equal_rewards() -> None:
    assert uninformative_fraction([[1.0, 1.0], [0.0, 1.0], [0.0, 0.0], []]) == pytest.approx(2 / 3)
    assert uninformative_fraction([]) == 0.0
