"""Chat templates, held-out splits, math-verify rewards, reasoning-gym datasets and data files
read through Hugging Face `datasets`."""

from __future__ import annotations

import copy
import json
from dataclasses import replace
from pathlib import Path

import pytest
from transformers import PreTrainedTokenizerBase

from sdp_cli.config import load_config
from sdp_cli.config.task_settings import TaskConfig
from sdp_cli.errors import ConfigError
from sdp_cli.tasks import PromptFormat, Task, decode_completion, get_task, load_tokenizer
from sdp_cli.tasks.math import math_verify_reward

# A chat template over the tiny model's character vocabulary: each turn opens with <bos> and
# ends with <pad>, a special token that is not EOS, as an instruct model's end-of-turn is.
TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<bos>{{ m['role'] }}:{{ m['content'] }}<pad>{% endfor %}"
    "{% if add_generation_prompt %}<bos>assistant:{% endif %}"
)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path) -> PreTrainedTokenizerBase:
    return load_tokenizer(tiny_model_dir)


@pytest.fixture(scope="module")
def chat_tokenizer(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    chat = copy.deepcopy(tokenizer)
    chat.chat_template = TINY_CHAT_TEMPLATE
    return chat


def make_task(tokenizer: PreTrainedTokenizerBase, **fields: object) -> Task:
    return get_task(replace(TaskConfig(), **fields), tokenizer)


def chain_sum(tokenizer: PreTrainedTokenizerBase, **fields: object) -> Task:
    options = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}
    fields = {"dataset_size": 400, **fields}
    return make_task(
        tokenizer, name="reasoning_gym", dataset="chain_sum", dataset_config=options, **fields
    )


# --- chat templates ---


def test_chat_template_formats_the_prompt_once_with_its_tokens(
    chat_tokenizer: PreTrainedTokenizerBase,
) -> None:
    task = make_task(chat_tokenizer, system_prompt="be brief")
    prompt = task.sample_prompt(0)
    bos, pad = chat_tokenizer.bos_token_id, chat_tokenizer.pad_token_id
    digits = prompt.meta["target"][::-1]
    rendered = f"<bos>system:be brief<pad><bos>user:{digits}=<pad><bos>assistant:"
    assert prompt.prompt_ids == chat_tokenizer(rendered, add_special_tokens=False)["input_ids"]
    assert prompt.prompt_ids.count(bos) == 3 and prompt.prompt_ids.count(pad) == 2
    assert prompt.text == rendered
    # Generation stops at EOS and at the template's end-of-turn token.
    assert task.stop_token_ids == (chat_tokenizer.eos_token_id, pad)


def test_chat_template_false_and_a_model_without_one_use_plain_text(
    chat_tokenizer: PreTrainedTokenizerBase, tokenizer: PreTrainedTokenizerBase
) -> None:
    for tok, mode in ((chat_tokenizer, "false"), (tokenizer, "auto")):
        prompt = make_task(tok, chat_template=mode).sample_prompt(0)
        assert prompt.prompt_ids == [tok.bos_token_id, *tok(prompt.text)["input_ids"]]
        assert make_task(tok, chat_template=mode).stop_token_ids == (tok.eos_token_id,)
    plain = make_task(tokenizer, system_prompt="hi").sample_prompt(0)
    assert plain.text.startswith("hi\n")


def test_chat_template_true_without_one_is_a_config_error(
    tokenizer: PreTrainedTokenizerBase,
) -> None:
    with pytest.raises(ConfigError, match=r"task\.chat_template"):
        make_task(tokenizer, chat_template="true")
    with pytest.raises(ConfigError, match=r"task\.chat_template"):
        load_config(overrides=["task.chat_template=maybe"])


def test_chat_template_accepts_yaml_booleans(chat_tokenizer: PreTrainedTokenizerBase) -> None:
    cfg = load_config(overrides=["task.chat_template=false"])
    fmt = PromptFormat.from_config(cfg.task, chat_tokenizer)
    assert not fmt.use_chat_template


def test_decode_completion_stops_at_the_end_of_turn(
    chat_tokenizer: PreTrainedTokenizerBase,
) -> None:
    one, two = (chat_tokenizer.convert_tokens_to_ids(c) for c in "12")
    pad = chat_tokenizer.pad_token_id
    assert decode_completion(chat_tokenizer, [one, pad, two], (pad,)) == "1"
    assert decode_completion(chat_tokenizer, [one, pad, two]) == "12"


# --- held-out split ---


def _tasks(tokenizer: PreTrainedTokenizerBase) -> dict[str, Task]:
    return {
        "reverse": make_task(tokenizer, name="reverse", min_len=1, max_len=2),
        "copy": make_task(tokenizer, name="copy", min_len=3, max_len=6),
        "math_jsonl": make_task(
            tokenizer, name="math_jsonl", path="builtin:math_small", eval_fraction=0.3
        ),
        "reasoning_gym": chain_sum(tokenizer),
    }


@pytest.mark.parametrize("name", ["reverse", "copy", "math_jsonl", "reasoning_gym"])
def test_eval_prompts_never_appear_in_training(
    name: str, tokenizer: PreTrainedTokenizerBase
) -> None:
    task = _tasks(tokenizer)[name]
    held_out = task.eval_prompts(4)
    assert len({p.text for p in held_out}) == 4
    assert [p.text for p in task.eval_prompts(4)] == [p.text for p in held_out]
    trained = {task.sample_prompt(i).text for i in range(600)}
    assert not trained & {p.text for p in held_out}
    for prompt in held_out:
        assert prompt.meta  # rewardable like a training prompt


def test_asking_for_more_held_out_prompts_than_exist_names_the_key(
    tokenizer: PreTrainedTokenizerBase,
) -> None:
    task = make_task(tokenizer, name="reverse", min_len=1, max_len=1)
    with pytest.raises(ConfigError, match=r"task\.eval_fraction"):
        task.eval_prompts(11)
    with pytest.raises(ConfigError, match=r"task\.eval_fraction"):
        load_config(overrides=["task.eval_fraction=1.0"])


# --- math-verify ---


@pytest.mark.parametrize(
    ("completion", "answer", "reward"),
    [
        ("so it is \\boxed{72}.", "#### 72", 1.0),
        ("half: 0.5", "\\frac{1}{2}", 1.0),
        ("\\boxed{\\frac{3}{4}}", "3/4", 1.0),
        ("it costs 1,000 dollars", "reasoning... #### 1000", 1.0),
        ("#### 7.0", "7", 1.0),
        ("7 no wait 8", "#### 7", 0.0),
        ("I think 6", "5", 0.0),
        ("", "5", 0.0),
    ],
)
def test_math_verify_reward(completion: str, answer: str, reward: float) -> None:
    assert math_verify_reward(completion, {"answer": answer}) == reward


def test_math_files_through_datasets_with_configurable_fields(
    tmp_path: Path, tokenizer: PreTrainedTokenizerBase
) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"problem": f"what is {i} + 1?", "solution": f"\\boxed{{{i + 1}}}"} for i in range(30)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "data.parquet")
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for name in ("data.parquet", "data.jsonl"):
        task = make_task(
            tokenizer,
            name="math_jsonl",
            path=str(tmp_path / name),
            question_field="problem",
            answer_field="solution",
            prompt_template="{question}",
        )
        prompt = task.sample_prompt(0)
        i = int(prompt.text.split()[2])
        assert task.reward(f"{i + 1}", prompt.meta) == 1.0
        assert task.reward(f"{i + 2}", prompt.meta) == 0.0
    with pytest.raises(ConfigError, match=r"task\.question_field"):
        make_task(tokenizer, name="math_jsonl", path=str(tmp_path / "data.jsonl"))


# --- reasoning-gym ---


def test_reasoning_gym_is_seeded_and_scored_by_the_dataset(
    tokenizer: PreTrainedTokenizerBase,
) -> None:
    task = chain_sum(tokenizer)
    again = chain_sum(tokenizer)
    prompts = [task.sample_prompt(i) for i in range(20)]
    assert [again.sample_prompt(i) for i in range(20)] == prompts
    assert [chain_sum(tokenizer, seed=1).sample_prompt(i) for i in range(20)] != prompts
    for prompt in prompts:
        assert "=" in prompt.text
        answer = prompt.meta["answer"]
        assert task.reward(answer, prompt.meta) == 1.0
        assert task.reward(f"<answer>{answer}</answer>", prompt.meta) == 1.0
        assert task.reward(str(int(answer) + 1), prompt.meta) == 0.0


def test_reasoning_gym_last_number_extraction(tokenizer: PreTrainedTokenizerBase) -> None:
    whole = chain_sum(tokenizer)
    last = chain_sum(tokenizer, answer_extract="last_number")
    prompt = whole.sample_prompt(0)
    answer = prompt.meta["answer"]
    sentence = f"The final answer is {answer}."
    # The dataset's score_answer gives a sentence only partial credit; its last number is exact.
    assert 0.0 < whole.reward(sentence, prompt.meta) < 1.0
    assert last.reward(sentence, prompt.meta) == 1.0
    assert last.reward(f"{answer} plus 1 is {int(answer) + 1}", prompt.meta) == 0.0
    assert last.reward("no number", prompt.meta) == 0.0


def test_reasoning_gym_composes_from_the_task_group() -> None:
    cfg = load_config(
        overrides=[
            "task=reasoning_gym",
            "task.dataset=chain_sum",
            "task.dataset_config.max_terms=3",
        ]
    )
    assert cfg.task.name == "reasoning_gym" and cfg.task.dataset_config == {"max_terms": 3}
    both = load_config(overrides=["task=reasoning_gym", "task.dataset_config={a: 1, b: 2}"])
    assert both.task.dataset_config == {"a": 1, "b": 2}
    with pytest.raises(ConfigError, match=r"task\.dataset"):
        load_config(overrides=["task=reasoning_gym", "task.dataset=null"])


def test_reasoning_gym_bad_names_and_options_are_config_errors(
    tokenizer: PreTrainedTokenizerBase,
) -> None:
    with pytest.raises(ConfigError, match=r"task\.dataset'"):
        make_task(tokenizer, name="reasoning_gym", dataset="no_such_dataset")
    with pytest.raises(ConfigError, match=r"task\.dataset_config"):
        make_task(tokenizer, name="reasoning_gym", dataset="chain_sum", dataset_config={"bogus": 1})
