"""Performance of the trainer against plain Hugging Face, side by side in one run.

Measures, on the same model, tokens and torch threads:

- `trainer_vs_hf`: tokens/s of the actor's train step at the defaults (`Actor.train_step`: the
  decoder forward under selective activation checkpointing, the LM head on the output positions
  a chunk at a time (`sdp_cli/trainer/chunked_logprobs.py`), decoupled PPO loss, backward that
  recomputes the decoder's pointwise ops, fused AdamW step) over tokens/s of a plain Hugging
  Face step (no recompute)
  (`model(input_ids, labels=...)`: the full logits and the model's own cross-entropy,
  backward, torch's default AdamW step) on the same micro-batches; also both without their
  optimizer steps (`passes_vs_hf`, printed).
  The two alternate for `--rounds` rounds after one warm-up each; the figure is the ratio of the
  medians. `train.prox_mode=segment`, so the actor makes no extra proximal forward pass.
- `peak_memory_vs_full`: the peak resident memory that one actor train step adds, over the same
  step (same activation checkpointing) with logprobs taken from a full-vocabulary
  `log_softmax` ([rows, L, vocab] float32).
  Each variant runs in its own child process (a fresh allocator, with glibc's malloc thresholds
  fixed so that RSS follows the live tensors: `STEADY_MALLOC`; as many at once as the cores
  allow, since they measure bytes, not seconds); the child resets the kernel's
  peak-RSS mark (`/proc/self/clear_refs`, 5) after loading the model and building the batch,
  runs a second step (the first creates AdamW's state, 2 × the weights) and reads `VmHWM` from
  `/proc/self/status`: peak RSS minus RSS before the step. This counts what the step holds in
  memory (activations, logits, gradients; the previous step's gradients, freed as the step
  starts, count as a saving), as the OS sees it. Also measured: the actor with every output
  logit at once (`train.logit_chunk_tokens=0`), both sides keeping every activation
  (`train.gradient_checkpointing=none`: `peak_memory_none_vs_full`; the actor's tokens/s
  under it over the default's, timed in the trainer rounds: `none_vs_actor`) and under
  `full` (`peak_memory_checkpointed_vs_full`), and that pair again at
  `--long-output-len` output tokens per sequence (`peak_memory_long_checkpointed_vs_full`),
  where the logits, not the decoder's activations or the optimizer, dominate the step.
- `packed_vs_padded`: tokens/s of the actor's train step with `train.pack_sequences` over the
  padded step, on a batch of varied lengths (each group's prompt half to all of --prompt-len
  tokens, each output a quarter to all of --output-len), alternating rounds after two warm-up
  steps each (each round led by the next variant), medians; also packed into one row
  (`train.pack_row_tokens` = the micro-batch).

Then real `sdp train` runs (in this process, `scripts/bench_train.py`'s `train_once`), on
`conf/examples/smollm2-chain-sum.yaml` for `--model smollm2-135m` (the default config for
`tiny`), attached to vLLM fleets started here, one at a time (each round starts `os`, servers
on every core, for its runs, stops it, then does the same with `split`, servers and trainer on
their own cores, what `sdp train` does at η ≥ 1). Each figure is the median over
`--run-rounds` rounds of the `--run-steps` steady steps (a run at η makes η + 2 more: the
first η + 1 fill the pipeline, since the executor starts η + 1 batches at once, and the last
drains it). The CPU the trainer and the
servers use is sampled every 0.5 s (a sampler in the trainer's process at a finer interval
slowed the runs it measured):

- η = 0 on each placement (`sync-os`: the trainer on every core; `sync-split`: the trainer on
  its one core), η = 2 on each (`async-split`, the trainer on its core; `async-os`, one trainer
  thread as `sdp train` gives it), `async-split-trainer-recompute` (η = 2 with
  `rollout.recompute_on=trainer`: the proximal recompute on the trainer instead of the
  servers), and η = 0 at twice the batch on `split` (`sync-split-2b`).
- `async_over_sync`: trained samples/s of the better η = 2 placement over the better η = 0
  one. Both are also given against the machine's limit: cores ÷ CPU seconds per trained sample
  of generation (the vLLM processes) plus training (this process), as `sync-os` measures them,
  where the two take turns on every core and so each runs alone; and against a bound no run
  at that batch size can pass: cores ÷ (each side's least CPU per trained sample in any run
  at that batch size), since two threads on two cores (sync-os) spend more CPU per sample
  than one thread on one core.
- `update_share`: the trainer's time in the weight update (`train_step.update_s`: pause,
  recompute, export, reload, version, resume, less the reload, version and resume it trains
  through with `train.overlap_reload`, the default) over the train step (`train_step.step_s`)
  of the run `sdp train` does by default at η = 2 (`async-split`), with the mean of each
  phase; `update_total_share` is the whole update (`weight_update.total_s`, what the share
  was before the overlap) over the train step, the servers' side of it. After the runs, the
  `split` fleet reloads weights 3 times with nothing else running: with the export alone
  (below) this is the floor of an update on this placement (`update_floor_share`). The runs
  export into a memory-backed directory (`train.weights_dir=memory`); before them, one export
  alone into a directory on disk and into /dev/shm, alternating (medians), shows the
  difference.
- `simulate_error`: `sdp simulate --calibrate` on the `sync-split` run's log (first round)
  predicts `async-split` (η = 2) and `sync-split-2b` (twice the batch), all three with the
  servers and the trainer on their own cores (the simulator does not model two processes
  sharing cores); the prediction's log goes through the same steady-step arithmetic as the real
  runs; the figure is the larger relative error of the two.

    .venv/bin/python scripts/bench_perf.py [--quick] [--model tiny|smollm2-135m] [--threads N]
        [--rounds R] [--run-steps N] [--run-rounds R] [--no-runs]

`--quick` takes 2 prompts per batch, 2 timed rounds (3 for packing and exports), one round of
runs of 5 steady steps (27 without it; half as many at twice the batch), and measures only
what the five targets need: no `gradient_checkpointing=none` timing, no packing into one row,
and the peak memory of `actor` and `full` only (the other ratios print as null).

The last line of output is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import replace
from functools import partial
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from transformers import PreTrainedModel

from sdp_cli.config import load_config
from sdp_cli.config.schema import SdpConfig
from sdp_cli.config.train_settings import TrainConfig
from sdp_cli.model import ensure_model_dir
from sdp_cli.rollout.trajectory import RolloutGroup, Trajectory
from sdp_cli.trainer.actor import Actor, load_model
from sdp_cli.trainer.batch import TrainBatch
from sdp_cli.weight_sync.versions import MEMORY_ROOT

if TYPE_CHECKING:
    from sdp_cli.launcher.fleet import ServerFleet

# --model NAME → the config group that selects it.
MODEL_GROUPS = {"tiny": "tiny", "smollm2-135m": "smollm2"}
EXAMPLE = Path(__file__).resolve().parent.parent / "conf" / "examples" / "smollm2-chain-sum.yaml"
# The real runs: name → (fleet placement, η, batch size multiple, trainer torch threads (0 is
# every core), other overrides).
RUNS: dict[str, tuple[str, int, int, int, tuple[str, ...]]] = {
    # The trainer and the servers take turns, so each gets every core.
    "sync-os": ("os", 0, 1, 0, ()),
    "sync-split": ("split", 0, 1, 1, ()),
    "async-split": ("split", 2, 1, 1, ()),
    "async-split-trainer-recompute": ("split", 2, 1, 1, ("rollout.recompute_on=trainer",)),
    "async-os": ("os", 2, 1, 1, ()),
    "sync-split-2b": ("split", 0, 2, 1, ()),
}
# `sdp simulate --calibrate` on this run predicts the others of the same placement.
CALIBRATED = "sync-split"
SYNC_RUNS = ("sync-os", "sync-split")
ASYNC_RUNS = ("async-split", "async-split-trainer-recompute", "async-os")
RUN_KEYS = ("update_share", "async_over_sync", "simulate_error", "update_total_share")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds, smaller batch")
    parser.add_argument("--model", choices=sorted(MODEL_GROUPS), default="tiny")
    parser.add_argument(
        "--cache-dir", default=None, help="model cache (model.cache_dir) to find --model in"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads of both sides")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds (default 5, 2)")
    parser.add_argument("--prompts", type=int, default=None, help="prompts per batch")
    parser.add_argument("--samples", type=int, default=4, help="completions per prompt")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=96)
    parser.add_argument(
        "--long-output-len", type=int, default=480, help="output tokens of the long memory shape"
    )
    parser.add_argument(
        "--run-steps",
        type=int,
        default=None,
        help="steady steps per run (5, 27); a run at η does η + 2 more",
    )
    parser.add_argument("--run-rounds", type=int, default=None, help="rounds of runs (1, 2)")
    parser.add_argument("--no-runs", action="store_true", help="skip the real sdp train runs")
    # Internal: one peak-memory measurement in this (child) process.
    parser.add_argument("--child-peak", choices=PEAK_VARIANTS, help=argparse.SUPPRESS)
    # Internal: the packing comparison in this (child) process.
    parser.add_argument("--child-packing", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run_steps is not None and args.run_steps < 1:
        parser.error("--run-steps must be at least 1")
    return args


def model_dir(args: argparse.Namespace) -> Path:
    return ensure_model_dir(load_config(None, model_overrides(args)).model)


def vocab_size(path: Path) -> int:
    return int(json.loads((path / "config.json").read_text())["vocab_size"])


def synthetic_groups(
    args: argparse.Namespace, vocab: int, varied: bool = False
) -> list[RolloutGroup]:
    """Random tokens with varied rewards (so advantages are not zero), all sampled at v0.
    `varied`: each group's prompt has between half and all of --prompt-len tokens, each
    output between a quarter and all of --output-len, uniformly (else every length is full)."""
    rng = random.Random(0)
    prompts = args.prompts or (2 if args.quick else 4)
    groups = []
    for rollout_id in range(prompts):
        samples = []
        n_prompt = rng.randint(args.prompt_len // 2, args.prompt_len) if varied else args.prompt_len
        for _ in range(args.samples):
            n_output = (
                rng.randint(args.output_len // 4, args.output_len) if varied else args.output_len
            )
            prompt = [rng.randrange(3, vocab) for _ in range(n_prompt)]
            output = [rng.randrange(3, vocab) for _ in range(n_output)]
            samples.append(
                Trajectory(
                    prompt_ids=prompt,
                    output_ids=output,
                    behav_logprobs=[-5.0] * len(output),
                    versions=[0] * len(output),
                    reward=rng.random(),
                )
            )
        groups.append(RolloutGroup(rollout_id=rollout_id, samples=samples))
    return groups


def make_actor(path: Path, threads: int, variant: str = "actor") -> Actor:
    actor_class, chunk_tokens, checkpointing = VARIANTS[variant]
    train = replace(
        TrainConfig(),
        prox_mode="segment",
        cpu_threads=threads,
        logit_chunk_tokens=chunk_tokens,
        gradient_checkpointing=checkpointing,
    )
    return actor_class(path, train, seed=0)


class FullVocabActor(Actor):
    """The actor with logprobs and entropy read from a full-vocabulary log_softmax over every
    output position: the reference whose peak memory the real actor is compared with."""

    def logprobs_and_entropy(
        self, batch: TrainBatch, model: PreTrainedModel | None = None
    ) -> tuple[Tensor, Tensor]:
        n_out = batch.n_output_cols
        logits = (model or self.model)(**batch.model_inputs()).logits
        logprobs = logits[:, -(n_out + 1) : -1, :].float().log_softmax(dim=-1)
        entropy = -(logprobs.detach().exp() * logprobs.detach()).sum(dim=-1)
        return logprobs.gather(-1, batch.output_ids.unsqueeze(-1)).squeeze(-1), entropy

    def logprobs(self, batch: TrainBatch, model: PreTrainedModel | None = None) -> Tensor:
        return self.logprobs_and_entropy(batch, model)[0]


class HfStep:
    """A plain Hugging Face training step on the actor's micro-batches: labels on the output
    tokens, the model's own loss, backward, torch's default AdamW (one tensor at a time on
    CPU). `optimizer_s` holds the seconds of each `optimizer.step()`."""

    def __init__(self, path: Path, actor: Actor) -> None:
        self.model = load_model(path, actor.device)
        self.model.train()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=actor.train_config.lr)
        self.optimizer_s: list[float] = []

    def __call__(self, batches: list[TrainBatch]) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        for batch in batches:
            labels = batch.input_ids.clone()
            n_out = batch.n_output_cols
            labels[:, :-n_out] = -100
            labels[:, -n_out:][batch.loss_mask == 0] = -100
            out = self.model(**batch.model_inputs(), labels=labels)
            out.loss.backward()
        self.optimizer_s.append(timed(self.optimizer.step))


CHUNK_TOKENS = TrainConfig().logit_chunk_tokens
# The default: the decoder keeps its matmul and attention outputs and recomputes the pointwise
# ops between them.
RECOMPUTE = str(TrainConfig().gradient_checkpointing)
# Variant → (actor class, train.logit_chunk_tokens, train.gradient_checkpointing).
VARIANTS: dict[str, tuple[type[Actor], int, str]] = {
    "actor": (Actor, CHUNK_TOKENS, RECOMPUTE),
    "unchunked": (Actor, 0, RECOMPUTE),
    "full": (FullVocabActor, 0, RECOMPUTE),
    # Every activation kept.
    "actor-none": (Actor, CHUNK_TOKENS, "none"),
    "full-none": (FullVocabActor, 0, "none"),
    # With the decoder's activations recomputed, the logits are what is left to save.
    "actor-checkpointed": (Actor, CHUNK_TOKENS, "full"),
    "full-checkpointed": (FullVocabActor, 0, "full"),
}
PEAK_VARIANTS = tuple(VARIANTS)
# Measured again at --long-output-len.
LONG_VARIANTS = ("actor-checkpointed", "full-checkpointed")
# --quick measures the target's pair only, and no long shape: the other seven children are
# no target's, and each loads the model and runs two steps.
QUICK_PEAK_VARIANTS = ("actor", "full")


def timed(fn: Any) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def trainer_throughput(args: argparse.Namespace, path: Path) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    groups = synthetic_groups(args, vocab_size(path))
    actor = make_actor(path, args.threads)
    # Timing train.gradient_checkpointing=none is no target: --quick leaves it out.
    keep_all = None if args.quick else make_actor(path, args.threads, "actor-none")
    hf = HfStep(path, actor)
    batches = actor._micro_batches(groups)
    tokens = sum(int(b.attention_mask.sum()) for b in batches)
    rounds = args.rounds or (2 if args.quick else 5)
    prompts = [s.prompt_ids for g in groups for s in g.samples]
    outputs = [s.output_ids for g in groups for s in g.samples]
    actor_s: list[float] = []
    actor_optimizer_s: list[float] = []
    hf_s: list[float] = []
    keep_all_s: list[float] = []
    score_s: list[float] = []

    def actor_step() -> None:
        actor_optimizer_s.append(actor.train_step(groups, 0)["optimizer_s"])

    # One warm-up each, then alternating rounds so a slow spell hits both sides.
    timed(actor_step)
    timed(lambda: hf(batches))
    if keep_all is not None:
        timed(lambda: keep_all.train_step(groups, 0))
    del actor_optimizer_s[:], hf.optimizer_s[:]
    for _ in range(rounds):
        actor_s.append(timed(actor_step))
        hf_s.append(timed(lambda: hf(batches)))
        if keep_all is not None:
            keep_all_s.append(timed(lambda: keep_all.train_step(groups, 0)))
        # What scoring the batch's tokens on the trainer (a proximal recompute there) costs.
        score_s.append(timed(lambda: actor.score(prompts, outputs)))
    actor_tps = tokens / statistics.median(actor_s)
    hf_tps = tokens / statistics.median(hf_s)
    # The same without the optimizer steps (the actor's is fused AdamW, plain HF's is not):
    # what the forward, loss and backward alone achieve.
    actor_pass_s = [a - o for a, o in zip(actor_s, actor_optimizer_s, strict=True)]
    hf_pass_s = [h - o for h, o in zip(hf_s, hf.optimizer_s, strict=True)]
    return {
        "tokens_per_step": tokens,
        "micro_batches": len(batches),
        "rounds": rounds,
        "actor_step_s": actor_s,
        "hf_step_s": hf_s,
        "score_s": score_s,
        "actor_tokens_per_s": actor_tps,
        "hf_tokens_per_s": hf_tps,
        "trainer_vs_hf": actor_tps / hf_tps,
        "none_step_s": keep_all_s,
        # Tokens/s under train.gradient_checkpointing=none over the default actor's.
        "none_vs_actor": (
            statistics.median(actor_s) / statistics.median(keep_all_s)
            if keep_all_s
            else float("nan")
        ),
        "actor_optimizer_s": actor_optimizer_s,
        "hf_optimizer_s": hf.optimizer_s,
        "passes_vs_hf": statistics.median(hf_pass_s) / statistics.median(actor_pass_s),
    }


def packing_throughput(args: argparse.Namespace, path: Path) -> dict[str, Any]:
    """Tokens/s of the actor's train step on a batch of varied lengths, padded, with
    `train.pack_sequences` and (not with --quick) packed into one row, alternating rounds after
    two warm-up steps each (medians)."""
    groups = synthetic_groups(args, vocab_size(path), varied=True)
    base = replace(TrainConfig(), prox_mode="segment", cpu_threads=args.threads)
    packings: dict[str, dict[str, Any]] = {
        "padded": {},
        "packed": {"pack_sequences": True},
    }
    if not args.quick:
        # Every sequence of the micro-batch in one row: no padding, attention over the row.
        packings["packed-one-row"] = {
            "pack_sequences": True,
            "pack_row_tokens": base.micro_batch_tokens,
        }
    actors = {
        name: Actor(path, replace(base, **settings), seed=0) for name, settings in packings.items()
    }
    tokens = sum(int(b.attention_mask.sum()) for b in actors["padded"]._micro_batches(groups))
    seconds: dict[str, list[float]] = {name: [] for name in actors}
    padding: dict[str, float] = {}
    # Two warm-up steps each: with one, the next two steps are still slower than the rest
    # (glibc's malloc settling on its larger tensors; docs/benchmarks.md).
    for name, actor in actors.items():
        padding[name] = actor.train_step(groups, 0)["padding_frac"]
        actor.train_step(groups, 0)
    names = list(actors)
    # Each round starts with the next variant, so none always runs first.
    for round_index in range(args.rounds or (3 if args.quick else 6)):
        for k in range(len(names)):
            name = names[(round_index + k) % len(names)]
            seconds[name].append(timed(partial(actors[name].train_step, groups, 0)))
    per_s = {name: tokens / statistics.median(values) for name, values in seconds.items()}
    return {
        "tokens_per_step": tokens,
        **{f"{name}_step_s": values for name, values in seconds.items()},
        **{f"{name}_tokens_per_s": value for name, value in per_s.items()},
        **{f"{name}_padding_frac": value for name, value in padding.items()},
        "packed_vs_padded": per_s["packed"] / per_s["padded"],
        "one_row_vs_padded": per_s.get("packed-one-row", float("nan")) / per_s["padded"],
    }


def packing_in_a_child(args: argparse.Namespace) -> dict[str, Any]:
    """`packing_throughput` in a child process, so its three actors add nothing to this
    process's memory during the runs."""
    rounds = ["--rounds", str(args.rounds)] if args.rounds else []
    return child_result(["--child-packing", *child_args(args), *rounds])


def export_timing(args: argparse.Namespace, path: Path) -> dict[str, Any]:
    """Seconds of one weight export for the servers (`Actor.export_weights`: safetensors,
    config, tokenizer files, written atomically) into a directory on disk and into a
    memory-backed one (/dev/shm, `train.weights_dir=memory`), alternating, medians."""
    actor = make_actor(path, args.threads)
    rounds = args.rounds or (3 if args.quick else 5)
    places = {"disk": Path(tempfile.mkdtemp(prefix="sdp-bench-export-"))}
    places["memory"] = Path(tempfile.mkdtemp(prefix="sdp-bench-export-", dir=MEMORY_ROOT))
    seconds: dict[str, list[float]] = {name: [] for name in places}
    try:
        for version in range(rounds):
            for name, place in places.items():
                seconds[name].append(timed(partial(actor.export_weights, place, version)))
    finally:
        for place in places.values():
            shutil.rmtree(place, ignore_errors=True)
    return {"rounds": rounds, **{f"{name}_s": values for name, values in seconds.items()}}


def rss_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def child_peak(args: argparse.Namespace) -> None:
    """Prints the bytes of resident memory one train step adds at its peak."""
    path = model_dir(args)
    torch.set_num_threads(args.threads)
    groups = synthetic_groups(args, vocab_size(path))
    actor = make_actor(path, args.threads, args.child_peak)
    # A first step creates AdamW's state (2 × the weights) and the gradients; from then on a
    # step frees the gradients it finds and makes them again in backward. What one process
    # measured before shapes what its allocator holds, so each process measures one step.
    actor.train_step(groups, 0)
    before = rss_bytes("VmRSS")
    # Reset the peak-RSS mark (VmHWM) to the current RSS: the peak is then the step's own.
    Path("/proc/self/clear_refs").write_text("5")
    actor.train_step(groups, 0)
    print(json.dumps({"peak_added_bytes": rss_bytes("VmHWM") - before}))


# glibc's malloc with fixed thresholds: every block over 64 KiB is its own mapping, returned to
# the OS when freed, so RSS follows the live tensors. With the default, dynamic threshold the
# same variant's peak varied by 300 MiB from one process to the next; with these, to the byte.
STEADY_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


def peak_added_bytes(args: argparse.Namespace, variant: str) -> int:
    found = child_result(["--child-peak", variant, *child_args(args)], STEADY_MALLOC)
    return int(found["peak_added_bytes"])


def child_result(arguments: list[str], env: dict[str, str] | None = None) -> dict[str, Any]:
    """The JSON object on the last line of this script run as a child with `arguments`
    (and `env` added to this process's environment)."""
    command = [sys.executable, __file__, *arguments]
    environment = {**os.environ, **(env or {})}
    out = subprocess.run(command, check=True, capture_output=True, text=True, env=environment)
    return json.loads(out.stdout.strip().splitlines()[-1])


def peak_memory(args: argparse.Namespace) -> dict[str, Any]:
    # Long outputs, where the logits outgrow the decoder's checkpointed activations.
    long_args = argparse.Namespace(**{**vars(args), "output_len": args.long_output_len})
    # The children measure bytes, not seconds, and each process's peak is its own: they run
    # side by side, as many as there are cores for their threads.
    workers = max(1, (os.cpu_count() or 1) // args.threads)
    variants = QUICK_PEAK_VARIANTS if args.quick else PEAK_VARIANTS
    long_variants = () if args.quick else LONG_VARIANTS
    with ThreadPoolExecutor(max_workers=workers) as pool:
        short = {v: pool.submit(peak_added_bytes, args, v) for v in variants}
        long = {v: pool.submit(peak_added_bytes, long_args, v) for v in long_variants}
        peaks = {variant: future.result() for variant, future in short.items()}
        long_peaks = {variant: future.result() for variant, future in long.items()}

    def ratio(variant: str, reference: str, found: dict[str, int] = peaks) -> float:
        # Not measured (--quick), or a tiny model's step fitting in memory the allocator
        # already holds (nothing added): no ratio.
        if variant not in found or found.get(reference, 0) <= 0:
            return float("nan")
        return found[variant] / found[reference]

    return {
        **{f"{variant}_mib": n / 2**20 for variant, n in peaks.items()},
        "peak_memory_vs_full": ratio("actor", "full"),
        "unchunked_vs_full": ratio("unchunked", "full"),
        "none_vs_full": ratio("actor-none", "full-none"),
        "actor_vs_full_none": ratio("actor", "full-none"),
        "checkpointed_vs_full": ratio("actor-checkpointed", "full-checkpointed"),
        **{f"long_{variant}_mib": n / 2**20 for variant, n in long_peaks.items()},
        "long_output_len": args.long_output_len,
        "long_checkpointed_vs_full": ratio("actor-checkpointed", "full-checkpointed", long_peaks),
    }


def child_args(args: argparse.Namespace) -> list[str]:
    out = ["--model", args.model, *(["--cache-dir", args.cache_dir] if args.cache_dir else [])]
    out += ["--threads", str(args.threads), "--samples", str(args.samples)]
    out += ["--prompt-len", str(args.prompt_len), "--output-len", str(args.output_len)]
    if args.prompts:
        out += ["--prompts", str(args.prompts)]
    return out + (["--quick"] if args.quick else [])


def run_steps(args: argparse.Namespace, eta: int, multiple: int) -> int:
    """train.steps of a run at η and `multiple` × the batch: `--run-steps` steady steps at the
    base batch, as few at a larger one as train at least as many samples (the run at twice
    the batch is the longest of --quick's runs)."""
    steady = args.run_steps or (5 if args.quick else 27)
    return bench_train_module().steps_for(math.ceil(steady / multiple), eta)


def real_runs(
    args: argparse.Namespace,
) -> tuple[dict[str, dict[str, float]], Path, int, list[float]]:
    """Each run's steady-step figures (medians over the rounds), the work directory, the base
    batch size and the seconds of vLLM's reload alone on the `split` fleet."""
    bench_train = bench_train_module()
    from rich.console import Console

    from sdp_cli.commands.train import with_cpu_placement

    conf = EXAMPLE if args.model == "smollm2-135m" else None
    model = model_overrides(args)
    rounds = args.run_rounds or (1 if args.quick else 2)
    work = Path(tempfile.mkdtemp(prefix="sdp-bench-perf-"))
    base = load_config(None if conf is None else str(conf), [f"run.dir={work}", *model])
    placements = {"os": base, "split": with_cpu_placement(bench_train.replace_eta(base, 2))}
    console = Console(stderr=True, quiet=True)
    found: dict[str, list[dict[str, float]]] = {}
    reloads: list[float] = []
    for round_index in range(rounds):
        for placement, cfg in placements.items():
            # One fleet up at a time: the other's processes and memory stay out of the runs.
            with running_fleet(cfg, work / f"fleet-{placement}-round{round_index}") as fleet:
                for name, (where, eta, multiple, threads, extra) in RUNS.items():
                    if where != placement:
                        continue
                    overrides = [
                        *model,
                        f"train.steps={run_steps(args, eta, multiple)}",
                        f"rollout.max_staleness={eta}",
                        f"rollout.batch_size={base.rollout.batch_size * multiple}",
                        f"train.cpu_threads={threads}",
                        f"train.cpu_cores={bench_train.core_list(cfg.train.cpu_cores)}",
                        f"server.registry={fleet.registry_path}",
                        "train.checkpoint_every=100000",
                        "eval.every=0",
                        # The faster place for the exports (export_timing measures both).
                        "train.weights_dir=memory",
                        *extra,
                    ]
                    print(f"run {name} round {round_index}: {' '.join(overrides)}", flush=True)
                    run_dir = work / f"{name}-round{round_index}"
                    result = bench_train.train_once(run_dir, overrides, console, conf)
                    found.setdefault(name, []).append(result)
                if placement == "split":
                    reloads += idle_reloads(fleet, ensure_model_dir(base.model))
    figures = {name: bench_train.medians(results) for name, results in found.items()}
    return figures, work, base.rollout.batch_size, reloads


@contextmanager
def running_fleet(cfg: SdpConfig, fleet_dir: Path) -> Iterator[ServerFleet]:
    from sdp_cli.launcher.fleet import ServerFleet

    fleet = ServerFleet(cfg.server, ensure_model_dir(cfg.model), fleet_dir)
    fleet.start()
    try:
        yield fleet
    finally:
        fleet.stop()


def idle_reloads(fleet: ServerFleet, weights: Path, rounds: int = 3) -> list[float]:
    """Seconds of the servers' reload phase (`reload_weights` over HTTP, vLLM loading and
    processing every tensor) with nothing else running: the floor of a weight update's reload.
    Loads the model's own directory, as a version none of the runs used."""
    import httpx

    from sdp_cli.weight_sync.vllm_http import update_server_weights

    async def reload_all() -> list[float]:
        seconds: list[float] = []
        async with httpx.AsyncClient() as http:
            for version in range(rounds):
                for address in fleet.addresses:
                    timings = await update_server_weights(
                        http, address, str(weights), 1000 + version, timeout_s=120.0
                    )
                    seconds.append(timings.reload)
        return seconds

    return asyncio.run(reload_all())


def bench_train_module() -> ModuleType:
    """scripts/bench_train.py, whose run, step arithmetic and report the runs here share."""
    scripts = str(Path(__file__).resolve().parent)
    if scripts not in sys.path:
        sys.path.insert(0, scripts)
    import bench_train

    return bench_train


def model_overrides(args: argparse.Namespace) -> list[str]:
    overrides = [f"model={MODEL_GROUPS[args.model]}"]
    if args.cache_dir:
        overrides.append(f"model.cache_dir={args.cache_dir}")
    return overrides


def simulated(calibrated_run: Path, overrides: list[str], out: Path) -> dict[str, float]:
    """`sdp simulate --calibrate` on a run's log with `overrides`, read as a real run is."""
    bench_train = bench_train_module()
    command = [sys.executable, "-m", "sdp_cli", "simulate", "--calibrate", str(calibrated_run)]
    command += ["--run-dir", str(out), *overrides]
    subprocess.run(command, check=True, capture_output=True, text=True)
    return bench_train.step_numbers(bench_train.steady_steps(out))


def run_figures(args: argparse.Namespace, export_s: float) -> dict[str, Any]:
    """The real runs' figures; `export_s` is one export into memory alone."""
    runs, work, batch_size, reloads = real_runs(args)
    best_sync = max(SYNC_RUNS, key=lambda name: runs[name]["samples_per_s"])
    best_async = max(ASYNC_RUNS, key=lambda name: runs[name]["samples_per_s"])
    # CPU seconds per trained sample with the trainer and the servers taking turns.
    alone = runs["sync-os"]
    cpu_s = (alone["trainer_cpu_ms_per_sample"] + alone["vllm_cpu_ms_per_sample"]) / 1000
    cores = len(os.sched_getaffinity(0))
    limit = cores / cpu_s
    # An upper bound no run at this batch size can pass: each side at the least CPU per
    # trained sample it took in any such run (twice the batch spreads fixed costs thinner).
    # The sync-os limit can sit below a run on one core: its servers and its two-thread
    # trainer spend more CPU per sample than one thread each does.
    same_batch = [runs[name] for name, spec in RUNS.items() if spec[2] == 1]
    least_cpu_s = sum(
        min(run[key] for run in same_batch)
        for key in ("trainer_cpu_ms_per_sample", "vllm_cpu_ms_per_sample")
    )
    bound = cores / (least_cpu_s / 1000)
    default = runs["async-split"]
    # As many steps as the real run made (the calibrated run, at η = 0, made fewer).
    shapes = {
        "async-split": ["rollout.max_staleness=2", f"train.steps={run_steps(args, 2, 1)}"],
        "sync-split-2b": [
            f"rollout.batch_size={2 * batch_size}",
            f"train.steps={run_steps(args, 0, 2)}",
        ],
    }
    calibrated = work / f"{CALIBRATED}-round0"
    predictions = {
        name: simulated(calibrated, shape, work / f"simulated-{name}")["samples_per_s"]
        for name, shape in shapes.items()
    }
    errors = {
        name: abs(predicted - runs[name]["samples_per_s"]) / runs[name]["samples_per_s"]
        for name, predicted in predictions.items()
    }
    return {
        "runs": runs,
        "best_sync": best_sync,
        "best_async": best_async,
        "machine_limit_samples_per_s": limit,
        "cheapest_cpu_bound_samples_per_s": bound,
        "predicted_samples_per_s": predictions,
        "prediction_errors": errors,
        # Both shares are of the steady cycle; their ratio is the update over the train step.
        "update_share": default["update_share"] / default["train_share"],
        "update_total_share": default["update_total_ms"] / 1000 / default["train_step_s"],
        "idle_reload_s": reloads,
        # An update can be no faster than an export and a reload, each alone.
        "update_floor_share": (export_s + statistics.median(reloads)) / default["train_step_s"],
        "async_over_sync": runs[best_async]["samples_per_s"] / runs[best_sync]["samples_per_s"],
        "simulate_error": max(errors.values()),
    }


def main() -> None:
    args = parse_args()
    if args.child_peak:
        child_peak(args)
        return
    if args.child_packing:
        print(json.dumps(packing_throughput(args, model_dir(args))))
        return
    path = model_dir(args)
    groups = synthetic_groups(args, vocab_size(path))
    print(
        f"model {args.model} ({path}), vocab {vocab_size(path)}, {args.threads} torch thread(s), "
        f"{len(groups)} prompts × {args.samples} samples, {args.prompt_len} prompt + "
        f"{args.output_len} output tokens"
    )
    throughput = trainer_throughput(args, path)
    print(
        f"trainer: actor {throughput['actor_tokens_per_s']:.0f} tok/s vs plain HF "
        f"{throughput['hf_tokens_per_s']:.0f} tok/s on {throughput['tokens_per_step']} tokens "
        f"per step (medians of {throughput['rounds']} alternating rounds; actor s "
        f"{fmt(throughput['actor_step_s'])}, HF s {fmt(throughput['hf_step_s'])}) → "
        f"trainer_vs_hf = {throughput['trainer_vs_hf']:.3f} (target ≥ 0.9)"
    )
    print(
        f"optimizer steps: actor (clipping + fused AdamW) "
        f"{fmt(throughput['actor_optimizer_s'])} s, plain HF (torch's default AdamW) "
        f"{fmt(throughput['hf_optimizer_s'])} s; without them, "
        f"forward + loss + backward alone: actor over HF {throughput['passes_vs_hf']:.3f}"
    )
    if throughput["none_step_s"]:
        print(
            f"keeping every activation (train.gradient_checkpointing=none, same rounds): "
            f"actor s {fmt(throughput['none_step_s'])} → {throughput['none_vs_actor']:.3f} × "
            f"the default actor's tokens/s"
        )
    score = statistics.median(throughput["score_s"])
    step = statistics.median(throughput["actor_step_s"])
    print(
        f"scoring the same tokens on the trainer (Actor.score, no grad, what a proximal "
        f"recompute on the trainer costs): {score:.3f} s, {score / step:.2f} of a train step"
    )
    packing = packing_in_a_child(args)
    print(
        f"sequence packing on {packing['tokens_per_step']} tokens of varied lengths (medians of "
        f"alternating rounds): padded {packing['padded_tokens_per_s']:.0f} tok/s, "
        f"{packing['padded_padding_frac']:.1%} of positions padding, s "
        f"{fmt(packing['padded_step_s'])}; packed {packing['packed_tokens_per_s']:.0f} tok/s, "
        f"{packing['packed_padding_frac']:.1%} padding, s {fmt(packing['packed_step_s'])} → "
        f"packed_vs_padded = {packing['packed_vs_padded']:.3f}"
    )
    if "packed-one-row_step_s" in packing:
        print(
            f"packed into one row: {packing['packed-one-row_tokens_per_s']:.0f} tok/s, s "
            f"{fmt(packing['packed-one-row_step_s'])} → {packing['one_row_vs_padded']:.3f}"
        )
    memory = peak_memory(args)
    print_memory(memory)
    exports = export_timing(args, path)
    print(
        f"weight export ({exports['rounds']} alternating rounds, medians): disk "
        f"{statistics.median(exports['disk_s']):.3f} s {fmt(exports['disk_s'])}, memory-backed "
        f"{statistics.median(exports['memory_s']):.3f} s {fmt(exports['memory_s'])}"
    )
    figures = {key: None for key in RUN_KEYS}
    if not args.no_runs:
        found = run_figures(args, statistics.median(exports["memory_s"]))
        print_runs(found)
        figures = {key: round(found[key], 4) for key in RUN_KEYS}
    result: dict[str, Any] = {
        "trainer_vs_hf": round(throughput["trainer_vs_hf"], 4),
        "peak_memory_vs_full": figure(memory["peak_memory_vs_full"]),
        **figures,
        "peak_memory_none_vs_full": figure(memory["none_vs_full"]),
        "none_vs_actor": figure(throughput["none_vs_actor"]),
        "peak_memory_checkpointed_vs_full": figure(memory["checkpointed_vs_full"]),
        "peak_memory_long_checkpointed_vs_full": figure(memory["long_checkpointed_vs_full"]),
        "packed_vs_padded": round(packing["packed_vs_padded"], 4),
    }
    print(json.dumps(result))


def print_memory(m: dict[str, Any]) -> None:
    measured = [v for v in PEAK_VARIANTS if f"{v}_mib" in m]
    sizes = ", ".join(f"{variant} {m[f'{variant}_mib']:.1f}" for variant in measured)
    print(
        f"peak resident memory one train step adds (peak RSS − RSS before, each variant in its "
        f"own process), MiB: {sizes}"
    )
    print(f"peak_memory_vs_full = {m['peak_memory_vs_full']:.3f} (target ≤ 0.6)")
    if len(measured) < len(PEAK_VARIANTS):
        print("(--quick: the other variants and the long shape are not measured)")
        return
    print(
        f"every output logit at once {m['unchunked_vs_full']:.3f}; both keeping every "
        f"activation (gradient_checkpointing=none) {m['none_vs_full']:.3f} (the actor over the "
        f"full log_softmax that keeps them {m['actor_vs_full_none']:.3f}); both under full "
        f"gradient checkpointing {m['checkpointed_vs_full']:.3f}"
    )
    print(
        f"at {m['long_output_len']} output tokens per sequence, both under gradient "
        f"checkpointing: actor {m['long_actor-checkpointed_mib']:.1f} MiB, full log_softmax "
        f"{m['long_full-checkpointed_mib']:.1f} MiB → {m['long_checkpointed_vs_full']:.3f}"
    )


def print_runs(found: dict[str, Any]) -> None:
    for name, figures in found["runs"].items():
        print(bench_train_module().describe(name, figures))
    limit = found["machine_limit_samples_per_s"]
    sync = found["runs"][found["best_sync"]]["samples_per_s"]
    best = found["runs"][found["best_async"]]["samples_per_s"]
    print(
        f"machine limit (cores ÷ CPU s per trained sample of vLLM + trainer in sync-os): "
        f"{limit:.2f} samples/s; η = 0 ({found['best_sync']}) reaches {sync / limit:.0%} of it, "
        f"η = 2 ({found['best_async']}) {best / limit:.0%}; no schedule beats η = 0 by more "
        f"than {limit / sync:.2f}× here"
    )
    bound = found["cheapest_cpu_bound_samples_per_s"]
    print(
        f"bound from each side's least CPU per trained sample over the runs at this batch "
        f"size: {bound:.2f} samples/s; η = 0 reaches {sync / bound:.0%} of it, η = 2 "
        f"{best / bound:.0%}"
    )
    print(
        f"async_over_sync = {found['async_over_sync']:.3f} (target ≥ 1.2); update_share = "
        f"{found['update_share']:.3f} of a train step in async-split (target ≤ 0.05): the "
        f"trainer's wait; the whole update, the reload it trains through included, is "
        f"{found['update_total_share']:.3f}"
    )
    print(
        f"vLLM reload alone on the split fleet (nothing else running): "
        f"{statistics.median(found['idle_reload_s']):.3f} s {fmt(found['idle_reload_s'])}; an "
        f"export to memory plus that reload is {found['update_floor_share']:.3f} of "
        f"async-split's mean train step ({found['runs']['async-split']['train_step_s']:.2f} s)"
    )
    for name, predicted in found["predicted_samples_per_s"].items():
        measured = found["runs"][name]["samples_per_s"]
        print(
            f"simulate --calibrate {CALIBRATED} → {name}: predicted {predicted:.3f} samples/s, "
            f"measured "
            f"{measured:.3f} (error {found['prediction_errors'][name]:.1%})"
        )
    alone = found["runs"][CALIBRATED]["train_step_s"]
    overlapped = found["runs"]["async-split"]["train_step_s"]
    print(
        f"the simulator's train step is the calibrated run's ({CALIBRATED}, the trainer alone on "
        f"its core: {alone:.2f} s); async-split's, with the servers generating on the other "
        f"core, took {overlapped:.2f} s ({overlapped / alone:.2f}×), which a log at η = 0, "
        f"where the two take turns, cannot show"
    )
    print(f"simulate_error = {found['simulate_error']:.3f} (target ≤ 0.15)")


def figure(value: float) -> float | None:
    """A ratio for the JSON line: rounded, or null when it could not be measured."""
    return None if math.isnan(value) else round(value, 4)


def fmt(values: list[float]) -> str:
    return "[" + ", ".join(f"{v:.3f}" for v in values) + "]"


if __name__ == "__main__":
    main()
