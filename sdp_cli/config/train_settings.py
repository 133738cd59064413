"""The `train.*` keys: loss, optimizer, memory, distribution and the weight update."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from sdp_cli.config.server_settings import Device
from sdp_cli.config.setting import setting


class GradientCheckpointing(StrEnum):
    none = "none"
    selective = "selective"
    full = "full"


class ProxMode(StrEnum):
    segment = "segment"
    recompute = "recompute"
    loglinear = "loglinear"


class WeightBoundMode(StrEnum):
    mask = "mask"
    clamp = "clamp"


class LossAgg(StrEnum):
    """How per-token losses add up to the step's loss (docs/design.md, The loss). The values
    have hyphens, as peers spell them, so the key is declared as a string with these choices."""

    token_mean = "token-mean"
    seq_mean_token_mean = "seq-mean-token-mean"
    seq_mean_token_sum_norm = "seq-mean-token-sum-norm"


class AdvNorm(StrEnum):
    group_std = "group_std"
    none = "none"


class Level(StrEnum):
    token = "token"
    sequence = "sequence"


class LrSchedule(StrEnum):
    constant = "constant"
    linear = "linear"
    cosine = "cosine"


class UpdateMode(StrEnum):
    """How the servers take new weights (docs/design.md, Weight-update protocol)."""

    abort = "abort"
    keep = "keep"


class TrainDtype(StrEnum):
    auto = "auto"
    float32 = "float32"
    bfloat16 = "bfloat16"


# vLLM 0.32's allowed --max-lora-rank values (vllm.config.lora.MaxLoRARanks).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


@dataclass
class LoraConfig:
    """`train.lora.*`: train a LoRA adapter (peft) instead of every weight."""

    rank: int = setting(
        0,
        ge=0,
        le=VLLM_LORA_RANKS[-1],
        help="LoRA rank; 0 trains every weight (full fine-tuning). With a rank, only the "
        "adapter is trained, and each weight update sends only the adapter to the servers",
        why="vLLM serves adapters up to rank 512",
    )
    alpha: float = setting(
        16.0, gt=0, help="LoRA alpha: the adapter's output is scaled by alpha / rank"
    )
    dropout: float = setting(
        0.0,
        ge=0,
        lt=1,
        help="dropout on the adapter's input in the trainer's loss passes only (the servers and "
        "the scoring passes use none, so above 0 the trainer's ratios see a noisier policy)",
    )
    target_modules: list[str] = setting(
        factory=list,
        help="module names (or name suffixes) that get an adapter; []: every linear "
        "projection of the decoder (q_proj ... down_proj on Llama-like models), never the LM "
        "head",
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
        WeightBoundMode.mask,
        help="what the cap and floor do to a token: mask it (MIS; IcePop with both) or clamp "
        "w (TIS)",
    )
    behav_weight_level: Level = setting(
        Level.token,
        help="token: each token's behaviour weight exp(p − μ); sequence: one weight per "
        "completion, the geometric mean exp(mean_t(p − μ)) of its tokens', so the cap and floor "
        "mask or clamp whole completions (sequence-level TIS/MIS)",
    )
    ratio_level: Level = setting(
        Level.token,
        help="token: PPO ratio exp(π − p) per token; sequence (GSPO): one ratio per completion, "
        "exp(mean_t(π − p)), clipped per completion (each token's gradient is the sequence "
        "ratio times its own ∇π)",
    )
    loss_agg: str = setting(
        LossAgg.token_mean.value,
        choices=tuple(member.value for member in LossAgg),
        help="how token losses add up: token-mean (DAPO: sum over the step's tokens / their "
        "number), seq-mean-token-mean (GRPO: mean per completion, then over completions), "
        "seq-mean-token-sum-norm (Dr.GRPO: sum per completion / train.loss_agg_tokens, then "
        "mean over completions)",
    )
    loss_agg_tokens: int | None = setting(
        None,
        ge=1,
        help="seq-mean-token-sum-norm: the constant each completion's token sum is divided by; "
        "null: rollout.max_new_tokens",
    )
    adv_norm: AdvNorm = setting(
        AdvNorm.group_std,
        help="GRPO advantage: group_std divides reward − group mean by the group's std + "
        "train.adv_eps; none leaves it undivided (Dr.GRPO)",
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
    update_mode: UpdateMode = setting(
        UpdateMode.abort,
        help="how a weight update treats requests in flight: abort (they return with their "
        "tokens so far and continue as new segments under the new weights, re-prefilled) or "
        "keep (the servers freeze them, reload, and resume them in place: no abort, no "
        "resubmission, no re-prefill; tokens after the resume carry the new version; with LoRA "
        "they finish on the adapter they named, under its version)",
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
    lora: LoraConfig = field(default_factory=LoraConfig)
