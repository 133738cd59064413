"""scripts/bench_perf.py: its full-vocabulary reference computes the actor's logprobs, and its
trainer comparison times both sides on the same tokens."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import torch

from tests import REPO

SCRIPT = REPO / "scripts" / "bench_perf.py"


def bench_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_perf", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_perf"] = module
    spec.loader.exec_module(module)
    return module


def small_args() -> argparse.Namespace:
    return argparse.Namespace(
        quick=True, threads=1, rounds=1, prompts=1, samples=2, prompt_len=4, output_len=6
    )


def test_full_vocab_reference_computes_the_same_logprobs(tiny_model_dir: Path) -> None:
    bench = bench_module()
    groups = bench.synthetic_groups(small_args(), bench.vocab_size(tiny_model_dir))
    actor = bench.make_actor(tiny_model_dir, 1)
    batch = actor._micro_batches(groups)[0]
    with torch.no_grad():
        reference = actor.logprobs(batch)
        for variant in [v for v in bench.VARIANTS if v != "actor"]:
            other = bench.make_actor(tiny_model_dir, 1, variant).logprobs(batch)
            assert torch.allclose(reference, other, atol=1e-6), variant


def test_trainer_comparison_counts_the_same_tokens_on_both_sides(tiny_model_dir: Path) -> None:
    bench = bench_module()
    result = bench.trainer_throughput(small_args(), tiny_model_dir)
    # 1 prompt × 2 samples × (4 + 6) tokens, no padding.
    assert result["tokens_per_step"] == 20
    assert len(result["actor_step_s"]) == len(result["hf_step_s"]) == 1
    expected = result["actor_tokens_per_s"] / result["hf_tokens_per_s"]
    assert result["trainer_vs_hf"] == expected > 0
