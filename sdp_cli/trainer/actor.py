"""The actor: a Hugging Face causal LM in float32 with its fused AdamW optimizer.

`train_step` runs one optimizer step on a batch of rollout groups with the decoupled PPO loss;
micro-batches accumulate gradients scaled so the total equals the full-batch loss.
"""

from __future__ import annotations

import inspect
import math
import random
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor
from transformers import AutoModelForCausalLM, PreTrainedModel
from transformers.utils import logging as hf_logging

from sdp_cli.config.rollout_settings import RolloutConfig
from sdp_cli.config.server_settings import Device
from sdp_cli.config.train_settings import LossAgg, ProxMode, TrainConfig
from sdp_cli.errors import ConfigError
from sdp_cli.orchestrator.run_state import TrainState
from sdp_cli.rollout.trajectory import RolloutGroup
from sdp_cli.trainer.adapter import (
    adapter_config,
    adapter_dropout,
    adapter_tensors,
    read_checkpoint_adapter,
    with_lora,
    write_checkpoint_adapter,
)
from sdp_cli.trainer.batch import (
    SampleSettings,
    TokenSample,
    TrainBatch,
    build_micro_batches,
    collate,
    split_by_token_budget,
)
from sdp_cli.trainer.checkpoint import read_model_tensors, save_checkpoint, write_model_tensors
from sdp_cli.trainer.chunked_logprobs import chunked_logprobs_and_entropy
from sdp_cli.trainer.health import health_stats, uninformative_fraction
from sdp_cli.trainer.loss import LossSettings, LossStats, decoupled_ppo_loss, select_proximal
from sdp_cli.trainer.packing import PackedRows, pack_batch
from sdp_cli.trainer.recompute_activations import enable_gradient_checkpointing
from sdp_cli.trainer.schedule import lr_at
from sdp_cli.trainer.token_stats import k3, masked_mean, token_entropy
from sdp_cli.weight_sync.adapter_export import export_adapter
from sdp_cli.weight_sync.export import export_weights


def torch_device(device: Device | str) -> torch.device:
    choice = Device(device)
    if choice == Device.auto:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == Device.cuda and not torch.cuda.is_available():
        raise ConfigError("train.device", "CUDA is not available", "set train.device=cpu")
    return torch.device(choice.value)


def limit_cpu_threads(train: TrainConfig) -> None:
    """A CPU trainer sharing the machine with vLLM CPU servers loses more to contention than it
    gains from threads (docs/benchmarks.md)."""
    if train.cpu_threads > 0 and torch_device(train.device).type == "cpu":
        torch.set_num_threads(train.cpu_threads)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def load_model(model_dir: Path, device: torch.device) -> PreTrainedModel:
    # Per-load progress bars would scribble over the dashboard.
    hf_logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model.to(device)
    # Dropout off for good: the trainer's logprobs must match the servers', which sample
    # without dropout.
    model.eval()
    return model


def make_optimizer(model: torch.nn.Module, train: TrainConfig) -> torch.optim.AdamW:
    """AdamW over `model`'s trainable parameters (the adapter's alone with LoRA), with
    torch's fused kernel: one pass over each tensor
    with no temporaries. The default on CPU (one tensor at a time, `foreach=False`) allocates
    two tensors the size of the largest parameter (SmolLM2-135M's embedding) and is several
    times slower (docs/benchmarks.md)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(trainable, lr=train.lr, weight_decay=train.weight_decay, fused=True)


def _pad_id(model: PreTrainedModel) -> int:
    for candidate in (model.config.pad_token_id, model.config.eos_token_id, 0):
        if isinstance(candidate, int):
            return candidate
        if isinstance(candidate, list) and candidate:
            return int(candidate[0])
    return 0


class Actor:
    def __init__(
        self,
        model_dir: Path,
        train: TrainConfig,
        seed: int = 0,
        temperature: float = 1.0,
        rollout: RolloutConfig | None = None,
    ) -> None:
        """`temperature` is the sampling temperature of the rollouts: every logprob the actor
        computes is of softmax(logits / temperature), the distribution tokens were drawn from.
        `rollout` gives what the loss takes from the rollout keys (rollout.max_new_tokens for
        train.loss_agg=seq-mean-token-sum-norm, rollout.overlong); its defaults if None."""
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0 (got {temperature})")
        seed_everything(seed)
        self.temperature = temperature
        limit_cpu_threads(train)
        self.model_dir = Path(model_dir)
        self.train_config = train
        self.device = torch_device(train.device)
        self.model = load_model(self.model_dir, self.device)
        # With train.lora.rank, the adapter is injected into self.model, which stays the
        # Hugging Face model (every method below reads its decoder and head as before);
        # `self.peft` switches the adapter off for the KL reference and names its tensors.
        self.peft = (
            with_lora(self.model, train.lora, self.model_dir) if train.lora.rank > 0 else None
        )
        self.pad_id = _pad_id(self.model)
        self.loss_settings = LossSettings.from_config(train)
        rollout = rollout or RolloutConfig()
        self.sample_settings = SampleSettings.from_config(train, rollout)
        self.variant = loss_variant(train, rollout)
        self.prox_mode = ProxMode(train.prox_mode)
        self.optimizer = make_optimizer(self.model, train)
        self._keeps_logits = "logits_to_keep" in inspect.signature(self.model.forward).parameters
        self.logit_chunk_tokens = train.logit_chunk_tokens if has_plain_lm_head(self.model) else 0
        enable_gradient_checkpointing(self.model, train.gradient_checkpointing)
        # The frozen initial model of the KL penalty; none is loaded when train.kl_coef = 0,
        # nor with LoRA: the reference is then this model with its adapter switched off.
        loads_reference = train.kl_coef > 0 and self.peft is None
        self.reference = load_model(self.model_dir, self.device) if loads_reference else None
        if self.reference is not None:
            self.reference.requires_grad_(False)
        self.step_extras: dict[str, float] = {}

    def logprobs(self, batch: TrainBatch, model: PreTrainedModel | None = None) -> Tensor:
        """log π of every output column of `batch` ([rows, L], padding included), with grad,
        under `model` (the actor's own by default)."""
        if self.logit_chunk_tokens:
            return self.logprobs_and_entropy(batch, model)[0]
        # Without the entropy, which would cost a softmax over the vocabulary.
        return token_logprobs(self.output_logits(batch, model), batch.output_ids)

    def logprobs_and_entropy(
        self, batch: TrainBatch, model: PreTrainedModel | None = None
    ) -> tuple[Tensor, Tensor]:
        """log π of every output column ([rows, L], with grad) and the policy's entropy there
        (no grad); with the LM head in chunks, 0 at padding."""
        model = model or self.model
        if not self.logit_chunk_tokens:
            logits = self.output_logits(batch, model)
            return token_logprobs(logits, batch.output_ids), token_entropy(logits)
        # Only the positions of real output tokens go through the LM head; padding gets 0.
        real = batch.attention_mask[:, -batch.n_output_cols :].bool()
        logprobs, entropy = chunked_logprobs_and_entropy(
            self.real_output_hidden(batch, model, real).unsqueeze(0),
            model.get_output_embeddings().weight,
            batch.output_ids[real].unsqueeze(0),
            self.temperature,
            chunk_tokens=self.logit_chunk_tokens,
        )
        zeros = torch.zeros(real.shape, dtype=logprobs.dtype, device=logprobs.device)
        return zeros.masked_scatter(real, logprobs), zeros.masked_scatter(real, entropy)

    @property
    def packs_sequences(self) -> bool:
        """train.pack_sequences, where it applies: with the LM head in chunks."""
        return self.train_config.pack_sequences and self.logit_chunk_tokens > 0

    def pack(self, batch: TrainBatch) -> PackedRows:
        return pack_batch(batch, self.pad_id, self.train_config.pack_row_tokens)

    def padding_fraction(self, batches: Sequence[TrainBatch]) -> float:
        """Share of the positions the decoder runs on that are padding."""
        if not self.packs_sequences:
            return padding_fraction(batches)
        packed = [self.pack(b) for b in batches]
        positions = sum(p.input_ids.numel() for p in packed)
        return 1.0 - sum(p.real_tokens for p in packed) / positions if positions else 0.0

    def real_output_hidden(self, batch: TrainBatch, model: PreTrainedModel, real: Tensor) -> Tensor:
        """The decoder's last hidden states predicting the real output tokens ([outputs, H], in
        the order of `real`, the output columns that are not padding), from the padded batch
        or, with train.pack_sequences, from its sequences packed into rows."""
        if not self.packs_sequences:
            return self.output_hidden(batch, model)[real]
        packed = self.pack(batch)
        hidden = model.get_decoder()(**packed.model_inputs()).last_hidden_state
        return hidden[packed.predictor_rows, packed.predictor_cols]

    def output_hidden(self, batch: TrainBatch, model: PreTrainedModel) -> Tensor:
        """The decoder's last hidden states at the positions that predict the output columns
        ([rows, L, H]), for an LM head applied in chunks."""
        n_out = batch.n_output_cols
        hidden = model.get_decoder()(**batch.model_inputs()).last_hidden_state
        return hidden[:, -(n_out + 1) : -1, :]

    def output_logits(self, batch: TrainBatch, model: PreTrainedModel | None = None) -> Tensor:
        """Logits predicting every output column of `batch` ([rows, L, V], float32), divided
        by the sampling temperature.

        Logits are only made for the output columns; `token_logprobs` takes logit − logsumexp,
        which never materialises a full log_softmax over the vocabulary."""
        n_out = batch.n_output_cols
        extra = {"logits_to_keep": n_out + 1} if self._keeps_logits else {}
        logits = (model or self.model)(**batch.model_inputs(), **extra).logits
        # The logits at column j predict the token at column j + 1.
        logits = logits[:, -(n_out + 1) : -1, :].float()
        # Every logprob is of the distribution tokens were sampled from: softmax(z / T).
        if self.temperature != 1.0:
            logits = logits / self.temperature
        return logits

    @torch.no_grad()
    def reference_logprobs(self, batch: TrainBatch) -> Tensor | None:
        if self.peft is not None and self.train_config.kl_coef > 0:
            with self.peft.disable_adapter():
                return self.logprobs(batch)
        if self.reference is None:
            return None
        return self.logprobs(batch, self.reference)

    @torch.no_grad()
    def score(
        self, prompts: Sequence[Sequence[int]], outputs: Sequence[Sequence[int]]
    ) -> list[list[float]]:
        """log π of each output token given its prompt under the current weights (no grad)."""
        samples = [
            TokenSample(list(p), list(o), [0.0] * len(o), [0.0] * len(o), [0] * len(o), 0.0, 0.0)
            for p, o in zip(prompts, outputs, strict=True)
        ]
        values: list[list[float]] = []
        for chunk in split_by_token_budget(samples, self.train_config.micro_batch_tokens):
            batch = collate(chunk, self.pad_id).to(self.device)
            rows = self.logprobs(batch).cpu().tolist()
            values += [row[: len(s.output_ids)] for row, s in zip(rows, chunk, strict=True)]
        return values

    def _micro_batches(self, groups: Sequence[RolloutGroup]) -> list[TrainBatch]:
        batches = build_micro_batches(
            groups, self.sample_settings, self.train_config.micro_batch_tokens, self.pad_id
        )
        return [b.to(self.device) for b in batches]

    @torch.no_grad()
    def _recomputed_proximal(self, batches: list[TrainBatch]) -> list[Tensor | None]:
        if self.prox_mode != ProxMode.recompute:
            return [None] * len(batches)
        return [self.logprobs(b) for b in batches]

    def _clip_gradients(self) -> float:
        max_norm = self.train_config.grad_clip
        # A non-positive grad_clip disables clipping; the norm is still reported.
        limit = max_norm if max_norm > 0 else float("inf")
        return float(torch.nn.utils.clip_grad_norm_(self.trainable(), limit).item())

    def trainable(self) -> list[torch.nn.Parameter]:
        """The parameters the optimizer steps (the adapter's alone with LoRA)."""
        return [p for p in self.model.parameters() if p.requires_grad]

    def train_step(self, groups: Sequence[RolloutGroup], version: int) -> dict[str, float]:
        """One optimizer step on `groups`, training version `version` → `version + 1`.

        Returns the loss statistics (see LossStats.summary), `tokens_lag_<k>` counts, the
        gradient norm before clipping, the mean reward, the step time and `skipped` (1.0 when
        the loss or the gradient norm was not finite and the weights were left unchanged)."""
        started = time.perf_counter()
        batches = self._micro_batches(groups)
        n_tokens = sum(b.n_tokens for b in batches)
        stats, grad_norm, finite = self._optimizer_step(batches, n_tokens, version)
        extras = {**self.step_extras, "padding_frac": self.padding_fraction(batches)}
        return step_summary(groups, stats, grad_norm, finite, len(batches), started, extras)

    def _optimizer_step(
        self, batches: list[TrainBatch], n_tokens: int, version: int
    ) -> tuple[LossStats, float, bool]:
        """Accumulate the gradients of `batches` (each token's loss times its coefficient in
        the whole step's loss, `TrainBatch.loss_scale`) and step unless the whole batch, across
        ranks, has no token (`n_tokens`); returns the statistics, the gradient norm and whether
        the step was finite (else the weights were left unchanged)."""
        recomputed = self._recomputed_proximal(batches)
        self.optimizer.zero_grad(set_to_none=True)
        stats = LossStats()
        extra = _ExtraStats()
        dropout = self.peft is not None and self.train_config.lora.dropout > 0
        for batch, prox_pass in zip(batches, recomputed, strict=True):
            with adapter_dropout(self.model, dropout):
                logprobs, entropy = self.logprobs_and_entropy(batch)
            extra.add(batch, entropy, logprobs)
            prox = select_proximal(
                self.prox_mode,
                logprobs=logprobs,
                segment_prox=batch.prox_logprobs,
                behav_logprobs=batch.behav_logprobs,
                versions=batch.versions,
                train_version=version,
                recomputed=prox_pass,
            )
            loss, batch_stats = decoupled_ppo_loss(
                logprobs,
                prox,
                batch.behav_logprobs,
                batch.advantages,
                batch.loss_mask,
                batch.versions,
                version,
                self.loss_settings,
                token_scale=batch.loss_scale,
            )
            loss = loss + self.reference_penalty(batch, logprobs, extra)
            loss.backward()
            stats = stats.merge(batch_stats)
        # What follows costs the same whatever the batch: `sdp simulate --calibrate` needs it
        # apart from the forward and backward, which grow with the tokens.
        optimizer_started = time.perf_counter()
        grad_norm = self._clip_gradients() if n_tokens > 0 else 0.0
        lr = lr_at(version, self.train_config)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        summary = stats.summary()
        # One overflow would otherwise put NaN into every weight through AdamW: skip the step
        # and leave the caller to decide when too many in a row means the run is broken.
        finite = self._finite_everywhere(
            math.isfinite(summary["loss"]) and math.isfinite(grad_norm)
        )
        if not finite:
            self.optimizer.zero_grad(set_to_none=True)
        elif n_tokens > 0:
            self.optimizer.step()
        # Rank-local: the schedule's rate, entropy and KL of this rank's tokens.
        self.step_extras = {
            **self.variant,
            "lr": lr,
            **extra.summary(),
            "optimizer_s": time.perf_counter() - optimizer_started,
        }
        return stats, grad_norm, finite

    def _finite_everywhere(self, finite: bool) -> bool:
        """Whether the step is finite for every rank taking part (one, here)."""
        return finite

    def save_tensors(self, target: Path) -> None:
        """Write the weights (the adapter alone with LoRA) and optimizer state of a checkpoint
        into `target`."""
        if self.peft is not None:
            write_checkpoint_adapter(target, self.peft, self.model, self.optimizer)
            return
        write_model_tensors(target, self.model, self.optimizer)

    def load_tensors(self, path: Path) -> None:
        if self.peft is not None:
            read_checkpoint_adapter(path, self.peft, self.optimizer)
            return
        read_model_tensors(path, self.model, self.optimizer)

    def reference_penalty(self, batch: TrainBatch, logprobs: Tensor, extra: _ExtraStats) -> Tensor:
        """train.kl_coef × the k3 estimate of KL(current ‖ reference) per output token,
        aggregated like the policy loss (train.loss_agg); 0 without a reference model."""
        reference = self.reference_logprobs(batch)
        if reference is None:
            return logprobs.new_zeros(())
        mask = batch.loss_mask.bool()
        per_token = torch.where(mask, k3(logprobs, reference), torch.zeros_like(logprobs))
        extra.ref_kl_sum += float(per_token.detach().sum().item())
        return self.train_config.kl_coef * (per_token * batch.loss_scale).sum()

    def save_checkpoint(self, run_dir: Path, state: TrainState, keep: int | None) -> Path:
        """Write `run_dir/checkpoints/step-{state.step}/`, keeping the newest `keep`."""
        return save_checkpoint(
            run_dir, self.model, self.optimizer, state, keep=keep, write_tensors=self.save_tensors
        )

    def export_weights(
        self, weights_dir: Path, version: int, dtype: torch.dtype | str | None = None
    ) -> Path:
        """Write `weights_dir/v{version}/` for the servers, in their `dtype` (a torch dtype, or
        vLLM's --dtype name; None: the trainer's); keeps the newest train.keep_weights. With
        LoRA only the adapter is written (vLLM converts it to its own dtype)."""
        if self.peft is not None:
            return self.export_adapter(weights_dir, version, adapter_tensors(self.peft, self.model))
        return export_weights(
            self.model,
            self.model_dir,
            weights_dir,
            version,
            self.train_config.keep_weights,
            dtype=dtype,
        )

    def export_adapter(self, weights_dir: Path, version: int, tensors: dict[str, Tensor]) -> Path:
        assert self.peft is not None
        return export_adapter(
            tensors,
            adapter_config(self.peft),
            weights_dir,
            version,
            self.train_config.keep_weights,
        )


def step_summary(
    groups: Sequence[RolloutGroup],
    stats: LossStats,
    grad_norm: float,
    finite: bool,
    n_micro_batches: int,
    started: float,
    extras: dict[str, float] | None = None,
) -> dict[str, float]:
    """The numbers `train_step` returns, from the merged statistics of its micro-batches."""
    rewards = [r for g in groups for r in g.rewards]
    truncated = sum(s.truncated for g in groups for s in g.samples)
    return {
        **stats.summary(),
        "skipped": 0.0 if finite else 1.0,
        **{f"tokens_lag_{lag}": float(n) for lag, n in stats.tokens_by_lag.items()},
        "grad_norm": grad_norm,
        **(extras or {}),
        "reward_mean": sum(rewards) / len(rewards) if rewards else 0.0,
        "n_samples": float(len(rewards)),
        # Completions cut at the length limit (rollout.overlong decides what they cost).
        "truncated_frac": truncated / len(rewards) if rewards else 0.0,
        "n_micro_batches": float(n_micro_batches),
        **health_stats(stats.health, uninformative_fraction(g.rewards for g in groups)),
        "step_time_s": time.perf_counter() - started,
    }


def loss_variant(train: TrainConfig, rollout: RolloutConfig) -> dict[str, float]:
    """The loss variant in force, for `train_step.stats`: `KEY=VALUE: 1.0` per choice (stats
    hold numbers only), and the Dr.GRPO constant when it applies."""
    choices = {
        "train.loss_agg": train.loss_agg,
        "train.adv_norm": train.adv_norm,
        "train.ratio_level": train.ratio_level,
        "train.behav_weight_level": train.behav_weight_level,
        "train.behav_weight_mode": train.behav_weight_mode,
        "train.prox_mode": train.prox_mode,
        "rollout.overlong": rollout.overlong,
    }
    variant = {f"{key}={getattr(value, 'value', value)}": 1.0 for key, value in choices.items()}
    settings = SampleSettings.from_config(train, rollout)
    if settings.loss_agg == LossAgg.seq_mean_token_sum_norm:
        variant["train.loss_agg_tokens"] = float(settings.agg_tokens)
    return variant


def padding_fraction(batches: Sequence[TrainBatch]) -> float:
    """Share of the micro-batches' positions that are padding: what packing sequences into
    rows instead could save at most."""
    positions = sum(b.attention_mask.numel() for b in batches)
    real = sum(int(b.attention_mask.sum().item()) for b in batches)
    return 1.0 - real / positions if positions else 0.0


def token_logprobs(logits: Tensor, output_ids: Tensor) -> Tensor:
    """log softmax(logits) at each output token, as logit − logsumexp ([rows, L])."""
    return logits.gather(-1, output_ids.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def has_plain_lm_head(model: PreTrainedModel) -> bool:
    """Whether the model's logits are its bias-free LM head applied to its decoder's last
    hidden states, nothing more (no soft-capping or scaling), so the head can run in chunks."""
    head = model.get_output_embeddings()
    config = model.config
    scaled = any(
        getattr(config, name, None) not in (None, 1.0)
        for name in ("final_logit_softcapping", "logit_scale", "logits_scaling")
    )
    return (
        isinstance(head, torch.nn.Linear)
        and head.bias is None
        and hasattr(model, "get_decoder")
        and not scaled
    )


class _ExtraStats:
    """Entropy of the current policy and the KL estimate behaviour → current over the valid
    tokens of a step's micro-batches, and the reference KL when it is computed."""

    def __init__(self) -> None:
        self.n_tokens = 0
        self.entropy_sum = 0.0
        self.kl_sum = 0.0
        self.ref_kl_sum = 0.0

    @torch.no_grad()
    def add(self, batch: TrainBatch, entropy: Tensor, logprobs: Tensor) -> None:
        mask = batch.loss_mask.bool()
        count = int(mask.sum().item())
        self.n_tokens += count
        self.entropy_sum += masked_mean(entropy, mask) * count
        self.kl_sum += masked_mean(k3(batch.behav_logprobs, logprobs.detach()), mask) * count

    def summary(self) -> dict[str, float]:
        n = max(self.n_tokens, 1)
        return {
            "entropy": self.entropy_sum / n,
            "kl": self.kl_sum / n,
            "ref_kl": self.ref_kl_sum / n,
        }
