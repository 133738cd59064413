"""scripts/bench_weight_sync.py: its figures come from a run's events (here a simulated run's,
in both update modes), and the LoRA rounds are left out, with the reason, when the config has
no `train.lora.rank`."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
from typer.testing import CliRunner

from sdp_cli.cli import app
from sdp_cli.config import load_config
from tests import REPO

SCRIPT = REPO / "scripts" / "bench_weight_sync.py"


def bench_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_weight_sync", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_weight_sync"] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("mode", ["abort", "keep"])
def test_figures_of_a_run_come_from_its_events(tmp_path: Path, mode: str) -> None:
    args = ["simulate", "--run-dir", str(tmp_path), "train.steps=6", f"train.update_mode={mode}"]
    args += ["simulate.update_s=0.05"]
    assert CliRunner().invoke(app, args).exit_code == 0
    figures = bench_module().run_figures(tmp_path, 2**30)
    assert figures["update_pause_s"] >= 0.05 - 1e-9
    assert figures["update_total_s"] >= figures["update_pause_s"]
    assert figures["samples_per_s"] > 0 and figures["peak_rss_gb"] == 1.0
    # η = 2: three steps fill the pipeline and the last drains it.
    assert figures["steady_steps"] == 2


def test_lora_rounds_are_added_only_where_the_config_has_lora() -> None:
    bench = bench_module()
    missing = bench.lora_supported(bench.EXAMPLE, 8)
    try:
        load_config(str(bench.EXAMPLE), ["train.lora.rank=8"])
        has_lora = True
    except Exception:
        has_lora = False
    assert (missing is None) == has_lora
    names = set(bench.configurations(8, missing))
    assert {"full/abort", "full/keep"} <= names
    assert ("lora/abort" in names) == has_lora
    assert ("lora/keep" in names) == has_lora
    assert set(bench.configurations(8, "--lora-rank 0")) == {"full/abort", "full/keep"}
    assert bench.lora_supported(bench.EXAMPLE, 0) == "--lora-rank 0"
