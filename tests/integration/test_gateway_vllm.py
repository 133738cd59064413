"""The OpenAI gateway on real vLLM CPU servers with the tiny model: agents written with the real
`openai` client drive 3-call episodes while a weight update interrupts calls (each continues as
a new segment), and the trained ids are exactly the ids the servers sampled; and
`sdp train conf=conf/examples/tiny-openai-agent.yaml`."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from openai import AsyncOpenAI
from typer.testing import CliRunner

from sdp_cli.cli import app
from sdp_cli.config.rollout_settings import RolloutConfig
from sdp_cli.config.task_settings import TaskConfig
from sdp_cli.episodes.multiturn import EpisodeLimits
from sdp_cli.episodes.render import Renderer
from sdp_cli.events.event_log import read_events
from sdp_cli.events.event_schema import RolloutFinishedEvent, TrainStepEvent
from sdp_cli.gateway.agent_workflow import AgentWorkflow
from sdp_cli.inference import InferenceClient, SamplingParams
from sdp_cli.launcher import ServerFleet
from sdp_cli.orchestrator.sample_log import read_samples
from sdp_cli.rollout.trajectory import Trajectory
from sdp_cli.tasks import decode_completion, get_task, load_tokenizer
from sdp_cli.tasks.base import encode_prompt
from sdp_cli.weight_sync.disk import DiskTransport
from tests import REPO
from tests.integration.test_episodes_vllm import (
    EPISODES,
    UpdateAtTurnTwo,
    assert_the_batch_trains_the_model_tokens,
    model_runs,
    update_rounds,
)
from tests.integration.test_inference_vllm import RecordingTransport, current_version

pytestmark = pytest.mark.vllm
CALLS = 3


async def asks_three_times(base_url: str, model_name: str, instance: dict[str, Any]) -> None:
    """An agent that knows nothing of sdp: three chat calls, each after the answer before."""
    async with AsyncOpenAI(base_url=base_url, api_key="sdp", max_retries=0) as client:
        messages: list[Any] = [{"role": "user", "content": instance["question"]}]
        for _ in range(CALLS):
            reply = await client.chat.completions.create(model=model_name, messages=messages)
            messages += [reply.choices[0].message, {"role": "user", "content": "no, try again."}]


def test_openai_agents_through_the_gateway_train_the_ids_vllm_sampled(
    vllm_fleet: ServerFleet, tiny_model_dir: Path, write_tiny_weights: Callable[..., Path]
) -> None:
    tokenizer = load_tokenizer(tiny_model_dir)
    task = get_task(replace(TaskConfig(), name="reverse"), tokenizer)

    async def play_round(
        first: Path, second: Path, delay_s: float
    ) -> tuple[int, list[Trajectory], RecordingTransport]:
        # A recorder per round: each round's answers are checked against its own requests.
        recorder = RecordingTransport()
        async with InferenceClient(vllm_fleet.pool, transport=recorder) as client:
            old = current_version(vllm_fleet) + 1
            await DiskTransport(client).load_weights(str(first), old)
            generator = UpdateAtTurnTwo(client, second, old + 1, delay_s)
            flow = AgentWorkflow(
                task,
                asks_three_times,
                generator,
                Renderer(tokenizer),
                lambda ids: decode_completion(tokenizer, ids, task.stop_token_ids),
                lambda text: encode_prompt(tokenizer, text),
                replace(RolloutConfig(), max_turns=CALLS),
                EpisodeLimits(CALLS, 255, 40, 10.0),
                agent_timeout_s=120.0,
                eos_token_id=tokenizer.eos_token_id,
            )
            prompt = task.sample_prompt(0)
            stops = (tokenizer.eos_token_id,)
            try:
                episodes = await asyncio.gather(
                    *(
                        flow.play(
                            prompt,
                            SamplingParams(seed=1000 * i, ignore_eos=True, stop_token_ids=stops),
                            None,
                        )
                        for i in range(EPISODES)
                    )
                )
            finally:
                await flow.aclose()
            assert generator.update is not None
            await generator.update
            return old, list(episodes), recorder

    # Rounds as in the episode test: the servers' pace can move the update to a call boundary.
    for first, second, delay_s in update_rounds(write_tiny_weights, 21):
        old, episodes, recorder = asyncio.run(play_round(first, second, delay_s))
        split_calls = check_episodes(old, episodes, recorder)
        if split_calls:
            break
    assert split_calls >= 1, "no call was interrupted by the update in any round"
    assert_the_batch_trains_the_model_tokens(episodes)


def check_episodes(old: int, episodes: list[Trajectory], recorder: RecordingTransport) -> int:
    """Checks every episode of a round whose update came at `old + 1`; returns how many calls
    the update interrupted."""
    split_calls = 0
    for episode in episodes:
        runs = model_runs(episode)
        assert len(runs) == CALLS and episode.end_reason == "done"
        versions = [[episode.versions[i] for i in run] for run in runs]
        flat = [v for turn in versions for v in turn]
        assert flat == sorted(flat) and set(flat) <= {old, old + 1}
        # A call the update interrupted went on as a new segment under the new weights (which
        # call depends on the machine's pace: a slower episode's first, or a second).
        split_calls += sum(set(turn) == {old, old + 1} for turn in versions)
        # Every request the gateway made was the episode's exact ids so far, and what the
        # servers answered is the episode's model tokens, in order.
        full = episode.prompt_ids + episode.output_ids
        answers = [
            r
            for r in recorder.reports
            if full[: len(r.request_ids) + len(r.answer_ids)] == r.request_ids + r.answer_ids
        ]
        sampled = [t for r in answers for t in r.answer_ids]
        assert sampled == [episode.output_ids[i] for run in runs for i in run]
        assert [t["role"] for t in episode.turns or []] == ["user", "assistant"] + [
            "user",
            "assistant",
        ] * (CALLS - 1)
    return split_calls


def test_sdp_train_runs_the_tiny_openai_agent_example(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result = CliRunner().invoke(
        app,
        [
            "train",
            f"conf={REPO / 'conf/examples/tiny-openai-agent.yaml'}",
            f"run.dir={run_dir}",
            "train.steps=3",
            "eval.every=3",
        ],
    )
    assert result.exit_code == 0, result.output
    events = list(read_events(run_dir / "events.jsonl"))
    assert len([e for e in events if isinstance(e, TrainStepEvent)]) == 3
    finished = [e for e in events if isinstance(e, RolloutFinishedEvent) and e.accepted]
    turns = [n for e in finished for n in e.episode_turns or []]
    # The example agent makes two model calls per episode.
    assert finished and turns == [2] * len(turns) and len(turns) == 4 * len(finished)
    records = [r for r in read_samples(run_dir / "samples.jsonl") if r["kind"] == "trained"]
    assert records
    for record in records:
        roles = [t["role"] for t in record["turns"]]
        assert roles == ["user", "assistant", "user", "assistant"]
        assert all(t["trained"] == (t["role"] == "assistant") for t in record["turns"])
