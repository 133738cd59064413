"""The learning-rate schedule: linear warm-up, then constant, linear or cosine decay.

The rate is a pure function of the step (the version being trained), so a resumed run continues
the schedule exactly without any scheduler state in the checkpoint.
"""

from __future__ import annotations

import math

from sdp_cli.config.train_settings import LrSchedule, TrainConfig


def lr_at(step: int, train: TrainConfig) -> float:
    """The learning rate of the 0-based training step `step`."""
    base = train.lr
    warmup = train.warmup_steps
    if step < warmup:
        return base * (step + 1) / warmup
    schedule = LrSchedule(train.lr_schedule)
    if schedule == LrSchedule.constant:
        return base
    decay_steps = max(train.steps - warmup, 1)
    progress = min(max(step - warmup, 0) / decay_steps, 1.0)
    floor = base * train.min_lr_ratio
    if schedule == LrSchedule.linear:
        return floor + (base - floor) * (1.0 - progress)
    return floor + (base - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
