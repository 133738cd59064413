"""Sequence packing: rows, and the actor's logprobs and gradients packed vs padded."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from sdp_cli.config.train_settings import TrainConfig
from sdp_cli.trainer.actor import Actor
from sdp_cli.trainer.batch import build_micro_batches
from sdp_cli.trainer.packing import first_fit_rows, pack_batch
from tests.unit.trainer.test_actor import PROMPTS, stale_groups


def test_first_fit_rows_places_each_sequence_once_within_the_longest() -> None:
    lengths = [5, 3, 2, 4, 1, 5]
    rows = first_fit_rows(lengths)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= max(lengths) for row in rows)
    # 20 tokens in rows of 5: four rows, none padded.
    assert len(rows) == 4
    assert first_fit_rows(lengths, capacity=100) == [[0, 5, 3, 1, 2, 4]]


def test_packed_rows_hold_the_real_tokens_with_positions_from_zero(tiny_model_dir: Path) -> None:
    actor = Actor(tiny_model_dir, TrainConfig(), seed=0)
    groups = stale_groups(actor, version=2)
    (batch,) = build_micro_batches(groups, 1e-6, 10_000, actor.pad_id)
    packed = pack_batch(batch, actor.pad_id)
    assert packed.input_ids.shape[0] < batch.input_ids.shape[0]
    assert packed.real_tokens == int(batch.attention_mask.sum())
    assert packed.input_ids.numel() < batch.input_ids.numel()
    # Each predictor is followed by the output token it predicts.
    real = batch.attention_mask[:, batch.output_start :].bool()
    following = packed.input_ids[packed.predictor_rows, packed.predictor_cols + 1]
    assert torch.equal(following, batch.output_ids[real])
    starts = (packed.position_ids == 0).sum().item()
    assert starts >= batch.input_ids.shape[0]


@pytest.mark.parametrize(("temperature", "row_tokens"), [(1.0, 0), (0.7, 0), (1.0, 10_000)])
def test_packed_sequences_train_like_padded_ones(
    tiny_model_dir: Path, temperature: float, row_tokens: int
) -> None:
    """Each token sees its own sequence only: the same logprobs, statistics and gradients as
    the padded batch, with less padding (none in one row of every sequence)."""
    actors = [
        Actor(
            tiny_model_dir,
            replace(TrainConfig(), pack_sequences=pack, pack_row_tokens=row_tokens, lr=0.0),
            seed=0,
            temperature=temperature,
        )
        for pack in (False, True)
    ]
    assert [actor.packs_sequences for actor in actors] == [False, True]
    groups = stale_groups(actors[0], version=3)
    padded, packed = (actor.train_step(groups, version=3) for actor in actors)
    for key in ("loss", "grad_norm", "clip_frac", "entropy", "kl"):
        assert packed[key] == pytest.approx(padded[key], rel=1e-4, abs=1e-6), key
    assert packed["padding_frac"] < padded["padding_frac"]
    assert (packed["padding_frac"] == 0) == (row_tokens > 0)
    for x, y in zip(actors[0].model.parameters(), actors[1].model.parameters(), strict=True):
        torch.testing.assert_close(x.grad, y.grad, rtol=1e-4, atol=1e-6)
    outputs = [[9, 9, 2], [10, 11, 12, 13, 14, 15, 2], [7]]
    scores = [actor.score(PROMPTS, outputs) for actor in actors]
    for a, b in zip(*scores, strict=True):
        assert a == pytest.approx(b, abs=1e-5)


def test_packing_without_the_chunked_head_is_not_applied(tiny_model_dir: Path) -> None:
    train = replace(TrainConfig(), pack_sequences=True, logit_chunk_tokens=0)
    assert not Actor(tiny_model_dir, train, seed=0).packs_sequences
