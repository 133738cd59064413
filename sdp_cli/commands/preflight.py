"""What `sdp train` checks before it starts any process: everything the config names that lives
outside it (the model directory and its tokenizer, the task's data file and each of its lines,
`task.reward_fn`'s import, the registry file, vLLM and the devices, the run directory). Each
failure is a ConfigError naming the key, so a mistake shows in a second, with exit code 2, instead
of after the servers have started; `sdp train --dry-run` runs the same checks."""

from __future__ import annotations

import json
import shutil
from collections.abc import Sized
from dataclasses import dataclass
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from sdp_cli.config.model_settings import ModelConfig
from sdp_cli.config.schema import SdpConfig
from sdp_cli.config.server_settings import Device, RayConfig, ServerBackend, ServerConfig
from sdp_cli.errors import ConfigError
from sdp_cli.launcher.command import (
    CPU_HEAD_SIZES,
    check_cpu_extra_args,
    check_vllm_installed,
    flag_value,
    lora_server_args,
    server_device,
    servers_may_be_remote,
)
from sdp_cli.launcher.devices import split_devices, visible_cuda_devices
from sdp_cli.launcher.registry_file import RegistryError, read_registry
from sdp_cli.model import builtin_name, check_model_dir, smollm2
from sdp_cli.orchestrator.run_state import latest_checkpoint
from sdp_cli.tasks import check_task, get_task, load_tokenizer
from sdp_cli.weight_sync.versions import MEMORY_ROOT, MEMORY_WEIGHTS, weights_dir_for

# What `sdp train` writes into run.dir; any of the first two means a run is already there.
RUN_FILES = (
    "events.jsonl",
    "checkpoints",
    "weights",
    "servers.json",
    "config.yaml",
    "logs",
    "samples.jsonl",
    "tensorboard",
    "wandb",
)


def preflight(cfg: SdpConfig) -> list[str]:
    """Run every check; returns one line per thing checked. Raises ConfigError (or another
    SdpError, e.g. vLLM missing) at the first problem."""
    if cfg.train.node_rank > 0:
        # Only trainer ranks run on this node; node 0 owns the servers and the run directory.
        return [*check_model(cfg.model), *check_trainer_device(cfg)]
    return [
        *check_model(cfg),
        *check_task(cfg.task),
        *check_servers(cfg.server, cfg.ray),
        *check_trainer_device(cfg),
        *check_lora(cfg),
        *check_run_dir(cfg),
        *check_memory_weights_dir(cfg),
    ]


# Modules vLLM 0.32 serves no adapter on (an adapter there would not load on the servers).
UNSERVED_LORA_MODULES = ("lm_head", "embed_tokens", "embed")


def check_lora(cfg: SdpConfig) -> list[str]:
    """train.lora: what the servers could not serve, refused before anything starts."""
    lora = cfg.train.lora
    if lora.rank == 0:
        return []
    for module in lora.target_modules:
        if any(module == name or module.endswith("." + name) for name in UNSERVED_LORA_MODULES):
            raise ConfigError(
                "train.lora.target_modules",
                f"{module}: vLLM serves adapters on the decoder's linear projections only",
                "name linear projections (e.g. [q_proj, v_proj]) or leave it [] for all of them",
            )
    flags = lora_server_args(lora)
    given = flag_value(list(cfg.server.extra_args), "--max-lora-rank")
    if given is not None and (not given.isdigit() or int(given) < lora.rank):
        raise ConfigError(
            "server.extra_args",
            f"--max-lora-rank {given} is below train.lora.rank ({lora.rank}): the servers "
            "would refuse the adapter",
            "leave --max-lora-rank out (sdp passes the smallest vLLM rank that fits)",
        )
    return [f"LoRA rank {lora.rank}: servers start with {' '.join(flags)}"]


def check_model(cfg: SdpConfig) -> list[str]:
    model = cfg.model
    path = check_model_dir(model)
    check_model_fits_servers(cfg, path, launching=not cfg.server.registry)
    if builtin_name(model.path) and not path.is_dir():
        return [
            f"model {model.path}: made at first use in {path} "
            "(prompt lengths are checked once it exists)"
        ]
    # The tokenizer is what the tasks encode prompts with; a directory of weights alone fails.
    tokenizer = load_tokenizer(path)
    return [
        f"model {path}: config.json and tokenizer load",
        check_prompts_fit(cfg, tokenizer),
    ]


@dataclass(frozen=True)
class ModelShape:
    head_dim: int
    max_positions: int
    # The key to change when the shape does not fit.
    key: str


def model_shape(model: ModelConfig, path: Path) -> ModelShape:
    """Head size and context of the model, from its config.json (or the built-in model's keys
    when it has not been made yet)."""
    name = builtin_name(model.path)
    if name == "tiny":
        return ModelShape(
            model.hidden_size // model.num_heads, model.max_position_embeddings, "model.num_heads"
        )
    if name == "smollm2-135m" and not (path / "config.json").is_file():
        return ModelShape(smollm2.HEAD_DIM, smollm2.MAX_POSITIONS, "model.path")
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
        head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
        return ModelShape(
            int(head_dim), int(config.get("max_position_embeddings", 0)), "model.path"
        )
    except (ValueError, KeyError, TypeError, ZeroDivisionError) as exc:
        raise ConfigError(
            "model.path", f"cannot read the model's shape from {path}/config.json: {exc!r}"
        ) from None


def check_model_fits_servers(cfg: SdpConfig, path: Path, *, launching: bool) -> None:
    """The model's shape suits the servers: a head size vLLM's CPU attention serves (when
    `launching` CPU servers) and server.max_model_len within the model's context."""
    shape = model_shape(cfg.model, path)
    launches_cpu_servers = launching and server_device(cfg.server) == Device.cpu
    if launches_cpu_servers and shape.head_dim not in CPU_HEAD_SIZES:
        raise ConfigError(
            shape.key,
            f"the model's head_dim is {shape.head_dim}; vLLM's CPU attention serves only "
            f"{', '.join(map(str, CPU_HEAD_SIZES))}",
            "choose model.hidden_size / model.num_heads (or a model) with a supported "
            "head_dim, or run the servers on CUDA (server=gpu)",
        )
    if shape.max_positions and cfg.server.max_model_len > shape.max_positions:
        raise ConfigError(
            "server.max_model_len",
            f"{cfg.server.max_model_len} is more than the model's max_position_embeddings "
            f"({shape.max_positions}); vLLM refuses to start",
            f"set server.max_model_len={shape.max_positions} or lower",
        )


# Positions of an endless task (built-in string tasks) sampled to find its longest prompt.
_SAMPLED_POSITIONS = 512
# A data file is checked whole up to this many records.
_MAX_CHECKED_RECORDS = 100_000


def check_prompts_fit(cfg: SdpConfig, tokenizer: PreTrainedTokenizerBase) -> str:
    """Every prompt plus rollout.max_new_tokens must fit server.max_model_len, with one
    position left for scoring; otherwise completions are cut short (or empty) in silence."""
    task = get_task(cfg.task, tokenizer)
    finite = isinstance(task, Sized)
    count = min(len(task), _MAX_CHECKED_RECORDS) if finite else _SAMPLED_POSITIONS
    longest = max(len(task.sample_prompt(position).prompt_ids) for position in range(count))
    needed = longest + cfg.rollout.max_new_tokens + 1
    if needed > cfg.server.max_model_len:
        raise ConfigError(
            "server.max_model_len",
            f"the longest prompt has {longest} tokens; with rollout.max_new_tokens="
            f"{cfg.rollout.max_new_tokens} (and one position for scoring) a completion needs "
            f"{needed} positions, more than server.max_model_len={cfg.server.max_model_len}",
            f"set server.max_model_len={needed} or more, or lower rollout.max_new_tokens",
        )
    check_sample_fits_micro_batch(cfg, longest + cfg.rollout.max_new_tokens)
    what = f"all {count} prompts" if finite else f"{count} sampled prompts"
    return (
        f"{what} fit: longest {longest} + {cfg.rollout.max_new_tokens} new tokens + 1 "
        f"<= server.max_model_len {cfg.server.max_model_len}"
    )


def check_sample_fits_micro_batch(cfg: SdpConfig, longest_sample: int) -> None:
    """The trainer cuts batches into micro-batches of train.micro_batch_tokens; a sample longer
    than that would get a micro-batch of its own past the budget the memory was planned for."""
    budget = cfg.train.micro_batch_tokens
    if longest_sample > budget:
        raise ConfigError(
            "train.micro_batch_tokens",
            f"the longest sample (prompt + rollout.max_new_tokens) has {longest_sample} "
            f"tokens, more than train.micro_batch_tokens={budget}",
            f"set train.micro_batch_tokens={longest_sample} or more, or lower "
            "rollout.max_new_tokens",
        )


def check_servers(server: ServerConfig, ray: RayConfig | None = None) -> list[str]:
    if server.registry:
        return [check_registry(Path(server.registry))]
    check_vllm_installed()
    check_cpu_extra_args(server)
    if server.backend == ServerBackend.ray:
        # Ray hands each server's actor its devices on its node; nothing to count here.
        address = ray.address if ray is not None else "local"
        return [f"{server.count} vLLM server(s) as Ray actors (ray.address={address})"]
    if server_device(server) != Device.cuda:
        return [f"{server.count} vLLM CPU server(s) to launch"]
    devices = chosen_devices("server.gpu_ids", server.gpu_ids)
    groups = split_devices(server.count, server.tensor_parallel_size, devices)
    return [f"{server.count} vLLM server(s) on CUDA devices {groups}"]


def chosen_devices(key: str, ids: list[int]) -> list[str]:
    """The visible CUDA devices `ids` name (all of them for []); naming one that is not
    visible is a config error."""
    visible = visible_cuda_devices()
    if not ids:
        return visible
    beyond = [i for i in ids if i >= len(visible)]
    if beyond:
        raise ConfigError(
            key,
            f"devices {beyond} are not visible ({len(visible)} CUDA devices are)",
            f"choose indices below {len(visible)}, or set CUDA_VISIBLE_DEVICES",
        )
    return [visible[i] for i in ids]


def check_registry(path: Path) -> str:
    try:
        entries = read_registry(path)
    except RegistryError as exc:
        raise ConfigError("server.registry", str(exc)) from None
    live = [entry for entry in entries if entry.state != "dead"]
    if not live:
        raise ConfigError(
            "server.registry",
            f"registry '{path}' lists no server that is not dead",
            "check that `sdp launch-servers` is still running",
        )
    return f"registry {path}: {len(live)} server(s) listed (health is checked at start)"


def check_trainer_device(cfg: SdpConfig) -> list[str]:
    from sdp_cli.trainer.actor import torch_device
    from sdp_cli.trainer.distributed import compute_dtype, total_ranks, trainer_on_cuda

    device = torch_device(cfg.train.device)
    dtype = str(compute_dtype(cfg.train)).removeprefix("torch.")
    line = f"trainer device {device}, {dtype}, {total_ranks(cfg.train)} rank(s)"
    if not trainer_on_cuda(cfg.train):
        return [line]
    devices = chosen_devices("train.gpu_ids", cfg.train.gpu_ids)
    if not cfg.train.gpu_ids and cfg.train.world_size > len(devices):
        raise ConfigError(
            "train.world_size",
            f"{cfg.train.world_size} CUDA ranks need as many visible devices ({len(devices)} are)",
            f"set train.world_size={len(devices)} or less, or set CUDA_VISIBLE_DEVICES",
        )
    return [f"{line} on CUDA devices {devices[: cfg.train.world_size]}"]


def holds_run(run_dir: Path) -> bool:
    return (run_dir / "events.jsonl").exists() or (run_dir / "checkpoints").exists()


def check_memory_weights_dir(cfg: SdpConfig) -> list[str]:
    """A memory-backed weights directory needs /dev/shm, and servers on this machine."""
    if cfg.train.weights_dir != MEMORY_WEIGHTS:
        return []
    if not MEMORY_ROOT.is_dir():
        raise ConfigError(
            "train.weights_dir",
            f"'memory' needs {MEMORY_ROOT}, which this machine does not have",
            "leave train.weights_dir empty (run.dir/weights) or give a directory",
        )
    if servers_may_be_remote(cfg.server, cfg.ray):
        raise ConfigError(
            "train.weights_dir",
            "'memory' is on this machine only, and servers on a joined Ray cluster's other "
            "nodes could not read it",
            "leave train.weights_dir empty or give a directory every node can read",
        )
    # The exports kept, plus the one being written.
    needed = (cfg.train.keep_weights + 1) * weight_bytes(check_model_dir(cfg.model))
    free = shutil.disk_usage(MEMORY_ROOT).free
    if free < needed:
        raise ConfigError(
            "train.weights_dir",
            f"'memory' would hold {cfg.train.keep_weights + 1} exports of "
            f"{needed / 2**30 / (cfg.train.keep_weights + 1):.2f} GiB in {MEMORY_ROOT}, which "
            f"has {free / 2**30:.2f} GiB free",
            "lower train.keep_weights, make /dev/shm larger (docker run --shm-size), or leave "
            "train.weights_dir empty",
        )
    return [f"weight exports in {weights_dir_for(cfg.train.weights_dir, Path(cfg.run.dir))}"]


def weight_bytes(model_dir: Path) -> int:
    return sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))


def check_run_dir(cfg: SdpConfig) -> list[str]:
    """A new run never mixes into an old one unless asked to; a resume needs a checkpoint."""
    run_dir = Path(cfg.run.dir)
    if cfg.resume:
        checkpoint = latest_checkpoint(run_dir)
        if checkpoint is None:
            raise ConfigError(
                "resume", f"no checkpoint in '{run_dir}/checkpoints'", "run without resume=true"
            )
        return [f"resume from {checkpoint}"]
    if holds_run(run_dir):
        if not cfg.run.overwrite:
            raise ConfigError(
                "run.dir",
                f"'{run_dir}' already holds a run",
                "set resume=true to continue it, run.overwrite=true to start afresh, "
                "or run.name=NEW",
            )
        return [f"run directory {run_dir}: its run will be replaced (run.overwrite=true)"]
    return [f"run directory {run_dir}"]
