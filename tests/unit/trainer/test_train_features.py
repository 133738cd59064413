"""Trainer features: learning-rate schedule, entropy and KL statistics, the KL penalty to the
frozen initial model, gradient checkpointing; held-out evaluation and samples.jsonl."""

from __future__ import annotations

import asyncio
import itertools
import json
import math
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from sdp_cli.config.eval_settings import EvalConfig
from sdp_cli.config.rollout_settings import RolloutConfig
from sdp_cli.config.train_settings import LrSchedule, TrainConfig
from sdp_cli.inference.types import Completion
from sdp_cli.orchestrator.evaluate import Evaluator, summarize_rewards
from sdp_cli.orchestrator.sample_log import SampleLog, read_samples, version_spans
from sdp_cli.rollout.trajectory import RolloutGroup, Trajectory
from sdp_cli.tasks.base import Prompt
from sdp_cli.trainer.actor import load_model
from sdp_cli.trainer.recompute_activations import enable_gradient_checkpointing
from sdp_cli.trainer.schedule import lr_at
from sdp_cli.trainer.token_stats import k3, token_entropy
from tests.unit.trainer.test_actor import make_actor, on_policy_groups, stale_groups, weights

# ---- learning-rate schedule -----------------------------------------------------------------


def schedule(**keys: object) -> list[float]:
    train = replace(TrainConfig(), lr=1.0, steps=10, **keys)
    return [lr_at(step, train) for step in range(10)]


def test_constant_schedule_with_warmup_ramps_then_holds() -> None:
    assert schedule(warmup_steps=4) == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]


def test_linear_and_cosine_decay_to_the_floor_at_the_last_step() -> None:
    linear = schedule(lr_schedule=LrSchedule.linear, min_lr_ratio=0.1)
    cosine = schedule(lr_schedule=LrSchedule.cosine, min_lr_ratio=0.1)
    assert linear[0] == 1.0 and cosine[0] == 1.0
    assert all(a > b for a, b in itertools.pairwise(linear))
    assert all(a > b for a, b in itertools.pairwise(cosine))
    assert linear[-1] == pytest.approx(0.1 + 0.9 / 10)
    # Cosine stays above linear early and falls below it late.
    assert cosine[2] > linear[2] and cosine[8] < linear[8]
    assert lr_at(10, replace(TrainConfig(), lr=1.0, steps=10, lr_schedule="cosine")) == 0.0


def test_actor_applies_the_scheduled_rate(tiny_model_dir: Path) -> None:
    actor = make_actor(tiny_model_dir, lr=0.01, warmup_steps=2, steps=4)
    stats = actor.train_step(on_policy_groups(actor), version=0)
    assert stats["lr"] == pytest.approx(0.005)
    assert actor.optimizer.param_groups[0]["lr"] == pytest.approx(0.005)


# ---- entropy and KL -------------------------------------------------------------------------


def test_entropy_in_chunks_equals_the_full_computation() -> None:
    logits = torch.randn(9, 5, 31)
    full = -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)
    assert torch.allclose(token_entropy(logits), full, atol=1e-5)
    uniform = token_entropy(torch.zeros(1, 1, 31))
    assert uniform.item() == pytest.approx(math.log(31), rel=1e-5)


def test_k3_is_zero_on_policy_and_positive_off_it() -> None:
    same = torch.tensor([-1.0, -2.0])
    assert torch.equal(k3(same, same), torch.zeros(2))
    assert bool((k3(same, same - 0.5) > 0).all())


def test_train_step_reports_entropy_and_kl(tiny_model_dir: Path) -> None:
    actor = make_actor(tiny_model_dir)
    on_policy = actor.train_step(on_policy_groups(actor), version=0)
    assert on_policy["kl"] == pytest.approx(0.0, abs=1e-6)
    assert 0.0 < on_policy["entropy"] <= math.log(actor.model.config.vocab_size) + 1e-4
    off_policy = actor.train_step(stale_groups(actor, version=2), version=2)
    assert off_policy["kl"] > 1e-3


def test_kl_penalty_pulls_towards_the_initial_model(tiny_model_dir: Path) -> None:
    """Same batch, same seed: with kl_coef the step differs, and the reference KL is reported."""
    plain = make_actor(tiny_model_dir, lr=0.05)
    penalised = make_actor(tiny_model_dir, lr=0.05, kl_coef=1.0)
    assert plain.reference is None and penalised.reference is not None
    groups = stale_groups(plain, version=1)
    for actor in (plain, penalised):
        actor.train_step(groups, version=1)
    # After one step both moved away from the reference; a second step shows the penalty.
    second_plain = plain.train_step(groups, version=2)
    second_penalised = penalised.train_step(groups, version=2)
    assert second_penalised["ref_kl"] > 0.0
    assert second_plain["ref_kl"] == 0.0
    assert any(
        not torch.equal(a, b) for a, b in zip(weights(plain), weights(penalised), strict=True)
    )


@pytest.mark.parametrize("mode", ["selective", "full"])
def test_gradient_checkpointing_takes_the_same_step(tiny_model_dir: Path, mode: str) -> None:
    plain = make_actor(tiny_model_dir, gradient_checkpointing="none")
    checkpointed = make_actor(tiny_model_dir, gradient_checkpointing=mode)
    groups = stale_groups(plain, version=1)
    a = plain.train_step(groups, version=1)
    b = checkpointed.train_step(groups, version=1)
    assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)
    for x, y in zip(weights(plain), weights(checkpointed), strict=True):
        assert torch.allclose(x, y, atol=1e-6)


@pytest.mark.parametrize("mode", ["selective", "full"])
def test_checkpointing_keeps_a_dropout_model_deterministic(tiny_model_dir: Path, mode: str) -> None:
    """Hugging Face recomputes only layers in training mode; the attention inside them must
    still not drop anything, or the actor's logprobs would differ from the servers'."""
    ids = torch.randint(0, 30, (2, 16))
    model = load_model(tiny_model_dir, torch.device("cpu"))
    exact = model(input_ids=ids).logits
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = 0.5
    enable_gradient_checkpointing(model, mode)
    assert all(layer.training for layer in model.model.layers)
    first, second = model(input_ids=ids).logits, model(input_ids=ids).logits
    assert torch.equal(first, second)
    assert torch.allclose(first, exact, atol=1e-6)


class CountedOps(TorchDispatchMode):
    """Counts every aten op that runs (a recompute served from the selective cache does not)."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.counts[str(func)] += 1
        return func(*args, **(kwargs or {}))


def test_selective_checkpointing_recomputes_the_pointwise_ops_but_no_matmul(
    tiny_model_dir: Path,
) -> None:
    counts = {}
    for mode in ("none", "selective", "full"):
        model = load_model(tiny_model_dir, torch.device("cpu"))
        enable_gradient_checkpointing(model, mode)
        with CountedOps() as ops:
            model.model(input_ids=torch.randint(0, 30, (2, 16))).last_hidden_state.sum().backward()
        counts[mode] = ops.counts
    layers = model.config.num_hidden_layers
    # SiLU runs once per layer, and again in each layer's recompute.
    assert counts["none"]["aten.silu.default"] == layers
    for mode in ("selective", "full"):
        assert counts[mode]["aten.silu.default"] == 2 * layers
    # The matrix multiplications: the full recompute runs them again, selective keeps them.
    assert counts["selective"]["aten.mm.default"] == counts["none"]["aten.mm.default"]
    assert counts["full"]["aten.mm.default"] > counts["none"]["aten.mm.default"]


# ---- evaluation -----------------------------------------------------------------------------


def test_accuracy_and_pass_at_k() -> None:
    accuracy, pass_at_k, mean = summarize_rewards([[1.0, 0.0], [0.0, 0.0], [1.0, 1.0]])
    assert accuracy == pytest.approx(0.5)
    assert pass_at_k == pytest.approx(2 / 3)
    assert mean == pytest.approx(0.5)


class EchoTask:
    """Held-out prompts 'a' and 'b'; a completion is right when its first token is the prompt's
    length."""

    name = "echo"
    stop_token_ids = (2,)

    def sample_prompt(self, position: int) -> Prompt:
        raise AssertionError("evaluation must never draw training prompts")

    def eval_prompts(self, n: int) -> list[Prompt]:
        return [Prompt("a", [1, 5], {"want": 2}), Prompt("b", [1, 5, 6], {"want": 3})][:n]

    def reward(self, completion_text: str, meta: dict[str, object]) -> float:
        return float(completion_text == str(meta["want"]))


class CountingGenerator:
    """Answers the prompt length for prompt 'a' and a wrong number otherwise; records calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[list[int], float, int | None]] = []

    async def generate(self, prompt_ids, sampling, max_new_tokens, gate=None):  # type: ignore[no-untyped-def]
        self.calls.append((prompt_ids, sampling.temperature, sampling.seed))
        answer = len(prompt_ids) if len(prompt_ids) == 2 else 0
        completion = Completion()
        completion.append([answer], [0.0], [0])
        return completion


def test_evaluator_generates_every_held_out_prompt_k_times() -> None:
    generator = CountingGenerator()
    evaluator = Evaluator(
        EchoTask(),
        generator,
        lambda ids: str(ids[0]),
        EvalConfig(every=2, n_prompts=2, n_samples=3, temperature=0.0),
        RolloutConfig(),
        stop_token_ids=(2,),
    )
    result = asyncio.run(evaluator.run())
    assert len(generator.calls) == 6
    assert {temperature for _, temperature, _ in generator.calls} == {0.0}
    assert len({seed for _, _, seed in generator.calls}) == 6
    assert result.accuracy == pytest.approx(0.5)
    assert result.pass_at_k == pytest.approx(0.5) and result.k == 3
    assert [evaluator.due(s) for s in range(5)] == [True, False, True, False, True]
    # Every completion is kept, prompt by prompt, with its text and reward.
    assert [(c.prompt_index, c.completion, c.reward) for c in result.completions] == [
        (0, "2", 1.0),
        (0, "2", 1.0),
        (0, "2", 1.0),
        (1, "0", 0.0),
        (1, "0", 0.0),
        (1, "0", 0.0),
    ]


# ---- samples.jsonl --------------------------------------------------------------------------


def test_version_spans() -> None:
    assert version_spans([3, 3, 4, 4, 4, 5]) == [[3, 0, 2], [4, 2, 5], [5, 5, 6]]
    assert version_spans([]) == []


def group(rollout_id: int, versions: list[int]) -> RolloutGroup:
    sample = Trajectory([1], [7] * len(versions), [0.0] * len(versions), versions, reward=0.5)
    return RolloutGroup(
        rollout_id=rollout_id,
        samples=[sample, sample],
        meta={"prompt": f"p{rollout_id}", "position": rollout_id},
    )


def test_sample_log_writes_trained_and_a_bounded_number_of_dropped(tmp_path: Path) -> None:
    log = SampleLog(tmp_path / "samples.jsonl", lambda ids: "x" * len(ids), 2, with_dropped=True)
    log.trained(step=4, version=4, groups=[group(1, [3, 3, 4]), group(2, [4])])
    for rollout_id in range(5):
        log.dropped(group(10 + rollout_id, [1, 2]), "head_lag", "purge", version=4)
    log.close()
    records = list(read_samples(tmp_path / "samples.jsonl"))
    trained = [r for r in records if r["kind"] == "trained"]
    dropped = [r for r in records if r["kind"] == "dropped"]
    assert len(trained) == 2 and len(dropped) == 2
    assert trained[0] == {
        "kind": "trained",
        "step": 4,
        "version": 4,
        "rollout_id": 1,
        "position": 1,
        "prompt": "p1",
        "completion": "xxx",
        "reward": 0.5,
        "n_tokens": 3,
        "version_spans": [[3, 0, 2], [4, 2, 3]],
        "head_lag": 1,
        "tail_lag": 0,
    }
    assert dropped[0]["reason"] == "head_lag" and dropped[0]["head_lag"] == 3
    assert json.loads((tmp_path / "samples.jsonl").read_text().splitlines()[0])["kind"]


def test_sdp_samples_shows_the_records_and_filters_dropped(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from sdp_cli.cli import app

    log = SampleLog(tmp_path / "samples.jsonl", lambda ids: "answer42", 2, with_dropped=True)
    log.trained(step=0, version=0, groups=[group(1, [0, 0])])
    log.dropped(group(7, [0]), "no_recompute", "take", version=2)
    log.close()
    runner = CliRunner()
    shown = runner.invoke(app, ["samples", str(tmp_path)], env={"COLUMNS": "200"})
    assert shown.exit_code == 0, shown.output
    assert "answer42" in shown.output and "no_recompute" in shown.output
    only_dropped = runner.invoke(app, ["samples", str(tmp_path), "--dropped"])
    assert "2 of 2" not in only_dropped.output and "1 of 1" in only_dropped.output
    missing = runner.invoke(app, ["samples", str(tmp_path / "nowhere")])
    assert missing.exit_code == 2 and "samples.jsonl" in missing.output


def test_sample_log_writes_every_eval_completion_only_when_asked(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from sdp_cli.cli import app
    from sdp_cli.orchestrator.evaluate import EvalCompletion

    completions = [
        EvalCompletion(0, "4 - 9 =", "-3", 0.0),
        EvalCompletion(1, "say hi", "hi", 1.0, turns=[{"role": "user"}], end_reason="done"),
    ]
    for with_eval in (False, True):
        path = tmp_path / f"eval-{with_eval}" / "samples.jsonl"
        path.parent.mkdir()
        log = SampleLog(path, str, 2, with_dropped=True, with_eval=with_eval)
        log.evaluated(step=10, version=10, completions=completions)
        log.close()
        records = list(read_samples(path))
        if not with_eval:
            assert records == []
            continue
        assert records == [
            {
                "kind": "eval",
                "step": 10,
                "version": 10,
                "prompt_index": 0,
                "prompt": "4 - 9 =",
                "completion": "-3",
                "reward": 0.0,
            },
            {
                "kind": "eval",
                "step": 10,
                "version": 10,
                "prompt_index": 1,
                "prompt": "say hi",
                "completion": "hi",
                "reward": 1.0,
                "turns": [{"role": "user"}],
                "end_reason": "done",
            },
        ]
        shown = CliRunner().invoke(
            app, ["samples", str(path.parent), "--eval"], env={"COLUMNS": "200"}
        )
        assert shown.exit_code == 0, shown.output
        assert "2 of 2" in shown.output and "4 - 9 =" in shown.output


def test_inspect_staleness_reports_eval_accuracy(tmp_path: Path) -> None:
    from sdp_cli.events.event_schema import EvalEvent
    from sdp_cli.views.staleness_analysis import summarize

    evals = [
        EvalEvent(
            step=s,
            version=s,
            accuracy=a,
            pass_at_k=a,
            k=1,
            mean_reward=a,
            n_prompts=8,
            temperature=0.0,
            seconds=0.1,
        )
        for s, a in ((0, 0.25), (2, 0.5))
    ]
    summary = summarize(evals)
    assert [row["accuracy"] for row in summary.to_dict()["evals"]] == [0.25, 0.5]
    from rich.console import Console

    from sdp_cli.views.staleness_report import render_summary

    console = Console(record=True, width=200)
    console.print(render_summary(summary))
    assert "0.250 (step 0) → 0.500 (step 2)" in console.export_text()
