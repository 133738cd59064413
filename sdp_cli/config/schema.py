"""Typed configuration schema, registered in Hydra's ConfigStore.

Every key a config file or override may set is declared here with its default, its bounds or
allowed values and one line of help (`setting(...)`). Hydra rejects unknown keys and wrong types
against these dataclasses; `validate.py` checks every declared bound and allowed value, so a
constraint is written once, beside its field, and `sdp config show --explain` and the key table
of docs/configuration.md print the same declarations.
"""

from __future__ import annotations

import operator
from collections.abc import Iterator, Sequence
from dataclasses import MISSING, Field, dataclass, field, fields, is_dataclass
from enum import Enum, StrEnum
from typing import Any

from hydra.core.config_store import ConfigStore

BUILTIN_MODEL = "builtin:tiny"
RULE = "sdp_rule"


@dataclass(frozen=True)
class Rule:
    """What one key accepts. A null value of an optional key always passes: null disables it."""

    help: str
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    choices: tuple[str, ...] | None = None
    # Why a value outside the bounds is refused, when the bound alone does not say it.
    why: str = ""

    def bounds(self) -> str:
        """The bounds in words, e.g. `>= 0 and < 1`; empty when there are none."""
        return " and ".join(
            f"{sign} {_number(bound)}"
            for sign, bound in ((">=", self.ge), (">", self.gt), ("<=", self.le), ("<", self.lt))
            if bound is not None
        )

    def allowed(self) -> str:
        """`one of a, b`, `a value >= 0 and < 1`, or empty when any value of the type is."""
        if self.choices is not None:
            return "one of " + ", ".join(self.choices)
        return f"a value {self.bounds()}" if self.bounds() else ""

    def accepts(self, value: Any) -> bool:
        if value is None:
            return True
        if isinstance(value, Sequence) and not isinstance(value, str):
            # A list key: every element must be allowed.
            return all(self.accepts(element) for element in value)
        if self.choices is not None:
            return str(value) in self.choices
        checks = (
            (self.ge, operator.ge),
            (self.gt, operator.gt),
            (self.le, operator.le),
            (self.lt, operator.lt),
        )
        return all(bound is None or compare(value, bound) for bound, compare in checks)


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def setting(
    default: Any = MISSING,
    *,
    help: str,
    factory: Any = MISSING,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    choices: tuple[str, ...] | None = None,
    why: str = "",
) -> Any:
    """A config key: its default (or `factory` for a list), its bounds and its help. An enum
    default makes the enum's values the allowed ones."""
    if choices is None and isinstance(default, Enum):
        choices = tuple(member.value for member in type(default))
    rule = Rule(help=help, ge=ge, gt=gt, le=le, lt=lt, choices=choices, why=why)
    if factory is not MISSING:
        return field(default_factory=factory, metadata={RULE: rule})
    return field(default=default, metadata={RULE: rule})


class Strategy(StrEnum):
    segment_wise = "segment_wise"
    standard = "standard"


class GradientCheckpointing(StrEnum):
    none = "none"
    selective = "selective"
    full = "full"


class ProxMode(StrEnum):
    segment = "segment"
    recompute = "recompute"
    loglinear = "loglinear"


class RecomputeOn(StrEnum):
    server = "server"
    trainer = "trainer"


class WeightBoundMode(StrEnum):
    mask = "mask"
    clamp = "clamp"


class LrSchedule(StrEnum):
    constant = "constant"
    linear = "linear"
    cosine = "cosine"


class LogBackend(StrEnum):
    tensorboard = "tensorboard"
    wandb = "wandb"


class Device(StrEnum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class TrainDtype(StrEnum):
    auto = "auto"
    float32 = "float32"
    bfloat16 = "bfloat16"


class ServerBackend(StrEnum):
    # Child processes of this machine.
    process = "process"
    # One Ray actor per server, placed on the nodes of a Ray cluster.
    ray = "ray"


class RayPlacement(StrEnum):
    """Placement-group strategy of the servers' bundles (Ray's names, lower case)."""

    spread = "spread"
    pack = "pack"
    strict_spread = "strict_spread"
    strict_pack = "strict_pack"


class WeightsTransport(StrEnum):
    # Servers read the exported directory itself: one machine or a shared filesystem.
    filesystem = "filesystem"
    # Through Ray's object store to each server's node-local disk.
    ray = "ray"


# vLLM's --dtype values.
SERVER_DTYPES = ("auto", "half", "float16", "bfloat16", "float", "float32")


@dataclass
class RunConfig:
    name: str = setting("default", help="run name; names the run directory")
    dir: str = setting(
        # Interpolated so that `run.name=foo` moves the directory too.
        "runs/${run.name}",
        help="run directory: config.yaml, events.jsonl, servers.json, weights/, checkpoints/",
    )
    seed: int = setting(0, help="seed of the trainer")
    overwrite: bool = setting(
        False, help="start afresh in a run.dir that already holds a run (deletes its checkpoints)"
    )
    split_cpus: bool = setting(
        True,
        help="with launched CPU servers, a CPU trainer and η >= 1: the trainer gets the last "
        "core and the servers the others (unless server.cpu_cores / train.cpu_cores are set)",
    )


@dataclass
class ModelConfig:
    path: str = setting(
        BUILTIN_MODEL,
        help="a local Hugging Face model directory, or builtin:tiny / builtin:smollm2-135m (made "
        "by `sdp init-model NAME`, or on first use)",
    )
    cache_dir: str | None = setting(
        None, help="where built-in models are cached; null: $SDP_CACHE_DIR or ~/.cache/sdp"
    )
    hidden_size: int = setting(128, ge=1, help="built-in model: hidden size")
    num_layers: int = setting(2, ge=1, help="built-in model: decoder layers")
    num_heads: int = setting(
        2, ge=1, help="built-in model: attention heads (must divide hidden_size)"
    )
    intermediate_size: int = setting(256, ge=1, help="built-in model: MLP width")
    max_position_embeddings: int = setting(
        256, ge=8, help="built-in model: longest sequence it can encode"
    )
    init_seed: int = setting(0, help="built-in model: seed of its random initial weights")


@dataclass
class ServerConfig:
    count: int = setting(1, ge=1, help="vLLM servers to launch")
    registry: str | None = setting(
        None,
        help="attach to the servers this registry file lists (written by `sdp launch-servers`) "
        "instead of launching new ones",
    )
    host: str = setting("127.0.0.1", help="address the servers listen on")
    base_port: int = setting(0, ge=0, le=65535, help="first port to try; 0 picks free ports")
    device: Device = setting(Device.auto, help="where vLLM runs; auto: CUDA if torch sees one")
    dtype: str = setting(
        "float32",
        choices=SERVER_DTYPES,
        help="vLLM --dtype; the trainer exports its weights for the servers in it (auto: in "
        "the trainer's)",
    )
    max_model_len: int = setting(
        256, ge=8, help="vLLM --max-model-len: longest prompt + completion"
    )
    seed: int = setting(0, help="vLLM --seed")
    enforce_eager: bool = setting(True, help="vLLM --enforce-eager (no CUDA graphs)")
    tensor_parallel_size: int = setting(
        1, ge=1, help="CUDA devices per server (vLLM --tensor-parallel-size)"
    )
    gpu_memory_utilization: float = setting(
        0.85, gt=0, le=1, help="vLLM --gpu-memory-utilization (CUDA only)"
    )
    cpu_kvcache_space_gb: int = setting(1, ge=1, help="VLLM_CPU_KVCACHE_SPACE in GiB (CPU only)")
    ready_timeout_s: float = setting(300.0, gt=0, help="seconds a server may take to start")
    request_timeout_s: float = setting(
        120.0, gt=0, help="seconds one request may take before it is retried elsewhere"
    )
    health_interval_s: float = setting(
        2.0, gt=0, help="seconds between the supervisor's health checks"
    )
    max_restarts: int = setting(3, ge=0, help="restarts per server before it is marked dead")
    shutdown_grace_s: float = setting(
        10.0, ge=0, help="seconds between SIGTERM and SIGKILL when stopping a server"
    )
    cpu_cores: list[int] = setting(
        factory=list,
        help="CPU cores of the server processes (vLLM binds its threads to them); "
        "[] leaves placement to the OS",
    )
    gpu_ids: list[int] = setting(
        factory=list,
        help="CUDA devices (indices among the visible ones) of the servers launched here, "
        "server.count × server.tensor_parallel_size of them; [] takes the first visible ones",
    )
    extra_args: list[str] = setting(
        factory=list, help="more vLLM command-line arguments, appended as given"
    )
    backend: ServerBackend = setting(
        ServerBackend.process,
        help="process: child processes of this machine; ray: one Ray actor per server on a "
        "Ray cluster (see ray.*)",
    )


@dataclass
class RayConfig:
    address: str = setting(
        "local",
        help="local: a private Ray instance for the run, stopped with it; auto: the cluster "
        "`ray start` joined on this machine; HOST:PORT: that cluster's head",
    )
    local_nodes: int = setting(
        1,
        ge=1,
        help="logical nodes of a local instance, each with the custom resource node<i>: 1 "
        "(rehearses a multi-node placement on one machine)",
    )
    placement: RayPlacement = setting(
        RayPlacement.spread, help="placement-group strategy of the servers' bundles"
    )
    cpus_per_server: float = setting(1.0, ge=0, help="CPUs each server's bundle reserves")
    gpus_per_server: float | None = setting(
        None,
        ge=0,
        help="GPUs each server's bundle reserves; null: server.tensor_parallel_size on CUDA, "
        "0 on the CPU",
    )
    staging_dir: str | None = setting(
        None,
        help="node-local directory where each server's actor writes staged weights "
        "(weights.transport=ray); null: the node's temporary directory",
    )


@dataclass
class WeightsConfig:
    transport: WeightsTransport = setting(
        WeightsTransport.filesystem,
        help="filesystem: servers read run.dir/weights/v<N>; ray: through Ray's object store "
        "to each server's node-local disk (needs server.backend=ray)",
    )


@dataclass
class RolloutConfig:
    max_staleness: int = setting(
        2, ge=0, help="η: how many versions old a sample may be when it is trained on"
    )
    batch_size: int = setting(8, ge=1, help="B: rollouts (groups) consumed per training step")
    max_concurrent: int = setting(64, ge=1, help="rollouts generating at once")
    strategy: Strategy = setting(
        Strategy.segment_wise,
        help="segment_wise: also drop what breaks the bound; standard: admission only",
    )
    n_samples: int = setting(
        4,
        ge=2,
        help="completions per prompt: the GRPO group",
        why="GRPO's advantage is reward minus the group mean, so a group of 1 has every "
        "advantage 0 and nothing is learned",
    )
    max_new_tokens: int = setting(16, ge=1, help="longest completion, in tokens")
    temperature: float = setting(
        1.0,
        gt=0,
        help="sampling temperature",
        why="0 is greedy decoding: every completion of a group is the same, so GRPO has "
        "nothing to compare, and the trainer divides its logits by the temperature",
    )
    top_p: float = setting(
        1.0,
        ge=1,
        le=1,
        help="nucleus sampling; only 1 (off) is accepted",
        why="the loss needs the logprobs of the distribution tokens are drawn from, and the "
        "trainer and the proximal recompute do not truncate; lower rollout.temperature instead",
    )
    top_k: int = setting(
        -1,
        ge=-1,
        le=0,
        help="top-k sampling; only -1 or 0 (off) are accepted",
        why="the loss needs the logprobs of the distribution tokens are drawn from, and the "
        "trainer and the proximal recompute do not truncate; lower rollout.temperature instead",
    )
    take_timeout_s: float = setting(
        600.0, gt=0, help="seconds the trainer waits for a batch before the run stops"
    )
    recompute_batch_size: int = setting(
        64, ge=1, help="proximal recompute: samples per scoring request"
    )
    recompute_concurrency: int = setting(
        4, ge=1, help="proximal recompute: scoring requests in flight at once"
    )
    recompute_early: bool = setting(
        True,
        help="score buffered samples while the trainer trains, so the update waits only for "
        "the last ones (segment mode; the p_t written are the same either way)",
    )
    recompute_on: RecomputeOn = setting(
        RecomputeOn.server,
        help="who scores the buffered v−1 tokens under v (segment mode): server (vLLM, early "
        "while the trainer trains, and at the update), or trainer (its version-v weights, "
        "before its optimizer step, what is buffered then; what finishes during the step is "
        "scored by the servers at the update). Trainer needs train.world_size=1",
    )
    score_continuations: bool = setting(
        True,
        help="a completion continued after a weight update asks vLLM for the logprobs of its "
        "tokens so far, which its prefill computes under the new weights anyway; the next "
        "update's proximal recompute writes them instead of scoring the sample (segment "
        "mode, rollout.temperature=1; the p_t are the same)",
    )


@dataclass
class TrainConfig:
    steps: int = setting(40, ge=1, help="training steps (weight versions) to run")
    prox_mode: ProxMode = setting(
        ProxMode.segment,
        help="proximal logprobs: segment (server recompute), recompute (trainer forward "
        "pass), loglinear (interpolation)",
    )
    device: Device = setting(Device.cpu, help="where the trainer runs")
    lr: float = setting(1e-3, gt=0, help="AdamW learning rate")
    weight_decay: float = setting(0.0, ge=0, help="AdamW weight decay")
    grad_clip: float = setting(1.0, ge=0, help="max gradient norm; 0 disables clipping")
    eps_clip_low: float = setting(
        0.2,
        ge=0,
        lt=1,
        help="PPO clip ε below: the ratio is clipped at 1 − ε",
        why="at 1 or more the lower clip 1 − ε is 0 or negative and never clips",
    )
    eps_clip_high: float = setting(
        0.2, ge=0, help="PPO clip ε above: the ratio is clipped at 1 + ε"
    )
    dual_clip: float | None = setting(
        None,
        gt=1,
        help="dual clip constant c for negative advantages; null disables it",
        why="the dual clip bounds the loss at c·|A|, which is below the clipped loss unless c > 1",
    )
    behav_weight_cap: float | None = setting(
        5.0, gt=0, help="mask or clamp tokens with behaviour weight exp(p − μ) above it; null: off"
    )
    behav_weight_floor: float | None = setting(
        None, ge=0, help="mask or clamp tokens with behaviour weight below it; null: off"
    )
    behav_weight_mode: WeightBoundMode = setting(
        WeightBoundMode.mask, help="what the cap and floor do to a token: mask it or clamp w"
    )
    token_max_lag: int | None = setting(
        None, ge=0, help="mask tokens more than this many versions old; null: off"
    )
    adv_eps: float = setting(1e-6, gt=0, help="GRPO advantage: reward − mean over std + adv_eps")
    micro_batch_tokens: int = setting(4096, ge=1, help="tokens per forward/backward pass")
    logit_chunk_tokens: int = setting(
        128,
        ge=0,
        help="positions whose vocabulary logits exist at once: the LM head makes logprobs and "
        "entropy a chunk at a time, and again in backward (one more head matmul per step, "
        "instead of holding tokens × vocabulary logits); 0 makes all output logits at once. "
        "Models whose logits are not a bias-free LM head's output, and the sharded trainer, "
        "always use 0",
    )
    pack_sequences: bool = setting(
        False,
        help="lay a micro-batch's sequences end to end in rows no longer than its longest "
        "instead of padding each to the longest prompt and output; applies where the LM head "
        "runs in chunks (train.logit_chunk_tokens > 0)",
    )
    pack_row_tokens: int = setting(
        0,
        ge=0,
        help="with train.pack_sequences, tokens per packed row; 0, or fewer than the longest "
        "sequence of the micro-batch, makes rows as long as that sequence, so attention costs "
        "no more than padded (longer rows pad less, but attention grows with the row)",
    )
    checkpoint_every: int = setting(10, ge=1, help="steps between checkpoints")
    keep_checkpoints: int = setting(2, ge=1, help="newest checkpoints kept in run.dir/checkpoints")
    keep_weights: int = setting(3, ge=1, help="newest weight exports kept in the weights dir")
    weights_dir: str = setting(
        "",
        help="where the weight exports for the servers go: empty is run.dir/weights; `memory` "
        "is a memory-backed directory (/dev/shm), deleted when the run ends: no disk writeback "
        "in the weight update, but keep_weights exports held in RAM and readable only by "
        "servers on this machine; or any other directory",
    )
    overlap_reload: bool = setting(
        True,
        help="at rollout.max_staleness >= 1: in a weight update, take the next batch as soon "
        "as it is decided (its groups need nothing more from the update, or the buffer is "
        "final) and train on it while the rest of the update (recompute, reload, version "
        "change, resume) finishes in the background. No "
        "effect at max_staleness 0 (the next batch needs the new weights), before a "
        "checkpoint or the run's end, or with rollout.recompute_on=trainer (the trainer scores "
        "the buffer at the servers' version, after the reload)",
    )
    update_timeout_s: float = setting(
        120.0, gt=0, help="seconds one weight-update call to a server may take"
    )
    max_nonfinite_steps: int = setting(
        3,
        ge=1,
        help="stop after this many training steps in a row whose loss or gradient norm was not "
        "finite (each is skipped, the weights left as they were)",
    )
    cpu_threads: int = setting(
        1,
        ge=0,
        help="torch threads of a CPU trainer; 0 keeps torch's default (all cores); 1 leaves "
        "the other cores to the vLLM CPU servers",
    )
    cpu_cores: list[int] = setting(
        factory=list, help="CPU cores of the trainer process; [] leaves placement to the OS"
    )
    world_size: int = setting(
        1, ge=1, help="trainer ranks (processes) on this node; more than one shards with FSDP2"
    )
    nnodes: int = setting(1, ge=1, help="nodes with trainer ranks")
    node_rank: int = setting(
        0,
        ge=0,
        help="this node's index; node 0 also runs the servers, rollouts, event log and dashboard",
    )
    master_addr: str = setting("127.0.0.1", help="rendezvous address of the trainer ranks (node 0)")
    master_port: int = setting(
        0, ge=0, le=65535, help="rendezvous port; 0 picks a free one (one node only)"
    )
    gpu_ids: list[int] = setting(
        factory=list,
        help="CUDA devices (indices among the visible ones) of this node's ranks, one per rank; "
        "[]: local rank r takes device r",
    )
    dtype: TrainDtype = setting(
        TrainDtype.auto,
        help="parameter and compute dtype; auto: bfloat16 on CUDA (float32 master weights and "
        "gradient reduction), float32 on CPU",
    )
    dist_timeout_s: float = setting(
        3600.0, gt=0, help="seconds a trainer rank waits in one collective"
    )
    lr_schedule: LrSchedule = setting(
        LrSchedule.constant,
        help="learning rate after warm-up: constant, linear decay or cosine decay to "
        "train.min_lr_ratio·lr at train.steps",
    )
    warmup_steps: int = setting(0, ge=0, help="steps of linear warm-up from 0 to train.lr")
    min_lr_ratio: float = setting(
        0.0, ge=0, le=1, help="linear/cosine: the final learning rate as a fraction of train.lr"
    )
    kl_coef: float = setting(
        0.0,
        ge=0,
        help="weight of a KL penalty to the frozen initial model (k3 estimator per token); 0 "
        "loads no reference model",
    )
    gradient_checkpointing: GradientCheckpointing = setting(
        GradientCheckpointing.selective,
        help="recompute activations in the backward pass (less memory, more time): none; "
        "selective (keep the outputs of matrix multiplications and attention, recompute the "
        "pointwise ops between them: most of the memory saved for a few percent of the speed); "
        "full (keep each decoder layer's input, recompute the layer)",
    )


@dataclass
class EvalConfig:
    """Held-out evaluation on the training servers, outside the staleness capacity."""

    every: int = setting(
        0, ge=0, help="steps between evaluations (also one before the first step); 0 disables"
    )
    n_prompts: int = setting(64, ge=1, help="held-out prompts per evaluation (task.eval_prompts)")
    n_samples: int = setting(
        1, ge=1, help="completions per prompt; pass@k is reported with k = n_samples"
    )
    temperature: float = setting(0.0, ge=0, help="sampling temperature; 0 is greedy")
    max_new_tokens: int | None = setting(
        None, ge=1, help="longest completion; null: rollout.max_new_tokens"
    )


@dataclass
class LogConfig:
    """Where metrics go besides the event log, which is always written."""

    backends: list[str] = setting(
        factory=list,
        choices=tuple(b.value for b in LogBackend),
        help="metric backends: [] (events.jsonl only), [tensorboard], [wandb] or both",
    )
    wandb_project: str = setting("sdp", help="W&B project")
    wandb_mode: str = setting(
        "offline",
        choices=("offline", "online", "disabled"),
        help="W&B mode; offline writes run.dir/wandb and needs no network (wandb sync uploads)",
    )
    samples_per_step: int = setting(
        2, ge=0, help="trained completions per step written to run.dir/samples.jsonl; 0: none"
    )
    dropped_samples: bool = setting(
        True, help="also write dropped rollouts (with their reason) to samples.jsonl"
    )


@dataclass
class TaskConfig:
    name: str = setting("reverse", help="task: reverse, copy, math_jsonl, or a registered one")
    path: str | None = setting(
        None, help="data file of a file-based task (builtin:math_small is bundled)"
    )
    reward_fn: str | None = setting(
        None, help="module:function (or module.function) replacing the task's reward"
    )
    seed: int = setting(0, help="seed of the prompt stream")
    min_len: int = setting(1, ge=1, help="reverse/copy: shortest digit string")
    max_len: int = setting(2, ge=1, help="reverse/copy: longest digit string (>= min_len)")
    prompt_template: str | None = setting(
        None,
        help="math_jsonl, reasoning_gym: prompt with a {question} field; null: the task's default",
    )
    chat_template: str = setting(
        "auto",
        help="format prompts with the tokenizer's chat template: auto (when it has one), true, "
        "false",
    )
    system_prompt: str | None = setting(
        None, help="system message of the chat (a first line without a template); null: none"
    )
    eval_fraction: float = setting(
        0.1,
        ge=0,
        lt=1,
        help="part of the distinct questions held out for evaluation, never trained on",
    )
    question_field: str = setting("question", help="math_jsonl: the question's field in the file")
    answer_field: str = setting("answer", help="math_jsonl: the reference answer's field")
    dataset: str | None = setting(None, help="reasoning_gym: the dataset name, e.g. chain_sum")
    dataset_config: dict[str, Any] = setting(
        factory=dict, help="reasoning_gym: the dataset's generator options"
    )
    dataset_size: int = setting(
        5000, ge=1, help="reasoning_gym: items generated (offline, seeded by task.seed)"
    )
    answer_extract: str = setting(
        "tags",
        choices=("tags", "last_number"),
        help="reasoning_gym: what score_answer gets: tags (<answer>...</answer>, else the "
        "whole completion) or last_number (the last number in it)",
    )


@dataclass
class SimulateConfig:
    """Simulated servers and trainer for `sdp simulate` (capacity planning, CPU smoke runs)."""

    token_latency_s: float = setting(
        0.002, ge=0, help="mean seconds per generated token for one request"
    )
    token_latency_per_seq_s: float = setting(
        0.0,
        ge=0,
        help="more mean seconds per token for each request decoding on the same server at the "
        "time, itself included (a server decodes its batch in one step, slower as it grows)",
    )
    prefill_s: float = setting(
        0.0,
        ge=0,
        help="mean seconds to prefill one request's prompt (every segment) before its first "
        "token; a server prefills one request at a time, first come first served, and its "
        "decoding requests wait meanwhile",
    )
    latency_jitter: float = setting(
        0.3, ge=0, help="relative spread (lognormal sigma) of per-token and prefill latency"
    )
    server_batch: int = setting(32, ge=1, help="requests one simulated server decodes at once")
    mean_new_tokens: int = setting(16, ge=1, help="mean tokens per completion")
    new_tokens: list[int] = setting(
        factory=list,
        ge=1,
        help="completion lengths, each drawn as often (--calibrate sets a run's quantiles, "
        "so a run whose completions stop at rollout.max_new_tokens is simulated so); [] draws "
        "from a gamma distribution with mean simulate.mean_new_tokens",
    )
    train_step_s: float = setting(0.05, ge=0, help="seconds per simulated training step")
    export_s: float = setting(
        0.0,
        ge=0,
        help="seconds the trainer spends writing the weights in a simulated weight update, "
        "before the servers reload (the trainer waits for it even with train.overlap_reload)",
    )
    update_s: float = setting(
        0.01,
        ge=0,
        help="seconds of a simulated weight update besides the export: the servers' reload, "
        "version change and resume (the trainer trains meanwhile with train.overlap_reload)",
    )
    time_scale: float = setting(
        0.0, ge=0, help="wall seconds per simulated second; 0 runs in virtual time"
    )
    seed: int = setting(0, help="seed of the simulated latencies and lengths")


@dataclass
class SdpConfig:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    weights: WeightsConfig = field(default_factory=WeightsConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    simulate: SimulateConfig = field(default_factory=SimulateConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)
    resume: bool = setting(False, help="continue from the newest checkpoint in run.dir")


def declared_keys(
    schema: type = SdpConfig, prefix: str = ""
) -> Iterator[tuple[str, Field[Any], Rule | None]]:
    """Every leaf key of the schema with its dataclass field and rule (None for a field declared
    without `setting`, which a test forbids), in declaration order; groups recurse."""
    for item in fields(schema):
        key = f"{prefix}{item.name}"
        group = item.default_factory
        if isinstance(group, type) and is_dataclass(group):
            yield from declared_keys(group, f"{key}.")
        else:
            yield key, item, item.metadata.get(RULE)


SCHEMA_NAME = "sdp_schema"


def register_schema() -> None:
    """Register the root schema; `conf/default.yaml` names it first in its defaults list, so
    every group file and override is checked against the dataclasses above."""
    ConfigStore.instance().store(name=SCHEMA_NAME, node=SdpConfig)
