"""InferenceClient and ServerPool against fake servers (httpx.MockTransport): fault injection for
routing, retries, backoff, timeouts, segment joining and the weight-update call sequence.
Real behaviour on vLLM is in tests/integration/test_inference_vllm.py."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from sdp_cli.inference import (
    InferenceClient,
    NoServerAvailableError,
    RequestFailedError,
    RequestRejectedError,
    SamplingParams,
    ServerPool,
    ServerProtocolError,
    ServerState,
    WeightsDirError,
    WeightUpdateError,
)
from sdp_cli.inference.connections import ConnectionPool
from sdp_cli.inference.protocol import (
    parse_prefix_logprobs,
    parse_prompt_logprobs,
    prompt_logprobs_body,
    versions_from_spans,
)
from sdp_cli.inference.types import Completion
from sdp_cli.weight_sync.disk import DiskTransport

A, B = "http://a:1", "http://b:2"


def answer(tokens: list[int], finish: str, spans: list[tuple[str, int, int]]) -> dict[str, Any]:
    return {
        "choices": [
            {
                "index": 0,
                "finish_reason": finish,
                "token_ids": tokens,
                "logprobs": {
                    "content": [
                        {"token_id": t, "logprob": -0.1 * (i + 1)} for i, t in enumerate(tokens)
                    ]
                },
                "weight_versions": [{"version": v, "start": s, "end": e} for v, s, e in spans],
            }
        ]
    }


@dataclass
class FakeServers:
    """Routes each request to `handler(address, path, body)`; records every call."""

    handler: Callable[[str, str, dict[str, Any]], Any]
    calls: list[tuple[str, str, dict[str, Any]]] = field(default_factory=list)

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        address = f"{request.url.scheme}://{request.url.host}:{request.url.port}"
        body = json.loads(request.content) if request.content else {}
        if request.url.params:
            body = {**body, **dict(request.url.params)}
        self.calls.append((address, request.url.path, body))
        result = self.handler(address, request.url.path, body)
        if asyncio.iscoroutine(result):
            result = await result
        if isinstance(result, httpx.Response):
            return result
        return httpx.Response(200, json=result)

    def paths(self, address: str | None = None) -> list[str]:
        return [p for a, p, _ in self.calls if address is None or a == address]


def make_client(pool: ServerPool, fake: FakeServers, **kwargs: Any) -> InferenceClient:
    options: dict[str, Any] = {"backoff_s": 0.001, "max_model_len": 256, "server_wait_s": 5.0}
    options.update(kwargs)
    return InferenceClient(pool, transport=httpx.MockTransport(fake), **options)


def prompt_logprobs_of_minus_token_id(address: str, path: str, body: dict[str, Any]) -> Any:
    """A /v1/completions answer giving every prompt token the logprob −(its id)."""
    return {
        "choices": [
            {
                "index": k,
                "prompt_logprobs": [None] + [{str(t): {"logprob": -float(t)}} for t in ids[1:]],
            }
            for k, ids in enumerate(body["prompt"])
        ]
    }


# ---- protocol parsing -------------------------------------------------------------------


def test_initial_version_name_is_version_zero_and_spans_give_per_token_versions() -> None:
    spans = [{"version": "default", "start": 0, "end": 2}, {"version": "3", "start": 2, "end": 5}]
    assert versions_from_spans(spans, 5) == [0, 0, 3, 3, 3]


def test_spans_that_miss_a_token_are_a_protocol_error() -> None:
    with pytest.raises(ServerProtocolError):
        versions_from_spans([{"version": "1", "start": 0, "end": 2}], 3)


def test_prompt_logprobs_are_read_by_token_id_from_start() -> None:
    payload = {
        "choices": [{"prompt_logprobs": [None, {"7": {"logprob": -1.5}}, {"9": {"logprob": -2.5}}]}]
    }
    assert parse_prompt_logprobs(payload, [[1, 7, 9]], [1]) == [[-1.5, -2.5]]
    assert parse_prompt_logprobs(payload, [[1, 7, 9]], [2]) == [[-2.5]]


def test_batched_prompt_logprobs_are_matched_to_prompts_by_choice_index() -> None:
    payload = {
        "choices": [
            {"index": 1, "prompt_logprobs": [None, {"5": {"logprob": -5.0}}]},
            {"index": 0, "prompt_logprobs": [None, {"7": {"logprob": -7.0}}]},
        ]
    }
    assert parse_prompt_logprobs(payload, [[1, 7], [2, 5]], [1, 1]) == [[-7.0], [-5.0]]


def test_prefix_logprobs_of_a_generate_answer_are_read_by_token_id_from_start() -> None:
    entries = [None, {"7": {"logprob": -1.5}}, {"9": {"logprob": -2.5, "rank": 3}}]
    assert parse_prefix_logprobs({"prompt_logprobs": entries}, [1, 7, 9], 1) == [-1.5, -2.5]
    assert parse_prefix_logprobs({"prompt_logprobs": entries}, [1, 7, 9], 2) == [-2.5]
    assert parse_prefix_logprobs({"prompt_logprobs": None}, [1, 7, 9], 1) is None
    with pytest.raises(ServerProtocolError, match="3 prompt logprobs for 4 tokens"):
        parse_prefix_logprobs({"prompt_logprobs": entries}, [1, 7, 9, 4], 1)
    # A continuation aborted before its prefill ran comes back with its first entry only: it
    # brings no scores (the recompute scores the sample instead), and is no protocol error.
    assert parse_prefix_logprobs({"prompt_logprobs": [None]}, [1, 7, 9], 1, aborted=True) is None
    with pytest.raises(ServerProtocolError, match="unexpected prompt logprobs"):
        parse_prefix_logprobs({"prompt_logprobs": entries}, [1, 7, 8], 1)


def test_tempered_prompt_logprobs_are_log_softmax_of_the_logits_over_t() -> None:
    logits = [2.0, 0.5, -1.0, 0.0]
    raw = torch.log_softmax(torch.tensor(logits), dim=-1).tolist()
    entry = {str(token): {"logprob": lp} for token, lp in enumerate(raw)}
    payload = {"choices": [{"prompt_logprobs": [None, entry]}]}
    want = torch.log_softmax(torch.tensor(logits) / 0.7, dim=-1)[1].item()
    (got,) = parse_prompt_logprobs(payload, [[3, 1]], [1], temperature=0.7)
    assert got == pytest.approx([want], abs=1e-6)
    assert got != pytest.approx([raw[1]], abs=1e-2)


def test_tempered_prompt_logprobs_need_the_whole_distribution() -> None:
    payload = {"choices": [{"prompt_logprobs": [None, {"1": {"logprob": -0.5}}]}]}
    with pytest.raises(ServerProtocolError, match="whole distribution"):
        parse_prompt_logprobs(payload, [[3, 1]], [1], temperature=0.7)


def test_only_a_tempered_recompute_asks_for_the_whole_distribution() -> None:
    assert prompt_logprobs_body([[1, 2]], "m")["prompt_logprobs"] == 0
    assert prompt_logprobs_body([[1, 2]], "m", whole_distribution=True)["prompt_logprobs"] == -1


def test_a_batched_answer_missing_a_prompt_is_a_protocol_error() -> None:
    payload = {"choices": [{"index": 0, "prompt_logprobs": [None, {"7": {"logprob": -7.0}}]}]}
    with pytest.raises(ServerProtocolError, match="1 choices for 2 prompts"):
        parse_prompt_logprobs(payload, [[1, 7], [2, 5]], [1, 1])


def test_every_sampling_field_is_sent_and_continuations_shift_seed_and_min_tokens() -> None:
    sampling = SamplingParams(
        temperature=0.7, top_p=0.9, top_k=5, min_p=0.1, seed=11, stop_token_ids=(3,), min_tokens=8
    )
    first = sampling.request_fields(max_tokens=20, tokens_so_far=0)
    assert first["max_tokens"] == 20 and first["min_tokens"] == 8 and first["seed"] == 11
    assert first["logprobs"] == 0 and first["ignore_eos"] is False
    assert first["stop_token_ids"] == [3]
    assert {"temperature", "top_p", "top_k", "min_p", "n", "repetition_penalty"} <= set(first)
    later = sampling.request_fields(max_tokens=14, tokens_so_far=6)
    assert later["min_tokens"] == 2 and later["seed"] == 17


def test_completion_merges_runs_of_one_version_into_segments() -> None:
    completion = Completion()
    completion.append([5, 6], [-1.0, -1.0], [0, 0])
    completion.append([7], [-1.0], [0])
    completion.append([8, 9], [-1.0, -1.0], [1, 1])
    assert completion.segments == [(0, 0, 3), (1, 3, 5)]
    assert completion.n_segments == 2


# ---- pool ---------------------------------------------------------------------------


def test_pool_routes_to_fewest_in_flight_among_ready_servers() -> None:
    pool = ServerPool([A, B, "http://c:3"])
    pool.set_state(2, ServerState.restarting)
    first = pool.acquire()
    second = pool.acquire()
    third = pool.acquire()
    assert first is not None and second is not None and third is not None
    assert {first.index, second.index} == {0, 1}
    assert third.index in (0, 1)
    assert [s.in_flight for s in pool.snapshot()] in ([2, 1, 0], [1, 2, 0])
    pool.release(third.index)
    assert [s.in_flight for s in pool.snapshot()] == [1, 1, 0]


def test_pool_listeners_hear_state_changes_but_not_in_flight_counts() -> None:
    pool = ServerPool([A])
    heard: list[ServerState] = []
    pool.subscribe(lambda status: heard.append(status.state))
    server = pool.acquire()
    assert server is not None
    pool.release(server.index)
    pool.set_state(0, ServerState.restarting)
    pool.set_state(0, ServerState.restarting)
    assert heard == [ServerState.restarting]


def test_a_server_handed_over_for_restart_is_not_routed_to() -> None:
    pool = ServerPool([A, B])
    pool.request_restart(0, "weight update failed")
    assert pool.status(0).state == ServerState.restarting
    assert {pool.acquire().index for _ in range(3)} == {1}  # type: ignore[union-attr]
    assert pool.take_restart_request(0) == "weight update failed"
    assert pool.take_restart_request(0) is None


def test_a_server_the_supervisor_is_already_restarting_is_not_restarted_twice() -> None:
    """Killed just before an update: the supervisor saw the exit and is restarting it when the
    update fails on it; that restart loads the new weights, so no second one is asked for."""
    pool = ServerPool([A])
    pool.set_state(0, ServerState.restarting)  # the supervisor's restart is under way
    pool.request_restart(0, "weight update failed")
    assert pool.take_restart_request(0) is None


def test_marking_ready_fails_when_the_target_moved_on_during_a_sync() -> None:
    pool = ServerPool([A], state=ServerState.restarting)
    pool.set_target_weights("/w/v2", 2)
    assert not pool.mark_ready_if_current(0, 1)
    assert pool.status(0).state == ServerState.restarting
    assert pool.mark_ready_if_current(0, 2)
    assert pool.status(0).state == ServerState.ready and pool.status(0).version == 2


# ---- generation ---------------------------------------------------------------------


def test_aborted_segment_continues_from_prompt_plus_tokens_after_the_gate() -> None:
    requests: list[dict[str, Any]] = []

    def handler(address: str, path: str, body: dict[str, Any]) -> Any:
        requests.append(body)
        if len(requests) == 1:
            return answer([10, 11, 12], "abort", [("4", 0, 3)])
        return answer([13, 14], "length", [("5", 0, 2)])

    gate_calls: list[int] = []

    async def gate() -> None:
        gate_calls.append(len(requests))

    async def run() -> Completion:
        client = make_client(ServerPool([A]), FakeServers(handler))
        return await client.generate([1, 2], SamplingParams(seed=3), 5, gate=gate)

    completion = asyncio.run(run())
    assert completion.output_ids == [10, 11, 12, 13, 14]
    assert completion.versions == [4, 4, 4, 5, 5]
    assert completion.segments == [(4, 0, 3), (5, 3, 5)]
    assert completion.finish_reason == "length" and completion.n_requests == 2
    assert completion.logprobs == pytest.approx([-0.1, -0.2, -0.3, -0.1, -0.2])
    assert requests[1]["token_ids"] == [1, 2, 10, 11, 12]
    assert requests[1]["sampling_params"]["max_tokens"] == 2
    assert requests[1]["sampling_params"]["seed"] == 6
    assert gate_calls == [0, 1]


def continuation_scores_handler(
    requests: list[dict[str, Any]], answers: list[tuple[list[int], str, list[Any]]]
) -> Callable[[str, str, dict[str, Any]], Any]:
    """Generate answers in order; a request that asks for prompt logprobs gets each of its
    tokens scored −(token id)/10."""

    def handler(address: str, path: str, body: dict[str, Any]) -> Any:
        requests.append(body)
        payload = answer(*answers[len(requests) - 1])
        if body["sampling_params"]["prompt_logprobs"] == 0:
            ids = body["token_ids"]
            payload["prompt_logprobs"] = [None] + [{str(t): {"logprob": -t / 10}} for t in ids[1:]]
        return payload

    return handler


def test_a_continuation_brings_its_earlier_tokens_logprobs_under_its_version() -> None:
    requests: list[dict[str, Any]] = []
    answers = [
        ([10, 11], "abort", [("4", 0, 2)]),
        ([], "abort", []),  # aborted again before a token: its version is unknown
        ([12], "abort", [("5", 0, 1)]),
        ([13], "length", [("6", 0, 1)]),
    ]

    async def run() -> Completion:
        fake = FakeServers(continuation_scores_handler(requests, answers))
        client = make_client(ServerPool([A]), fake, score_continuations=True)
        return await client.generate([1, 2], SamplingParams(seed=3), 4)

    completion = asyncio.run(run())
    asked = [r["sampling_params"]["prompt_logprobs"] for r in requests]
    assert asked == [None, 0, 0, 0]
    assert completion.output_ids == [10, 11, 12, 13]
    # The last continuation with tokens: [1, 2, 10, 11, 12] under version 6.
    assert completion.prefix_version == 6
    assert completion.prefix_logprobs == pytest.approx([-1.0, -1.1, -1.2])


def test_continuations_ask_for_no_logprobs_unless_told_or_at_another_temperature() -> None:
    answers = [([10], "abort", [("4", 0, 1)]), ([11], "length", [("5", 0, 1)])]

    async def run(
        requests: list[dict[str, Any]], options: dict[str, Any], temperature: float
    ) -> Completion:
        fake = FakeServers(continuation_scores_handler(requests, answers))
        client = make_client(ServerPool([A]), fake, **options)
        return await client.generate([1], SamplingParams(temperature=temperature), 2)

    for options, temperature in (({}, 1.0), ({"score_continuations": True}, 0.7)):
        requests: list[dict[str, Any]] = []
        completion = asyncio.run(run(requests, options, temperature))
        assert [r["sampling_params"]["prompt_logprobs"] for r in requests] == [None, None]
        assert completion.prefix_logprobs is None and completion.prefix_version is None


def test_abort_right_after_a_stop_token_ends_the_completion() -> None:
    def handler(address: str, path: str, body: dict[str, Any]) -> Any:
        return answer([10, 3], "abort", [("1", 0, 2)])

    async def run() -> Completion:
        client = make_client(ServerPool([A]), FakeServers(handler))
        return await client.generate([1], SamplingParams(stop_token_ids=(3,)), 10)

    completion = asyncio.run(run())
    assert completion.output_ids == [10, 3] and completion.finish_reason == "stop"


def test_budget_leaves_room_to_score_the_completion_within_the_context() -> None:
    fake = FakeServers(
        lambda a, p, b: answer(
            [9] * b["sampling_params"]["max_tokens"],
            "length",
            [("0", 0, b["sampling_params"]["max_tokens"])],
        )
    )

    async def run() -> Completion:
        client = make_client(ServerPool([A]), fake, max_model_len=10)
        return await client.generate([1] * 6, SamplingParams(), 50)

    completion = asyncio.run(run())
    # 10 positions: 6 of prompt, 3 of output, 1 left so that prompt + output can be scored.
    assert len(completion.output_ids) == 3
    assert fake.calls[0][2]["sampling_params"]["max_tokens"] == 3


def test_connection_error_is_retried_on_another_server() -> None:
    def handler(address: str, path: str, body: dict[str, Any]) -> Any:
        if address == A:
            raise httpx.ConnectError("refused")
        return answer([5], "length", [("0", 0, 1)])

    fake = FakeServers(handler)
    pool = ServerPool([A, B])

    async def run() -> Completion:
        return await make_client(pool, fake).generate([1], SamplingParams(), 1)

    completion = asyncio.run(run())
    assert completion.output_ids == [5] and completion.n_requests == 2
    assert [a for a, _, _ in fake.calls] == [A, B]
    # The failed server is avoided by the next request too, and no request is left counted.
    assert pool.acquire().index == 1  # type: ignore[union-attr]
    assert [s.in_flight for s in pool.snapshot()] == [0, 1]


def test_retries_back_off_exponentially_and_give_up_after_max_attempts() -> None:
    def handler(address: str, path: str, body: dict[str, Any]) -> Any:
        raise httpx.ConnectError("refused")

    fake = FakeServers(handler)
    client = make_client(ServerPool([A]), fake, max_attempts=4, backoff_s=0.05)
    start = time.monotonic()
    with pytest.raises(RequestFailedError, match="failed 4 times"):
        asyncio.run(client.generate([1], SamplingParams(), 1))
    # 0.05 + 0.1 + 0.2 + 0.4 seconds of backoff between and after the four attempts.
    assert time.monotonic() - start >= 0.7
    assert len(fake.calls) == 4


def test_server_errors_are_retried_but_rejections_are_not() -> None:
    statuses = iter([500, 200])

    def flaky(address: str, path: str, body: dict[str, Any]) -> Any:
        code = next(statuses)
        return answer([5], "length", [("0", 0, 1)]) if code == 200 else httpx.Response(code)

    fake = FakeServers(flaky)
    assert asyncio.run(
        make_client(ServerPool([A]), fake).generate([1], SamplingParams(), 1)
    ).output_ids == [5]
    assert len(fake.calls) == 2

    rejecting = FakeServers(lambda a, p, b: httpx.Response(400, text="too long"))
    with pytest.raises(RequestRejectedError, match="too long"):
        asyncio.run(make_client(ServerPool([A]), rejecting).generate([1], SamplingParams(), 1))
    assert len(rejecting.calls) == 1


def test_a_request_past_its_timeout_is_aborted_there_and_retried_elsewhere() -> None:
    async def handler(address: str, path: str, body: dict[str, Any]) -> Any:
        if path.endswith("abort_requests"):
            return {}
        if address == A:
            await asyncio.sleep(5.0)
        return answer([5], "length", [("0", 0, 1)])

    fake = FakeServers(handler)

    async def run() -> Completion:
        return await make_client(ServerPool([A, B]), fake, request_timeout_s=0.2).generate(
            [1], SamplingParams(), 1
        )

    start = time.monotonic()
    assert asyncio.run(run()).output_ids == [5]
    assert time.monotonic() - start < 2.0
    assert fake.paths(A) == ["/inference/v1/generate", "/inference/v1/abort_requests"]
    timed_out_id = fake.calls[0][2]["request_id"]
    assert timed_out_id in fake.calls[1][2]["request_ids"]


def test_a_request_waits_while_every_server_restarts() -> None:
    pool = ServerPool([A], state=ServerState.restarting)
    fake = FakeServers(lambda a, p, b: answer([5], "length", [("2", 0, 1)]))

    async def run() -> Completion:
        async def come_back() -> None:
            await asyncio.sleep(0.3)
            pool.set_state(0, ServerState.ready)

        task = asyncio.create_task(come_back())
        completion = await make_client(pool, fake).generate([1], SamplingParams(), 1)
        await task
        return completion

    start = time.monotonic()
    assert asyncio.run(run()).versions == [2]
    assert time.monotonic() - start >= 0.3


def test_no_live_server_is_an_error_not_a_hang() -> None:
    pool = ServerPool([A], state=ServerState.dead)
    client = make_client(pool, FakeServers(lambda a, p, b: {}))
    with pytest.raises(NoServerAvailableError, match="alive"):
        asyncio.run(client.generate([1], SamplingParams(), 1))


def test_score_is_prompt_logprobs_of_the_output_given_the_prompt() -> None:
    fake = FakeServers(prompt_logprobs_of_minus_token_id)
    client = make_client(ServerPool([A]), fake, model_name="m")
    assert asyncio.run(client.score([1, 2], [3, 4])) == [-3.0, -4.0]
    _, path, body = fake.calls[0]
    assert path == "/v1/completions"
    assert body["model"] == "m" and body["max_tokens"] == 1 and body["prompt_logprobs"] == 0


def test_score_many_sends_one_prompt_list_per_ready_server_and_keeps_order() -> None:
    async def slow_answer(address: str, path: str, body: dict[str, Any]) -> Any:
        await asyncio.sleep(0.01)  # both requests in flight at once, as with real servers
        return prompt_logprobs_of_minus_token_id(address, path, body)

    fake = FakeServers(slow_answer)
    client = make_client(ServerPool([A, B]), fake)
    samples = [([1], [10 + i, 20 + i]) for i in range(5)]
    scores = asyncio.run(client.score_many(samples))
    assert scores == [[-10.0 - i, -20.0 - i] for i in range(5)]
    assert sorted(len(body["prompt"]) for _, _, body in fake.calls) == [2, 3]
    assert {address for address, _, _ in fake.calls} == {A, B}


def test_score_many_of_nothing_sends_nothing() -> None:
    fake = FakeServers(prompt_logprobs_of_minus_token_id)
    assert asyncio.run(make_client(ServerPool([A]), fake).score_many([])) == []
    assert fake.calls == []


# ---- weight updates -----------------------------------------------------------------


def weights_dir(tmp_path: Path) -> Path:
    (tmp_path / "model.safetensors").write_bytes(b"")
    (tmp_path / "config.json").write_text("{}")
    return tmp_path


def test_weight_update_runs_the_protocol_on_every_ready_server(tmp_path: Path) -> None:
    fake = FakeServers(lambda a, p, b: {"results": [None]} if p == "/collective_rpc" else {})
    pool = ServerPool([A, B, "http://c:3"])
    pool.set_state(2, ServerState.restarting)
    timings = asyncio.run(
        DiskTransport(make_client(pool, fake)).load_weights(str(weights_dir(tmp_path)), 7)
    )
    for address in (A, B):
        assert fake.paths(address) == [
            "/pause",
            "/collective_rpc",
            "/update_weight_version",
            "/resume",
        ]
    assert fake.paths("http://c:3") == []
    pause, reload, version, _resume = [body for a, _, body in fake.calls if a == A]
    assert pause == {"mode": "abort", "clear_cache": "true"}
    assert reload == {"method": "reload_weights", "kwargs": {"weights_path": str(tmp_path)}}
    assert version == {"new_version": "7"}
    assert [s.version for s in pool.snapshot()] == [7, 7, 0]
    assert pool.target().version == 7 and pool.target().weights_dir == str(tmp_path)
    assert set(timings) >= {"pause_s", "reload_s", "version_s", "resume_s", "total_s"}
    assert timings["servers"] == 2 and timings["failed"] == 0


def test_a_server_failing_the_update_is_handed_to_the_supervisor(tmp_path: Path) -> None:
    def handler(address: str, path: str, body: dict[str, Any]) -> Any:
        if address == A and path == "/collective_rpc":
            return httpx.Response(500)
        return {}

    pool = ServerPool([A, B])
    timings = asyncio.run(
        DiskTransport(make_client(pool, FakeServers(handler))).load_weights(
            str(weights_dir(tmp_path)), 1
        )
    )
    assert timings["failed"] == 1 and timings["servers"] == 1
    assert pool.status(0).state == ServerState.restarting
    assert pool.take_restart_request(0) is not None
    assert pool.status(1).version == 1


def test_abort_generation_pauses_with_abort_and_resumes_every_ready_server() -> None:
    fake = FakeServers(lambda a, p, b: {})
    pool = ServerPool([A, B, "http://c:3"])
    pool.set_state(2, ServerState.restarting)
    asyncio.run(DiskTransport(make_client(pool, fake)).abort_generation())
    for address in (A, B):
        assert fake.paths(address) == ["/pause", "/resume"]
    assert fake.paths("http://c:3") == []
    pause = next(body for a, p, body in fake.calls if a == A and p == "/pause")
    # The prefix cache survives: the same weights serve the scoring that follows.
    assert pause == {"mode": "abort", "clear_cache": "false"}
    assert [s.state for s in pool.snapshot()][:2] == [ServerState.ready, ServerState.ready]


def test_a_tempered_score_asks_for_the_whole_distribution() -> None:
    fake = FakeServers(prompt_logprobs_of_minus_token_id)
    client = make_client(ServerPool([A]), fake)
    asyncio.run(client.score_many([([1], [3])], temperature=1.0))
    assert fake.calls[-1][2]["prompt_logprobs"] == 0
    with pytest.raises(ServerProtocolError, match="whole distribution"):
        asyncio.run(client.score_many([([1], [3])], temperature=0.7))
    assert fake.calls[-1][2]["prompt_logprobs"] == -1


def test_update_fails_loudly_when_every_attached_server_fails(tmp_path: Path) -> None:
    fake = FakeServers(lambda a, p, b: httpx.Response(500))
    with pytest.raises(WeightUpdateError):
        asyncio.run(
            DiskTransport(make_client(ServerPool([A]), fake)).load_weights(
                str(weights_dir(tmp_path)), 1
            )
        )


def test_under_a_supervisor_every_server_failing_the_update_is_restarted_not_fatal(
    tmp_path: Path,
) -> None:
    """The only server was killed just before the update: the supervisor restarts it with the
    new weights (the pool's target), so the run goes on."""
    fake = FakeServers(lambda a, p, b: httpx.Response(500))
    pool = ServerPool([A])
    pool.supervised = True
    weights = weights_dir(tmp_path)
    timings = asyncio.run(DiskTransport(make_client(pool, fake)).load_weights(str(weights), 1))
    assert timings["failed"] == 1 and timings["servers"] == 0
    assert pool.status(0).state == ServerState.restarting
    assert pool.take_restart_request(0) is not None
    assert pool.target().version == 1 and pool.target().weights_dir == str(weights)


def test_an_incomplete_weights_dir_is_refused_before_any_server_is_touched(tmp_path: Path) -> None:
    fake = FakeServers(lambda a, p, b: {})
    client = make_client(ServerPool([A]), fake)
    with pytest.raises(WeightsDirError, match="safetensors"):
        asyncio.run(DiskTransport(client).load_weights(str(tmp_path), 1))
    with pytest.raises(WeightsDirError, match="does not exist"):
        asyncio.run(DiskTransport(client).load_weights(str(tmp_path / "missing"), 1))
    assert fake.calls == []


# ---- connections --------------------------------------------------------------------


@pytest.fixture
def slow_http_server() -> Iterator[tuple[str, list[int]]]:
    """A keep-alive HTTP/1.1 server that answers after 0.2 s and records each request's client
    port, which names the connection it came on."""
    ports: list[int] = []

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            return None

        def do_GET(self) -> None:
            ports.append(self.client_address[1])
            time.sleep(0.2)
            self.send_response(200)
            self.send_header("content-length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", ports
    server.shutdown()
    server.server_close()


def test_concurrent_requests_get_their_own_kept_alive_connections(
    slow_http_server: tuple[str, list[int]],
) -> None:
    address, ports = slow_http_server

    async def burst(pool: ConnectionPool) -> None:
        async def one() -> None:
            async with pool.connection(address) as http:
                (await http.get(address + "/x")).raise_for_status()

        await asyncio.gather(*(one() for _ in range(16)))

    async def run() -> float:
        pool = ConnectionPool(httpx.Timeout(10.0))
        await burst(pool)
        start = time.monotonic()
        await burst(pool)
        elapsed = time.monotonic() - start
        await pool.aclose()
        return elapsed

    elapsed = asyncio.run(run())
    first, second = ports[:16], ports[16:]
    assert len(set(first)) == 16, "concurrent requests shared a connection"
    assert set(second) == set(first), "connections were not kept alive and reused"
    # All 16 ran at once, not queued behind each other on a few connections.
    assert elapsed < 1.0


def test_aborting_generation_goes_on_past_a_server_that_just_died() -> None:
    """The weight update aborts generation on every ready server; one SIGKILLed a moment ago
    refuses the connection, which must not end the run (its supervisor restarts it)."""

    def handler(address: str, path: str, body: dict[str, Any]) -> Any:
        if address == A:
            raise httpx.ConnectError("connection refused")
        return {}

    fake = FakeServers(handler)
    pool = ServerPool([A, B])
    asyncio.run(DiskTransport(make_client(pool, fake)).abort_generation())
    assert fake.paths(B) == ["/pause", "/resume"]
    # Requests are steered to the server that answered until the health check catches up.
    assert {pool.acquire().index for _ in range(3)} == {1}  # type: ignore[union-attr]
