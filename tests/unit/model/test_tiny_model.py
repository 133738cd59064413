from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sdp_cli.cli import app
from sdp_cli.errors import SdpError
from sdp_cli.model import smollm2
from sdp_cli.model.tiny import ALPHABET, TinyModelSpec, build_tokenizer, init_tiny_model

runner = CliRunner()


def _digest(path: Path) -> str:
    return hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()


def test_model_is_deterministic_from_its_seed(tmp_path: Path) -> None:
    a, created_a = init_tiny_model(TinyModelSpec(init_seed=3), tmp_path / "a")
    b, created_b = init_tiny_model(TinyModelSpec(init_seed=3), tmp_path / "b")
    c, _ = init_tiny_model(TinyModelSpec(init_seed=4), tmp_path / "c")
    assert created_a and created_b
    assert _digest(a) == _digest(b)
    assert _digest(a) != _digest(c)


def test_second_call_is_a_no_op(tmp_path: Path) -> None:
    path, created = init_tiny_model(TinyModelSpec(), tmp_path / "m")
    mtime = (path / "model.safetensors").stat().st_mtime_ns
    again, created_again = init_tiny_model(TinyModelSpec(), tmp_path / "m")
    assert created and not created_again and again == path
    assert (path / "model.safetensors").stat().st_mtime_ns == mtime


def test_a_model_another_process_published_between_the_checks_is_used(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two processes sharing a cache: this one finds no model, then the other one's finished
    directory appears before this one looks whether the target is empty."""
    target = tmp_path / "shared"
    real_exists = Path.exists

    def exists_after_the_other_published(path: Path) -> bool:
        if path == target and not real_exists(target):
            shutil.copytree(tiny_model_dir, target)
        return real_exists(path)

    monkeypatch.setattr(Path, "exists", exists_after_the_other_published)
    assert init_tiny_model(TinyModelSpec(), target) == (target, False)


def test_model_shape_suits_vllm_cpu(tiny_model_dir: Path) -> None:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny_model_dir)
    assert config.model_type == "llama"
    assert config.hidden_size // config.num_attention_heads == 64
    assert config.vocab_size >= len(ALPHABET) + 4


def test_tokenizer_is_character_level_and_round_trips(tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    text = "12 + 34 = ? abc"
    ids = tok(text, add_special_tokens=False).input_ids
    assert len(ids) == len(text)
    assert tok.decode(ids) == text
    assert tok.unk_token_id not in ids
    assert build_tokenizer().eos_token_id == tok.eos_token_id


def test_init_model_command_uses_the_cache_by_default(isolated_cache: Path) -> None:
    first = runner.invoke(app, ["init-model", "model.init_seed=11"])
    second = runner.invoke(app, ["init-model", "model.init_seed=11"])
    assert first.exit_code == 0 and "created" in first.output
    assert second.exit_code == 0 and "already present" in second.output
    assert str(isolated_cache) in first.output.replace("\n", "")


def test_init_model_command_into_a_directory(tmp_path: Path) -> None:
    result = runner.invoke(app, ["init-model", "tiny", "--dir", str(tmp_path / "here")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "here" / "config.json").is_file()
    assert (tmp_path / "here" / "tokenizer.json").is_file()


def test_init_model_takes_model_names_not_directories(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["init-model", "smollm2-135M"])
    assert result.exit_code == 2
    assert "knows no model 'smollm2-135M'" in result.output and "--dir" in result.output
    assert not any(tmp_path.iterdir())  # nothing written where the typo pointed


def test_unknown_builtin_model_path_is_a_config_error() -> None:
    result = runner.invoke(app, ["init-model", "model.path=builtin:nope"])
    assert result.exit_code == 2
    assert "model.path" in result.output and "builtin:smollm2-135m" in result.output


def test_smollm2_wheel_is_checked_before_use(tmp_path: Path) -> None:
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    (downloads / smollm2.WHEEL_NAME).write_bytes(b"not the wheel")
    with pytest.raises(SdpError, match="SHA-256"):
        smollm2.build_smollm2(tmp_path / "model", downloads)
    assert not (tmp_path / "model").exists()
