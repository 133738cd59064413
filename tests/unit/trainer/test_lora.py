"""LoRA on the tiny model (train.lora.rank > 0): only the adapter trains and reaches the
optimizer, the weight export is the adapter alone and peft loads it to the same logprobs, the
KL reference is the model with its adapter off, checkpoints hold the adapter and its optimizer
state, `sdp export` writes the adapter or merged weights, and the config is checked."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from sdp_cli.config import config_to_yaml, load_config
from sdp_cli.config.train_settings import LoraConfig, TrainConfig
from sdp_cli.errors import ConfigError
from sdp_cli.launcher.command import (
    lora_server_args,
    vllm_command,
    vllm_env,
    with_lora_serving,
)
from sdp_cli.orchestrator.run_state import TrainState
from sdp_cli.trainer.actor import Actor
from sdp_cli.trainer.checkpoint import load_checkpoint
from sdp_cli.weight_sync.adapter_export import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    model_projection_names,
)
from tests.unit.trainer.test_checkpoint import PROMPT, train_once

OUTPUT = [7, 8, 2]


def lora_actor(model_dir: Path, rank: int = 8, **train: object) -> Actor:
    settings: dict[str, object] = {"lr": 1e-2, "lora": LoraConfig(rank=rank), **train}
    config = replace(TrainConfig(), **settings)
    return Actor(model_dir, config, seed=0)


def hf_logprobs(model: torch.nn.Module) -> list[float]:
    """log π of OUTPUT after PROMPT under a plain Hugging Face (or peft) model."""
    ids = torch.tensor([PROMPT + OUTPUT])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(PROMPT) - 1 : -1]
    return logits.log_softmax(-1).gather(-1, torch.tensor(OUTPUT)[:, None])[:, 0].tolist()


def test_only_the_adapter_is_in_the_optimizer_and_only_it_changes(tiny_model_dir: Path) -> None:
    actor = lora_actor(tiny_model_dir)
    in_optimizer = {id(p) for group in actor.optimizer.param_groups for p in group["params"]}
    names = {id(p): n for n, p in actor.model.named_parameters()}
    assert in_optimizer and all("lora_" in names[i] for i in in_optimizer)
    assert len(in_optimizer) == sum("lora_" in n for n in names.values())
    before = {n: p.detach().clone() for n, p in actor.model.named_parameters()}
    train_once(actor, 0)
    changed = {n for n, p in actor.model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in n for n in changed)
    # lora_B starts at zero and moves: the adapter trains.
    assert any("lora_B" in n for n in changed)


def test_the_export_is_the_adapter_alone_and_peft_loads_it_to_the_same_logprobs(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    actor = lora_actor(tiny_model_dir)
    train_once(actor, 0)
    out = actor.export_weights(tmp_path / "weights", 1)
    assert sorted(p.name for p in out.iterdir()) == [ADAPTER_CONFIG, ADAPTER_WEIGHTS]
    tensors = load_file(out / ADAPTER_WEIGHTS)
    assert tensors and all(".lora_A.weight" in k or ".lora_B.weight" in k for k in tensors)
    config = json.loads((out / ADAPTER_CONFIG).read_text())
    assert config["r"] == 8 and config["peft_type"] == "LORA"
    # The modules the servers put LoRA layers on (--lora-target-modules) are the adapter's.
    assert sorted(config["target_modules"]) == model_projection_names(tiny_model_dir)
    assert "lm_head" not in config["target_modules"]
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    # The update moved the policy: the export is not the base model.
    expected = actor.score([PROMPT], [OUTPUT])[0]
    assert hf_logprobs(base) != pytest.approx(expected, abs=1e-3)
    served = PeftModel.from_pretrained(base, str(out)).eval()
    assert hf_logprobs(served) == pytest.approx(expected, abs=1e-5)


def test_the_kl_reference_is_the_model_with_its_adapter_off(tiny_model_dir: Path) -> None:
    actor = lora_actor(tiny_model_dir, kl_coef=0.1)
    assert actor.reference is None
    train_once(actor, 0)
    stats = train_once(actor, 1)
    assert stats["ref_kl"] > 0
    from sdp_cli.trainer.batch import TokenSample, collate

    sample = TokenSample(PROMPT, OUTPUT, [0.0] * 3, [0.0] * 3, [0] * 3, 0.0, 0.0)
    reference = actor.reference_logprobs(collate([sample], actor.pad_id))
    assert reference is not None
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    assert reference[0].tolist() == pytest.approx(hf_logprobs(base), abs=1e-5)


def test_a_checkpoint_holds_the_adapter_and_its_optimizer_state_and_resumes(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    actor = lora_actor(tiny_model_dir)
    train_once(actor, 0)
    path = actor.save_checkpoint(tmp_path, TrainState(step=1, version=1, data_position=8), None)
    assert not (path / "model.safetensors").exists()
    assert (path / "adapter" / ADAPTER_WEIGHTS).is_file()
    resumed = lora_actor(tiny_model_dir)
    state = load_checkpoint(path, resumed.model, resumed.optimizer, resumed.load_tensors)
    assert state.step == 1
    assert resumed.score([PROMPT], [OUTPUT]) == actor.score([PROMPT], [OUTPUT])
    # The same optimizer state: the next step lands on the same weights.
    train_once(actor, 1)
    train_once(resumed, 1)
    assert resumed.score([PROMPT], [OUTPUT])[0] == pytest.approx(
        actor.score([PROMPT], [OUTPUT])[0], abs=1e-6
    )
    full = Actor(tiny_model_dir, replace(TrainConfig(), lr=1e-2), seed=0)
    with pytest.raises(ConfigError) as raised:
        load_checkpoint(path, full.model, full.optimizer, full.load_tensors)
    assert raised.value.key == "train.lora.rank"


def test_a_checkpoint_of_another_rank_is_refused_naming_the_key(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    actor = lora_actor(tiny_model_dir)
    path = actor.save_checkpoint(tmp_path, TrainState(step=1, version=1, data_position=8), None)
    other = lora_actor(tiny_model_dir, rank=4)
    with pytest.raises(ConfigError) as raised:
        load_checkpoint(path, other.model, other.optimizer, other.load_tensors)
    assert raised.value.key == "train.lora.rank"


def test_sdp_export_writes_the_adapter_or_the_merged_model(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    from sdp_cli.commands.export_run import export_run

    run_dir = tmp_path / "run"
    cfg = load_config(overrides=[f"run.dir={run_dir}", f"model.path={tiny_model_dir}"])
    cfg = replace(cfg, train=replace(cfg.train, lora=LoraConfig(rank=8)))
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(config_to_yaml(cfg))
    actor = lora_actor(tiny_model_dir)
    train_once(actor, 0)
    actor.save_checkpoint(run_dir, TrainState(step=1, version=1, data_position=8), None)
    expected = actor.score([PROMPT], [OUTPUT])[0]

    source, what = export_run(run_dir, tmp_path / "adapter")
    assert (source.step, what) == (1, "adapter")
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == [
        ADAPTER_CONFIG,
        ADAPTER_WEIGHTS,
    ]
    _, what = export_run(run_dir, tmp_path / "merged", step=1, merge=True)
    assert what == "model"
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    assert not any("lora" in name for name in merged.state_dict())
    assert hf_logprobs(merged) == pytest.approx(expected, abs=1e-5)
    assert (tmp_path / "merged" / "tokenizer.json").is_file()
    with pytest.raises(ConfigError) as raised:
        export_run(run_dir, tmp_path / "none", step=7)
    assert raised.value.key == "--step"
    with pytest.raises(ConfigError):
        export_run(run_dir, tmp_path / "merged")


def test_lora_keys_are_checked() -> None:
    for override, key in (
        ("train.lora.rank=600", "train.lora.rank"),
        ("train.lora.rank=-1", "train.lora.rank"),
        ("train.lora.dropout=1.0", "train.lora.dropout"),
        ("train.lora.alpha=0", "train.lora.alpha"),
    ):
        with pytest.raises(ConfigError) as raised:
            load_config(overrides=[override])
        assert raised.value.key == key


def test_servers_start_with_lora_and_the_smallest_vllm_rank_that_fits(
    tiny_model_dir: Path,
) -> None:
    cfg = load_config(overrides=["train.lora.rank=12", "server.extra_args=[--seed,3]"])
    assert lora_server_args(cfg.train.lora) == [
        "--enable-lora",
        "--max-lora-rank",
        "16",
        "--max-loras",
        "4",
        "--max-cpu-loras",
        "8",
    ]
    server = with_lora_serving(cfg.server, cfg.train.lora, tiny_model_dir)
    assert server.extra_args[-2:] == ["--seed", "3"]
    # LoRA layers on the decoder's projections only, never on the LM head.
    targets = server.extra_args[8:-2]
    assert server.extra_args[7] == "--lora-target-modules"
    assert targets == model_projection_names(tiny_model_dir)
    assert "q_proj" in targets and "down_proj" in targets and "lm_head" not in targets
    assert vllm_env(server)["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    plain = load_config()
    assert with_lora_serving(plain.server, plain.train.lora, tiny_model_dir) == plain.server
    assert "--enable-lora" not in vllm_command(plain.server, Path("m"), 8000)


def test_sdp_export_on_the_command_line(tiny_model_dir: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from sdp_cli.cli import app

    runner = CliRunner()
    missing = runner.invoke(
        app, ["export", str(tmp_path / "nothing"), "--out", str(tmp_path / "o")]
    )
    assert missing.exit_code == 2 and "config.yaml" in missing.output
    assert "Traceback" not in missing.output
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    cfg = load_config(overrides=[f"run.dir={run_dir}", f"model.path={tiny_model_dir}"])
    (run_dir / "config.yaml").write_text(config_to_yaml(cfg))
    full = Actor(tiny_model_dir, replace(TrainConfig(), lr=1e-2), seed=0)
    train_once(full, 0)
    full.save_checkpoint(run_dir, TrainState(step=1, version=1, data_position=8), None)
    out = tmp_path / "model"
    done = runner.invoke(app, ["export", str(run_dir), "--out", str(out)])
    assert done.exit_code == 0, done.output
    assert "exported step 1" in done.output
    # A full fine-tuning run exports its model directory.
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert hf_logprobs(model) == pytest.approx(full.score([PROMPT], [OUTPUT])[0], abs=1e-5)


def test_lora_dropout_acts_in_the_loss_pass_only(tiny_model_dir: Path) -> None:
    from sdp_cli.trainer.adapter import adapter_dropout

    actor = lora_actor(tiny_model_dir, lora=LoraConfig(rank=8, dropout=0.5))
    train_once(actor, 0)  # lora_B leaves zero, so dropout on the adapter's input shows
    dropouts = [m for n, m in actor.model.named_modules() if n.endswith(".lora_dropout")]
    assert dropouts and not any(m.training for m in dropouts)
    # Scoring (the recompute, the trainer's μ checks) sees no dropout: the same twice.
    assert actor.score([PROMPT], [OUTPUT]) == actor.score([PROMPT], [OUTPUT])
    with adapter_dropout(actor.model, True):
        assert all(m.training for m in dropouts)
        noisy = [actor.score([PROMPT], [OUTPUT])[0] for _ in range(3)]
    assert not all(n == noisy[0] for n in noisy[1:])
    assert not any(m.training for m in dropouts)
