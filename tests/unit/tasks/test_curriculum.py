"""task.curriculum: the level rises with the step or the training reward, each data position
keeps the level it was handed out at (across a checkpoint and resume), the levels come from
reasoning-gym's own chain_sum curriculum, and bad settings are config errors naming the key."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import pytest
from transformers import PreTrainedTokenizerBase

from sdp_cli.config import load_config
from sdp_cli.config.task_settings import CurriculumConfig, TaskConfig
from sdp_cli.errors import ConfigError
from sdp_cli.tasks import (
    CurriculumState,
    LevelChange,
    Schedule,
    check_task,
    curriculum_of,
    get_task,
    load_tokenizer,
)
from sdp_cli.tasks.curriculum import level_options

OPTIONS = {"min_terms": 3, "max_terms": 3, "min_digits": 1, "max_digits": 1}


def step_schedule(**fields: object) -> Schedule:
    return Schedule(CurriculumConfig(**{"mode": "step", "every_steps": 3, **fields}))


def reward_schedule(**fields: object) -> Schedule:
    defaults = {"mode": "reward", "window": 3, "reward_threshold": 0.5, "end_level": 2}
    return Schedule(CurriculumConfig(**{**defaults, **fields}))


def test_step_mode_raises_one_level_every_n_steps_up_to_the_end_level() -> None:
    schedule = step_schedule(start_level=1, end_level=3)
    levels, changes = [], []
    for steps_done in range(1, 13):
        change = schedule.after_step(steps_done, reward=0.0, next_position=10 * steps_done)
        changes += [change] if change else []
        levels.append(schedule.level)
    assert levels == [1, 1, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3]
    assert changes == [LevelChange(3, 30, 2), LevelChange(6, 60, 3)]


def test_each_position_keeps_the_level_it_was_handed_out_at() -> None:
    schedule = step_schedule(end_level=2)
    schedule.after_step(3, 0.0, next_position=12)
    schedule.after_step(6, 0.0, next_position=25)
    assert [schedule.level_at(p) for p in (0, 11, 12, 24, 25, 1000)] == [0, 0, 1, 1, 2, 2]


def test_reward_mode_waits_for_a_full_window_at_the_threshold() -> None:
    schedule = reward_schedule()
    rewards = [0.9, 0.9, 0.1, 0.6, 0.6, 0.6, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9]
    levels = []
    for steps_done, reward in enumerate(rewards, start=1):
        schedule.after_step(steps_done, reward, next_position=steps_done)
        levels.append(schedule.level)
    # Steps 1-3 average 0.63 >= 0.5: up. The window starts again at the new level: steps 4-6
    # average 0.6: up to 2, the end; no further rise.
    assert levels == [0, 0, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2]


def test_reward_mode_does_not_rise_below_the_threshold() -> None:
    schedule = reward_schedule(reward_threshold=0.7)
    for steps_done in range(1, 30):
        schedule.after_step(steps_done, 0.69, next_position=steps_done)
    assert schedule.level == 0


def run_schedule(schedule: Schedule, rewards: list[float], first_step: int) -> None:
    for offset, reward in enumerate(rewards):
        steps_done = first_step + offset + 1
        schedule.after_step(steps_done, reward, next_position=4 * steps_done)


@pytest.mark.parametrize("mode", ["step", "reward"])
def test_a_schedule_restored_from_its_checkpoint_state_decides_as_if_never_stopped(
    mode: str,
) -> None:
    rewards = [0.2, 0.8, 0.8, 0.8, 0.3, 0.9, 0.9, 0.9, 0.9, 0.1]
    make = step_schedule if mode == "step" else reward_schedule
    whole = make(end_level=3)
    run_schedule(whole, rewards, 0)
    first = make(end_level=3)
    run_schedule(first, rewards[:5], 0)
    # Through JSON, as the checkpoint's state.json holds it.
    saved = CurriculumState.from_json(first.state().to_json())
    resumed = make(end_level=3)
    resumed.restore(saved)
    run_schedule(resumed, rewards[5:], 5)
    assert resumed.state().changes == whole.state().changes
    assert len(whole.state().changes) >= 3, "the rewards above move it twice or more"
    assert [resumed.level_at(p) for p in range(60)] == [whole.level_at(p) for p in range(60)]


def test_a_checkpoint_with_levels_this_run_does_not_have_is_refused() -> None:
    first = step_schedule(end_level=3)
    run_schedule(first, [0.0] * 9, 0)
    narrower = step_schedule(end_level=1)
    with pytest.raises(ConfigError) as caught:
        narrower.restore(first.state())
    assert caught.value.key == "task.curriculum.end_level"


def test_levels_follow_reasoning_gyms_chain_sum_curriculum() -> None:
    cfg = CurriculumConfig(mode="step", attributes=["num_terms", "num_digits"])
    assert level_options("chain_sum", OPTIONS, cfg, 0) == {
        **OPTIONS,
        "min_terms": 2,
        "max_terms": 2,
    }
    assert level_options("chain_sum", OPTIONS, cfg, 1) == {
        "min_terms": 3,
        "max_terms": 3,
        "min_digits": 2,
        "max_digits": 2,
    }
    only_terms = CurriculumConfig(mode="step", attributes=["num_terms"])
    # An attribute not named keeps task.dataset_config's value.
    assert (
        level_options("chain_sum", {**OPTIONS, "max_digits": 2}, only_terms, 2)["max_digits"] == 2
    )


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path) -> PreTrainedTokenizerBase:
    return load_tokenizer(tiny_model_dir)


def curriculum_task(tokenizer: PreTrainedTokenizerBase, **curriculum: object):  # type: ignore[no-untyped-def]
    cfg = replace(
        TaskConfig(),
        name="reasoning_gym",
        dataset="chain_sum",
        dataset_config=dict(OPTIONS),
        dataset_size=400,
        eval_fraction=0.3,
        curriculum=CurriculumConfig(**{"mode": "step", "every_steps": 2, **curriculum}),
    )
    return get_task(cfg, tokenizer)


def terms(question: str) -> int:
    expression = question.split(":")[-1]
    return len(re.findall(r"\d+", expression))


def test_training_prompts_follow_the_level_and_evaluation_stays_on_the_target(
    tokenizer: PreTrainedTokenizerBase,
) -> None:
    task = curriculum_task(tokenizer)
    schedule = curriculum_of(task)
    assert schedule is not None and schedule.level == 0
    easy = [task.sample_prompt(p) for p in range(20)]
    schedule.after_step(2, 0.0, next_position=10)
    assert [p.meta["level"] for p in easy] == [0] * 20
    after = [task.sample_prompt(p) for p in range(20)]
    assert [p.meta["level"] for p in after] == [0] * 10 + [1] * 10
    assert [p.text for p in after[:10]] == [p.text for p in easy[:10]], "handed out before"
    assert {terms(p.text) for p in after[:10]} == {2}
    assert {terms(p.text) for p in after[10:]} == {3}
    held_out = task.eval_prompts(16)
    assert {terms(p.text) for p in held_out} == {3}
    assert all("level" not in p.meta for p in held_out)
    # No held-out question is trained on, at any level.
    eval_texts = {p.text for p in task.eval_prompts(len(held_out))}
    assert not eval_texts & {task.sample_prompt(p).text for p in range(400)}


def test_the_reward_scores_against_the_level_the_prompt_came_from(
    tokenizer: PreTrainedTokenizerBase,
) -> None:
    task = curriculum_task(tokenizer)
    curriculum_of(task).after_step(2, 0.0, next_position=1)  # type: ignore[union-attr]
    for position in (0, 1):
        prompt = task.sample_prompt(position)
        assert terms(prompt.text) == 2 + position
        answer = str(sum(int(t) for t in re.findall(r"-?\s*\d+", prompt.text.replace(" ", ""))))
        assert answer == prompt.meta["answer"]
        assert task.reward(f"<answer>{answer}</answer>", prompt.meta) == 1.0
        assert task.reward("<answer>-999</answer>", prompt.meta) == 0.0


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (
            [
                "task.curriculum.mode=step",
                "task.curriculum.end_level=0",
                "task.curriculum.start_level=1",
            ],
            "task.curriculum.end_level",
        ),
        (["task.curriculum.mode=sometimes"], "task.curriculum.mode"),
        (
            ["task.curriculum.mode=step", "task.curriculum.every_steps=0"],
            "task.curriculum.every_steps",
        ),
        (
            ["task.curriculum.mode=reward", "task.curriculum.reward_threshold=1.5"],
            "task.curriculum.reward_threshold",
        ),
        (["task=reverse", "task.curriculum.mode=step"], "task.curriculum.mode"),
    ],
)
def test_bad_settings_are_config_errors_naming_the_key(overrides: list[str], key: str) -> None:
    base = ["task=reasoning_gym"] if not any(o.startswith("task=") for o in overrides) else []
    with pytest.raises(ConfigError) as caught:
        load_config(None, [*base, *overrides])
    assert caught.value.key == key


@pytest.mark.parametrize(
    ("curriculum", "key", "allowed"),
    [
        ({"attributes": ["num_words"]}, "task.curriculum.attributes", "num_terms, num_digits"),
        ({"end_level": 11}, "task.curriculum.end_level", "at most 10"),
    ],
)
def test_unknown_attributes_and_levels_are_refused_before_the_run(
    curriculum: dict[str, object], key: str, allowed: str
) -> None:
    cfg = replace(
        TaskConfig(),
        name="reasoning_gym",
        dataset="chain_sum",
        curriculum=CurriculumConfig(mode="step", **curriculum),  # type: ignore[arg-type]
    )
    with pytest.raises(ConfigError) as caught:
        check_task(cfg)
    assert caught.value.key == key
    assert allowed in str(caught.value)
