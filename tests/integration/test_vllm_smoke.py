"""A real vLLM CPU server started by the launcher (a fleet of one), with the tiny model."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from sdp_cli.config import load_config
from sdp_cli.launcher import ServerFleet
from sdp_cli.launcher.process import group_alive, pid_alive

pytestmark = pytest.mark.vllm


def test_vllm_server_generates_with_logprobs_and_leaves_no_process(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    cfg = load_config(overrides=["server.count=1"])
    fleet = ServerFleet(cfg.server, tiny_model_dir, tmp_path)
    with fleet:
        proc = fleet.process(0)
        [address] = fleet.addresses
        body = {
            "request_id": "smoke",
            "token_ids": [1, 5, 6, 7],
            "return_token_ids": True,
            "stream": False,
            "sampling_params": {
                "max_tokens": 6,
                "min_tokens": 6,
                "temperature": 1.0,
                "top_p": 1.0,
                "top_k": -1,
                "logprobs": 0,
                "seed": 0,
            },
        }
        reply = httpx.post(f"{address}/inference/v1/generate", json=body, timeout=120).json()
        choice = reply["choices"][0]
        assert len(choice["token_ids"]) == 6
        logprobs = [entry["logprob"] for entry in choice["logprobs"]["content"]]
        assert len(logprobs) == 6 and all(lp <= 0.0 for lp in logprobs)
        assert [e["token_id"] for e in choice["logprobs"]["content"]] == choice["token_ids"]
        assert choice["weight_versions"][0]["end"] == 6
    assert (tmp_path / "logs" / "server-0.log").stat().st_size > 0
    assert not pid_alive(proc.pid)
    assert not group_alive(proc.pgid)
