"""The actor on the tiny model: logprobs, train_step, determinism, micro-batching, prox modes."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from sdp_cli.config.train_settings import ProxMode, TrainConfig
from sdp_cli.rollout.trajectory import RolloutGroup, Trajectory
from sdp_cli.trainer.actor import Actor

PROMPTS = [[1, 5, 6, 7, 45], [1, 8, 45], [1, 5, 5, 5, 5, 5, 5, 5, 45]]
OUTPUTS = [[9, 9, 2], [10, 11, 12, 13, 14, 15, 2], [7]]


def make_actor(model_dir: Path, **train: object) -> Actor:
    return Actor(model_dir, replace(TrainConfig(), **train), seed=0)


def on_policy_groups(actor: Actor, version: int = 0) -> list[RolloutGroup]:
    """Two groups of completions whose μ are the actor's own logprobs (fresh tokens)."""
    groups = []
    for g, prompt in enumerate(PROMPTS[:2]):
        outputs = [OUTPUTS[(g + k) % 3] for k in range(3)]
        behav = actor.score([prompt] * 3, outputs)
        samples = [
            Trajectory(prompt, out, lp, [version] * len(out), reward=float(k == g))
            for k, (out, lp) in enumerate(zip(outputs, behav, strict=True))
        ]
        groups.append(RolloutGroup(rollout_id=g, samples=samples))
    return groups


def stale_groups(actor: Actor, version: int) -> list[RolloutGroup]:
    """Groups whose tokens come from versions v−2..v with μ and p off the current policy."""
    groups = on_policy_groups(actor, version)
    for group in groups:
        for i, sample in enumerate(group.samples):
            n = len(sample.output_ids)
            sample.versions = [version - (t + i) % 3 for t in range(n)]
            sample.behav_logprobs = [
                lp - 0.3 * ((t + i) % 3) for t, lp in enumerate(sample.behav_logprobs)
            ]
            sample.prox_logprobs = [lp + 0.25 for lp in sample.behav_logprobs]
    return groups


def weights(actor: Actor) -> list[torch.Tensor]:
    return [p.detach().clone() for p in actor.model.parameters()]


def test_padded_batch_logprobs_match_one_sequence_at_a_time(tiny_model_dir: Path) -> None:
    actor = make_actor(tiny_model_dir)
    together = actor.score(PROMPTS, OUTPUTS)
    for prompt, output, got in zip(PROMPTS, OUTPUTS, together, strict=True):
        with torch.no_grad():
            logits = actor.model(torch.tensor([prompt + output])).logits[0]
        full = torch.log_softmax(logits, dim=-1)
        want = [float(full[len(prompt) - 1 + i, tok]) for i, tok in enumerate(output)]
        assert got == pytest.approx(want, abs=1e-5)


def test_train_step_reports_the_loss_statistics(tiny_model_dir: Path) -> None:
    actor = make_actor(tiny_model_dir)
    stats = actor.train_step(stale_groups(actor, version=4), version=4)
    for key in (
        "loss",
        "clip_frac",
        "masked_frac",
        "behav_weight_mean",
        "behav_weight_max",
        "ratio_mean",
        "grad_norm",
        "reward_mean",
        "step_time_s",
        "tokens_lag_0",
        "tokens_lag_2",
    ):
        assert key in stats, key
    assert stats["n_tokens"] == 2 * sum(len(o) for o in OUTPUTS)
    assert stats["grad_norm"] > 0 and stats["behav_weight_mean"] > 1.0
    assert stats["reward_mean"] == pytest.approx(1 / 3)


def test_train_step_is_deterministic(tiny_model_dir: Path) -> None:
    results = []
    for _ in range(2):
        actor = make_actor(tiny_model_dir)
        groups = stale_groups(actor, version=2)
        stats = [actor.train_step(groups, version=2) for _ in range(2)]
        results.append((weights(actor), [s["loss"] for s in stats]))
    (w1, loss1), (w2, loss2) = results
    assert loss1 == loss2
    assert all(torch.equal(a, b) for a, b in zip(w1, w2, strict=True))


def test_the_fused_optimizer_steps_like_torchs_default_adamw(tiny_model_dir: Path) -> None:
    """The actor's fused AdamW moves the weights as the one-tensor-at-a-time AdamW would."""
    fused = make_actor(tiny_model_dir, lr=1e-2, weight_decay=0.1)
    plain = make_actor(tiny_model_dir, lr=1e-2, weight_decay=0.1)
    plain.optimizer = torch.optim.AdamW(
        plain.model.parameters(), lr=1e-2, weight_decay=0.1, foreach=False
    )
    assert fused.optimizer.defaults["fused"] and not plain.optimizer.defaults["fused"]
    groups = stale_groups(fused, version=2)
    before = weights(fused)
    for actor in (fused, plain):
        for _ in range(2):
            actor.train_step(groups, version=2)
    moved = weights(fused)
    assert any(not torch.equal(a, b) for a, b in zip(before, moved, strict=True))
    # Each step moves a weight by about lr; the two kernels round differently, far below that.
    for a, b in zip(moved, weights(plain), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_the_lm_head_in_chunks_trains_like_every_logit_at_once(
    tiny_model_dir: Path, temperature: float
) -> None:
    """A chunk of 5 positions over padded micro-batches: the same statistics and gradients as
    making every output logit at once."""
    actors = [
        Actor(
            tiny_model_dir,
            replace(TrainConfig(), logit_chunk_tokens=chunk, lr=0.0),
            seed=0,
            temperature=temperature,
        )
        for chunk in (0, 5)
    ]
    assert [actor.logit_chunk_tokens for actor in actors] == [0, 5]
    groups = stale_groups(actors[0], version=3)
    whole, chunked = (actor.train_step(groups, version=3) for actor in actors)
    for key in ("loss", "grad_norm", "clip_frac", "entropy", "kl", "padding_frac"):
        assert chunked[key] == pytest.approx(whole[key], rel=1e-4, abs=1e-6), key
    assert whole["padding_frac"] > 0
    for x, y in zip(actors[0].model.parameters(), actors[1].model.parameters(), strict=True):
        torch.testing.assert_close(x.grad, y.grad, rtol=1e-4, atol=1e-6)
    scores = [actor.score(PROMPTS, OUTPUTS) for actor in actors]
    for a, b in zip(*scores, strict=True):
        assert a == pytest.approx(b, abs=1e-5)


@pytest.mark.parametrize("mode", list(ProxMode))
def test_micro_batches_accumulate_the_full_batch_gradient(
    tiny_model_dir: Path, mode: ProxMode
) -> None:
    # lr = 0 leaves the accumulated (clipped) gradients in place for comparison; comparing
    # weights after an Adam step would magnify float noise in near-zero gradients.
    whole = make_actor(tiny_model_dir, prox_mode=mode, micro_batch_tokens=10_000, lr=0.0)
    split = make_actor(tiny_model_dir, prox_mode=mode, micro_batch_tokens=12, lr=0.0)
    groups = stale_groups(whole, version=3)
    a = whole.train_step(groups, version=3)
    b = split.train_step(groups, version=3)
    assert a["n_micro_batches"] == 1 and b["n_micro_batches"] > 2
    for key in ("loss", "grad_norm", "clip_frac", "ratio_mean", "behav_weight_mean"):
        assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key
    for x, y in zip(whole.model.parameters(), split.model.parameters(), strict=True):
        torch.testing.assert_close(x.grad, y.grad, rtol=1e-4, atol=1e-7)


def test_recompute_mode_takes_p_from_the_current_weights(tiny_model_dir: Path) -> None:
    actor = make_actor(tiny_model_dir, prox_mode=ProxMode.recompute)
    stats = actor.train_step(stale_groups(actor, version=3), version=3)
    # One optimizer step per batch: π equals the no-grad pass, so nothing is clipped.
    assert stats["ratio_mean"] == pytest.approx(1.0, abs=1e-5)
    assert stats["clip_frac"] == 0.0


def test_segment_mode_uses_the_rollout_proximal_logprobs(tiny_model_dir: Path) -> None:
    actor = make_actor(tiny_model_dir, prox_mode=ProxMode.segment)
    stats = actor.train_step(stale_groups(actor, version=3), version=3)
    # p = π + 0.25 − 0.3·k, so r = exp(π − p) differs from 1 and tokens get clipped.
    assert stats["ratio_mean"] != pytest.approx(1.0, abs=1e-3)
    assert stats["clip_frac"] > 0


def test_loglinear_mode_trains_fresh_tokens_like_on_policy(tiny_model_dir: Path) -> None:
    fresh = make_actor(tiny_model_dir, prox_mode=ProxMode.loglinear)
    segment = make_actor(tiny_model_dir, prox_mode=ProxMode.segment)
    groups = on_policy_groups(fresh, version=0)
    a = fresh.train_step(groups, version=0)
    b = segment.train_step(groups, version=0)
    assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)


def test_positive_advantage_raises_the_rewarded_completion(tiny_model_dir: Path) -> None:
    actor = make_actor(tiny_model_dir, lr=1e-2)
    prompt = PROMPTS[0]
    good, bad = [20, 21, 2], [30, 31, 2]
    before = [sum(lp) for lp in actor.score([prompt, prompt], [good, bad])]
    for version in range(5):
        behav = actor.score([prompt, prompt], [good, bad])
        group = RolloutGroup(
            rollout_id=version,
            samples=[
                Trajectory(prompt, good, behav[0], [version] * 3, reward=1.0),
                Trajectory(prompt, bad, behav[1], [version] * 3, reward=0.0),
            ],
        )
        actor.train_step([group], version=version)
    after = [sum(lp) for lp in actor.score([prompt, prompt], [good, bad])]
    assert after[0] > before[0] + 1.0 and after[1] < before[1]


def test_groups_without_tokens_or_spread_leave_weights_alone(tiny_model_dir: Path) -> None:
    actor = make_actor(tiny_model_dir)
    before = weights(actor)
    empty = RolloutGroup(0, [Trajectory(PROMPTS[0], [], [], [], reward=1.0)])
    stats = actor.train_step([empty], version=0)
    assert stats["n_tokens"] == 0 and stats["grad_norm"] == 0.0
    assert all(torch.equal(a, b) for a, b in zip(before, weights(actor), strict=True))


def test_gradients_are_clipped_to_grad_clip(tiny_model_dir: Path) -> None:
    actor = make_actor(tiny_model_dir, grad_clip=1e-3, lr=0.0)
    actor.train_step(stale_groups(actor, version=1), version=1)
    norm = torch.sqrt(sum((p.grad**2).sum() for p in actor.model.parameters()))
    assert float(norm) == pytest.approx(1e-3, rel=1e-3)


def test_a_step_with_a_non_finite_loss_is_skipped_and_leaves_the_weights(
    tiny_model_dir: Path,
) -> None:
    actor = make_actor(tiny_model_dir, behav_weight_cap=None)
    before = weights(actor)
    groups = stale_groups(actor, version=2)
    groups[0].samples[0].prox_logprobs = [float("nan")] * len(groups[0].samples[0].output_ids)
    stats = actor.train_step(groups, version=2)
    assert stats["skipped"] == 1.0
    assert all(torch.equal(a, b) for a, b in zip(before, weights(actor), strict=True))
    assert all(p.grad is None for p in actor.model.parameters())
    # The optimizer took no step either: a healthy batch afterwards trains as usual.
    stats = actor.train_step(stale_groups(actor, version=3), version=3)
    assert stats["skipped"] == 0.0
    assert not all(torch.equal(a, b) for a, b in zip(before, weights(actor), strict=True))


def test_logprobs_are_of_the_tempered_distribution(tiny_model_dir: Path) -> None:
    actor = Actor(tiny_model_dir, TrainConfig(), seed=0, temperature=0.7)
    prompt, output = PROMPTS[1], OUTPUTS[1]
    (got,) = actor.score([prompt], [output])
    with torch.no_grad():
        logits = actor.model(torch.tensor([prompt + output])).logits[0]
    tempered = torch.log_softmax(logits / 0.7, dim=-1)
    want = [float(tempered[len(prompt) - 1 + i, tok]) for i, tok in enumerate(output)]
    assert got == pytest.approx(want, abs=1e-5)
    (plain,) = make_actor(tiny_model_dir).score([prompt], [output])
    assert max(abs(a - b) for a, b in zip(got, plain, strict=True)) > 1e-2
