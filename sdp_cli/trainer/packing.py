"""Sequence packing: a padded micro-batch's sequences laid end to end in rows.

`TrainBatch` pads every prompt on the left and every output on the right to the longest of its
micro-batch; the padding goes through the decoder like real tokens. Packing places the
sequences whole (a sequence never spans two rows), first fit in order of decreasing length,
into rows as long as the longest one (or `train.pack_row_tokens`, when longer), so by default
the rows are no longer than the padded ones and the attention does not grow. Hugging Face's
causal LMs read the boundaries from the position ids, which restart at 0 for each sequence,
when no attention mask is given: each token attends to its own sequence only. The hidden
states predicting the output tokens are gathered back in the order of the padded batch's real
output positions, so the LM head and the loss do not change.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from sdp_cli.trainer.batch import TrainBatch


@dataclass(frozen=True)
class PackedRows:
    # [rows, T]: sequences end to end, then padding to T (a run of positions from 0 of its own).
    input_ids: Tensor
    # [rows, T]: 0 at each sequence's first token.
    position_ids: Tensor
    # [outputs]: where the hidden state predicting each real output token is, in the order
    # of the padded batch's real output positions (row by row, column by column).
    predictor_rows: Tensor
    predictor_cols: Tensor
    # Tokens of the sequences, without padding.
    real_tokens: int

    def model_inputs(self) -> dict[str, Tensor | bool]:
        """Keyword arguments of the decoder's forward: no attention mask, so the position ids
        mark where each sequence starts."""
        return {"input_ids": self.input_ids, "position_ids": self.position_ids, "use_cache": False}


def first_fit_rows(lengths: list[int], capacity: int = 0) -> list[list[int]]:
    """Indices of `lengths` grouped into rows of at most max(capacity, max(lengths)) tokens,
    first fit in order of decreasing length; within a row, in the order placed."""
    capacity = max(capacity, *lengths) if lengths else 0
    rows: list[list[int]] = []
    room: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        row = next((r for r, left in enumerate(room) if left >= lengths[index]), None)
        if row is None:
            rows.append([])
            room.append(capacity)
            row = len(rows) - 1
        rows[row].append(index)
        room[row] -= lengths[index]
    return rows


def pack_batch(batch: TrainBatch, pad_id: int, row_tokens: int = 0) -> PackedRows:
    """The sequences of `batch` (its real tokens, without padding) packed into rows."""
    mask = batch.attention_mask.bool()
    sequences = [batch.input_ids[i][mask[i]] for i in range(mask.shape[0])]
    n_outputs = mask[:, batch.output_start :].sum(dim=1).tolist()
    rows = first_fit_rows([len(s) for s in sequences], row_tokens)
    width = max((sum(len(sequences[i]) for i in row) for row in rows), default=0)
    input_ids = torch.full((len(rows), width), pad_id, dtype=batch.input_ids.dtype)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    # Where the token before each sequence's first output sits: (row, column).
    starts: dict[int, tuple[int, int]] = {}
    for r, row in enumerate(rows):
        offset = 0
        for i in row:
            n = len(sequences[i])
            input_ids[r, offset : offset + n] = sequences[i]
            position_ids[r, offset : offset + n] = torch.arange(n)
            starts[i] = (r, offset + n - n_outputs[i] - 1)
            offset += n
        position_ids[r, offset:] = torch.arange(width - offset)
    predictor_rows = [starts[i][0] for i in range(len(sequences)) for _ in range(n_outputs[i])]
    predictor_cols = [starts[i][1] + k for i in range(len(sequences)) for k in range(n_outputs[i])]
    device = batch.input_ids.device
    return PackedRows(
        input_ids=input_ids.to(device),
        position_ids=position_ids.to(device),
        predictor_rows=torch.tensor(predictor_rows, dtype=torch.long, device=device),
        predictor_cols=torch.tensor(predictor_cols, dtype=torch.long, device=device),
        real_tokens=sum(len(s) for s in sequences),
    )
