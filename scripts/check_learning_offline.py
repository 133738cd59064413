"""Offline learnability check: on-policy GRPO on a built-in task without vLLM.

Completions are sampled from the trainer's own model with torch (temperature 1, full
vocabulary), rewarded by the task, and trained on with the actor and the decoupled PPO loss
(η = 0, so every token is fresh and p = μ). Prints the reward per step, the mean reward of the
first and last 10 steps, and seconds per step.

    .venv/bin/python scripts/check_learning_offline.py [--steps 40] [--lr 0.001] [--seed 0]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from sdp_cli.config.task_settings import TaskConfig
from sdp_cli.config.train_settings import TrainConfig
from sdp_cli.model import TinyModelSpec, init_tiny_model
from sdp_cli.rollout.trajectory import RolloutGroup, Trajectory
from sdp_cli.tasks import Task, decode_completion, get_task, load_tokenizer
from sdp_cli.trainer.actor import Actor


def parse_args() -> argparse.Namespace:
    defaults = TrainConfig()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default=TaskConfig().name)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--prompts", type=int, default=8, help="rollouts (groups) per step")
    parser.add_argument("--samples", type=int, default=4, help="completions per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    parser.add_argument("--model-dir", type=Path, default=None, help="default: a fresh tiny model")
    return parser.parse_args()


def left_padded(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, ...]:
    """Input ids, attention mask and server-style positions of left-padded sequences, so that
    the last column is every row's newest token."""
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad_id] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask, (mask.cumsum(dim=1) - 1).clamp(min=0)


@torch.no_grad()
def sample(
    actor: Actor, prompts: list[list[int]], max_new_tokens: int, eos_id: int, gen: torch.Generator
) -> list[tuple[list[int], list[float]]]:
    """Temperature-1 sampling over the whole vocabulary, like the servers do; returns each
    completion's tokens (EOS included when sampled) and their logprobs."""
    outputs: list[list[int]] = [[] for _ in prompts]
    logprobs: list[list[float]] = [[] for _ in prompts]
    for _ in range(max_new_tokens):
        live = [i for i, out in enumerate(outputs) if not out or out[-1] != eos_id]
        if not live:
            break
        ids, mask, positions = left_padded([prompts[i] + outputs[i] for i in live], actor.pad_id)
        logits = actor.model(
            input_ids=ids.to(actor.device),
            attention_mask=mask.to(actor.device),
            position_ids=positions.to(actor.device),
            use_cache=False,
            logits_to_keep=1,
        ).logits[:, -1, :]
        dist = torch.log_softmax(logits.float(), dim=-1).cpu()
        tokens = torch.multinomial(dist.exp(), 1, generator=gen).squeeze(-1)
        for row, i in enumerate(live):
            token = int(tokens[row])
            outputs[i].append(token)
            logprobs[i].append(float(dist[row, token]))
    return list(zip(outputs, logprobs, strict=True))


def rollout_groups(
    actor: Actor,
    task: Task,
    tokenizer: PreTrainedTokenizerBase,
    start: int,
    args: argparse.Namespace,
    version: int,
    gen: torch.Generator,
) -> list[RolloutGroup]:
    prompts = [task.sample_prompt(start + i) for i in range(args.prompts)]
    flat = [p.prompt_ids for p in prompts for _ in range(args.samples)]
    completions = sample(actor, flat, args.max_new_tokens, tokenizer.eos_token_id, gen)
    groups = []
    for g, prompt in enumerate(prompts):
        samples = []
        for ids, lps in completions[g * args.samples : (g + 1) * args.samples]:
            text = decode_completion(tokenizer, ids)
            samples.append(
                Trajectory(
                    prompt_ids=prompt.prompt_ids,
                    output_ids=ids,
                    behav_logprobs=lps,
                    versions=[version] * len(ids),
                    reward=task.reward(text, prompt.meta),
                )
            )
        groups.append(RolloutGroup(rollout_id=start + g, samples=samples, meta=prompt.meta))
    return groups


def main() -> None:
    args = parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model_dir or init_tiny_model(TinyModelSpec(), Path(tmp) / "tiny")[0]
        tokenizer = load_tokenizer(model_dir)
        task = get_task(replace(TaskConfig(), name=args.task), tokenizer)
        actor = Actor(
            model_dir, replace(TrainConfig(), lr=args.lr, device=args.device), seed=args.seed
        )
        gen = torch.Generator().manual_seed(args.seed)
        rewards: list[float] = []
        seconds: list[float] = []
        for step in range(args.steps):
            started = time.perf_counter()
            groups = rollout_groups(actor, task, tokenizer, step * args.prompts, args, step, gen)
            stats = actor.train_step(groups, version=step)
            seconds.append(time.perf_counter() - started)
            rewards.append(stats["reward_mean"])
            print(
                f"step {step:3d}  reward {stats['reward_mean']:.3f}  loss {stats['loss']:+.4f}  "
                f"ratio {stats['ratio_mean']:.4f}  grad_norm {stats['grad_norm']:.3f}  "
                f"{seconds[-1]:.2f}s"
            )
        window = min(10, len(rewards))
        first = sum(rewards[:window]) / window
        last = sum(rewards[-window:]) / window
        print(
            f"task={args.task} lr={args.lr} steps={args.steps}: mean reward first {window} steps "
            f"{first:.3f}, last {window} steps {last:.3f}, gain {last - first:+.3f}; "
            f"{statistics.median(seconds):.2f} s/step median, {sum(seconds) / len(seconds):.2f} "
            "mean (sample + train)"
        )


if __name__ == "__main__":
    main()
