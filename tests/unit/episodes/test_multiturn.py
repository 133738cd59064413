"""Multi-turn episodes through the real InferenceClient against fake servers (fault injection:
an abort mid-turn): the ids sent are the episode's exact ids, the trajectory keeps every turn's
ids as sampled or given, the trained mask marks model tokens only, and versions survive an abort
in turn 2 of 3. Real vLLM: tests/integration/test_episodes_vllm.py."""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from transformers import PreTrainedTokenizerBase

from sdp_cli.config.rollout_settings import RolloutConfig
from sdp_cli.config.task_settings import TaskConfig
from sdp_cli.episodes.episode import ContextOverflow, Episode, ModelTurn
from sdp_cli.episodes.messages import MessageFormat
from sdp_cli.episodes.multiturn import EpisodeLimits, MultiTurnWorkflow
from sdp_cli.errors import EpisodeRejected
from sdp_cli.inference import ServerPool
from sdp_cli.rollout.recompute import ProximalRecomputer
from sdp_cli.rollout.trajectory import RolloutGroup, Trajectory
from sdp_cli.tasks import decode_completion, get_task, load_tokenizer
from sdp_cli.tasks.chat import PromptFormat
from sdp_cli.tasks.environment import EnvTask
from sdp_cli.trainer.batch import SampleSettings, collate, flatten_groups
from tests.unit.inference.test_client import (
    A,
    FakeServers,
    answer,
    continuation_scores_handler,
    make_client,
)

FEEDBACK = "no, try again."


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path) -> PreTrainedTokenizerBase:
    return load_tokenizer(tiny_model_dir)


def feedback_config(**fields: Any) -> TaskConfig:
    return replace(
        TaskConfig(),
        name="feedback",
        base="reverse",
        feedback_message=FEEDBACK,
        max_attempts=3,
        **fields,
    )


def workflow(
    tokenizer: PreTrainedTokenizerBase,
    generator: Any,
    task: EnvTask | None = None,
    cfg: TaskConfig | None = None,
    **limits: Any,
) -> MultiTurnWorkflow:
    cfg = cfg or feedback_config()
    task = task or get_task(cfg, tokenizer)
    assert isinstance(task, EnvTask)
    rollout = replace(RolloutConfig(), n_samples=2, max_new_tokens=8, max_turns=4)
    settings = {"max_turns": 4, "max_tokens": 255, "max_new_tokens": 8, "env_timeout_s": 5.0}
    settings.update(limits)
    return MultiTurnWorkflow(
        task,
        generator,
        MessageFormat(PromptFormat.from_config(cfg, tokenizer)),
        lambda ids: decode_completion(tokenizer, ids, task.stop_token_ids),
        rollout,
        EpisodeLimits(**settings),
        eos_token_id=tokenizer.eos_token_id,
    )


def ids_of(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


class ScriptedTurns:
    """One episode's answers: turn 1 under v0; turn 2 aborted after two tokens by the update
    to v1, then continued; turn 3 under v1. Every answer is wrong, so the feedback environment
    asks again until the third attempt."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.eos = tokenizer.eos_token_id
        digit = ids_of(tokenizer, "3")[0]
        self.turn1 = [digit, self.eos]
        self.turn2 = [digit, digit, digit, self.eos]
        self.turn3 = [digit, digit, self.eos]


def play_one(tokenizer: PreTrainedTokenizerBase) -> tuple[Trajectory, list[list[int]], Any]:
    server = ScriptedTurns(tokenizer)
    requests: list[list[int]] = []

    def handler(address: str, path: str, body: dict[str, Any]) -> Any:
        requests.append(list(body["token_ids"]))
        n = len(requests)
        if n == 1:
            return answer(server.turn1, "stop", [("0", 0, 2)])
        if n == 2:
            return answer(server.turn2[:2], "abort", [("0", 0, 2)])
        if n == 3:
            return answer(server.turn2[2:], "stop", [("1", 0, 2)])
        return answer(server.turn3, "stop", [("1", 0, 3)])

    async def run() -> Trajectory:
        client = make_client(ServerPool([A]), FakeServers(handler))
        flow = workflow(tokenizer, client)
        prompt = flow.task.sample_prompt(0)
        return await flow.play(prompt, flow.sampling(0, 0), gate=None)

    return asyncio.run(run()), requests, server


def test_every_request_is_the_episode_so_far_and_the_trajectory_keeps_each_turn_exactly(
    tokenizer: PreTrainedTokenizerBase,
) -> None:
    trajectory, requests, server = play_one(tokenizer)
    feedback_ids = [
        *ids_of(tokenizer, f"user: {FEEDBACK}"),
        server.eos,
        *ids_of(tokenizer, "assistant: "),
    ]
    expected_output = server.turn1 + feedback_ids + server.turn2 + feedback_ids + server.turn3
    assert trajectory.output_ids == expected_output
    prompt = trajectory.prompt_ids
    # Never re-rendered: each request is exactly the ids so far (turn 2's continuation is
    # the first segment's request plus its tokens).
    assert requests[0] == prompt
    assert requests[1] == prompt + server.turn1 + feedback_ids
    assert requests[2] == requests[1] + server.turn2[:2]
    assert requests[3] == prompt + expected_output[: -len(server.turn3)]
    # The mask: model tokens only.
    n1, nf, n2 = len(server.turn1), len(feedback_ids), len(server.turn2)
    mask = [True] * n1 + [False] * nf + [True] * n2 + [False] * nf + [True] * len(server.turn3)
    assert trajectory.trained == mask
    assert trajectory.n_trained == n1 + n2 + len(server.turn3)
    assert tokenizer.decode(prompt).endswith("assistant: ")


def test_versions_and_logprobs_survive_an_abort_in_turn_two_of_three(
    tokenizer: PreTrainedTokenizerBase,
) -> None:
    trajectory, _, _server = play_one(tokenizer)
    model = [i for i, t in enumerate(trajectory.trained or []) if t]
    model_versions = [trajectory.versions[i] for i in model]
    # turn 1 (2 tokens) v0; turn 2: 2 tokens v0, then 2 v1 after the abort; turn 3 (3) v1.
    assert model_versions == [0, 0, 0, 0, 1, 1, 1, 1, 1]
    assert trajectory.head_version == 0 and trajectory.tail_version == 1
    assert trajectory.n_segments == 4
    logprobs = [trajectory.behav_logprobs[i] for i in model]
    assert logprobs == pytest.approx([-0.1, -0.2, -0.1, -0.2, -0.1, -0.2, -0.1, -0.2, -0.3])
    context = [i for i, t in enumerate(trajectory.trained or []) if not t]
    assert all(trajectory.behav_logprobs[i] == 0.0 for i in context)
    # Context tokens take a neighbouring model token's version: within [head, tail].
    assert all(0 <= trajectory.versions[i] <= 1 for i in context)
    # Three wrong answers: the feedback environment ends the episode, reward of the last.
    assert trajectory.end_reason == "done"
    assert [t["role"] for t in trajectory.turns or []] == [
        "user",
        "assistant",
        "user",
        "assistant",
        "user",
        "assistant",
    ]
    assert [t["trained"] for t in trajectory.turns or []] == [False, True] * 3
    assert trajectory.turns[2]["text"] == FEEDBACK  # type: ignore[index]
    assert sum(t["n_tokens"] for t in trajectory.turns or []) == (
        len(trajectory.prompt_ids) + len(trajectory.output_ids)
    )


def test_the_loss_mask_and_the_loss_share_count_model_tokens_only(
    tokenizer: PreTrainedTokenizerBase,
) -> None:
    trajectory, _, _ = play_one(tokenizer)
    other = replace(trajectory, reward=1.0)
    group = RolloutGroup(0, [trajectory, other])
    samples = flatten_groups([group], SampleSettings())
    batch = collate(samples, pad_id=0)
    assert batch.loss_mask[0].tolist() == trajectory.trained
    assert batch.n_tokens == 2 * trajectory.n_trained
    # token-mean: 1 / (model tokens of the batch), not of every output token.
    assert samples[0].loss_scale == pytest.approx(1.0 / (2 * trajectory.n_trained))


def test_the_recompute_scores_the_whole_episode_and_writes_model_tokens_only(
    tokenizer: PreTrainedTokenizerBase,
) -> None:
    trajectory, _, _ = play_one(tokenizer)
    scored: list[tuple[list[int], list[int]]] = []

    async def scorer(pairs: list[tuple[list[int], list[int]]]) -> list[list[float]]:
        scored.extend(pairs)
        return [[-5.0] * len(output) for _, output in pairs]

    group = RolloutGroup(0, [trajectory])
    stats = asyncio.run(ProximalRecomputer(scorer).recompute([group], 1))
    assert scored == [(trajectory.prompt_ids, trajectory.output_ids)]
    prox = trajectory.proximal_logprobs()
    # The v0 model tokens (4 of them) now carry the score; context and v1 tokens do not.
    changed = [i for i, p in enumerate(prox) if p == -5.0]
    assert stats.tokens == 4 and len(changed) == 4
    assert all(trajectory.is_trained(i) and trajectory.versions[i] == 0 for i in changed)


class RaisingEnv:
    def reset(self, instance: Any) -> list[dict[str, str]]:
        return [{"role": "user", "content": "12="}]

    def step(self, model_message: str) -> Any:
        raise RuntimeError("tool crashed")


class SlowEnv(RaisingEnv):
    def step(self, model_message: str) -> Any:
        time.sleep(0.5)
        return [], True, 1.0


def env_task(tokenizer: PreTrainedTokenizerBase, env: type) -> EnvTask:
    base = get_task(replace(TaskConfig(), name="reverse"), tokenizer)
    return EnvTask("custom", base, env)


def one_turn_handler(address: str, path: str, body: dict[str, Any]) -> Any:
    return answer([4, 2], "stop", [("0", 0, 2)])


@pytest.mark.parametrize(
    ("env", "kind", "timeout"),
    [(RaisingEnv, "step RuntimeError", 5.0), (SlowEnv, "step timeout", 0.05)],
)
def test_an_environment_that_raises_or_times_out_rejects_the_rollout(
    tokenizer: PreTrainedTokenizerBase, env: type, kind: str, timeout: float
) -> None:
    async def run() -> None:
        client = make_client(ServerPool([A]), FakeServers(one_turn_handler))
        flow = workflow(tokenizer, client, env_task(tokenizer, env), env_timeout_s=timeout)
        await flow.run(0, 0, gate=_open_gate)

    with pytest.raises(EpisodeRejected) as info:
        asyncio.run(run())
    assert info.value.kind == kind


async def _open_gate() -> None:
    return None


def test_a_slow_environment_runs_off_the_loop_and_is_timed_apart(
    tokenizer: PreTrainedTokenizerBase,
) -> None:
    """Two episodes whose steps sleep 0.5 s in worker threads take about 0.5 s together, and
    the loop keeps ticking meanwhile."""
    ticks: list[float] = []

    async def ticker() -> None:
        while True:
            ticks.append(time.monotonic())
            await asyncio.sleep(0.02)

    async def run() -> RolloutGroup | None:
        client = make_client(ServerPool([A]), FakeServers(one_turn_handler))
        flow = workflow(tokenizer, client, env_task(tokenizer, SlowEnv))
        tick = asyncio.create_task(ticker())
        try:
            return await flow.run(0, 0, gate=_open_gate)
        finally:
            tick.cancel()

    started = time.monotonic()
    group = asyncio.run(run())
    elapsed = time.monotonic() - started
    assert group is not None and len(group.samples) == 2
    assert elapsed < 0.95  # the two 0.5 s steps overlapped
    assert all((s.env_s or 0) >= 0.45 for s in group.samples)
    assert all(s.reward == 1.0 and s.end_reason == "done" for s in group.samples)
    gaps = [b - a for a, b in itertools.pairwise(ticks)]
    assert gaps and max(gaps) < 0.3


def test_an_episode_past_its_token_limit_ends_with_reason_context(
    tokenizer: PreTrainedTokenizerBase,
) -> None:
    def handler(address: str, path: str, body: dict[str, Any]) -> Any:
        return answer([4, 4, 2], "stop", [("0", 0, 3)])

    async def run() -> Trajectory:
        client = make_client(ServerPool([A]), FakeServers(handler))
        flow = workflow(tokenizer, client)
        prompt = flow.task.sample_prompt(0)
        _, first_ids = flow.messages.first([{"role": "user", "content": prompt.question}])
        # Room for the prompt, one model turn and not the feedback after it.
        flow.limits = replace(flow.limits, max_tokens=len(first_ids) + 6)
        return await flow.play(prompt, flow.sampling(0, 0), gate=None)

    trajectory = asyncio.run(run())
    assert trajectory.end_reason == "context"
    assert trajectory.n_trained == 3 and trajectory.trained == [True] * 3


def test_episode_refuses_context_that_does_not_fit_and_appends_nothing() -> None:
    episode = Episode([1, 2], max_tokens=5)
    episode.add_model_turn(ModelTurn([3, 4], [-0.5, -0.5], [0, 0], "stop", [(0, 0, 2)]))
    with pytest.raises(ContextOverflow):
        episode.add_context([5, 6], "user", "too long")
    assert episode.context_ids() == [1, 2, 3, 4]


def test_a_continued_turn_scores_the_episode_from_its_first_output_token_for_the_recompute(
    tokenizer: PreTrainedTokenizerBase,
) -> None:
    """Turn 2 continues after an abort with score_continuations: the prefill scores every
    output token before it (turn 1, the feedback, turn 2's first tokens) under v1, and the
    recompute before the update to v2 takes those instead of scoring the episode again."""
    turns = ScriptedTurns(tokenizer)
    answers = [
        (turns.turn1, "stop", [("0", 0, 2)]),
        (turns.turn2[:2], "abort", [("0", 0, 2)]),
        (turns.turn2[2:], "stop", [("1", 0, 2)]),
        (turns.turn3, "stop", [("1", 0, 3)]),
    ]
    requests: list[dict[str, Any]] = []

    async def run() -> Trajectory:
        fake = FakeServers(continuation_scores_handler(requests, answers))
        client = make_client(ServerPool([A]), fake, score_continuations=True)
        flow = workflow(tokenizer, client)
        return await flow.play(flow.task.sample_prompt(0), flow.sampling(0, 0), gate=None)

    trajectory = asyncio.run(run())
    n_prompt = len(trajectory.prompt_ids)
    continued = requests[2]["token_ids"]
    # Every output token before the continuation, each scored −(id)/10 by the fake.
    assert trajectory.prefix_version == 1
    assert trajectory.prefix_logprobs == pytest.approx([-t / 10 for t in continued[n_prompt:]])

    async def no_scorer(pairs: list[tuple[list[int], list[int]]]) -> list[list[float]]:
        raise AssertionError("the continuation's scores cover every v0 token")

    stats = asyncio.run(ProximalRecomputer(no_scorer).recompute([RolloutGroup(0, [trajectory])], 1))
    assert stats.continued_samples == 1 and stats.tokens == 4
    prox = trajectory.proximal_logprobs()
    v0_model = [i for i, v in enumerate(trajectory.versions) if v == 0 and trajectory.is_trained(i)]
    assert [prox[i] for i in v0_model] == pytest.approx(
        [-trajectory.output_ids[i] / 10 for i in v0_model]
    )


def test_a_resumed_run_replays_the_untrained_position_as_the_same_episode_instance(
    tokenizer: PreTrainedTokenizerBase,
) -> None:
    """Position replay: an episode in flight at a crash was not trained; the checkpoint's
    untrained position is played again after resume, on the same task instance."""
    from sdp_cli.rollout.positions import DataPositions

    def handler(address: str, path: str, body: dict[str, Any]) -> Any:
        return answer([4, 2], "stop", [("0", 0, 2)])

    async def first_prompt(positions: DataPositions, rollout_id: int) -> str:
        client = make_client(ServerPool([A]), FakeServers(handler))
        flow = workflow(tokenizer, client)
        flow.positions = positions
        positions.assign(rollout_id)
        group = await flow.run(rollout_id, 0, _open_gate)
        assert group is not None
        return str(group.meta["prompt"])

    before = DataPositions()
    prompts = [asyncio.run(first_prompt(before, rid)) for rid in range(3)]
    before.trained([0, 2])  # rollout 1 was in flight at the crash
    resumed = DataPositions(before.state())
    assert asyncio.run(first_prompt(resumed, 100)) == prompts[1]


def test_more_slow_tools_run_at_once_than_asyncios_default_pool_has_threads(
    tokenizer: PreTrainedTokenizerBase,
) -> None:
    """16 episodes whose step sleeps 0.5 s finish in about 0.5 s: the workflow's own pool has
    a thread per episode in flight (asyncio's default has 6 on 2 cores: 1.5 s at least)."""

    async def run() -> RolloutGroup | None:
        client = make_client(ServerPool([A]), FakeServers(one_turn_handler))
        flow = workflow(tokenizer, client, env_task(tokenizer, SlowEnv))
        flow.rollout = replace(flow.rollout, n_samples=16)
        return await flow.run(0, 0, gate=_open_gate)

    started = time.monotonic()
    group = asyncio.run(run())
    assert group is not None and len(group.samples) == 16
    assert time.monotonic() - started < 1.4
