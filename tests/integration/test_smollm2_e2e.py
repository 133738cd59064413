"""A real pretrained model end to end: `sdp init-model smollm2-135m` builds SmolLM2-135M-Instruct
from the PyPI wheel, and `sdp train` with the SmolLM2 chain_sum example trains two steps on a
real vLLM CPU server, its prompts formatted by the model's chat template."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from sdp_cli.cli import app
from sdp_cli.events.event_log import read_events
from sdp_cli.events.event_schema import EvalEvent, TrainStepEvent
from sdp_cli.inference import client as client_module
from sdp_cli.orchestrator.sample_log import read_samples
from tests import REPO

pytestmark = pytest.mark.vllm
runner = CliRunner()
EXAMPLE = REPO / "conf" / "examples" / "smollm2-chain-sum.yaml"
SYSTEM_PROMPT = "Give only the final number."


def test_smollm2_trains_on_chain_sum_through_its_chat_template(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    start = time.perf_counter()
    made = runner.invoke(app, ["init-model", "smollm2-135m"])
    assert made.exit_code == 0, made.output
    assert "smollm2-135m created" in made.output
    # The conversion's progress bars share the output; the last line names the directory.
    found = re.search(r"smollm2-135m created in [0-9.]+ s: (\S+)", made.output)
    assert found, made.output
    model_dir = Path(found.group(1))
    assert (model_dir / "model.safetensors").is_file()
    again = runner.invoke(app, ["init-model", "smollm2-135m"])
    assert again.exit_code == 0 and "already present" in again.output
    built_s = time.perf_counter() - start

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    im_start, im_end = tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    system_turn = tokenizer(f"system\n{SYSTEM_PROMPT}", add_special_tokens=False)["input_ids"]
    assistant_cue = [im_start, *tokenizer("assistant\n", add_special_tokens=False)["input_ids"]]

    sent: list[tuple[list[int], dict[str, Any]]] = []
    real_generate_body = client_module.generate_body

    def recording_generate_body(request_id: str, token_ids: list[int], sampling: dict) -> dict:
        sent.append((list(token_ids), dict(sampling)))
        return real_generate_body(request_id, token_ids, sampling)

    monkeypatch.setattr(client_module, "generate_body", recording_generate_body)
    run_dir = tmp_path / "run"
    tiny_batch = ["rollout.batch_size=2", "rollout.n_samples=2", "rollout.max_new_tokens=8"]
    # The command: two steps, an evaluation after each, TensorBoard curves.
    command = [
        "train",
        f"conf={EXAMPLE}",
        "train.steps=2",
        "eval.every=1",
        "eval.n_prompts=8",
        "log.backends=[tensorboard]",
        f"run.dir={run_dir}",
    ]
    trained = runner.invoke(app, [*command, *tiny_batch])
    assert trained.exit_code == 0, trained.output

    events = list(read_events(run_dir / "events.jsonl"))
    steps = [e for e in events if isinstance(e, TrainStepEvent)]
    assert [s.step for s in steps] == [0, 1]
    evals = [e for e in events if isinstance(e, EvalEvent)]
    assert [(e.step, e.n_prompts) for e in evals] == [(0, 8), (1, 8), (2, 8)]
    samples = list(read_samples(run_dir / "samples.jsonl"))
    assert [r["step"] for r in samples if r["kind"] == "trained"] == [0, 0, 1, 1]
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    print("eval accuracy", [e.accuracy for e in evals])
    assert sent, "no generate request reached the server"
    for token_ids, sampling in sent:
        # The chat template's turns, system prompt included, and the assistant cue the model
        # answers after; generation stops at its end-of-turn token.
        assert token_ids[0] == im_start
        assert token_ids[1 : 1 + len(system_turn)] == system_turn
        assert token_ids[1 + len(system_turn)] == im_end
        assert im_end in sampling["stop_token_ids"]
    first_prompt, _ = sent[0]
    assert first_prompt[-len(assistant_cue) :] == assistant_cue
    print(f"init-model (build + no-op) {built_s:.1f} s; train {len(steps)} steps ok")
