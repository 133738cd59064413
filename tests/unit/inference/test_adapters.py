"""LoRA on the servers against fake servers (httpx.MockTransport): adapter names per version,
the load → version → resume sequence, requests naming the server's adapter, token versions
from the adapter, and which adapters are unloaded. Real vLLM: tests/integration/
test_lora_vllm.py."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from sdp_cli.inference import SamplingParams, ServerPool, ServerState
from sdp_cli.inference.adapters import (
    adapter_name,
    adapter_prefix,
    adapter_version,
    adapters_to_unload,
)
from sdp_cli.weight_sync.adapter_export import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from sdp_cli.weight_sync.disk import DiskTransport, load_target_weights
from tests.unit.inference.test_client import (
    A,
    B,
    FakeServers,
    answer,
    make_client,
    prompt_logprobs_of_minus_token_id,
)


def adapter_dir(tmp_path: Path, version: int) -> Path:
    path = tmp_path / f"v{version}"
    path.mkdir(parents=True, exist_ok=True)
    (path / ADAPTER_CONFIG).write_text(json.dumps({"r": 8}))
    (path / ADAPTER_WEIGHTS).write_bytes(b"x")
    return path


def lora_server(loaded: set[str] | None = None) -> FakeServers:
    """Answers the LoRA endpoints (404 when unloading an unknown name) and generates one token
    with the spans of version "9", whatever adapter was named."""
    known = loaded if loaded is not None else set()

    def handler(address: str, path: str, body: dict[str, Any]) -> Any:
        if path == "/v1/load_lora_adapter":
            known.add(body["lora_name"])
        if path == "/v1/unload_lora_adapter":
            if body["lora_name"] not in known:
                return httpx.Response(404, json={"error": "not found"})
            known.discard(body["lora_name"])
        if path == "/inference/v1/generate":
            return {**answer([5], "length", [("9", 0, 1)]), "model": body.get("model")}
        if path == "/v1/completions":
            return prompt_logprobs_of_minus_token_id(address, path, body)
        return {}

    return FakeServers(handler)


def test_adapter_names_are_one_per_version_and_read_back() -> None:
    prefix = adapter_prefix()
    names = {adapter_name(prefix, v) for v in range(3)}
    assert len(names) == 3
    assert [adapter_version(adapter_name(prefix, v)) for v in range(3)] == [0, 1, 2]
    # The base model's name and other runs' prefixes' shapes are not adapters of a version.
    assert adapter_version("sdp-policy") is None and adapter_version(None) is None
    assert adapter_prefix() != prefix


def test_unload_keeps_the_current_adapter_and_those_requests_still_name() -> None:
    loaded = ["a-v1", "a-v2", "a-v3", "a-v4"]
    assert adapters_to_unload(loaded, "a-v4", {"a-v2": 1, "a-v1": 0}) == ["a-v1", "a-v3"]
    assert adapters_to_unload(["a-v4"], "a-v4", {}) == []


def test_a_lora_update_loads_the_versions_adapter_and_requests_name_it(tmp_path: Path) -> None:
    fake = lora_server()
    pool = ServerPool([A, B])
    client = make_client(pool, fake)
    asyncio.run(DiskTransport(client).load_weights(str(adapter_dir(tmp_path, 1)), 1))
    name = adapter_name(pool.adapter_prefix, 1)
    for address in (A, B):
        assert fake.paths(address) == [
            "/pause",
            "/v1/load_lora_adapter",
            "/update_weight_version",
            "/resume",
        ]
    load = next(body for a, p, body in fake.calls if a == A and p == "/v1/load_lora_adapter")
    assert load == {"lora_name": name, "lora_path": str(tmp_path / "v1")}
    assert [(s.version, s.adapter) for s in pool.snapshot()] == [(1, name), (1, name)]

    completion = asyncio.run(client.generate([1, 2], SamplingParams(), 1))
    generate = next(body for _, p, body in fake.calls if p == "/inference/v1/generate")
    assert generate["model"] == name
    # The adapter named is the version of the tokens, whatever the spans say.
    assert completion.versions == [1]
    asyncio.run(client.score_many([([1, 2], [3])]))
    scoring = next(body for _, p, body in fake.calls if p == "/v1/completions")
    assert scoring["model"] == name


def test_a_keep_update_of_an_adapter_pauses_with_keep_and_keeps_the_named_adapter_loaded(
    tmp_path: Path,
) -> None:
    fake = lora_server()
    pool = ServerPool([A])
    client = make_client(pool, fake)
    asyncio.run(DiskTransport(client).load_weights(str(adapter_dir(tmp_path, 1)), 1))
    old = adapter_name(pool.adapter_prefix, 1)
    # A request running on the v1 adapter when the keep update comes.
    assert pool.acquire() is not None
    fake.calls.clear()
    keep = DiskTransport(client, keep_requests=True)
    asyncio.run(keep.load_weights(str(adapter_dir(tmp_path, 2)), 2))
    assert fake.paths(A) == ["/pause", "/v1/load_lora_adapter", "/update_weight_version", "/resume"]
    pause = next(body for _, p, body in fake.calls if p == "/pause")
    assert pause == {"mode": "keep", "clear_cache": "false"}
    assert pool.status(0).adapter == adapter_name(pool.adapter_prefix, 2)
    # The frozen request finishes on the v1 adapter, which stays loaded until it is back.
    assert pool.unloadable_adapters(0) == []
    pool.release(0, old)
    assert pool.unloadable_adapters(0) == [old]


def test_a_second_update_unloads_the_old_adapter_unless_a_request_names_it(
    tmp_path: Path,
) -> None:
    fake = lora_server()
    pool = ServerPool([A])
    transport = DiskTransport(make_client(pool, fake))
    asyncio.run(transport.load_weights(str(adapter_dir(tmp_path, 1)), 1))
    old = adapter_name(pool.adapter_prefix, 1)
    # A request routed to the server under v1 and not back yet.
    assert pool.acquire() is not None
    asyncio.run(transport.load_weights(str(adapter_dir(tmp_path, 2)), 2))
    assert "/v1/unload_lora_adapter" not in fake.paths()
    pool.release(0, old)
    asyncio.run(transport.load_weights(str(adapter_dir(tmp_path, 3)), 3))
    unloaded = [body["lora_name"] for _, p, body in fake.calls if p == "/v1/unload_lora_adapter"]
    assert unloaded == [old, adapter_name(pool.adapter_prefix, 2)]
    assert pool.unloadable_adapters(0) == []


def test_a_restarted_server_gets_the_base_model_plus_the_current_adapter(
    tmp_path: Path,
) -> None:
    fake = lora_server()
    pool = ServerPool([A, B])
    client = make_client(pool, fake)
    asyncio.run(DiskTransport(client).load_weights(str(adapter_dir(tmp_path, 4)), 4))
    pool.set_state(1, ServerState.restarting)
    before = len(fake.calls)

    async def resync() -> None:
        await load_target_weights(pool, client.http(), 1, 5.0)

    asyncio.run(resync())
    name = adapter_name(pool.adapter_prefix, 4)
    assert [p for a, p, _ in fake.calls[before:] if a == B][:4] == [
        "/pause",
        "/v1/load_lora_adapter",
        "/update_weight_version",
        "/resume",
    ]
    assert pool.status(1).state == ServerState.ready
    assert (pool.status(1).version, pool.status(1).adapter) == (4, name)


def test_an_adapter_dir_without_its_weights_is_refused_before_any_server(
    tmp_path: Path,
) -> None:
    from sdp_cli.inference import WeightsDirError

    path = adapter_dir(tmp_path, 1)
    (path / ADAPTER_WEIGHTS).unlink()
    fake = lora_server()
    with pytest.raises(WeightsDirError, match=ADAPTER_WEIGHTS):
        asyncio.run(DiskTransport(make_client(ServerPool([A]), fake)).load_weights(str(path), 1))
    assert fake.calls == []
