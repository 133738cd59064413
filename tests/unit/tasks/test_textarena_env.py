"""The TextArena adapter on the real `textarena` package (offline): GuessTheNumber-v0 through
reset, get_observation, step and close, and one episode of it through the multi-turn workflow."""

from __future__ import annotations

import asyncio
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from transformers import PreTrainedTokenizerBase

from sdp_cli.config.task_settings import TaskConfig
from sdp_cli.episodes.multiturn import MultiTurnWorkflow
from sdp_cli.inference import ServerPool
from sdp_cli.tasks import get_task, load_tokenizer
from sdp_cli.tasks.environment import EnvTask, instance_of
from sdp_cli.tasks.registry import check_task
from tests.unit.episodes.test_multiturn import workflow
from tests.unit.inference.test_client import A, FakeServers, answer, make_client

pytest.importorskip("textarena", reason="the dev extra installs textarena==0.7.4")


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path) -> PreTrainedTokenizerBase:
    return load_tokenizer(tiny_model_dir)


def game_task(tokenizer: PreTrainedTokenizerBase) -> EnvTask:
    task = get_task(replace(TaskConfig(), name="textarena"), tokenizer)
    assert isinstance(task, EnvTask)
    return task


def test_a_binary_search_wins_guess_the_number_with_reward_one(
    tokenizer: PreTrainedTokenizerBase,
) -> None:
    task = game_task(tokenizer)
    env = task.make_env()
    first = env.reset(instance_of(task.sample_prompt(3)))
    assert "Guess The Number" in first[0]["content"]
    low, high = 1, 20
    for _ in range(10):
        guess = (low + high) // 2
        step = env.step(f"I guess [{guess}]")
        if step.done:
            assert step.reward == 1.0
            return
        hint = step.messages[0]["content"]
        # Only what is new, without the echo of the model's own move.
        assert "[Player]" not in hint and "You are Player 0" not in hint
        if "higher" in hint:
            low = guess + 1
        else:
            assert "lower" in hint
            high = guess - 1
    pytest.fail("binary search did not finish within 10 guesses")


def test_a_game_is_a_function_of_its_position_and_held_out_games_differ(
    tokenizer: PreTrainedTokenizerBase,
) -> None:
    task = game_task(tokenizer)
    assert task.sample_prompt(5).meta == task.sample_prompt(5).meta
    train_seeds = {task.sample_prompt(p).meta["game_seed"] for p in range(50)}
    eval_seeds = {p.meta["game_seed"] for p in task.eval_prompts(8)}
    assert len(eval_seeds) == 8 and not train_seeds & eval_seeds


def test_an_unknown_game_is_a_config_error_naming_task_game() -> None:
    with pytest.raises(Exception) as info:
        check_task(replace(TaskConfig(), name="textarena", game="NoSuchGame-v0"))
    assert getattr(info.value, "key", None) == "task.game"


def test_an_episode_of_the_game_through_the_workflow(tokenizer: PreTrainedTokenizerBase) -> None:

    guesses = iter(["[10]", "[5]", "[15]"])

    def handler(address: str, path: str, body: dict[str, Any]) -> Any:
        text = next(guesses)
        ids = [*tokenizer(text, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]
        return answer(ids, "stop", [("0", 0, len(ids))])

    task = game_task(tokenizer)

    async def run() -> Any:
        client = make_client(ServerPool([A]), FakeServers(handler), max_model_len=4096)
        # The game's rules are ~500 characters: tokens, for the tiny character tokenizer.
        flow: MultiTurnWorkflow = workflow(
            tokenizer, client, task=task, cfg=TaskConfig(), max_turns=3, max_tokens=4000
        )
        return await flow.play(task.sample_prompt(0), flow.sampling(0, 0), gate=None)

    episode = asyncio.run(run())
    roles = [t["role"] for t in episode.turns]
    assert roles[:2] == ["user", "assistant"]
    texts = [t["text"] for t in episode.turns if t["role"] == "user"][1:]
    # Each distinct guess gets higher or lower (unless it was right and the game ended).
    assert texts and all(
        re.fullmatch(r"\[GAME\] The target number is (higher|lower)\.", t) for t in texts
    )
    assert episode.end_reason in ("max_turns", "done")
