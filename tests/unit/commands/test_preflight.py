"""`sdp train --dry-run` checks everything it can without starting servers (model directory,
task data file and each of its lines, `task.reward_fn`'s import, registry file, devices, run
directory) and exits 2 naming the key, with no traceback; `sdp train` runs the same checks
before it starts anything. Every config in the repository's `conf/` passes them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sdp_cli.cli import app
from tests import REPO

runner = CliRunner()
EXAMPLES = sorted((REPO / "conf").rglob("*.yaml"))
# Needs a CUDA GPU, a model directory and a data file this machine does not have.
GPU_EXAMPLE = REPO / "conf" / "examples" / "qwen2.5-1.5b-gsm8k.yaml"


def dry_run(tmp_path: Path, *overrides: str) -> tuple[int, str]:
    result = runner.invoke(app, ["train", "--dry-run", f"run.dir={tmp_path}/run", *overrides])
    return result.exit_code, result.output


def refused(tmp_path: Path, key: str, *overrides: str, hint: str = "") -> str:
    code, output = dry_run(tmp_path, *overrides)
    assert code == 2, output
    assert f"'{key}'" in output, output
    assert hint in output, output
    assert "Traceback" not in output
    return output


def test_conf_holds_examples() -> None:
    assert REPO / "conf" / "examples" / "tiny-reverse.yaml" in EXAMPLES


@pytest.mark.parametrize(
    "path", [e for e in EXAMPLES if e != GPU_EXAMPLE], ids=lambda p: str(p.relative_to(REPO))
)
def test_every_config_in_conf_passes_a_dry_run(path: Path, tmp_path: Path) -> None:
    code, output = dry_run(tmp_path, f"conf={path}")
    assert code == 0, output
    assert "checked: task" in output and "capacity plan" in output


def test_the_gpu_example_composes_and_its_dry_run_names_the_missing_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("QWEN_DIR", str(tmp_path / "no-qwen"))
    shown = runner.invoke(app, ["config", "show", f"conf={GPU_EXAMPLE}"])
    assert shown.exit_code == 0, shown.output
    assert "device: cuda" in shown.output and f"path: {tmp_path}/no-qwen" in shown.output
    code, output = dry_run(tmp_path, f"conf={GPU_EXAMPLE}")
    assert code == 2 and "'model.path'" in output and "no-qwen" in output, output


def test_a_dry_run_says_what_it_checked(tmp_path: Path) -> None:
    code, output = dry_run(tmp_path, "task=math_jsonl", "task.path=builtin:math_small")
    assert code == 0, output
    assert "math_small.jsonl: 26 records" in output
    assert "vLLM CPU server" in output and "trainer device cpu" in output


def test_missing_model_directory(tmp_path: Path) -> None:
    refused(tmp_path, "model.path", f"model.path={tmp_path}/nomodel", hint="not found")


def test_model_directory_without_a_tokenizer(tmp_path: Path) -> None:
    model = tmp_path / "weights-only"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "llama"}))
    refused(tmp_path, "model.path", f"model.path={model}", hint="cannot read the model's shape")
    shape = {"hidden_size": 128, "num_attention_heads": 2, "max_position_embeddings": 256}
    (model / "config.json").write_text(json.dumps({"model_type": "llama", **shape}))
    refused(tmp_path, "model.path", f"model.path={model}", hint="tokenizer")


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


GOOD = json.dumps({"question": "1+1?", "answer": "#### 2"})


@pytest.mark.parametrize(
    ("lines", "hint"),
    [
        ([GOOD, "{not json"], ":2: not valid JSON"),
        ([GOOD, GOOD, json.dumps({"question": "q"})], ":3: each line needs"),
        ([json.dumps({"question": "q", "answer": "none"})], ":1: the answer has no number"),
        ([], "has no records"),
    ],
)
def test_each_line_of_the_task_data_is_checked(tmp_path: Path, lines: list[str], hint: str) -> None:
    data = write_lines(tmp_path / "data.jsonl", lines)
    refused(tmp_path, "task.path", "task=math_jsonl", f"task.path={data}", hint=hint)


def test_missing_task_data_file(tmp_path: Path) -> None:
    refused(
        tmp_path, "task.path", "task=math_jsonl", f"task.path={tmp_path}/no.jsonl", hint="not found"
    )


def test_a_prompt_template_with_another_field(tmp_path: Path) -> None:
    refused(
        tmp_path,
        "task.prompt_template",
        "task=math_jsonl",
        "task.path=builtin:math_small",
        "task.prompt_template='{question} {answer}'",
        hint="{question}",
    )


def test_unknown_task_name(tmp_path: Path) -> None:
    refused(tmp_path, "task.name", "task.name=sorting", hint="reverse")


@pytest.mark.parametrize(
    ("dotted", "hint"),
    [
        ("no_such_module_xyz:reward", "cannot import module 'no_such_module_xyz'"),
        ("json:no_such_function", "has no function 'no_such_function'"),
        ("reward", "not a dotted path"),
        ("broken_reward_module:reward", "ZeroDivisionError"),
    ],
)
def test_reward_fn_is_imported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dotted: str, hint: str
) -> None:
    (tmp_path / "broken_reward_module.py").write_text("1 / 0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    refused(tmp_path, "task.reward_fn", f"task.reward_fn={dotted}", hint=hint)


def test_a_reward_fn_that_imports_passes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "my_reward_module.py").write_text("def reward(text, meta):\n    return 1.0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    code, output = dry_run(tmp_path, "task.reward_fn=my_reward_module:reward")
    assert code == 0, output
    assert "my_reward_module:reward imports" in output


@pytest.mark.parametrize(
    ("content", "hint"),
    [
        (None, "not found"),
        ("{", "not valid JSON"),
        ('{"server": []}', 'no "servers" list'),
        ('{"servers": [{"address": "http://127.0.0.1:1"}]}', "malformed entry"),
    ],
)
def test_registry_file_is_read(tmp_path: Path, content: str | None, hint: str) -> None:
    registry = tmp_path / "servers.json"
    if content is not None:
        registry.write_text(content)
    refused(tmp_path, "server.registry", f"server.registry={registry}", hint=hint)


def test_a_registry_of_dead_servers(tmp_path: Path) -> None:
    entry = {
        "address": "http://127.0.0.1:1",
        "pid": 1,
        "pgid": 1,
        "model": "m",
        "version": 0,
        "state": "dead",
        "restarts": 3,
        "started_at": 0.0,
    }
    registry = tmp_path / "servers.json"
    registry.write_text(json.dumps({"servers": [entry]}))
    refused(tmp_path, "server.registry", f"server.registry={registry}", hint="dead")


def test_trainer_on_cuda_without_cuda(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    refused(tmp_path, "train.device", "train.device=cuda", hint="CUDA is not available")


def test_servers_on_cuda_without_enough_devices(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    code, output = dry_run(tmp_path, "server=gpu", "server.count=2", "server.max_model_len=256")
    assert code == 2, output
    assert "server.count=2" in output and "server.tensor_parallel_size" in output
    assert "Traceback" not in output


def test_resume_without_a_checkpoint(tmp_path: Path) -> None:
    refused(tmp_path, "resume", "resume=true", hint="no checkpoint")


def test_a_run_directory_that_holds_a_run(tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "events.jsonl").write_text("")
    refused(tmp_path, "run.dir", hint="already holds a run")
    code, output = dry_run(tmp_path, "run.overwrite=true")
    assert code == 0, output


def test_a_memory_weights_dir_needs_dev_shm_and_local_servers(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sdp_cli.weight_sync import versions

    code, output = dry_run(tmp_path, "train.weights_dir=memory")
    assert code == 0 and "weight exports in /dev/shm/sdp-weights-" in output, output
    refused(
        tmp_path,
        "train.weights_dir",
        "train.weights_dir=memory",
        "server.backend=ray",
        "ray.address=10.0.0.1:6379",
        hint="other nodes",
    )
    refused(
        tmp_path,
        "train.weights_dir",
        "train.weights_dir=memory",
        # A million exports of the model do not fit.
        f"model.path={tiny_model_dir}",
        "train.keep_weights=1000000",
        hint="--shm-size",
    )
    monkeypatch.setattr(versions, "MEMORY_ROOT", tmp_path / "no-shm")
    monkeypatch.setattr("sdp_cli.commands.preflight.MEMORY_ROOT", tmp_path / "no-shm")
    refused(tmp_path, "train.weights_dir", "train.weights_dir=memory", hint="does not have")


def test_train_checks_before_it_starts_anything(tmp_path: Path) -> None:
    """Without --dry-run the same checks stop `sdp train` before the run directory or a server
    exists (a server would take tens of seconds to start)."""
    result = runner.invoke(
        app,
        ["train", f"run.dir={tmp_path}/run", "task=math_jsonl", f"task.path={tmp_path}/no.jsonl"],
    )
    assert result.exit_code == 2, result.output
    assert "'task.path'" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "run").exists()


def test_a_head_size_the_cpu_servers_cannot_serve(tmp_path: Path) -> None:
    refused(tmp_path, "model.num_heads", "model.num_heads=8", "server=cpu", hint="head_dim is 16")
    model = tmp_path / "narrow-heads"
    model.mkdir()
    shape = {"hidden_size": 64, "num_attention_heads": 4, "max_position_embeddings": 512}
    (model / "config.json").write_text(json.dumps(shape))
    refused(tmp_path, "model.path", f"model.path={model}", "server=cpu", hint="head_dim is 16")


def test_max_model_len_beyond_the_model(tmp_path: Path, tiny_model_dir: Path) -> None:
    refused(
        tmp_path,
        "server.max_model_len",
        f"model.path={tiny_model_dir}",
        "server.max_model_len=512",
        hint="max_position_embeddings (256)",
    )


def test_prompts_that_leave_no_room_for_the_completion(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    math = ["task=math_jsonl", "task.path=builtin:math_small", f"model.path={tiny_model_dir}"]
    code, output = dry_run(tmp_path, *math)
    assert code == 0, output
    assert "all 26 prompts fit" in output
    refused(
        tmp_path,
        "server.max_model_len",
        *math,
        "server.max_model_len=64",
        hint="the longest prompt has",
    )
    refused(
        tmp_path,
        "server.max_model_len",
        f"model.path={tiny_model_dir}",
        "task.max_len=9",
        "rollout.max_new_tokens=250",
        hint="rollout.max_new_tokens=250",
    )


def test_episodes_must_fit_the_context_and_a_micro_batch(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    episodes = ["task=feedback", "task.base=reverse", f"model.path={tiny_model_dir}"]
    code, output = dry_run(tmp_path, *episodes)
    assert code == 0, output
    assert "episodes fit: at most 255 tokens" in output
    refused(
        tmp_path,
        "rollout.max_episode_tokens",
        *episodes,
        "rollout.max_episode_tokens=300",
        hint="server.max_model_len − 1 = 255",
    )
    refused(
        tmp_path, "train.micro_batch_tokens", *episodes, "train.micro_batch_tokens=100", hint="255"
    )


def test_launch_servers_checks_the_head_size_before_starting(tmp_path: Path) -> None:
    result = runner.invoke(
        app, ["launch-servers", f"run.dir={tmp_path}/run", "model.num_heads=8", "server=cpu"]
    )
    assert result.exit_code == 2, result.output
    assert "'model.num_heads'" in result.output and "head_dim is 16" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "run").exists()


def test_a_sample_longer_than_a_micro_batch_is_refused(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    refused(
        tmp_path,
        "train.micro_batch_tokens",
        f"model.path={tiny_model_dir}",
        "rollout.max_new_tokens=200",
        "train.micro_batch_tokens=128",
        hint="set train.micro_batch_tokens=",
    )


@pytest.mark.parametrize(
    ("args", "hint"),
    [
        ("[--enable-chunked-prefill]", "remove --enable-chunked-prefill"),
        ("[--long-prefill-token-threshold,64]", "remove --long-prefill-token-threshold"),
        ("[--max-num-batched-tokens,64]", "--max-num-batched-tokens 256 or more"),
    ],
)
def test_cpu_server_flags_that_would_split_a_prefill_are_refused(
    tmp_path: Path, args: str, hint: str
) -> None:
    refused(tmp_path, "server.extra_args", "server=cpu", f"server.extra_args={args}", hint=hint)


@pytest.mark.parametrize(
    ("overrides", "key", "hint"),
    [
        (["train.lora.target_modules=[q_proj,lm_head]"], "train.lora.target_modules", "lm_head"),
        (["train.lora.target_modules=[embed_tokens]"], "train.lora.target_modules", "linear"),
        (["server.extra_args=[--max-lora-rank,8]"], "server.extra_args", "below"),
    ],
)
def test_lora_settings_the_servers_cannot_serve_are_refused(
    tmp_path: Path, overrides: list[str], key: str, hint: str
) -> None:
    refused(tmp_path, key, "train.lora.rank=16", *overrides, hint=hint)


def test_a_lora_dry_run_names_the_server_flags(tmp_path: Path) -> None:
    code, output = dry_run(tmp_path, "train.lora.rank=8")
    assert code == 0, output
    assert "--enable-lora --max-lora-rank 8 --max-loras 4 --max-cpu-loras 8" in output
