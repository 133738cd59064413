"""Typed configuration schema, registered in Hydra's ConfigStore.

Every key a config file or override may set is declared here; Hydra rejects unknown keys and
wrong types against these dataclasses, and `validate.py` checks ranges.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from hydra.core.config_store import ConfigStore

BUILTIN_MODEL = "builtin:tiny"


class Strategy(StrEnum):
    segment_wise = "segment_wise"
    standard = "standard"


class ProxMode(StrEnum):
    segment = "segment"
    recompute = "recompute"
    loglinear = "loglinear"


class WeightBoundMode(StrEnum):
    mask = "mask"
    clamp = "clamp"


class Device(StrEnum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


@dataclass
class RunConfig:
    name: str = "default"
    # Interpolated so that `run.name=foo` moves the directory too.
    dir: str = "runs/${run.name}"
    seed: int = 0
    # Start afresh in a run.dir that already holds a run (its checkpoints are deleted).
    overwrite: bool = False
    # `sdp train` with CPU servers it launches and a CPU trainer working at the same time
    # (η ≥ 1): give the trainer the last core and the servers the others, unless
    # server.cpu_cores or train.cpu_cores are set.
    split_cpus: bool = True


@dataclass
class ModelConfig:
    # A local Hugging Face model directory, or `builtin:tiny` for the model `sdp init-model` makes.
    path: str = BUILTIN_MODEL
    # Where the built-in model is cached; null means $SDP_CACHE_DIR or ~/.cache/sdp.
    cache_dir: str | None = None
    # Shape and seed of the built-in model (ignored for a local directory).
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 2
    intermediate_size: int = 256
    max_position_embeddings: int = 256
    init_seed: int = 0


@dataclass
class ServerConfig:
    count: int = 1
    # Attach to servers listed in this registry file (written by `sdp launch-servers`)
    # instead of launching new ones.
    registry: str | None = None
    host: str = "127.0.0.1"
    # First port to try; 0 picks free ports.
    base_port: int = 0
    device: Device = Device.auto
    dtype: str = "float32"
    max_model_len: int = 256
    seed: int = 0
    enforce_eager: bool = True
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.85
    # VLLM_CPU_KVCACHE_SPACE in GiB, CPU only.
    cpu_kvcache_space_gb: int = 1
    ready_timeout_s: float = 300.0
    request_timeout_s: float = 120.0
    health_interval_s: float = 2.0
    max_restarts: int = 3
    shutdown_grace_s: float = 10.0
    # CPU cores the server processes run on (vLLM's CPU backend binds its threads to them);
    # empty leaves placement to the OS and vLLM.
    cpu_cores: list[int] = field(default_factory=list)
    extra_args: list[str] = field(default_factory=list)


@dataclass
class RolloutConfig:
    # η: how many versions old a sample may be when it is trained on.
    max_staleness: int = 2
    # B: rollouts (groups) consumed per training step.
    batch_size: int = 8
    max_concurrent: int = 64
    strategy: Strategy = Strategy.segment_wise
    # Group size for GRPO.
    n_samples: int = 4
    max_new_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    take_timeout_s: float = 600.0
    # Proximal recompute: samples per scoring request, and requests in flight at once.
    recompute_batch_size: int = 64
    recompute_concurrency: int = 4
    # Score buffered samples while the trainer trains, so the update waits only for the last
    # ones (segment mode; the p_t written are the same either way).
    recompute_early: bool = True


@dataclass
class TrainConfig:
    steps: int = 40
    prox_mode: ProxMode = ProxMode.segment
    device: Device = Device.cpu
    lr: float = 1e-3
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    eps_clip_low: float = 0.2
    eps_clip_high: float = 0.2
    # Dual clip constant c (> 1) for negative advantages; null disables it.
    dual_clip: float | None = None
    # Behaviour weight w = exp(p − μ) bounds; null disables each.
    behav_weight_cap: float | None = 5.0
    behav_weight_floor: float | None = None
    behav_weight_mode: WeightBoundMode = WeightBoundMode.mask
    # Mask tokens more than this many versions old; null disables it.
    token_max_lag: int | None = None
    adv_eps: float = 1e-6
    micro_batch_tokens: int = 4096
    checkpoint_every: int = 10
    # Checkpoints kept in run_dir/checkpoints (the newest ones).
    keep_checkpoints: int = 2
    keep_weights: int = 3
    update_timeout_s: float = 120.0
    # Torch intra-op threads for a CPU trainer; 0 keeps torch's default (all cores). The
    # default 1 leaves the other cores to the vLLM CPU servers that generate at the same time.
    cpu_threads: int = 1
    # CPU cores the trainer process runs on; empty leaves placement to the OS.
    cpu_cores: list[int] = field(default_factory=list)


@dataclass
class TaskConfig:
    # A built-in task name, or `math_jsonl`.
    name: str = "reverse"
    # Data file for file-based tasks.
    path: str | None = None
    # Dotted path `module:function` or `module.function` overriding the task's reward.
    reward_fn: str | None = None
    seed: int = 0
    # Digit-string length range of the built-in string tasks (reverse, copy).
    min_len: int = 1
    max_len: int = 2
    # Prompt template of math_jsonl with a `{question}` field; null uses the task's default.
    prompt_template: str | None = None


@dataclass
class SimulateConfig:
    """Simulated servers and trainer for `sdp simulate` (capacity planning, CPU smoke runs)."""

    # Mean seconds per generated token for one request.
    token_latency_s: float = 0.002
    # Relative spread (lognormal sigma) of per-token latency.
    latency_jitter: float = 0.3
    # Requests one simulated server decodes at once.
    server_batch: int = 32
    # Mean tokens per completion.
    mean_new_tokens: int = 16
    # Seconds per training step of the simulated trainer.
    train_step_s: float = 0.05
    # Seconds per weight update.
    update_s: float = 0.01
    # Wall seconds per simulated second; 0 runs in virtual time.
    time_scale: float = 0.0
    seed: int = 0


@dataclass
class SdpConfig:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    simulate: SimulateConfig = field(default_factory=SimulateConfig)
    # Continue from the last checkpoint in run.dir.
    resume: bool = False


SCHEMA_NAME = "sdp_schema"


def register_schema() -> None:
    """Register the root schema; `conf/default.yaml` names it first in its defaults list, so
    every group file and override is checked against the dataclasses above."""
    ConfigStore.instance().store(name=SCHEMA_NAME, node=SdpConfig)
