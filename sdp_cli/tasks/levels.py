"""When a curriculum's level rises (`task.curriculum.mode`: with the step or with the training
reward), and which level each data position gets.

A prompt stays a pure function of its data position: the schedule records each change as
(step, position, level), positions from `position` on get `level`, and positions handed out
before a change keep the level they had, so a rollout replayed after a resume gets the same
prompt. The changes, and the reward window of mode=reward, go into the checkpoint.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from sdp_cli.config.task_settings import CurriculumConfig
from sdp_cli.errors import ConfigError


@dataclass(frozen=True)
class LevelChange:
    """From data position `position` on, training prompts are at `level`; decided after
    `step` training steps."""

    step: int
    position: int
    level: int


@dataclass
class CurriculumState:
    """What a checkpoint stores: the changes so far (the first is the start level at position
    0) and, for mode=reward, the rewards of the steps at the current level (at most `window`)."""

    changes: list[LevelChange]
    rewards: list[float] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "changes": [[c.step, c.position, c.level] for c in self.changes],
            "rewards": list(self.rewards),
        }

    @classmethod
    def from_json(cls, payload: Mapping[str, Any]) -> CurriculumState:
        changes = [LevelChange(int(s), int(p), int(lv)) for s, p, lv in payload["changes"]]
        return cls(changes, [float(r) for r in payload.get("rewards", [])])


class Schedule:
    """When the level rises. `after_step` is called by the training loop after each step (one
    thread); `level_at` by the rollout workflow on the executor's thread: it reads the change
    list once, and a change replaces the list rather than growing it."""

    def __init__(self, cfg: CurriculumConfig, state: CurriculumState | None = None) -> None:
        self.cfg = cfg
        start = CurriculumState([LevelChange(0, 0, cfg.start_level)])
        self._state = state if state is not None else start
        self._changes = tuple(self._state.changes)

    @property
    def level(self) -> int:
        return self._changes[-1].level

    def level_at(self, position: int) -> int:
        changes = self._changes
        return next(c.level for c in reversed(changes) if c.position <= position)

    def state(self) -> CurriculumState:
        return CurriculumState(list(self._changes), list(self._state.rewards))

    def restore(self, state: CurriculumState) -> None:
        """The schedule a checkpoint saved (before any prompt is sampled); its levels must lie
        within this run's start_level..end_level, which are the ones generated."""
        levels = [c.level for c in state.changes]
        low, high = self.cfg.start_level, self.cfg.end_level
        if not state.changes or not all(low <= level <= high for level in levels):
            raise ConfigError(
                "task.curriculum.end_level",
                f"the checkpoint's curriculum used levels {levels}, outside this run's "
                f"start_level..end_level ({low}..{high})",
                "resume with the task.curriculum levels the run was started with",
            )
        self._state = CurriculumState(list(state.changes), list(state.rewards))
        self._changes = tuple(state.changes)

    def after_step(
        self, steps_done: int, reward: float | None, next_position: int
    ) -> LevelChange | None:
        """Whether the level rises after `steps_done` steps, the last with mean training reward
        `reward`; positions from `next_position` (the next one handed out) get the new level."""
        target = self._target(steps_done, reward)
        if target <= self.level:
            return None
        change = LevelChange(steps_done, next_position, target)
        self._state.rewards = []
        self._changes = (*self._changes, change)
        self._state.changes = list(self._changes)
        return change

    def _target(self, steps_done: int, reward: float | None) -> int:
        cfg = self.cfg
        if cfg.mode == "step":
            return min(cfg.end_level, cfg.start_level + steps_done // cfg.every_steps)
        if cfg.mode != "reward" or reward is None:
            return self.level
        rewards = [*self._state.rewards, float(reward)][-cfg.window :]
        self._state.rewards = rewards
        full = len(rewards) == cfg.window
        if full and sum(rewards) / len(rewards) >= cfg.reward_threshold:
            return min(cfg.end_level, self.level + 1)
        return self.level
