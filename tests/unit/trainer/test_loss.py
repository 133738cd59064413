"""The decoupled PPO loss against a per-token Python reference (docs/design.md, The loss),
and GRPO advantages."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

from sdp_cli.config.train_settings import ProxMode, TrainConfig, WeightBoundMode
from sdp_cli.trainer.advantages import group_advantages
from sdp_cli.trainer.loss import (
    LossSettings,
    LossStats,
    decoupled_ppo_loss,
    loglinear_proximal,
    select_proximal,
)

TRAIN_VERSION = 5


@dataclass
class Case:
    logprobs: torch.Tensor
    prox: torch.Tensor
    behav: torch.Tensor
    advantages: torch.Tensor
    mask: torch.Tensor
    versions: torch.Tensor


def random_case(seed: int, rows: int = 6, cols: int = 9) -> Case:
    """Random tokens from several versions (v−3..v), per-row advantages, right padding, and
    proximal values far enough from μ and π that clipping and the weight bounds all trigger."""
    gen = torch.Generator().manual_seed(seed)
    behav = -3.0 * torch.rand(rows, cols, generator=gen)
    prox = behav + 1.2 * torch.randn(rows, cols, generator=gen)
    logprobs = prox + 0.5 * torch.randn(rows, cols, generator=gen)
    advantages = torch.randn(rows, 1, generator=gen).expand(rows, cols).clone()
    lengths = torch.randint(1, cols + 1, (rows,), generator=gen)
    mask = torch.arange(cols).unsqueeze(0) < lengths.unsqueeze(1)
    versions = TRAIN_VERSION - torch.randint(0, 4, (rows, cols), generator=gen)
    # Padding holds zeros, as the batch builder writes it.
    for t in (behav, prox, logprobs, advantages):
        t[~mask] = 0.0
    return Case(logprobs, prox, behav, advantages, mask, versions)


def reference_loss(case: Case, prox: torch.Tensor, s: LossSettings) -> tuple[float, dict]:
    """The loss of docs/design.md one token at a time, in Python floats."""
    numerator, n_valid, n_kept, n_clipped = 0.0, 0, 0, 0
    weights, ratios, lags = [], [], {}
    rows, cols = case.mask.shape
    for i in range(rows):
        for t in range(cols):
            if not case.mask[i, t]:
                continue
            n_valid += 1
            pi, p, mu = (float(x[i, t]) for x in (case.logprobs, prox, case.behav))
            adv = float(case.advantages[i, t])
            lag = TRAIN_VERSION - int(case.versions[i, t])
            lags[lag] = lags.get(lag, 0) + 1
            r = math.exp(pi - p)
            ratios.append(r)
            clipped_r = min(max(r, 1 - s.eps_clip_low), 1 + s.eps_clip_high)
            pg = -min(r * adv, clipped_r * adv)
            n_clipped += clipped_r * adv < r * adv
            if s.dual_clip is not None and adv < 0:
                pg = min(pg, -s.dual_clip * adv)
            w = math.exp(p - mu)
            weights.append(w)
            keep = s.token_max_lag is None or lag <= s.token_max_lag
            if s.behav_weight_mode == WeightBoundMode.mask:
                if s.behav_weight_cap is not None and w > s.behav_weight_cap:
                    keep = False
                if s.behav_weight_floor is not None and w < s.behav_weight_floor:
                    keep = False
            else:
                if s.behav_weight_cap is not None:
                    w = min(w, s.behav_weight_cap)
                if s.behav_weight_floor is not None:
                    w = max(w, s.behav_weight_floor)
            if keep:
                n_kept += 1
                numerator += w * pg
    stats = {
        "clip_frac": n_clipped / n_valid,
        "masked_frac": (n_valid - n_kept) / n_valid,
        "behav_weight_mean": sum(weights) / n_valid,
        "behav_weight_max": max(weights),
        "ratio_mean": sum(ratios) / n_valid,
        "tokens_by_lag": dict(sorted(lags.items())),
    }
    return numerator / n_valid, stats


def reference_loglinear(case: Case) -> torch.Tensor:
    out = case.behav.clone()
    rows, cols = case.mask.shape
    for i in range(rows):
        for t in range(cols):
            b = int(case.versions[i, t])
            alpha = (TRAIN_VERSION - b) / (TRAIN_VERSION + 1 - b)
            mu = float(case.behav[i, t])
            out[i, t] = mu + alpha * (float(case.logprobs[i, t]) - mu)
    return out


SETTINGS = {
    "plain": LossSettings(),
    "asymmetric_clip": LossSettings(eps_clip_low=0.1, eps_clip_high=0.3),
    "cap_mask": LossSettings(behav_weight_cap=1.5),
    "cap_clamp": LossSettings(behav_weight_cap=1.5, behav_weight_mode=WeightBoundMode.clamp),
    "floor_mask": LossSettings(behav_weight_floor=0.5),
    "floor_clamp": LossSettings(behav_weight_floor=0.5, behav_weight_mode=WeightBoundMode.clamp),
    "cap_floor_mask": LossSettings(behav_weight_cap=2.0, behav_weight_floor=0.4),
    "dual_clip": LossSettings(dual_clip=1.5),
    "lag_mask": LossSettings(token_max_lag=1),
    "everything": LossSettings(
        eps_clip_low=0.15,
        eps_clip_high=0.25,
        dual_clip=2.0,
        behav_weight_cap=2.0,
        behav_weight_floor=0.3,
        token_max_lag=2,
    ),
}


def proximal_for(mode: ProxMode, case: Case, recomputed: torch.Tensor) -> torch.Tensor:
    return select_proximal(
        mode,
        logprobs=case.logprobs,
        segment_prox=case.prox,
        behav_logprobs=case.behav,
        versions=case.versions,
        train_version=TRAIN_VERSION,
        recomputed=recomputed,
    )


def assert_stats_match(stats: LossStats, expected: dict) -> None:
    summary = stats.summary()
    for key in ("clip_frac", "masked_frac", "behav_weight_mean", "behav_weight_max", "ratio_mean"):
        assert summary[key] == pytest.approx(expected[key], rel=1e-5, abs=1e-6), key
    assert stats.tokens_by_lag == expected["tokens_by_lag"]


@pytest.mark.parametrize("mode", list(ProxMode))
@pytest.mark.parametrize("name", list(SETTINGS))
def test_loss_and_stats_match_the_per_token_reference(mode: ProxMode, name: str) -> None:
    settings = SETTINGS[name]
    for seed in range(3):
        case = random_case(seed)
        recomputed = case.logprobs + 0.3 * torch.randn(case.mask.shape)
        prox = proximal_for(mode, case, recomputed)
        expected_prox = {
            ProxMode.segment: case.prox,
            ProxMode.recompute: recomputed,
            ProxMode.loglinear: reference_loglinear(case),
        }[mode]
        torch.testing.assert_close(prox, expected_prox)
        loss, stats = decoupled_ppo_loss(
            case.logprobs,
            prox,
            case.behav,
            case.advantages,
            case.mask,
            case.versions,
            TRAIN_VERSION,
            settings,
        )
        want, want_stats = reference_loss(case, expected_prox, settings)
        assert float(loss) == pytest.approx(want, rel=1e-5, abs=1e-7)
        assert stats.summary()["loss"] == pytest.approx(want, rel=1e-5, abs=1e-7)
        assert_stats_match(stats, want_stats)


def test_the_random_cases_exercise_every_branch() -> None:
    """Guard against a reference test that passes because nothing gets clipped or masked."""
    case = random_case(0)
    _, clip = reference_loss(case, case.prox, SETTINGS["plain"])
    _, cap = reference_loss(case, case.prox, SETTINGS["cap_mask"])
    _, lag = reference_loss(case, case.prox, SETTINGS["lag_mask"])
    assert 0 < clip["clip_frac"] < 1
    assert 0 < cap["masked_frac"] < 1
    assert 0 < lag["masked_frac"] < 1
    assert len(clip["tokens_by_lag"]) == 4
    assert bool((case.advantages[case.mask] < 0).any())


def test_dual_clip_bounds_the_loss_of_negative_advantages() -> None:
    ratio = torch.tensor([[10.0, 10.0, 10.0]])
    logprobs = torch.log(ratio)
    zeros = torch.zeros_like(logprobs)
    adv = torch.tensor([[-1.0, 1.0, -0.5]])
    mask = torch.ones_like(adv, dtype=torch.bool)
    versions = torch.zeros_like(adv, dtype=torch.long)
    settings = LossSettings(dual_clip=3.0)
    loss, stats = decoupled_ppo_loss(logprobs, zeros, zeros, adv, mask, versions, 0, settings)
    # A = −1: min(10, 3) = 3; A = +1: −min(10, 1.2) = −1.2; A = −0.5: min(5, 1.5) = 1.5.
    assert float(loss) == pytest.approx((3.0 - 1.2 + 1.5) / 3)
    assert stats.n_dual_clipped == 2


def test_lag_mask_drops_old_tokens_but_keeps_them_in_the_denominator() -> None:
    logprobs = torch.tensor([[-1.0, -1.0]])
    adv = torch.tensor([[1.0, 1.0]])
    mask = torch.ones_like(adv, dtype=torch.bool)
    versions = torch.tensor([[3, 1]])
    loss, stats = decoupled_ppo_loss(
        logprobs, logprobs, logprobs, adv, mask, versions, 3, LossSettings(token_max_lag=1)
    )
    assert float(loss) == pytest.approx(-0.5)
    assert stats.summary()["masked_frac"] == 0.5
    assert stats.tokens_by_lag == {0: 1, 2: 1}


@pytest.mark.parametrize("mode", list(ProxMode))
def test_gradient_flows_only_through_the_current_logprobs(mode: ProxMode) -> None:
    case = random_case(1)
    pi = case.logprobs.clone().requires_grad_(True)
    prox_in = case.prox.clone().requires_grad_(True)
    behav = case.behav.clone().requires_grad_(True)
    adv = case.advantages.clone().requires_grad_(True)
    recomputed = (case.logprobs + 0.1).requires_grad_(True)
    prox = select_proximal(
        mode,
        logprobs=pi,
        segment_prox=prox_in,
        behav_logprobs=behav,
        versions=case.versions,
        train_version=TRAIN_VERSION,
        recomputed=recomputed,
    )
    loss, _ = decoupled_ppo_loss(
        pi, prox, behav, adv, case.mask, case.versions, TRAIN_VERSION, SETTINGS["everything"]
    )
    loss.backward()
    assert pi.grad is not None and bool(pi.grad.abs().sum() > 0)
    assert bool((pi.grad[~case.mask] == 0).all())
    for other in (prox_in, behav, adv, recomputed):
        assert other.grad is None


def test_gradient_matches_the_analytic_per_token_gradient() -> None:
    """d loss / d π_t = −keep·w·r·A / N where the unclipped term is the active one, else 0."""
    case = random_case(2)
    settings = SETTINGS["cap_clamp"]
    pi = case.logprobs.clone().requires_grad_(True)
    loss, _ = decoupled_ppo_loss(
        pi, case.prox, case.behav, case.advantages, case.mask, case.versions, 5, settings
    )
    loss.backward()
    n = int(case.mask.sum())
    expected = torch.zeros_like(pi)
    for i, t in case.mask.nonzero().tolist():
        r = math.exp(float(case.logprobs[i, t] - case.prox[i, t]))
        adv = float(case.advantages[i, t])
        w = min(math.exp(float(case.prox[i, t] - case.behav[i, t])), 1.5)
        clipped_r = min(max(r, 0.8), 1.2)
        if r * adv <= clipped_r * adv:
            expected[i, t] = -w * r * adv / n
    torch.testing.assert_close(pi.grad, expected, rtol=1e-5, atol=1e-7)


def test_micro_batches_add_up_to_the_full_batch() -> None:
    case = random_case(3, rows=8)
    settings = SETTINGS["everything"]
    full, full_stats = decoupled_ppo_loss(
        case.logprobs, case.prox, case.behav, case.advantages, case.mask, case.versions, 5, settings
    )
    total = float(case.mask.sum())
    parts = []
    for rows in (slice(0, 3), slice(3, 8)):
        parts.append(
            decoupled_ppo_loss(
                case.logprobs[rows],
                case.prox[rows],
                case.behav[rows],
                case.advantages[rows],
                case.mask[rows],
                case.versions[rows],
                5,
                settings,
                normalizer=total,
            )
        )
    assert float(parts[0][0] + parts[1][0]) == pytest.approx(float(full), rel=1e-5)
    merged = parts[0][1].merge(parts[1][1])
    assert merged.summary() == pytest.approx(full_stats.summary())
    assert merged.tokens_by_lag == full_stats.tokens_by_lag


def test_overflowing_behaviour_weights_are_masked_without_nan() -> None:
    logprobs = torch.tensor([[-1.0, -1.0]], requires_grad=True)
    prox = torch.tensor([[-1.0, -1.0]])
    behav = torch.tensor([[-1.0, -200.0]])  # w = e^199 overflows float32
    adv = torch.tensor([[1.0, 1.0]])
    mask = torch.ones_like(adv, dtype=torch.bool)
    versions = torch.zeros_like(adv, dtype=torch.long)
    loss, stats = decoupled_ppo_loss(
        logprobs, prox, behav, adv, mask, versions, 0, LossSettings(behav_weight_cap=5.0)
    )
    loss.backward()
    assert math.isfinite(float(loss.detach())) and bool(torch.isfinite(logprobs.grad).all())
    assert stats.summary()["masked_frac"] == 0.5


@pytest.mark.parametrize("masked_by", ["loss_mask", "token_max_lag", "behav_weight_cap"])
def test_an_overflowing_ratio_on_a_masked_token_leaves_loss_and_gradient_finite(
    masked_by: str,
) -> None:
    """exp(π − p) = e^200 overflows float32; with A < 0 the unmasked pg is +inf, and a mask
    applied by multiplying afterwards would give 0·inf = NaN in the loss and the gradient."""
    logprobs = torch.tensor([[-1.0, 100.0]], requires_grad=True)
    prox = torch.tensor([[-1.0, -100.0]])
    behav = prox.clone()
    adv = torch.tensor([[-1.0, -1.0]])
    mask = torch.ones_like(adv, dtype=torch.bool)
    versions = torch.zeros_like(adv, dtype=torch.long)
    settings = LossSettings()
    if masked_by == "loss_mask":
        mask[0, 1] = False
    elif masked_by == "token_max_lag":
        versions[0, 1] = -3
        settings = LossSettings(token_max_lag=1)
    else:
        behav[0, 1] = -300.0  # w = e^200
        settings = LossSettings(behav_weight_cap=5.0)
    loss, stats = decoupled_ppo_loss(logprobs, prox, behav, adv, mask, versions, 0, settings)
    loss.backward()
    assert logprobs.grad is not None
    assert math.isfinite(float(loss.detach()))
    assert bool(torch.isfinite(logprobs.grad).all())
    assert float(logprobs.grad[0, 1]) == 0.0
    # The kept token alone: r = 1, A = −1 → pg = 1, over the valid tokens.
    assert float(loss.detach()) == pytest.approx(1.0 / stats.n_valid)


def test_an_empty_batch_gives_zero_loss() -> None:
    zeros = torch.zeros(2, 3)
    mask = torch.zeros(2, 3, dtype=torch.bool)
    versions = torch.zeros(2, 3, dtype=torch.long)
    loss, stats = decoupled_ppo_loss(zeros, zeros, zeros, zeros, mask, versions, 0, LossSettings())
    assert float(loss) == 0.0 and stats.n_valid == 0
    assert stats.summary()["clip_frac"] == 0.0


def test_loglinear_fresh_tokens_use_the_behaviour_logprob() -> None:
    pi = torch.tensor([[-0.5, -0.5, -0.5]])
    mu = torch.tensor([[-1.5, -1.5, -1.5]])
    versions = torch.tensor([[4, 3, 1]])
    prox = loglinear_proximal(pi, mu, versions, train_version=4)
    # α = 0, 1/2, 3/4
    torch.testing.assert_close(prox, torch.tensor([[-1.5, -1.0, -0.75]]))


def test_recompute_mode_needs_the_recomputed_logprobs() -> None:
    x = torch.zeros(1, 1)
    with pytest.raises(ValueError, match="recompute"):
        select_proximal(
            ProxMode.recompute,
            logprobs=x,
            segment_prox=x,
            behav_logprobs=x,
            versions=x.long(),
            train_version=0,
        )


def test_settings_come_from_the_train_config() -> None:
    train = TrainConfig(dual_clip=3.0, behav_weight_floor=0.1, token_max_lag=2)
    settings = LossSettings.from_config(train)
    assert settings.dual_clip == 3.0 and settings.behav_weight_cap == train.behav_weight_cap
    assert settings.behav_weight_floor == 0.1 and settings.token_max_lag == 2
    assert settings.behav_weight_mode == WeightBoundMode.mask


# --- GRPO advantages ---


def test_advantages_are_standardised_within_the_group() -> None:
    adv = group_advantages([1.0, 0.0, 0.5, 0.5], eps=1e-6)
    mean, std = 0.5, math.sqrt(0.125)
    assert adv == pytest.approx([(r - mean) / (std + 1e-6) for r in (1.0, 0.0, 0.5, 0.5)])
    assert sum(adv) == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize("rewards", [[0.3, 0.3, 0.3], [0.1 + 0.2, 0.3], [1.0], []])
def test_groups_without_spread_get_zero_advantages(rewards: list[float]) -> None:
    assert group_advantages(rewards, eps=1e-6) == [0.0] * len(rewards)


def test_advantage_eps_limits_tiny_spreads() -> None:
    adv = group_advantages([0.0, 1e-6], eps=1e-3)
    assert max(abs(a) for a in adv) < 1e-3
