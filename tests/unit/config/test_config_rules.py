"""Constraints declared beside their fields in the schema, and the bad inputs of issue 11: each
exits 2 naming the key and the allowed values, with no traceback, before anything starts."""

from __future__ import annotations

from typing import Any

import pytest
import yaml
from omegaconf import OmegaConf
from typer.testing import CliRunner

from sdp_cli.cli import app
from sdp_cli.config.compose import CONF_DIR
from sdp_cli.config.reference import markdown_table, readme_with_table
from sdp_cli.config.schema import SdpConfig, declared_keys
from sdp_cli.config.validate import check_declared_rules
from sdp_cli.errors import ConfigError
from tests import REPO

runner = CliRunner()


def refused(args: list[str], key: str, *hints: str) -> str:
    """Run the CLI; assert exit code 2, the key path quoted, each hint present, no traceback."""
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert f"'{key}'" in result.output, result.output
    for hint in hints:
        assert hint in result.output, result.output
    assert "Traceback" not in result.output
    return result.output


def test_every_key_has_a_rule_with_one_line_of_help() -> None:
    keys = list(declared_keys())
    assert len(keys) > 60
    for key, _, rule in keys:
        assert rule is not None, f"{key} is declared without setting(...)"
        assert rule.help and "\n" not in rule.help, key


@pytest.mark.parametrize(
    ("override", "key", "hints"),
    [
        ("train.lr=-1", "train.lr", ["> 0", "(got -1.0)"]),
        ("rollout.temperature=0", "rollout.temperature", ["> 0", "greedy"]),
        ("train.eps_clip_low=1", "train.eps_clip_low", [">= 0 and < 1"]),
        ("train.dual_clip=1", "train.dual_clip", ["> 1"]),
        ("rollout.n_samples=1", "rollout.n_samples", [">= 2", "nothing is learned"]),
        ("simulate.update_s=-1", "simulate.update_s", [">= 0"]),
    ],
)
def test_bad_values_stop_a_dry_run_naming_the_key(
    override: str, key: str, hints: list[str]
) -> None:
    output = refused(["train", "--dry-run", override], key, *hints)
    assert len(output.strip().splitlines()) <= 2


def test_the_trainer_scores_the_recompute_only_as_one_process() -> None:
    refused(
        ["config", "show", "rollout.recompute_on=trainer", "train.world_size=2"],
        "rollout.recompute_on",
        "rollout.recompute_on=server or train.world_size=1",
    )
    refused(["config", "show", "rollout.recompute_on=gpu"], "rollout.recompute_on", "server")


def test_update_mode_takes_abort_or_keep() -> None:
    refused(["config", "show", "train.update_mode=pause"], "train.update_mode", "abort", "keep")


@pytest.mark.parametrize("command", [["config", "show"], ["simulate"]])
def test_simulate_keys_are_checked_by_every_command(command: list[str]) -> None:
    refused([*command, "simulate.update_s=-1"], "simulate.update_s", ">= 0")


@pytest.mark.parametrize(
    ("key", "value", "allowed"),
    [
        ("train.lr", 0.0, "> 0"),
        ("train.eps_clip_low", 1.5, "< 1"),
        ("train.dual_clip", 0.5, "> 1"),
        ("rollout.top_p", 0.9, ">= 1 and <= 1"),
        ("rollout.top_p", 1.5, "<= 1"),
        ("rollout.top_k", -2, ">= -1"),
        ("rollout.top_k", 20, ">= -1 and <= 0"),
        ("server.dtype", "fp8", "one of auto, half, float16, bfloat16, float, float32"),
        ("server.gpu_memory_utilization", 2.0, "<= 1"),
        ("server.base_port", 70000, "<= 65535"),
        ("simulate.server_batch", 0, ">= 1"),
        ("simulate.time_scale", -1.0, ">= 0"),
    ],
)
def test_declared_bounds_refuse_values_outside_them(key: str, value: Any, allowed: str) -> None:
    cfg: Any = OmegaConf.structured(SdpConfig)
    OmegaConf.update(cfg, key, value)
    with pytest.raises(ConfigError) as info:
        check_declared_rules(cfg)
    assert info.value.key == key
    assert allowed in str(info.value)


def test_the_defaults_pass_every_declared_rule() -> None:
    check_declared_rules(OmegaConf.structured(SdpConfig))


def test_null_disables_an_optional_bounded_key() -> None:
    cfg: Any = OmegaConf.structured(SdpConfig)
    OmegaConf.update(cfg, "train.dual_clip", None)
    OmegaConf.update(cfg, "train.behav_weight_cap", None)
    check_declared_rules(cfg)
    result = runner.invoke(app, ["config", "show", "train.dual_clip=3"])
    assert result.exit_code == 0, result.output
    assert "dual_clip: 3.0" in result.output


def test_group_files_keep_only_what_differs_from_the_schema_defaults() -> None:
    defaults: Any = OmegaConf.structured(SdpConfig)
    files = sorted(CONF_DIR.glob("*/*.yaml"))
    assert files
    for path in files:
        group = path.parent.name
        content = OmegaConf.to_container(OmegaConf.load(path)) or {}
        for key, value in content.items():
            default = OmegaConf.select(defaults, f"{group}.{key}")
            shown = default.value if hasattr(default, "value") else default
            assert value != shown, f"{path.relative_to(CONF_DIR)}: {key}: {value} is the default"


def test_configuration_doc_key_table_is_the_schema() -> None:
    doc_path = REPO / "docs" / "configuration.md"
    doc = doc_path.read_text(encoding="utf-8")
    table = markdown_table()
    assert readme_with_table(doc, table) == doc, (
        "docs/configuration.md's config key table is out of date: "
        "python scripts/config_reference.py --write"
    )
    for key, _, _ in declared_keys():
        assert f"| `{key}` |" in table


def test_config_show_explain_is_the_same_yaml_with_help() -> None:
    plain = runner.invoke(app, ["config", "show", "train.lr=0.01", "server.cpu_cores=[0]"])
    explained = runner.invoke(
        app, ["config", "show", "--explain", "train.lr=0.01", "server.cpu_cores=[0]"]
    )
    assert plain.exit_code == explained.exit_code == 0, explained.output
    assert yaml.safe_load(explained.output) == yaml.safe_load(plain.output)
    assert "lr: 0.01  # AdamW learning rate [a value > 0]" in explained.output
    group_line = "n_samples: 4  # completions per prompt: the GRPO group [a value >= 2]"
    assert group_line in explained.output
    assert "strategy: segment_wise  # " in explained.output
