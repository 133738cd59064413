"""Config composition, the typed schema and the bad inputs of issue 2 (exit code 2, key path)."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from sdp_cli.cli import app
from sdp_cli.config import load_config
from sdp_cli.config.rollout_settings import Strategy
from sdp_cli.config.run_plan import RunPlan, plan_run
from sdp_cli.errors import ConfigError

runner = CliRunner()


def test_default_config_has_the_documented_keys() -> None:
    cfg = load_config()
    assert cfg.rollout.max_staleness == 2
    assert cfg.rollout.strategy is Strategy.segment_wise
    assert cfg.run.dir == "runs/default"
    assert cfg.server.count == 1
    assert cfg.server.registry is None
    assert cfg.train.prox_mode.value == "segment"


def test_overrides_and_interpolated_run_dir() -> None:
    cfg = load_config(None, ["run.name=exp1", "rollout.max_staleness=4", "rollout=standard"])
    assert cfg.run.dir == "runs/exp1"
    assert cfg.rollout.max_staleness == 4
    assert cfg.rollout.strategy is Strategy.standard


def test_yaml_path_without_defaults_extends_the_builtin_default(tmp_path: Path) -> None:
    path = tmp_path / "mine.yaml"
    path.write_text("rollout:\n  batch_size: 3\ntrain:\n  steps: 7\n")
    cfg = load_config(str(path), ["rollout.n_samples=2"])
    assert (cfg.rollout.batch_size, cfg.train.steps, cfg.rollout.n_samples) == (3, 7, 2)
    assert cfg.model.path == "builtin:tiny"


def test_yaml_path_with_unknown_key_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("rollout:\n  max_stalenes: 3\n")
    with pytest.raises(ConfigError) as info:
        load_config(str(path), [])
    assert info.value.key == "rollout.max_stalenes"


def test_config_show_prints_resolved_yaml() -> None:
    result = runner.invoke(app, ["config", "show", "rollout.max_staleness=5", "run.name=x"])
    assert result.exit_code == 0, result.output
    assert "max_staleness: 5" in result.output
    assert "dir: runs/x" in result.output


@pytest.mark.parametrize(
    ("override", "key", "hint"),
    [
        ("rollout.bogus=1", "rollout.bogus", "unknown key"),
        ("nosuchgroup.x=1", "nosuchgroup", "unknown key"),
        ("rollout.max_staleness=abc", "rollout.max_staleness", "Integer"),
        ("rollout.strategy=fast", "rollout.strategy", "segment_wise, standard"),
        ("train.prox_mode=exact", "train.prox_mode", "segment, recompute, loglinear"),
        ("rollout.max_staleness=-1", "rollout.max_staleness", ">= 0"),
        ("rollout.batch_size=0", "rollout.batch_size", ">= 1"),
        ("rollout.max_concurrent=0", "rollout.max_concurrent", ">= 1"),
        ("rollout.n_samples=0", "rollout.n_samples", ">= 2"),
        ("server.base_port=70000", "server.base_port", "<= 65535"),
        ("server.base_port=-5", "server.base_port", ">= 0"),
        ("rollout=turbo", "rollout", "segment_wise"),
        ("task=math_jsonl", "task.path", "data file"),
        ("server.cpu_cores=[4096]", "server.cpu_cores", "choose from"),
        ("train.cpu_cores=[4096]", "train.cpu_cores", "choose from"),
    ],
)
def test_bad_input_exits_2_naming_the_key(override: str, key: str, hint: str) -> None:
    result = runner.invoke(app, ["train", "--dry-run", override])
    assert result.exit_code == 2, result.output
    assert f"'{key}'" in result.output
    assert hint in result.output
    assert "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) <= 2


def test_unknown_named_conf_lists_available() -> None:
    result = runner.invoke(app, ["config", "show", "conf=nope"])
    assert result.exit_code == 2
    assert "'conf'" in result.output and "default" in result.output


def test_missing_conf_file_is_a_clear_error(tmp_path: Path) -> None:
    result = runner.invoke(app, ["config", "show", f"conf={tmp_path}/missing.yaml"])
    assert result.exit_code == 2
    assert "does not exist" in result.output


def test_missing_model_directory_is_a_clear_error(tmp_path: Path) -> None:
    result = runner.invoke(app, ["launch-servers", f"model.path={tmp_path}/nomodel"])
    assert result.exit_code == 2, result.output
    assert "'model.path'" in result.output and "not found" in result.output
    assert "Traceback" not in result.output


def test_vllm_not_installed_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "vllm" else real_find_spec(name, *a),
    )
    result = runner.invoke(app, ["launch-servers"])
    assert result.exit_code == 2, result.output
    assert "vLLM is not installed" in result.output
    assert "Traceback" not in result.output


def test_dry_run_prints_config_and_capacity_plan(tmp_path: Path) -> None:
    result = runner.invoke(
        app,
        [
            "train",
            "--dry-run",
            "rollout.max_staleness=1",
            "rollout.batch_size=4",
            f"run.dir={tmp_path}/run",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "max_staleness: 1" in result.output
    assert "capacity plan" in result.output
    # (η + v + 1)·B at v = 0 and v = 1 with η = 1, B = 4.
    assert "│       0 │         8 │" in result.output
    assert "│       1 │        12 │" in result.output


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("rollout.temperature=0", "rollout.temperature"),
        ("rollout.temperature=-0.5", "rollout.temperature"),
        ("rollout.top_p=0.9", "rollout.top_p"),
        ("rollout.top_k=20", "rollout.top_k"),
    ],
)
def test_sampling_the_loss_cannot_account_for_is_refused(override: str, key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(None, [override])
    assert caught.value.key == key
    result = runner.invoke(app, ["config", "show", override])
    assert result.exit_code == 2 and key in result.output and "Traceback" not in result.output


def test_temperature_and_untruncated_sampling_are_accepted() -> None:
    cfg = load_config(None, ["rollout.temperature=0.7", "rollout.top_k=0"])
    assert cfg.rollout.temperature == 0.7 and cfg.rollout.top_p == 1.0


@pytest.mark.parametrize(
    ("overrides", "plan"),
    [
        ([], RunPlan(True, False, True, True)),
        (["rollout.recompute_on=trainer"], RunPlan(True, True, True, True)),
        (
            ["train.prox_mode=loglinear", "rollout.recompute_on=trainer"],
            RunPlan(False, False, False, True),
        ),
        (["rollout.max_staleness=0"], RunPlan(True, False, True, False)),
        (
            ["rollout.score_continuations=false", "train.overlap_reload=false"],
            RunPlan(True, False, False, False),
        ),
    ],
)
def test_the_run_plan_resolves_what_the_config_implies(overrides: list[str], plan: RunPlan) -> None:
    assert plan_run(load_config(overrides=overrides)) == plan
