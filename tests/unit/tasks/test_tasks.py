"""Tasks: deterministic prompts by data position, rewards, the registry and reward_fn loading."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from transformers import PreTrainedTokenizerBase

from sdp_cli.config import load_config
from sdp_cli.config.task_settings import TaskConfig
from sdp_cli.errors import ConfigError, SdpError
from sdp_cli.tasks import (
    Task,
    decode_completion,
    encode_prompt,
    get_task,
    load_reward_fn,
    load_tokenizer,
    register_task,
    task_names,
)
from sdp_cli.tasks.math import extract_answer, numbers_match, numeric_reward, resolve_data_path
from sdp_cli.tasks.strings import digit_string_reward

MATH_SMALL = "builtin:math_small"


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path) -> PreTrainedTokenizerBase:
    return load_tokenizer(tiny_model_dir)


def string_task(name: str, tokenizer: PreTrainedTokenizerBase, **fields: object) -> Task:
    return get_task(replace(TaskConfig(), name=name, **fields), tokenizer)


# --- built-in string tasks ---


@pytest.mark.parametrize("name", ["reverse", "copy"])
def test_string_prompts_are_a_function_of_the_position(
    name: str, tokenizer: PreTrainedTokenizerBase
) -> None:
    task = string_task(name, tokenizer, min_len=2, max_len=5)
    first = [task.sample_prompt(i) for i in range(50)]
    again = string_task(name, tokenizer, min_len=2, max_len=5)
    assert [again.sample_prompt(i) for i in range(50)] == first
    assert len({p.text for p in first}) > 40
    other_seed = string_task(name, tokenizer, min_len=2, max_len=5, seed=1)
    assert [other_seed.sample_prompt(i).text for i in range(50)] != [p.text for p in first]
    for prompt in first:
        digits = prompt.text.removesuffix("=")
        assert prompt.text.endswith("=") and digits.isdigit() and 2 <= len(digits) <= 5
        assert prompt.prompt_ids[0] == tokenizer.bos_token_id
        assert tokenizer.decode(prompt.prompt_ids[1:]) == prompt.text
        want = digits[::-1] if name == "reverse" else digits
        assert prompt.meta == {"target": want}
        assert task.reward(want, prompt.meta) == 1.0


def test_default_task_is_reverse_and_its_prompts_are_short(
    tokenizer: PreTrainedTokenizerBase,
) -> None:
    cfg = load_config()
    assert cfg.task.name == "reverse"
    task = get_task(cfg.task, tokenizer)
    lengths = {len(task.sample_prompt(i).prompt_ids) for i in range(100)}
    assert max(lengths) <= cfg.task.max_len + 2


@pytest.mark.parametrize(
    ("completion", "target", "reward"),
    [
        ("321", "321", 1.0),
        ("3", "321", (1 + 1 / 3) / 4),
        ("391", "321", (2 + 1) / 4),
        ("32", "321", (2 + 2 / 3) / 4),
        ("321000", "321", (3 + 1 / 2) / 4),
        ("", "321", 0.0),
        ("abc", "321", (0 + 1) / 4),
        ("123", "321", (1 + 1) / 4),
        (" 321 ", "321", 1.0),
        ("8", "7", (0 + 1) / 2),
        ("7" * 16, "7", (1 + 1 / 16) / 2),
    ],
)
def test_reverse_reward_credits_each_position_and_the_length(
    completion: str, target: str, reward: float, tokenizer: PreTrainedTokenizerBase
) -> None:
    task = string_task("reverse", tokenizer)
    assert task.reward(completion, {"target": target}) == pytest.approx(reward)


def test_digit_string_reward_is_in_unit_interval() -> None:
    for completion in ["", "1", "12", "9999999999999999", "x1", "21"]:
        for target in ["1", "12", "123"]:
            value = digit_string_reward(completion, target)
            assert 0.0 <= value <= 1.0
            assert (value == 1.0) == (completion == target)


def test_string_task_rejects_bad_lengths(tokenizer: PreTrainedTokenizerBase) -> None:
    with pytest.raises(ConfigError, match=r"task\.min_len"):
        string_task("copy", tokenizer, min_len=3, max_len=2)


# --- tokenizer helpers ---


def test_encode_prompt_adds_bos_once(tokenizer: PreTrainedTokenizerBase) -> None:
    ids = encode_prompt(tokenizer, "12=")
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1
    assert len(ids) == 4


def test_decode_completion_stops_at_eos_and_drops_special_tokens(
    tokenizer: PreTrainedTokenizerBase,
) -> None:
    one, two, three = (tokenizer.convert_tokens_to_ids(c) for c in "123")
    eos, unk = tokenizer.eos_token_id, tokenizer.unk_token_id
    beyond_vocab = len(tokenizer) + 1  # the model's vocabulary is padded past the tokenizer's
    assert decode_completion(tokenizer, [three, unk, two, beyond_vocab, one]) == "321"
    assert decode_completion(tokenizer, [three, eos, two]) == "3"
    assert decode_completion(tokenizer, [eos]) == ""


def test_load_tokenizer_from_a_dir_without_one_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"model\.path"):
        load_tokenizer(tmp_path)


# --- math_jsonl ---


@pytest.mark.parametrize(
    ("text", "number"),
    [
        ("so 3 + 4 = 7. #### 7", 7.0),
        ("#### 1,234", 1234.0),
        ("the answer is 42.", 42.0),
        ("it is -3", -3.0),
        ("0.5 of 10 is 5.0", 5.0),
        ("x #### 12 and then 99", 12.0),
        ("a #### 1 b #### 2", 2.0),
        ("no numbers here", None),
        ("#### none", None),
    ],
)
def test_extract_answer(text: str, number: float | None) -> None:
    assert extract_answer(text) == number


def test_numbers_match_numerically() -> None:
    assert numbers_match(1000.0, 1000.0000001)
    assert not numbers_match(1000.0, 1001.0)
    assert not numbers_match(None, 3.0)


def test_numeric_reward_compares_final_numbers() -> None:
    meta = {"answer": "she has 3 + 4 = <<3+4=7>>7 apples.\n#### 7"}
    assert numeric_reward("3 and 4 make 7", meta) == 1.0
    assert numeric_reward("#### 7.0", meta) == 1.0
    assert numeric_reward("7 no wait 8", meta) == 0.0
    assert numeric_reward("", meta) == 0.0


def test_math_task_walks_a_seeded_shuffle_of_every_record(
    tokenizer: PreTrainedTokenizerBase,
) -> None:
    cfg = replace(TaskConfig(), name="math_jsonl", path=MATH_SMALL)
    task = get_task(cfg, tokenizer)
    train = task.train_indices
    n = len(train)
    assert 0 < n < len(task)  # some records are held out for evaluation
    epoch0 = [task.sample_prompt(i).meta["index"] for i in range(n)]
    epoch1 = [task.sample_prompt(n + i).meta["index"] for i in range(n)]
    assert sorted(epoch0) == sorted(epoch1) == sorted(train)
    assert epoch0 != epoch1 and epoch0 != sorted(train)
    again = get_task(cfg, tokenizer)
    assert [again.sample_prompt(i) for i in range(2 * n)] == [
        task.sample_prompt(i) for i in range(2 * n)
    ]
    prompt = task.sample_prompt(3)
    assert prompt.text.startswith("question: ") and prompt.text.endswith("\nanswer:")
    answer = str(extract_answer(prompt.meta["answer"]))
    assert task.reward(f"the answer is {answer}", prompt.meta) == 1.0


def test_math_prompt_template_is_configurable(tokenizer: PreTrainedTokenizerBase) -> None:
    cfg = replace(TaskConfig(), name="math_jsonl", path=MATH_SMALL, prompt_template="q {question}")
    assert get_task(cfg, tokenizer).sample_prompt(0).text.startswith("q ")


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ("", "no records"),
        ('{"question": "q"}\n', ":1: each line needs 'question' and 'answer'"),
        ('{"question": "q", "answer": "1"}\nnot json\n', ":2: not valid JSON"),
        ('{"question": "q", "answer": "none"}\n', ":1: the answer has no number"),
    ],
)
def test_bad_math_files_are_config_errors_with_the_line(
    content: str, problem: str, tmp_path: Path, tokenizer: PreTrainedTokenizerBase
) -> None:
    path = tmp_path / "data.jsonl"
    path.write_text(content)
    cfg = replace(TaskConfig(), name="math_jsonl", path=str(path))
    with pytest.raises(ConfigError, match=r"task\.path") as info:
        get_task(cfg, tokenizer)
    assert problem in str(info.value)


def test_missing_math_file_is_a_config_error(tokenizer: PreTrainedTokenizerBase) -> None:
    cfg = replace(TaskConfig(), name="math_jsonl", path="/nonexistent/file.jsonl")
    with pytest.raises(ConfigError, match="not found"):
        get_task(cfg, tokenizer)


def test_math_task_composes_from_the_config_tree() -> None:
    cfg = load_config(overrides=["task=math_jsonl", f"task.path={MATH_SMALL}"])
    assert cfg.task.name == "math_jsonl" and cfg.task.path == MATH_SMALL


# --- registry and reward_fn ---


def test_unknown_task_names_the_key_and_the_choices(tokenizer: PreTrainedTokenizerBase) -> None:
    with pytest.raises(ConfigError, match=r"task\.name") as info:
        string_task("nope", tokenizer)
    assert "reverse" in str(info.value)


def test_register_task_adds_a_name(tokenizer: PreTrainedTokenizerBase) -> None:
    register_task("copy_alias", lambda cfg, tok: string_task("copy", tok))
    assert "copy_alias" in task_names()
    assert string_task("copy_alias", tokenizer).name == "copy"


@pytest.fixture
def reward_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    (tmp_path / "my_rewards.py").write_text(
        "def always_half(text, meta):\n    return 0.5\n"
        "def too_big(text, meta):\n    return 2\n"
        "def length(text, meta):\n    return min(len(text), 4) / 4\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "my_rewards"
    sys.modules.pop("my_rewards", None)


@pytest.mark.parametrize("sep", [":", "."])
def test_reward_fn_by_dotted_path_replaces_the_reward(
    sep: str, reward_module: str, tokenizer: PreTrainedTokenizerBase
) -> None:
    task = string_task("reverse", tokenizer, reward_fn=f"{reward_module}{sep}length")
    prompt = task.sample_prompt(0)
    assert task.reward("12", prompt.meta) == 0.5
    assert task.sample_prompt(0) == string_task("reverse", tokenizer).sample_prompt(0)


def test_reward_fn_from_an_installed_package() -> None:
    assert load_reward_fn("sdp_cli.tasks.math:numeric_reward") is numeric_reward
    assert load_reward_fn("sdp_cli.tasks.math.numeric_reward") is numeric_reward


@pytest.mark.parametrize(
    ("dotted", "problem"),
    [
        ("no_such_module_xyz:fn", "cannot import module 'no_such_module_xyz'"),
        ("sdp_cli.tasks.math:missing", "has no function 'missing'"),
        ("sdp_cli.tasks.math.DEFAULT_TEMPLATE", "has no function"),
        ("justaname", "not a dotted path"),
    ],
)
def test_unimportable_reward_fn_is_a_config_error(
    dotted: str, problem: str, tokenizer: PreTrainedTokenizerBase
) -> None:
    with pytest.raises(ConfigError, match=r"task\.reward_fn") as info:
        string_task("reverse", tokenizer, reward_fn=dotted)
    assert problem in str(info.value)


def test_reward_fn_outside_unit_interval_is_reported(
    reward_module: str, tokenizer: PreTrainedTokenizerBase
) -> None:
    task = string_task("reverse", tokenizer, reward_fn=f"{reward_module}:too_big")
    with pytest.raises(SdpError, match=r"task\.reward_fn"):
        task.reward("1", {"target": "1"})


def test_fixture_file_is_valid_gsm8k_style_jsonl() -> None:
    lines = resolve_data_path(MATH_SMALL).read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert len(records) >= 20
    assert all(extract_answer(r["answer"]) is not None for r in records)
