"""Exported weights on a real vLLM CPU server: a fresh `--model DIR` and `reload_weights(DIR)`
both serve exactly the trainer's weights (vLLM's logprobs match the actor's)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import httpx
import pytest

from sdp_cli.config import load_config
from sdp_cli.config.train_settings import TrainConfig
from sdp_cli.launcher import ServerFleet
from sdp_cli.rollout.trajectory import RolloutGroup, Trajectory
from sdp_cli.trainer.actor import Actor

pytestmark = pytest.mark.vllm

PROMPT = [1, 5, 6, 7, 45]
# float32 on both sides; different kernels still differ in the last bits.
TOLERANCE = 2e-3


def generate(address: str, request_id: str) -> tuple[list[int], list[float]]:
    body = {
        "request_id": request_id,
        "token_ids": PROMPT,
        "return_token_ids": True,
        "stream": False,
        "sampling_params": {
            "max_tokens": 8,
            # ignore_eos, not min_tokens: min_tokens masks EOS before sampling, and the servers
            # report logprobs of the distribution sampled from (the actor scores it unmasked).
            "ignore_eos": True,
            "temperature": 1.0,
            "top_p": 1.0,
            "top_k": -1,
            "logprobs": 0,
            "seed": 0,
        },
    }
    choice = httpx.post(f"{address}/inference/v1/generate", json=body, timeout=120).json()
    choice = choice["choices"][0]
    return choice["token_ids"], [e["logprob"] for e in choice["logprobs"]["content"]]


def train_once(actor: Actor, version: int) -> None:
    outputs = [[7, 8, 9, 2], [20, 2]]
    behav = actor.score([PROMPT, PROMPT], outputs)
    samples = [
        Trajectory(PROMPT, out, lp, [version] * len(out), reward=float(i == 0))
        for i, (out, lp) in enumerate(zip(outputs, behav, strict=True))
    ]
    actor.train_step([RolloutGroup(version, samples)], version=version)


def assert_serves_actor_weights(address: str, actor: Actor, request_id: str) -> None:
    tokens, served = generate(address, request_id)
    ours = actor.score([PROMPT], [tokens])[0]
    assert max(abs(a - b) for a, b in zip(served, ours, strict=True)) < TOLERANCE


def test_vllm_loads_exported_weights(tiny_model_dir: Path, tmp_path: Path) -> None:
    cfg = load_config(overrides=["server.count=1"])
    actor = Actor(tiny_model_dir, replace(TrainConfig(), lr=5e-2, keep_weights=2), seed=0)
    original = Actor(tiny_model_dir, TrainConfig(), seed=0)
    weights_dir = tmp_path / "weights"
    train_once(actor, 0)
    first = actor.export_weights(weights_dir, 1)

    with ServerFleet(cfg.server, first, tmp_path / "run") as fleet:
        [address] = fleet.addresses
        assert_serves_actor_weights(address, actor, "fresh")
        tokens, served = generate(address, "fresh-again")
        assert (
            max(
                abs(a - b)
                for a, b in zip(served, original.score([PROMPT], [tokens])[0], strict=True)
            )
            > 10 * TOLERANCE
        ), "the trained weights should differ from the initial ones"

        train_once(actor, 1)
        second = actor.export_weights(weights_dir, 2)
        # docs/design.md, Weight-update protocol: pause with a cleared cache (no KV from old
        # weights), reload, resume.
        steps = [
            ("pause?mode=abort&clear_cache=true", None),
            (
                "collective_rpc",
                {"method": "reload_weights", "kwargs": {"weights_path": str(second)}},
            ),
            ("resume", None),
        ]
        for path, body in steps:
            reply = httpx.post(f"{address}/{path}", json=body, timeout=120)
            assert reply.status_code == 200, (path, reply.text)
        assert_serves_actor_weights(address, actor, "reloaded")
