"""The weight-update protocol on one server: pause → reload → version → resume
(docs/design.md, Weight-update protocol).

vLLM's `reload_weights(weights_path=DIR)` points the model loader at DIR and reads every
`*.safetensors` file there (config.json is read too when present). A failed reload leaves the
engine with half-initialised weights and it dies on the next request, so the directory is checked
before any server is touched, and a server that fails the protocol is restarted.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import httpx

from sdp_cli.inference.client_errors import WeightsDirError

PHASES = ("pause", "reload", "version", "resume")


@dataclass
class PhaseTimings:
    """Seconds each phase of the protocol took on one server."""

    pause: float = 0.0
    reload: float = 0.0
    version: float = 0.0
    resume: float = 0.0

    def as_dict(self) -> dict[str, float]:
        return {f"{phase}_s": getattr(self, phase) for phase in PHASES}


def check_weights_dir(weights_dir: str | Path) -> Path:
    """The absolute weights directory, or WeightsDirError if vLLM could not load it."""
    path = Path(weights_dir).expanduser().resolve()
    if not path.is_dir():
        raise WeightsDirError(f"weights directory '{path}' does not exist")
    if not any(path.glob("*.safetensors")):
        raise WeightsDirError(
            f"weights directory '{path}' holds no *.safetensors file "
            "(write it with save_pretrained(..., safe_serialization=True))"
        )
    if not (path / "config.json").is_file():
        raise WeightsDirError(f"weights directory '{path}' has no config.json")
    return path


class _Deadline:
    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        left = self.end - time.monotonic()
        if left <= 0:
            raise httpx.TimeoutException("weight-update deadline passed")
        return left


async def _run_protocol(
    http: httpx.AsyncClient,
    address: str,
    version: int,
    timeout_s: float,
    load: Callable[[float], Awaitable[None]],
    keep_requests: bool,
) -> PhaseTimings:
    """pause (with keep under `keep_requests`, else with abort) → load (timed as `reload`) →
    version → resume on one server, all within `timeout_s`, each phase timed."""
    deadline = _Deadline(timeout_s)
    timings = PhaseTimings()
    pause = pause_server_keep if keep_requests else pause_server

    start = time.perf_counter()
    await pause(http, address, deadline.left())
    timings.pause = time.perf_counter() - start

    start = time.perf_counter()
    await load(deadline.left())
    timings.reload = time.perf_counter() - start

    start = time.perf_counter()
    await set_server_version(http, address, version, deadline.left())
    timings.version = time.perf_counter() - start

    start = time.perf_counter()
    await resume_server(http, address, deadline.left())
    timings.resume = time.perf_counter() - start
    return timings


async def update_server_weights(
    http: httpx.AsyncClient,
    address: str,
    weights_dir: str,
    version: int,
    timeout_s: float,
    keep_requests: bool = False,
) -> PhaseTimings:
    """Run the whole protocol on one server within `timeout_s`. In-flight requests come back
    with finish_reason "abort" and their tokens so far; requests arriving meanwhile wait in
    vLLM's queue until the resume. With `keep_requests` (train.update_mode=keep) the pause
    keeps them instead: they finish in place, and their tokens sampled after the resume carry
    `version` in their `weight_versions` spans. Raises httpx errors on any failure."""

    async def reload(timeout: float) -> None:
        response = await http.post(
            f"{address}/collective_rpc",
            json={"method": "reload_weights", "kwargs": {"weights_path": weights_dir}},
            timeout=timeout,
        )
        response.raise_for_status()

    return await _run_protocol(http, address, version, timeout_s, reload, keep_requests)


async def pause_server(
    http: httpx.AsyncClient, address: str, timeout_s: float, clear_cache: bool = True
) -> None:
    """`POST /pause?mode=abort`: in-flight and queued requests return with finish_reason
    "abort"; requests that arrive while paused wait in vLLM's queue until the resume."""
    params = {"mode": "abort", "clear_cache": "true" if clear_cache else "false"}
    response = await http.post(f"{address}/pause", params=params, timeout=timeout_s)
    response.raise_for_status()


async def resume_server(http: httpx.AsyncClient, address: str, timeout_s: float) -> None:
    response = await http.post(f"{address}/resume", timeout=timeout_s)
    response.raise_for_status()


async def set_server_version(
    http: httpx.AsyncClient, address: str, version: int, timeout_s: float
) -> None:
    """Name the weights a server holds; every token it samples from now on carries it."""
    response = await http.post(
        f"{address}/update_weight_version", json={"new_version": str(version)}, timeout=timeout_s
    )
    response.raise_for_status()


async def server_version(http: httpx.AsyncClient, address: str, timeout_s: float) -> str:
    """The raw weight version string a server reports ("default" before any update)."""
    response = await http.get(f"{address}/weight_info", timeout=timeout_s)
    response.raise_for_status()
    return str(response.json()["weight_version"])


# ---- LoRA adapters (train.lora.rank > 0) ---------------------------------------------------


def check_adapter_dir(adapter_dir: str | Path) -> Path:
    """The absolute adapter directory, or WeightsDirError if vLLM could not load it."""
    path = Path(adapter_dir).expanduser().resolve()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        if not (path / name).is_file():
            raise WeightsDirError(f"adapter directory '{path}' has no {name}")
    return path


async def update_server_adapter(
    http: httpx.AsyncClient,
    address: str,
    adapter_dir: str,
    adapter: str,
    version: int,
    timeout_s: float,
    keep_requests: bool = False,
) -> PhaseTimings:
    """The protocol with a LoRA adapter instead of full weights: pause → load the adapter
    under its version's name (`reload` times it) → version → resume. The base model stays; the
    old adapters are unloaded after the resume (`unload_adapter`), once no request names them.
    With `keep_requests` (train.update_mode=keep) the pause keeps requests in flight: they
    resume and finish on the adapter they named, the previous version's (a request is bound to
    an adapter by name, and `load_inplace` is no way round it, docs/design.md). Raises httpx
    errors on any failure."""

    async def load(timeout: float) -> None:
        await load_adapter(http, address, adapter, adapter_dir, timeout)

    return await _run_protocol(http, address, version, timeout_s, load, keep_requests)


async def load_adapter(
    http: httpx.AsyncClient, address: str, adapter: str, adapter_dir: str, timeout_s: float
) -> None:
    """`POST /v1/load_lora_adapter`: vLLM reads the adapter and serves it under `adapter`."""
    response = await http.post(
        f"{address}/v1/load_lora_adapter",
        json={"lora_name": adapter, "lora_path": adapter_dir},
        timeout=timeout_s,
    )
    response.raise_for_status()


async def unload_adapter(
    http: httpx.AsyncClient, address: str, adapter: str, timeout_s: float
) -> bool:
    """`POST /v1/unload_lora_adapter`; False when the server does not know the name (it
    restarted since), True when it dropped it."""
    response = await http.post(
        f"{address}/v1/unload_lora_adapter", json={"lora_name": adapter}, timeout=timeout_s
    )
    if response.status_code in (400, 404):
        return False
    response.raise_for_status()
    return True


async def pause_server_keep(http: httpx.AsyncClient, address: str, timeout_s: float) -> None:
    """`POST /pause?mode=keep&clear_cache=false`: running requests freeze where they are, with
    their KV cache, and go on after the resume; requests that arrive meanwhile wait in vLLM's
    queue (docs/design.md, Weight-update protocol)."""
    params = {"mode": "keep", "clear_cache": "false"}
    response = await http.post(f"{address}/pause", params=params, timeout=timeout_s)
    response.raise_for_status()
