"""The actor sharded with FSDP2 across trainer ranks, and what each rank runs.

`fully_shard` wraps every decoder layer and then the root, so each rank holds 1/N of the
parameters, gradients and AdamW state. Rank 0 splits a batch's samples across the ranks by
token count; each rank cuts its share into micro-batches by train.micro_batch_tokens. Each
token's coefficient in the loss (train.loss_agg: 1/N for the token mean) is computed on rank 0
over the whole batch before it is split, and the gradients are summed, not averaged, across
ranks, so N ranks take the same step as one rank would.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import Tensor
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from transformers import PreTrainedModel

from sdp_cli.config.rollout_settings import RolloutConfig
from sdp_cli.config.schema import SdpConfig
from sdp_cli.config.train_settings import TrainConfig
from sdp_cli.errors import ConfigError
from sdp_cli.rollout.trajectory import RolloutGroup
from sdp_cli.trainer.actor import Actor, make_optimizer, step_summary
from sdp_cli.trainer.adapter import CHECKPOINT_ADAPTER_DIR, adapter_config, adapter_tensors
from sdp_cli.trainer.batch import (
    TokenSample,
    TrainBatch,
    collate,
    flatten_groups,
    split_by_token_budget,
)
from sdp_cli.trainer.distributed import (
    Command,
    LocalRanks,
    RankChannel,
    RankInfo,
    compute_dtype,
    die_with_parent,
    init_rank,
    leave_process_group,
    rank_info,
    rank_log,
    redirect_output,
    uses_sharded_trainer,
)
from sdp_cli.trainer.loss import LossStats
from sdp_cli.weight_sync.adapter_export import write_adapter_dir
from sdp_cli.weight_sync.export import export_weights

# torch.distributed.checkpoint directory inside a step-N checkpoint.
SHARDED_DIR = "sharded"


def decoder_layers(model: PreTrainedModel) -> list[torch.nn.Module]:
    """The transformer blocks of a Hugging Face causal LM (Llama, Qwen, Mistral, SmolLM...)."""
    base = getattr(model, model.base_model_prefix, model)
    layers = getattr(base, "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__} has no `{model.base_model_prefix}.layers`")
    return list(layers)


def shard_model(model: PreTrainedModel, param_dtype: torch.dtype) -> PreTrainedModel:
    """FSDP2 over the default process group: each decoder layer, then the root."""
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for layer in decoder_layers(model):
        fully_shard(layer, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            # Sum, don't average: each rank's loss is already divided by the global token
            # count. Summing by plain SUM reductions (gloo has no pre-multiplied sum).
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)
    return model


def split_across_ranks(samples: Sequence[TokenSample], world_size: int) -> list[list[TokenSample]]:
    """Shares of about equal token count: longest samples first, each to the lightest share.
    Within a share the samples keep their batch order."""
    loads = [0] * world_size
    owner: dict[int, int] = {}
    for index in sorted(range(len(samples)), key=lambda i: -samples[i].length):
        rank = min(range(world_size), key=lambda r: loads[r])
        owner[index] = rank
        loads[rank] += samples[index].length
    return [[s for i, s in enumerate(samples) if owner[i] == rank] for rank in range(world_size)]


def idle_batch(pad_id: int) -> TrainBatch:
    """One padding token with nothing to learn: a rank with fewer micro-batches than the others
    runs it so that every rank makes the same FSDP collectives."""
    sample = TokenSample([pad_id], [pad_id], [0.0], [0.0], [0], 0.0, 0.0)
    batch = collate([sample], pad_id)
    return replace(batch, loss_mask=torch.zeros_like(batch.loss_mask))


class ShardedActor(Actor):
    """The actor of one rank. Rank 0 calls the same methods as on the plain actor; they tell
    the other ranks, which wait in `serve()`, to do their part."""

    def __init__(
        self,
        model_dir: Path,
        train: TrainConfig,
        info: RankInfo,
        channel: RankChannel,
        seed: int = 0,
        temperature: float = 1.0,
        rollout: RolloutConfig | None = None,
    ) -> None:
        super().__init__(model_dir, train, seed=seed, temperature=temperature, rollout=rollout)
        # The chunked LM head calls the decoder directly, which skips the unsharding that
        # FSDP2 does in the root module's forward.
        self.logit_chunk_tokens = 0
        self.info = info
        self.channel = channel
        self.cuda_index = torch.cuda.current_device() if self.device.type == "cuda" else None
        self.model = shard_model(self.model, compute_dtype(train))
        # Built over the sharded parameters, so every rank keeps the state of its shard only.
        self.optimizer = make_optimizer(self.model, train)

    # ---- rank 0 -----------------------------------------------------------------------

    def train_step(self, groups: Sequence[RolloutGroup], version: int) -> dict[str, float]:
        started = time.perf_counter()
        # The loss scales are computed here, over the whole batch, before it is cut.
        samples = flatten_groups(groups, self.sample_settings)
        budget = self.train_config.micro_batch_tokens
        parts = [
            [collate(chunk, self.pad_id) for chunk in split_by_token_budget(share, budget)]
            for share in split_across_ranks(samples, self.info.world_size)
        ]
        self.channel.send(Command.train, version)
        stats, grad_norm, finite, n_micro = self._rank_step(self.channel.scatter(parts), version)
        gathered = self.channel.gather(stats) or []
        merged = LossStats()
        for part in gathered:
            merged = merged.merge(part)
        # Entropy and KL are rank 0's share of the batch; the loss statistics are all ranks'.
        return step_summary(groups, merged, grad_norm, finite, n_micro, started, self.step_extras)

    def export_weights(
        self, weights_dir: Path, version: int, dtype: torch.dtype | str | None = None
    ) -> Path:
        # The training loop exports from a worker thread, and the current CUDA device is
        # per thread: gather on this rank's device.
        with self._on_rank_device():
            self.channel.send(Command.export)
            state = self._export_state()
        if self.peft is not None:
            return self.export_adapter(weights_dir, version, state)
        return export_weights(
            self.model,
            self.model_dir,
            weights_dir,
            version,
            self.train_config.keep_weights,
            state_dict=state,
            dtype=dtype,
        )

    def _on_rank_device(self) -> AbstractContextManager[object]:
        if self.cuda_index is None:
            return nullcontext()
        return torch.cuda.device(self.cuda_index)

    def save_tensors(self, target: Path) -> None:
        self.channel.send(Command.save, str(target))
        self._save_sharded(target)

    def load_tensors(self, path: Path) -> None:
        if not (path / SHARDED_DIR).is_dir():
            raise ConfigError(
                "train.world_size",
                f"checkpoint {path} was written by a one-process float32 trainer, and this "
                "trainer is sharded (FSDP2)",
                "resume with train.world_size=1 and train.dtype=float32",
            )
        self.channel.send(Command.load, str(path))
        self._load_sharded(path)

    def score(
        self, prompts: Sequence[Sequence[int]], outputs: Sequence[Sequence[int]]
    ) -> list[list[float]]:
        raise NotImplementedError("the sharded actor scores only inside train_step")

    def stop_ranks(self) -> None:
        self.channel.send(Command.stop)

    # ---- every rank -------------------------------------------------------------------

    def _rank_step(self, batches: list[TrainBatch], version: int) -> tuple[LossStats, float, int]:
        """This rank's part of one step; returns its statistics, the gradient norm (over the
        full model) and the number of micro-batches of the whole step."""
        local_tokens = sum(b.n_tokens for b in batches)
        n_tokens = int(self.channel.all_reduce(local_tokens, dist.ReduceOp.SUM))
        total_micro = int(self.channel.all_reduce(len(batches), dist.ReduceOp.SUM))
        most = int(self.channel.all_reduce(len(batches), dist.ReduceOp.MAX))
        padded = batches + [idle_batch(self.pad_id)] * (most - len(batches))
        moved = [b.to(self.device) for b in padded]
        stats, grad_norm, finite = self._optimizer_step(moved, n_tokens, version)
        return stats, grad_norm, finite, total_micro

    def _finite_everywhere(self, finite: bool) -> bool:
        # Every rank must skip or step together: each one steps its own shard.
        return bool(self.channel.all_reduce(float(finite), dist.ReduceOp.MIN))

    def _clip_gradients(self) -> float:
        max_norm = self.train_config.grad_clip
        limit = max_norm if max_norm > 0 else float("inf")
        # The norm of DTensor gradients is computed over the full (unsharded) gradient.
        norm = torch.nn.utils.clip_grad_norm_(self.trainable(), limit)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        return float(norm.item())

    def _export_state(self) -> dict[str, Tensor]:
        """What a weight update sends, gathered from every rank: the adapter in peft's names
        with LoRA (each rank gets it), else the full state dict on rank 0."""
        if self.peft is not None:
            return adapter_tensors(self.peft, self.model)
        return self.full_state_dict()

    def full_state_dict(self) -> dict[str, Tensor]:
        """Every parameter in full on rank 0's CPU (empty on the other ranks)."""
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_model_state_dict(self.model, options=options)

    def _save_sharded(self, target: Path) -> None:
        model_state, optimizer_state = get_state_dict(self.model, self.optimizer)
        state = {"model": model_state, "optimizer": optimizer_state}
        dcp.save(state, checkpoint_id=str(target / SHARDED_DIR))
        if self.peft is not None:
            # Also the adapter alone, servable (`sdp export`): gathered on every rank.
            tensors = adapter_tensors(self.peft, self.model)
            if self.info.rank == 0:
                write_adapter_dir(
                    target / CHECKPOINT_ADAPTER_DIR, tensors, adapter_config(self.peft)
                )

    def _load_sharded(self, path: Path) -> None:
        model_state, optimizer_state = get_state_dict(self.model, self.optimizer)
        state = {"model": model_state, "optimizer": optimizer_state}
        dcp.load(state, checkpoint_id=str(path / SHARDED_DIR))
        set_state_dict(
            self.model,
            self.optimizer,
            model_state_dict=state["model"],
            optim_state_dict=state["optimizer"],
        )

    # ---- ranks other than 0 -----------------------------------------------------------

    def serve(self) -> None:
        """Do what rank 0 says until it says stop."""
        while True:
            command, payload = self.channel.receive()
            if command == Command.stop:
                return
            if command == Command.train:
                stats, *_ = self._rank_step(self.channel.scatter(None), int(payload))
                self.channel.gather(stats)
            elif command == Command.export:
                self._export_state()
            elif command == Command.save:
                self._save_sharded(Path(payload))
            elif command == Command.load:
                self._load_sharded(Path(payload))


def _join(
    cfg: SdpConfig, model_dir: Path, local_rank: int, ranks: LocalRanks | None = None
) -> ShardedActor:
    info = rank_info(cfg.train, local_rank)
    group = init_rank(cfg.train, info)
    channel = RankChannel(group, info, before_send=ranks.check if ranks else None)
    return ShardedActor(
        model_dir,
        cfg.train,
        info,
        channel,
        seed=cfg.run.seed,
        temperature=cfg.rollout.temperature,
        rollout=cfg.rollout,
    )


def _serve_rank(cfg: SdpConfig, model_dir: Path, local_rank: int) -> None:
    """A rank that only trains: join, serve rank 0's commands, leave."""
    try:
        _join(cfg, model_dir, local_rank).serve()
    finally:
        leave_process_group()


def _spawned_rank(index: int, cfg: SdpConfig, model_dir: Path, log_dir: Path) -> None:
    """Entry point of local rank `index + 1` in its own process."""
    die_with_parent()
    # Ctrl-C reaches the whole process group: rank 0 alone decides how the run stops (and
    # stops this rank), so that a rank dying of SIGINT is not reported as a failure.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    local_rank = index + 1
    redirect_output(rank_log(log_dir, rank_info(cfg.train, local_rank).rank))
    _serve_rank(cfg, model_dir, local_rank)


@contextmanager
def local_ranks(cfg: SdpConfig, model_dir: Path, log_dir: Path) -> Iterator[LocalRanks]:
    """Start this node's local ranks 1..world_size-1; on exit none of them is left."""
    ranks = LocalRanks(cfg.train, log_dir)
    ranks.start(_spawned_rank, cfg, model_dir, log_dir)
    try:
        yield ranks
    except BaseException:
        ranks.stop(grace_s=0.0)
        raise
    finally:
        ranks.stop()


@contextmanager
def trainer_actor(cfg: SdpConfig, model_dir: Path, log_dir: Path) -> Iterator[Actor]:
    """The actor of global rank 0: the plain one-process actor, or the sharded one with this
    node's other ranks started (stopped on exit, killed if the run fails). A rank that died
    turns the failure into a TrainerRankDied naming it.

    `cfg.train.master_port` must be set when there is more than one rank."""
    if not uses_sharded_trainer(cfg.train):
        yield Actor(
            model_dir,
            cfg.train,
            seed=cfg.run.seed,
            temperature=cfg.rollout.temperature,
            rollout=cfg.rollout,
        )
        return
    with local_ranks(cfg, model_dir, log_dir) as ranks:
        try:
            actor = _join(cfg, model_dir, 0, ranks)
            yield actor
            actor.stop_ranks()
        except KeyboardInterrupt:
            raise
        except Exception:
            failure = ranks.dead_rank(wait_s=2.0)
            if failure is not None:
                raise failure from None
            raise
        finally:
            leave_process_group()


def serve_worker_node(cfg: SdpConfig, model_dir: Path, log_dir: Path) -> None:
    """`sdp train` on a node other than 0: this node's ranks train as rank 0 says."""
    with local_ranks(cfg, model_dir, log_dir):
        _serve_rank(cfg, model_dir, 0)


__all__ = [
    "SHARDED_DIR",
    "ShardedActor",
    "decoder_layers",
    "idle_batch",
    "local_ranks",
    "serve_worker_node",
    "shard_model",
    "split_across_ranks",
    "trainer_actor",
    "uses_sharded_trainer",
]
