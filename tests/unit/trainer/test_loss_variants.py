"""Loss variants (train.loss_agg, train.adv_norm, train.ratio_level, train.behav_weight_level,
rollout.overlong) against a per-token Python reference written plainly here, composed with the
decoupled loss (every prox mode, the behaviour-weight cap and floor, the lag mask), and the
aggregate the same however the batch is cut into ranks and micro-batches (docs/design.md, The
loss)."""

from __future__ import annotations

import json
import math
import multiprocessing
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import torch

from sdp_cli.config import load_config
from sdp_cli.config.rollout_settings import Overlong, RolloutConfig
from sdp_cli.config.schema import SdpConfig
from sdp_cli.config.train_settings import (
    AdvNorm,
    Level,
    LossAgg,
    ProxMode,
    TrainConfig,
    WeightBoundMode,
)
from sdp_cli.errors import ConfigError
from sdp_cli.inference.types import Completion
from sdp_cli.launcher.process import free_port
from sdp_cli.rollout.rlvr import RLVRWorkflow, overlong_penalty
from sdp_cli.rollout.trajectory import RolloutGroup, Trajectory
from sdp_cli.tasks.base import Prompt
from sdp_cli.trainer.actor import Actor
from sdp_cli.trainer.advantages import group_advantages
from sdp_cli.trainer.batch import (
    SampleSettings,
    TrainBatch,
    collate,
    flatten_groups,
    loss_scales,
    split_by_token_budget,
)
from sdp_cli.trainer.fsdp import split_across_ranks, trainer_actor
from sdp_cli.trainer.loss import LossSettings, decoupled_ppo_loss, select_proximal

V = 5  # the version being trained
AGG_TOKENS = 7  # the Dr.GRPO constant of the tests


@dataclass
class Case:
    """A collated batch and the current policy's logprobs π on it."""

    batch: TrainBatch
    pi: torch.Tensor


def random_groups(seed: int, n_groups: int = 5, size: int = 4) -> list[RolloutGroup]:
    gen = torch.Generator().manual_seed(seed)
    groups = []
    for g in range(n_groups):
        prompt = [1] + [int(x) for x in torch.randint(3, 40, (1 + g % 3,), generator=gen)]
        samples = []
        for k in range(size):
            n = int(torch.randint(1, 12, (1,), generator=gen))
            behav = (-3.0 * torch.rand(n, generator=gen)).tolist()
            prox = [b + 0.8 * float(torch.randn(1, generator=gen)) for b in behav]
            versions = [V - int(x) for x in torch.randint(0, 4, (n,), generator=gen)]
            output = [int(x) for x in torch.randint(3, 40, (n,), generator=gen)]
            reward = float(torch.randint(0, 3, (1,), generator=gen)) / 2
            sample = Trajectory(prompt, output, behav, versions, prox_logprobs=prox, reward=reward)
            sample.finish_reason = "length" if (g + k) % 3 == 0 else "stop"
            samples.append(sample)
        groups.append(RolloutGroup(rollout_id=g, samples=samples))
    return groups


def synthetic_logprobs(prox: torch.Tensor, behav: torch.Tensor) -> torch.Tensor:
    """A current policy that depends on each token alone, so any cut of the batch sees it."""
    return prox + 0.4 * torch.sin(13.0 * behav)


def case_of(batch: TrainBatch) -> Case:
    return Case(batch, synthetic_logprobs(batch.prox_logprobs, batch.behav_logprobs))


def random_case(seed: int) -> Case:
    """Twenty completions of 1 to 11 tokens from versions v−3..v with their group advantages,
    proximal values far enough from μ and π that clipping and the weight bounds trigger, token
    and sequence wise."""
    return case_of(collate(flatten_groups(random_groups(seed), SampleSettings()), pad_id=0))


def coefficient(agg: LossAgg, lengths: list[int], row: int) -> float:
    """A token's share of the step's loss, from the definitions of the three aggregations."""
    trained = [n for n in lengths if n > 0]
    if agg == LossAgg.token_mean:
        return 1.0 / sum(trained)
    if agg == LossAgg.seq_mean_token_mean:
        return 1.0 / (len(trained) * lengths[row])
    return 1.0 / (len(trained) * AGG_TOKENS)


def reference(
    case: Case, prox: torch.Tensor, s: LossSettings, agg: LossAgg
) -> tuple[float, dict, torch.Tensor]:
    """The loss, its statistics and d loss / d π, one token at a time in Python floats."""
    rows, cols = case.batch.loss_mask.shape
    lengths = [int(case.batch.loss_mask[i].sum()) for i in range(rows)]
    loss, n_clipped, n_kept = 0.0, 0, 0
    raw_weights: list[float] = []
    ratios: list[float] = []
    grad = torch.zeros(rows, cols)
    for i in range(rows):
        tokens = [t for t in range(cols) if case.batch.loss_mask[i, t]]

        def log_w(t: int, i: int = i) -> float:
            return float(prox[i, t]) - float(case.batch.behav_logprobs[i, t])

        def log_r(t: int, i: int = i) -> float:
            return float(case.pi[i, t]) - float(prox[i, t])

        raw_weights += [math.exp(log_w(t)) for t in tokens]
        lag_kept = [
            t
            for t in tokens
            if s.token_max_lag is None or V - case.batch.versions[i, t] <= s.token_max_lag
        ]
        if s.behav_weight_level == Level.sequence:
            row_w = math.exp(sum(log_w(t) for t in lag_kept) / len(lag_kept)) if lag_kept else 1.0
            weight = dict.fromkeys(tokens, row_w)
        else:
            weight = {t: math.exp(log_w(t)) for t in tokens}
        kept: dict[int, float] = {}
        for t in lag_kept:
            w = weight[t]
            if s.behav_weight_mode == WeightBoundMode.mask:
                if s.behav_weight_cap is not None and w > s.behav_weight_cap:
                    continue
                if s.behav_weight_floor is not None and w < s.behav_weight_floor:
                    continue
            else:
                if s.behav_weight_cap is not None:
                    w = min(w, s.behav_weight_cap)
                if s.behav_weight_floor is not None:
                    w = max(w, s.behav_weight_floor)
            kept[t] = w
        n_kept += len(kept)
        if s.ratio_level == Level.sequence:
            row_r = math.exp(sum(log_r(t) for t in kept) / len(kept)) if kept else 1.0
            ratio = dict.fromkeys(tokens, row_r)
        else:
            ratio = {t: math.exp(log_r(t)) for t in tokens}
        c = coefficient(agg, lengths, i)
        for t in tokens:
            r, adv = ratio[t], float(case.batch.advantages[i, t])
            ratios.append(r)
            clipped_r = min(max(r, 1 - s.eps_clip_low), 1 + s.eps_clip_high)
            n_clipped += clipped_r * adv < r * adv
            if t not in kept:
                continue
            pg = -min(r * adv, clipped_r * adv)
            unclipped_active = r * adv <= clipped_r * adv
            if s.dual_clip is not None and adv < 0 and -s.dual_clip * adv < pg:
                pg, unclipped_active = -s.dual_clip * adv, False
            loss += c * kept[t] * pg
            # ∂r/∂π_t = r: the token's own ratio, or at sequence level its row's (GSPO-token).
            if unclipped_active:
                grad[i, t] = -c * kept[t] * r * adv
    n_valid = sum(lengths)
    stats = {
        "loss": loss,
        "clip_frac": n_clipped / n_valid,
        "masked_frac": (n_valid - n_kept) / n_valid,
        "behav_weight_mean": sum(raw_weights) / n_valid,
        "behav_weight_max": max(raw_weights),
        "ratio_mean": sum(ratios) / n_valid,
    }
    return loss, stats, grad


def token_scale(case: Case, agg: LossAgg) -> torch.Tensor:
    """TrainBatch.loss_scale for the case's rows, from the code's `loss_scales`."""
    lengths = [int(n) for n in case.batch.loss_mask.sum(dim=1)]
    scales = loss_scales(lengths, agg, AGG_TOKENS)
    return torch.tensor(scales).unsqueeze(1) * case.batch.loss_mask


# IcePop: tokens (or completions) with a weight outside [floor, cap] leave the loss.
ICEPOP = LossSettings(behav_weight_cap=1.5, behav_weight_floor=0.6)
BOUNDS = {
    "plain": LossSettings(),
    "cap_floor_mask": ICEPOP,
    # TIS with a floor: the weight clamped into [floor, cap].
    "floor_clamp": replace(ICEPOP, behav_weight_cap=2.0, behav_weight_mode=WeightBoundMode.clamp),
    # Asymmetric clip, dual clip, IcePop bounds and the lag mask at once.
    "everything": replace(
        ICEPOP, eps_clip_low=0.1, eps_clip_high=0.3, dual_clip=2.5, token_max_lag=2
    ),
}


def run_loss(
    case: Case, prox: torch.Tensor, settings: LossSettings, scale: torch.Tensor
) -> tuple[torch.Tensor, object, torch.Tensor]:
    pi = case.pi.clone().requires_grad_(True)
    loss, stats = decoupled_ppo_loss(
        pi,
        prox,
        case.batch.behav_logprobs,
        case.batch.advantages,
        case.batch.loss_mask,
        case.batch.versions,
        V,
        settings,
        token_scale=scale,
    )
    loss.backward()
    assert pi.grad is not None
    return loss, stats, pi.grad


@pytest.mark.parametrize("mode", list(ProxMode))
@pytest.mark.parametrize("bounds", list(BOUNDS))
@pytest.mark.parametrize("ratio_level", list(Level))
@pytest.mark.parametrize("weight_level", list(Level))
@pytest.mark.parametrize("agg", list(LossAgg))
def test_variants_match_the_per_token_reference(
    mode: ProxMode, bounds: str, ratio_level: Level, weight_level: Level, agg: LossAgg
) -> None:
    settings = replace(BOUNDS[bounds], ratio_level=ratio_level, behav_weight_level=weight_level)
    for seed in range(2):
        case = random_case(seed)
        recomputed = case.pi + 0.3 * torch.randn(case.batch.loss_mask.shape)
        # The proximal values of the prox mode (no gradient); loglinear's depend on π.
        prox = select_proximal(
            mode,
            logprobs=case.pi,
            segment_prox=case.batch.prox_logprobs,
            behav_logprobs=case.batch.behav_logprobs,
            versions=case.batch.versions,
            train_version=V,
            recomputed=recomputed,
        )
        loss, stats, grad = run_loss(case, prox, settings, token_scale(case, agg))
        want, want_stats, want_grad = reference(case, prox, settings, agg)
        assert float(loss.detach()) == pytest.approx(want, rel=1e-5, abs=1e-7)
        summary = stats.summary()
        for key, value in want_stats.items():
            assert summary[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
        torch.testing.assert_close(grad, want_grad, rtol=1e-4, atol=1e-7)


def test_the_sequence_cases_mask_clamp_and_clip_whole_rows() -> None:
    """Guard against a reference test that passes because nothing happens at sequence level."""
    case = random_case(0)
    seq = BOUNDS["cap_floor_mask"]
    seq = replace(seq, behav_weight_level=Level.sequence)
    _, masked, _ = reference(case, case.batch.prox_logprobs, seq, LossAgg.token_mean)
    assert 0 < masked["masked_frac"] < 1
    gspo = LossSettings(ratio_level=Level.sequence, eps_clip_low=0.05, eps_clip_high=0.05)
    _, clipped, _ = reference(case, case.batch.prox_logprobs, gspo, LossAgg.token_mean)
    assert 0 < clipped["clip_frac"] < 1


def test_without_a_token_scale_the_token_mean_is_the_old_loss() -> None:
    """train.loss_agg=token-mean, the default, keeps the loss sdp always had: Σ / Σ loss_mask."""
    case = random_case(3)
    settings = BOUNDS["everything"]
    args = (
        case.pi,
        case.batch.prox_logprobs,
        case.batch.behav_logprobs,
        case.batch.advantages,
        case.batch.loss_mask,
        case.batch.versions,
        V,
    )
    old, _ = decoupled_ppo_loss(*args, settings)
    new, _ = decoupled_ppo_loss(*args, settings, token_scale=token_scale(case, LossAgg.token_mean))
    assert float(new) == pytest.approx(float(old), rel=1e-6)


@pytest.mark.parametrize("on_policy", [True, False])
def test_sequence_ratio_with_sequence_mean_is_gspo(on_policy: bool) -> None:
    """seq-mean-token-mean with ratio_level=sequence is GSPO's objective itself:
    (1/S)·Σ_i −W_i·min(s_i·A_i, clip(s_i)·A_i) with s_i = exp(mean_t(π − p)), gradient through
    the mean, written here one completion at a time; W_i = 1 on policy (μ = p), else the
    sequence-level behaviour weight exp(mean_t(p − μ))."""
    case = random_case(4)
    if on_policy:
        case = Case(replace(case.batch, behav_logprobs=case.batch.prox_logprobs.clone()), case.pi)
    settings = LossSettings(
        eps_clip_low=0.1,
        eps_clip_high=0.1,
        ratio_level=Level.sequence,
        behav_weight_level=Level.sequence,
        behav_weight_cap=None,
    )
    scale = token_scale(case, LossAgg.seq_mean_token_mean)
    loss, _, grad = run_loss(case, case.batch.prox_logprobs, settings, scale)

    pi = case.pi.clone().requires_grad_(True)
    rows = case.batch.loss_mask.shape[0]
    total = torch.zeros(())
    for i in range(rows):
        tokens = case.batch.loss_mask[i].nonzero().flatten().tolist()
        s_i = torch.exp(
            torch.stack([pi[i, t] - case.batch.prox_logprobs[i, t] for t in tokens]).mean()
        )
        log_w = [
            float(case.batch.prox_logprobs[i, t] - case.batch.behav_logprobs[i, t]) for t in tokens
        ]
        w_i = math.exp(sum(log_w) / len(tokens))
        a = float(case.batch.advantages[i, 0])
        total = total - w_i * torch.minimum(s_i * a, s_i.clamp(0.9, 1.1) * a)
    total = total / rows
    total.backward()
    assert float(loss.detach()) == pytest.approx(float(total.detach()), rel=1e-5)
    torch.testing.assert_close(grad, pi.grad, rtol=1e-4, atol=1e-7)


# --- one batch cut into ranks and micro-batches -------------------------------------------


def cut_loss(samples: list, world_size: int, budget: int, settings: LossSettings) -> float:
    """Σ over ranks and micro-batches of each micro-batch's loss, as the (sharded) actor sums
    them into the gradient."""
    total = 0.0
    for share in split_across_ranks(samples, world_size):
        for chunk in split_by_token_budget(share, budget):
            batch = collate(chunk, pad_id=0)
            pi = synthetic_logprobs(batch.prox_logprobs, batch.behav_logprobs)
            loss, _ = decoupled_ppo_loss(
                pi,
                batch.prox_logprobs,
                batch.behav_logprobs,
                batch.advantages,
                batch.loss_mask,
                batch.versions,
                V,
                settings,
                token_scale=batch.loss_scale,
            )
            total += float(loss)
    return total


@pytest.mark.parametrize("drop_truncated", [False, True])
@pytest.mark.parametrize("levels", [(Level.token, Level.token), (Level.sequence, Level.sequence)])
@pytest.mark.parametrize("agg", list(LossAgg))
def test_the_aggregate_is_the_same_however_the_batch_is_cut(
    agg: LossAgg, levels: tuple[Level, Level], drop_truncated: bool
) -> None:
    """Rank 0 computes every token's coefficient over the whole batch before splitting it, so
    one rank, two or three, with large or tiny micro-batches, all make the reference's loss."""
    sample_settings = SampleSettings(
        loss_agg=agg, agg_tokens=AGG_TOKENS, drop_truncated=drop_truncated
    )
    samples = flatten_groups(random_groups(7), sample_settings)
    settings = replace(BOUNDS["everything"], ratio_level=levels[0], behav_weight_level=levels[1])
    case = case_of(collate(samples, pad_id=0))
    want, _, _ = reference(case, case.batch.prox_logprobs, settings, agg)
    for world_size in (1, 2, 3):
        for budget in (10_000, 30):
            got = cut_loss(samples, world_size, budget, settings)
            assert got == pytest.approx(want, rel=1e-5, abs=1e-7), (world_size, budget)


# --- advantages, overlong, settings -------------------------------------------------------


def test_adv_norm_none_leaves_the_advantage_undivided() -> None:
    rewards = [1.0, 0.0, 0.5, 0.5]
    assert group_advantages(rewards, 1e-6, divide_by_std=False) == [0.5, -0.5, 0.0, 0.0]
    assert group_advantages([0.3, 0.3], 1e-6, divide_by_std=False) == [0.0, 0.0]
    groups = random_groups(1)
    samples = flatten_groups(groups, SampleSettings(adv_norm=AdvNorm.none))
    want = []
    for group in groups:
        mean = sum(group.rewards) / len(group.rewards)
        want += [r - mean for r in group.rewards]
    assert [s.advantage for s in samples] == pytest.approx(want)


def test_overlong_filter_leaves_truncated_completions_out_of_the_loss_only() -> None:
    groups = random_groups(2)
    kept = flatten_groups(groups, SampleSettings(drop_truncated=True))
    everything = flatten_groups(groups, SampleSettings())
    truncated = [s.truncated for g in groups for s in g.samples]
    assert 0 < sum(truncated) < len(truncated)
    # The advantages are those of the whole group: the filter only drops rows.
    assert [s.advantage for s in kept] == [
        s.advantage for s, cut in zip(everything, truncated, strict=True) if not cut
    ]
    # And the denominators count the trained completions only.
    assert kept[0].loss_scale == pytest.approx(1.0 / sum(len(s.output_ids) for s in kept))


def test_loss_scales_follow_their_definitions() -> None:
    assert loss_scales([2, 3, 5], LossAgg.token_mean, 9) == pytest.approx([0.1] * 3)
    assert loss_scales([2, 4], LossAgg.seq_mean_token_mean, 9) == pytest.approx([1 / 4, 1 / 8])
    assert loss_scales([2, 4], LossAgg.seq_mean_token_sum_norm, 8) == pytest.approx([1 / 16] * 2)
    assert loss_scales([], LossAgg.token_mean, 8) == []


@pytest.mark.parametrize("buffer", [4, 1, 30])
def test_overlong_penalty_is_daps_soft_punishment(buffer: int) -> None:
    rollout = RolloutConfig(
        max_new_tokens=16, overlong=Overlong.penalty, overlong_buffer=buffer, overlong_penalty=0.5
    )
    cache = min(buffer, 16)
    for n in range(17):
        # DAPO's R_length: 0 up to L − L_cache, then linearly down to −1 at L.
        r_length = 0.0 if n <= 16 - cache else (16 - cache - n) / cache
        assert -overlong_penalty(n, rollout) == pytest.approx(0.5 * max(r_length, -1.0)), n
    assert overlong_penalty(16, replace(rollout, overlong=Overlong.filter)) == 0.0


class OneRewardTask:
    name = "one"
    stop_token_ids = (2,)

    def reward(self, completion: str, meta: dict) -> float:
        return 1.0


@pytest.mark.parametrize("overlong", list(Overlong))
def test_the_workflow_keeps_the_finish_reason_and_applies_the_penalty(overlong: Overlong) -> None:
    rollout = RolloutConfig(max_new_tokens=8, overlong=overlong, overlong_buffer=4)
    workflow = RLVRWorkflow(OneRewardTask(), None, lambda ids: "x", rollout, eos_token_id=2)  # type: ignore[arg-type]
    completion = Completion(output_ids=[5] * 7, logprobs=[-1.0] * 7, versions=[0] * 7)
    completion.finish_reason = "length"
    sample = workflow.to_trajectory(Prompt("p", [1, 3]), completion)
    assert sample.truncated and sample.finish_reason == "length"
    # 7 tokens, 3 past max − buffer = 4: penalty 3/4.
    assert sample.reward == pytest.approx(0.25 if overlong == Overlong.penalty else 1.0)


def test_the_keys_are_checked_and_reach_the_settings() -> None:
    cfg = load_config(
        overrides=[
            "train.loss_agg=seq-mean-token-sum-norm",
            "train.adv_norm=none",
            "train.ratio_level=sequence",
            "train.behav_weight_level=sequence",
            "rollout.overlong=filter",
            "rollout.max_new_tokens=24",
        ]
    )
    samples = SampleSettings.from_config(cfg.train, cfg.rollout)
    assert samples == SampleSettings(
        adv_eps=cfg.train.adv_eps,
        adv_norm=AdvNorm.none,
        loss_agg=LossAgg.seq_mean_token_sum_norm,
        agg_tokens=24,
        drop_truncated=True,
    )
    loss = LossSettings.from_config(cfg.train)
    assert loss.ratio_level == Level.sequence and loss.behav_weight_level == Level.sequence
    fixed = replace(cfg.train, loss_agg_tokens=100)
    assert SampleSettings.from_config(fixed, cfg.rollout).agg_tokens == 100
    for bad in ("train.loss_agg=seq-mean", "train.ratio_level=group", "rollout.overlong=cut"):
        with pytest.raises(ConfigError, match=bad.split("=")[0]):
            load_config(overrides=[bad])
    with pytest.raises(ConfigError, match="loss_agg_tokens"):
        load_config(overrides=["train.loss_agg_tokens=0"])


def test_the_actor_trains_every_variant_and_says_which(tiny_model_dir: Path) -> None:
    variants = {
        "train.loss_agg": "seq-mean-token-sum-norm",
        "train.adv_norm": "none",
        "train.ratio_level": "sequence",
        "train.behav_weight_level": "sequence",
        "rollout.overlong": "filter",
    }
    cfg = load_config(overrides=[f"{k}={v}" for k, v in variants.items()] + ["train.kl_coef=0.1"])
    actor = Actor(tiny_model_dir, cfg.train, seed=0, rollout=cfg.rollout)
    groups = random_groups(5, n_groups=3, size=3)
    stats = actor.train_step(groups, V)
    assert stats["skipped"] == 0.0 and math.isfinite(stats["loss"]) and stats["grad_norm"] > 0
    for key, value in variants.items():
        assert stats[f"{key}={value}"] == 1.0
    assert stats["train.loss_agg_tokens"] == float(cfg.rollout.max_new_tokens)
    truncated = [s.truncated for g in groups for s in g.samples]
    assert 0 < sum(truncated) < len(truncated)
    assert stats["truncated_frac"] == pytest.approx(sum(truncated) / len(truncated))
    # The filtered completions are not trained on.
    assert stats["n_tokens"] == sum(
        len(s.output_ids) for g in groups for s in g.samples if not s.truncated
    )
    default = Actor(tiny_model_dir, TrainConfig(), seed=0).train_step(groups, V)
    assert default["train.loss_agg=token-mean"] == 1.0 and default["rollout.overlong=none"] == 1.0


def _one_step_on_two_ranks(cfg: SdpConfig, model_dir: Path, groups: list, out: Path) -> None:
    with trainer_actor(cfg, model_dir, out / "logs") as actor:
        (out / "stats.json").write_text(json.dumps(actor.train_step(groups, V)))


def test_two_ranks_take_the_same_variant_step_as_one(tiny_model_dir: Path, tmp_path: Path) -> None:
    """The sharded trainer gets the rollout keys and the loss scales travel with the samples:
    with per-completion aggregation, sequence-level ratio and weight, the overlong filter and
    the KL penalty, two ranks with small micro-batches take the one-rank step."""
    overrides = [
        "train.loss_agg=seq-mean-token-mean",
        "train.ratio_level=sequence",
        "train.behav_weight_level=sequence",
        "rollout.overlong=filter",
        "train.kl_coef=0.05",
        "train.micro_batch_tokens=40",
    ]
    one = load_config(overrides=overrides)
    groups = random_groups(8, n_groups=4, size=3)
    expected = Actor(tiny_model_dir, one.train, seed=0, rollout=one.rollout).train_step(groups, V)

    two = load_config(overrides=[*overrides, "train.world_size=2"])
    two = replace(two, train=replace(two.train, master_port=free_port()))
    process = multiprocessing.get_context("spawn").Process(
        target=_one_step_on_two_ranks, args=(two, tiny_model_dir, groups, tmp_path)
    )
    process.start()
    process.join(120.0)
    if process.is_alive():
        process.kill()
        pytest.fail("rank 0 did not finish in time")
    assert process.exitcode == 0
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert stats["n_tokens"] == expected["n_tokens"]
    assert stats["loss"] == pytest.approx(expected["loss"], abs=1e-6)
    assert stats["grad_norm"] == pytest.approx(expected["grad_norm"], rel=1e-5)
    assert stats["train.loss_agg=seq-mean-token-mean"] == 1.0
