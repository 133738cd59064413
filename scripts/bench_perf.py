"""Performance of the trainer against plain Hugging Face, side by side in one run.

Measures, on the same model, tokens and torch threads:

- `trainer_vs_hf`: tokens/s of the actor's train step (`Actor.train_step`: forward with logits
  for the output columns only, logprob = logit − logsumexp, decoupled PPO loss, backward, AdamW
  step) over tokens/s of a plain Hugging Face step (`model(input_ids, labels=...)`: the full
  logits and the model's own cross-entropy, backward, AdamW step) on the same micro-batches.
  The two alternate for `--rounds` rounds after one warm-up each; the figure is the ratio of the
  medians. `train.prox_mode=segment`, so the actor makes no extra proximal forward pass.
- `peak_memory_vs_full`: the peak resident memory that one actor train step adds, over the same
  step with logprobs taken from a full-vocabulary `log_softmax` ([rows, L, vocab] float32).
  Each variant runs in its own child process (a fresh allocator); the child resets the kernel's
  peak-RSS mark (`/proc/self/clear_refs`, 5) after loading the model and building the batch,
  runs a second step (the first creates AdamW's state, 2 × the weights) and reads `VmHWM` from
  `/proc/self/status`: peak RSS minus RSS before the step. This counts what the step holds in
  memory (activations, logits, gradients), as the OS sees it.

`update_share`, `async_over_sync` and `simulate_error` need real vLLM runs of SmolLM2 and are not
measured by this version of the script: they print null with the reason.

    .venv/bin/python scripts/bench_perf.py [--quick] [--model tiny|smollm2-135m] [--threads N]
        [--rounds R]

The last line of output is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from sdp_cli.config import load_config
from sdp_cli.config.schema import TrainConfig
from sdp_cli.model import ensure_model_dir
from sdp_cli.rollout.trajectory import RolloutGroup, Trajectory
from sdp_cli.train.actor import Actor, load_model
from sdp_cli.train.batch import TrainBatch
from sdp_cli.train.chunked_logprobs import chunked_token_logprobs

# --model NAME → the config group that selects it.
MODEL_GROUPS = {"tiny": "tiny", "smollm2-135m": "smollm2"}
NOT_MEASURED = {
    "update_share": "needs a real vLLM run of SmolLM2 (weight update vs train step); "
    "not implemented in this version of the script",
    "async_over_sync": "needs real vLLM runs of SmolLM2 at η = 2 and η = 0 "
    "(scripts/bench_train.py measures it on the default config); not implemented here",
    "simulate_error": "needs real vLLM runs of SmolLM2 to calibrate `sdp simulate --calibrate` "
    "on and to compare its prediction with; not implemented here",
}


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
    # Internal: one peak-memory measurement in this (child) process.
    parser.add_argument("--child-peak", choices=PEAK_VARIANTS, help=argparse.SUPPRESS)
    return parser.parse_args()


def model_dir(args: argparse.Namespace) -> Path:
    overrides = [f"model={MODEL_GROUPS[args.model]}"]
    if args.cache_dir:
        overrides.append(f"model.cache_dir={args.cache_dir}")
    return ensure_model_dir(load_config(None, overrides).model)


def vocab_size(path: Path) -> int:
    return int(json.loads((path / "config.json").read_text())["vocab_size"])


def synthetic_groups(args: argparse.Namespace, vocab: int) -> list[RolloutGroup]:
    """Random tokens with varied rewards (so advantages are not zero), all sampled at v0."""
    rng = random.Random(0)
    prompts = args.prompts or (2 if args.quick else 4)
    groups = []
    for rollout_id in range(prompts):
        samples = []
        for _ in range(args.samples):
            prompt = [rng.randrange(3, vocab) for _ in range(args.prompt_len)]
            output = [rng.randrange(3, vocab) for _ in range(args.output_len)]
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
    train = replace(TrainConfig(), prox_mode="segment", cpu_threads=threads)
    return VARIANTS[variant](path, train, seed=0)


class FullVocabActor(Actor):
    """The actor with logprobs read from a full-vocabulary log_softmax: the reference whose
    peak memory the real actor is compared with."""

    def logprobs(self, batch: TrainBatch) -> Tensor:
        n_out = batch.n_output_cols
        logits = self.model(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
            use_cache=False,
        ).logits
        logprobs = logits[:, -(n_out + 1) : -1, :].float().log_softmax(dim=-1)
        return logprobs.gather(-1, batch.output_ids.unsqueeze(-1)).squeeze(-1)


class ChunkedHeadActor(Actor):
    """The actor with the LM head applied a chunk of positions at a time under checkpointing
    (sdp_cli/train/chunked_logprobs.py), measured here before it goes into the actor: it reads
    the decoder's hidden states directly, which a model sharded at its root (FSDP2) does not
    allow, and assumes logits are the LM head's output (no scaling or soft-capping)."""

    def logprobs(self, batch: TrainBatch) -> Tensor:
        n_out = batch.n_output_cols
        hidden = self.model.get_decoder()(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
            use_cache=False,
        ).last_hidden_state
        return chunked_token_logprobs(
            hidden[:, -(n_out + 1) : -1], self.model.get_output_embeddings(), batch.output_ids
        )


class HfStep:
    """A plain Hugging Face training step on the actor's micro-batches: labels on the output
    tokens, the model's own loss, backward, AdamW."""

    def __init__(self, path: Path, actor: Actor) -> None:
        self.model = load_model(path, actor.device)
        self.model.train()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=actor.train_config.lr)

    def __call__(self, batches: list[TrainBatch]) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        for batch in batches:
            labels = batch.input_ids.clone()
            n_out = batch.n_output_cols
            labels[:, :-n_out] = -100
            labels[:, -n_out:][batch.loss_mask == 0] = -100
            out = self.model(
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                position_ids=batch.position_ids,
                labels=labels,
                use_cache=False,
            )
            out.loss.backward()
        self.optimizer.step()


VARIANTS: dict[str, type[Actor]] = {
    "actor": Actor,
    "full": FullVocabActor,
    "chunked": ChunkedHeadActor,
}
PEAK_VARIANTS = tuple(VARIANTS)


def timed(fn: Any) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def trainer_throughput(args: argparse.Namespace, path: Path) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    groups = synthetic_groups(args, vocab_size(path))
    actor = make_actor(path, args.threads)
    hf = HfStep(path, actor)
    batches = actor._micro_batches(groups)
    tokens = sum(int(b.attention_mask.sum()) for b in batches)
    rounds = args.rounds or (2 if args.quick else 5)
    actor_s: list[float] = []
    hf_s: list[float] = []
    # One warm-up each, then alternating rounds so a slow spell hits both sides.
    timed(lambda: actor.train_step(groups, 0))
    timed(lambda: hf(batches))
    for _ in range(rounds):
        actor_s.append(timed(lambda: actor.train_step(groups, 0)))
        hf_s.append(timed(lambda: hf(batches)))
    actor_tps = tokens / statistics.median(actor_s)
    hf_tps = tokens / statistics.median(hf_s)
    return {
        "tokens_per_step": tokens,
        "micro_batches": len(batches),
        "rounds": rounds,
        "actor_step_s": actor_s,
        "hf_step_s": hf_s,
        "actor_tokens_per_s": actor_tps,
        "hf_tokens_per_s": hf_tps,
        "trainer_vs_hf": actor_tps / hf_tps,
    }


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
    # A first step creates AdamW's state (2 × the weights), which would hide the logits.
    actor.train_step(groups, 0)
    before = rss_bytes("VmRSS")
    # Reset the peak-RSS mark (VmHWM) to the current RSS: the peak is then the step's own.
    Path("/proc/self/clear_refs").write_text("5")
    actor.train_step(groups, 0)
    print(json.dumps({"peak_added_bytes": rss_bytes("VmHWM") - before, "rss_before": before}))


def peak_memory(args: argparse.Namespace) -> dict[str, Any]:
    peaks = {}
    for variant in PEAK_VARIANTS:
        command = [sys.executable, __file__, "--child-peak", variant, *child_args(args)]
        out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        peaks[variant] = json.loads(out.strip().splitlines()[-1])["peak_added_bytes"]
    return {
        "actor_step_peak_mib": peaks["actor"] / 2**20,
        "full_log_softmax_step_peak_mib": peaks["full"] / 2**20,
        "chunked_head_step_peak_mib": peaks["chunked"] / 2**20,
        "peak_memory_vs_full": peaks["actor"] / peaks["full"],
        "chunked_vs_full": peaks["chunked"] / peaks["full"],
    }


def child_args(args: argparse.Namespace) -> list[str]:
    out = ["--model", args.model, *(["--cache-dir", args.cache_dir] if args.cache_dir else [])]
    out += ["--threads", str(args.threads), "--samples", str(args.samples)]
    out += ["--prompt-len", str(args.prompt_len), "--output-len", str(args.output_len)]
    if args.prompts:
        out += ["--prompts", str(args.prompts)]
    return out + (["--quick"] if args.quick else [])


def main() -> None:
    args = parse_args()
    if args.child_peak:
        child_peak(args)
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
    memory = peak_memory(args)
    print(
        f"peak memory one step adds (peak RSS − RSS before, own process each): actor "
        f"{memory['actor_step_peak_mib']:.1f} MiB vs full-vocabulary log_softmax "
        f"{memory['full_log_softmax_step_peak_mib']:.1f} MiB → peak_memory_vs_full = "
        f"{memory['peak_memory_vs_full']:.3f} (target ≤ 0.6); with the LM head in chunks "
        f"(not in the actor yet) {memory['chunked_head_step_peak_mib']:.1f} MiB → "
        f"{memory['chunked_vs_full']:.3f} of the full-vocabulary step"
    )
    for key, reason in NOT_MEASURED.items():
        print(f"{key}: not measured: {reason}")
    result: dict[str, Any] = {
        "trainer_vs_hf": round(throughput["trainer_vs_hf"], 4),
        "peak_memory_vs_full": round(memory["peak_memory_vs_full"], 4),
        **dict.fromkeys(NOT_MEASURED),
    }
    print(json.dumps(result))


def fmt(values: list[float]) -> str:
    return "[" + ", ".join(f"{v:.3f}" for v in values) + "]"


if __name__ == "__main__":
    main()
