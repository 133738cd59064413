"""`textarena`: a single-player game of the TextArena library (PyPI `textarena`, the `textarena`
extra) as a multi-turn environment, offline.

`task.game` names the game (default `GuessTheNumber-v0`: guess 1–20 within 10 turns, told
"higher" or "lower"; only a number in square brackets counts). Each data position is one game,
seeded by `task.seed` and the position, so a position always plays the same game; held-out games
are seeded apart (they never meet a training seed). The adapter runs TextArena's loop:
`reset(num_players=1, seed)`, `get_observation()` for the first message, `step(action)` after
each model turn, and `close()` for the rewards once the game is done. TextArena's observation
repeats the whole game so far; the episode already holds it, so each step's message is only what
is new, without the echo of the model's own move. A reward above 1 or below 0 is clipped to
[0, 1] (a lost game is 0).
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from typing import Any

from sdp_cli.config.task_settings import TaskConfig
from sdp_cli.errors import ConfigError, MissingDependencyError
from sdp_cli.tasks.base import Prompt
from sdp_cli.tasks.environment import ChatMessage, EnvStep

# Seeds of held-out games start here; training seeds stay below it.
EVAL_SEED_BASE = 1 << 30
PLAYER = 0


def _import_textarena() -> Any:
    try:
        import textarena
    except ImportError as exc:
        raise MissingDependencyError(
            "task=textarena needs the 'textarena' package: pip install 'sdp[textarena]' "
            "(textarena==0.7.4)"
        ) from exc
    return textarena


def check_textarena_config(cfg: TaskConfig) -> str:
    """The game exists and makes (for `--dry-run`)."""
    ta = _import_textarena()
    try:
        ta.make(cfg.game)
    except Exception as exc:  # TextArena raises its own errors for an unknown id
        raise ConfigError(
            "task.game", f"TextArena cannot make '{cfg.game}': {exc}", "e.g. GuessTheNumber-v0"
        ) from None
    return f"TextArena game {cfg.game} makes"


class TextArenaTask:
    """The games' instances: one seed per data position (the prompt text is only a label)."""

    name = "textarena"

    def __init__(self, game: str, seed: int, stop_token_ids: tuple[int, ...]) -> None:
        self.game = game
        self.seed = seed
        self.stop_token_ids = stop_token_ids

    def _prompt(self, game_seed: int) -> Prompt:
        label = f"{self.game} seed {game_seed}"
        return Prompt(label, [], {"game": self.game, "game_seed": game_seed}, question=label)

    def sample_prompt(self, position: int) -> Prompt:
        mixed = zlib.crc32(f"{self.seed}:{position}".encode()) % EVAL_SEED_BASE
        return self._prompt(mixed)

    def eval_prompts(self, n: int) -> list[Prompt]:
        return [self._prompt(EVAL_SEED_BASE + self.seed * 100_003 + i) for i in range(n)]

    def reward(self, completion_text: str, meta: Mapping[str, Any]) -> float:
        # A game is scored by playing it (TextArenaEnv), never from one completion.
        return 0.0


class TextArenaEnv:
    def __init__(self, game: str) -> None:
        self.env = _import_textarena().make(game)
        self.seen = ""

    def reset(self, instance: Mapping[str, Any]) -> list[ChatMessage]:
        self.env.reset(num_players=1, seed=int(instance["game_seed"]))
        return [{"role": "user", "content": self._new_observation()}]

    def step(self, model_message: str) -> EnvStep:
        done, _ = self.env.step(model_message)
        if done:
            rewards, _ = self.env.close()
            reward = float((rewards or {}).get(PLAYER, 0.0))
            return EnvStep([], done=True, reward=min(1.0, max(0.0, reward)))
        return EnvStep([{"role": "user", "content": self._new_observation()}], done=False)

    def _new_observation(self) -> str:
        _, observation = self.env.get_observation()
        text = str(observation)
        new = text[len(self.seen) :] if text.startswith(self.seen) else text
        self.seen = text
        # The model's own move comes back as "[Player] ..."; the episode holds it already.
        lines = [line for line in new.splitlines() if not line.startswith("[Player]")]
        return "\n".join(lines).strip()
