"""The environment protocol's tasks: task.env loading and its config errors, the feedback and
tool_calc environments, the calculator."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from transformers import PreTrainedTokenizerBase

from sdp_cli.config.task_settings import TaskConfig
from sdp_cli.errors import ConfigError
from sdp_cli.tasks import get_task, load_tokenizer
from sdp_cli.tasks.environment import EnvStep, EnvTask, instance_of
from sdp_cli.tasks.registry import check_task
from sdp_cli.tasks.tool_calc import CalcError, calculate


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path) -> PreTrainedTokenizerBase:
    return load_tokenizer(tiny_model_dir)


class EchoEnv:
    """A user environment for task.env: done at once, reward 1 when the model says 'yes'."""

    def reset(self, instance: dict[str, object]) -> list[dict[str, str]]:
        return [{"role": "user", "content": str(instance["question"])}]

    def step(self, model_message: str) -> EnvStep:
        return EnvStep([], done=True, reward=float(model_message == "yes"))


def test_task_env_plays_a_user_class_on_the_prompts_of_task_name(
    tokenizer: PreTrainedTokenizerBase,
) -> None:
    cfg = replace(TaskConfig(), name="reverse", env=f"{__name__}:EchoEnv")
    task = get_task(cfg, tokenizer)
    assert isinstance(task, EnvTask)
    env = task.make_env()
    prompt = task.sample_prompt(0)
    assert env.reset(instance_of(prompt)) == [{"role": "user", "content": prompt.question}]
    assert EnvStep.of(env.step("yes")) == EnvStep([], True, 1.0)
    assert check_task(cfg)[-1] == f"task.env {__name__}:EchoEnv imports"


@pytest.mark.parametrize(
    ("fields", "key"),
    [
        ({"env": "no_such_module_sdp:Env"}, "task.env"),
        ({"env": f"{__name__}:tokenizer_missing"}, "task.env"),
        ({"env": "nocolon"}, "task.env"),
        ({"name": "feedback", "base": "reverse", "env": f"{__name__}:EchoEnv"}, "task.env"),
        ({"name": "feedback", "base": "feedback"}, "task.base"),
        ({"name": "tool_calc", "base": "nope"}, "task.base"),
        ({"name": "feedback", "base": "reverse", "reward_fn": "math:sqrt"}, "task.reward_fn"),
        ({"env": f"{__name__}:EchoEnv", "reward_fn": "math:sqrt"}, "task.reward_fn"),
    ],
)
def test_environment_config_errors_name_the_key(fields: dict[str, str], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        check_task(replace(TaskConfig(), **fields))
    assert info.value.key == key


def test_feedback_asks_again_until_correct_or_out_of_attempts(
    tokenizer: PreTrainedTokenizerBase,
) -> None:
    cfg = replace(TaskConfig(), name="feedback", base="reverse", max_attempts=3)
    task = get_task(cfg, tokenizer)
    assert isinstance(task, EnvTask)
    prompt = task.sample_prompt(0)
    target = prompt.meta["target"]
    env = task.make_env()
    env.reset(instance_of(prompt))
    wrong = env.step("x")
    assert not wrong.done and wrong.messages[0]["content"] == "That is not correct. Try again."
    right = env.step(target)
    assert right.done and right.reward == 1.0
    env.reset(instance_of(prompt))
    steps = [env.step("x") for _ in range(3)]
    assert [s.done for s in steps] == [False, False, True] and steps[-1].reward < 1.0


@pytest.mark.parametrize(
    ("expression", "value"),
    [("12*(3+4)", "84"), ("7/2", "3.5"), ("-3 + 10 // 3", "0"), ("2^10", "1024"), ("6/3", "2")],
)
def test_the_calculator_evaluates_arithmetic(expression: str, value: str) -> None:
    assert calculate(expression) == value


@pytest.mark.parametrize(
    "expression", ["__import__('os')", "1/0", "2**100000", "x + 1", "(1", "[1, 2]"]
)
def test_the_calculator_refuses_anything_else(expression: str) -> None:
    with pytest.raises(CalcError):
        calculate(expression)


def test_tool_calc_answers_a_call_with_a_tool_message_and_scores_the_final_answer(
    tokenizer: PreTrainedTokenizerBase,
) -> None:
    cfg = replace(TaskConfig(), name="tool_calc", base="reverse", max_tool_calls=1)
    task = get_task(cfg, tokenizer)
    assert isinstance(task, EnvTask)
    prompt = task.sample_prompt(0)
    env = task.make_env()
    first = env.reset(instance_of(prompt))
    assert "<calc>" in first[0]["content"]
    call = env.step("let me see <calc>3*4</calc>")
    assert call == EnvStep([{"role": "tool", "content": "12"}], done=False, reward=0.0)
    # The call budget is spent: the next turn is scored whatever it holds.
    final = env.step(f"<calc>1+1</calc>{prompt.meta['target']}")
    assert final.done
    env.reset(instance_of(prompt))
    assert env.step(prompt.meta["target"]) == EnvStep([], done=True, reward=1.0)
