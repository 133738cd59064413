"""Rollout groups → padded training tensors and token-budget micro-batches."""

from __future__ import annotations

import pytest
import torch

from sdp_cli.rollout.trajectory import RolloutGroup, Trajectory
from sdp_cli.trainer.advantages import group_advantages
from sdp_cli.trainer.batch import (
    build_micro_batches,
    collate,
    flatten_groups,
    split_by_token_budget,
)

PAD = 0


def traj(prompt: list[int], output: list[int], reward: float, version: int = 3) -> Trajectory:
    n = len(output)
    return Trajectory(
        prompt_ids=prompt,
        output_ids=output,
        behav_logprobs=[-0.1 * (i + 1) for i in range(n)],
        versions=[version - (i % 2) for i in range(n)],
        reward=reward,
    )


def groups() -> list[RolloutGroup]:
    first = RolloutGroup(0, [traj([1, 5], [7, 8, 2], 1.0), traj([1, 5], [9], 0.0)])
    second = RolloutGroup(
        1,
        [traj([1, 6, 6, 6], [7, 2], 0.5), traj([1, 6, 6, 6], [], 0.25)],
    )
    second.samples[0].prox_logprobs = [-5.0, -6.0]
    return [first, second]


def test_layout_left_pads_prompts_and_aligns_outputs() -> None:
    (batch,) = build_micro_batches(groups(), settings=1e-6, micro_batch_tokens=10_000, pad_id=PAD)
    # The empty completion has no token to train on.
    assert batch.input_ids.tolist() == [
        [PAD, PAD, 1, 5, 7, 8, 2],
        [PAD, PAD, 1, 5, 9, PAD, PAD],
        [1, 6, 6, 6, 7, 2, PAD],
    ]
    assert batch.output_start == 4 and batch.n_output_cols == 3
    assert batch.attention_mask.tolist() == [
        [0, 0, 1, 1, 1, 1, 1],
        [0, 0, 1, 1, 1, 0, 0],
        [1, 1, 1, 1, 1, 1, 0],
    ]
    assert batch.position_ids[0].tolist()[2:] == [0, 1, 2, 3, 4]
    assert batch.position_ids[2].tolist()[:6] == [0, 1, 2, 3, 4, 5]
    assert batch.loss_mask.tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0]]
    assert batch.output_ids.tolist() == [[7, 8, 2], [9, PAD, PAD], [7, 2, PAD]]
    assert batch.versions.tolist() == [[3, 2, 3], [3, 0, 0], [3, 2, 0]]
    assert batch.n_tokens == 6


def test_proximal_is_mu_unless_recomputed() -> None:
    (batch,) = build_micro_batches(groups(), 1e-6, 10_000, PAD)
    torch.testing.assert_close(batch.behav_logprobs[0], torch.tensor([-0.1, -0.2, -0.3]))
    torch.testing.assert_close(batch.prox_logprobs[0], batch.behav_logprobs[0])
    torch.testing.assert_close(batch.prox_logprobs[2], torch.tensor([-5.0, -6.0, 0.0]))


def test_advantages_come_from_the_whole_group() -> None:
    (batch,) = build_micro_batches(groups(), 1e-6, 10_000, PAD)
    first = group_advantages([1.0, 0.0], 1e-6)
    # The empty completion still counts in its group's mean and std.
    second = group_advantages([0.5, 0.25], 1e-6)
    assert batch.advantages[0].tolist() == pytest.approx([first[0]] * 3)
    assert batch.advantages[1].tolist() == pytest.approx([first[1], 0.0, 0.0])
    assert batch.advantages[2].tolist() == pytest.approx([second[0], second[0], 0.0])


def test_token_budget_splits_into_consecutive_micro_batches() -> None:
    samples = flatten_groups(groups(), 1e-6)
    # Padded sizes: rows × (longest prompt + longest output).
    assert [len(c) for c in split_by_token_budget(samples, 10)] == [2, 1]
    assert [len(c) for c in split_by_token_budget(samples, 5)] == [1, 1, 1]
    assert [len(c) for c in split_by_token_budget(samples, 21)] == [3]
    batches = build_micro_batches(groups(), 1e-6, 10, PAD)
    assert [b.input_ids.shape for b in batches] == [torch.Size([2, 5]), torch.Size([1, 6])]
    assert sum(b.n_tokens for b in batches) == 6


def test_a_sample_needs_a_prompt_token() -> None:
    group = RolloutGroup(0, [traj([], [5], 1.0), traj([1], [5], 0.0)])
    with pytest.raises(ValueError, match="prompt token"):
        build_micro_batches([group], 1e-6, 100, PAD)


def test_collate_rejects_an_empty_list() -> None:
    with pytest.raises(ValueError, match="empty"):
        collate([], PAD)


def test_padding_fraction_counts_the_padded_positions() -> None:
    from sdp_cli.trainer.actor import padding_fraction
    from sdp_cli.trainer.batch import TokenSample

    def sample(prompt: int, output: int) -> TokenSample:
        zeros = [0.0] * output
        return TokenSample([5] * prompt, [6] * output, zeros, zeros, [0] * output, 1.0, 0.0)

    # Rows of 3 + 4 positions: the first sample fills them, the second has 1 + 2 of 7.
    batch = collate([sample(3, 4), sample(1, 2)], pad_id=0)
    assert padding_fraction([batch]) == pytest.approx(4 / 14)
    assert padding_fraction([collate([sample(2, 2)], pad_id=0)]) == 0.0
