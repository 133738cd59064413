"""The TRL side of `scripts/bench_learning.py --peer trl`: TRL's `GRPOTrainer` on the same
model, prompts, chat template, reward and held-out prompts as an `sdp train` run of the same
config, with greedy held-out evaluation before training and every few steps, until a deadline.

It needs the `bench` extra (`pip install -e .[bench]`: trl). The sdp config (example file plus
overrides) is composed and its task built by sdp itself, so both sides read the same prompts:
training prompts are the task's data positions 0, 1, ... (TRL shuffles them), the reward is the
task's reward of the decoded completion, and evaluation is `task.eval_prompts(eval.n_prompts)`
at temperature 0 and `eval.max_new_tokens` (else rollout.max_new_tokens). The curve is written
as sdp events (`train_step`, `eval`) to OUT/events.jsonl, so the bench reads both sides alike;
the first batches' completions and rewards go to OUT/samples.jsonl.

Settings: where sdp has a setting its value is used (lr and its schedule, warm-up, weight decay,
gradient clip, clip ε low/high, loss aggregation, advantage normalisation, ratio level, KL
coefficient, temperature/top-p/top-k, group size n, B·n completions per step, completion
length, seed); everything else stays at TRL's documented GRPO defaults (num_iterations 1,
mask_truncated_completions off, ...). Generation: TRL's own (transformers `generate`), or
`--generation vllm-colocate` (TRL's colocated vLLM, which is meant for GPUs).

    python scripts/bench_learning_trl.py --conf FILE --deadline EPOCH --out DIR
        [--eval-every 10] [--threads 2] [--generation transformers] [overrides...]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from sdp_cli.config import SdpConfig, load_config
from sdp_cli.events.event_log import EventLog
from sdp_cli.events.event_schema import EvalEvent, TrainStepEvent
from sdp_cli.model import ensure_model_dir
from sdp_cli.tasks import Prompt, Task, decode_completion, get_task, load_tokenizer

LOSS_TYPES = {
    "token-mean": "dapo",
    "seq-mean-token-mean": "grpo",
    "seq-mean-token-sum-norm": "dr_grpo",
}
SCALE_REWARDS = {"group_std": "group", "none": "none"}
GENERATIONS = ("transformers", "vllm-colocate")
# Distinct training prompts handed to TRL (it cycles through them, shuffled, epoch by epoch).
TRAIN_PROMPTS = 4000


def parse_args() -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--conf", required=True, help="the sdp config file of the workload")
    parser.add_argument("--deadline", type=float, required=True, help="time.time() to stop at")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--generation", choices=GENERATIONS, default="transformers")
    return parser.parse_known_args()


def grpo_config(cfg: SdpConfig, out: Path, generation: str) -> Any:
    """TRL's GRPOConfig with sdp's value wherever sdp has the setting."""
    from trl import GRPOConfig

    rollout, train = cfg.rollout, cfg.train
    return GRPOConfig(
        output_dir=str(out / "trl"),
        use_cpu=True,
        bf16=False,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        seed=cfg.run.seed,
        # The deadline stops it; the schedule must not decay towards a step never reached.
        max_steps=1_000_000,
        per_device_train_batch_size=rollout.batch_size * rollout.n_samples,
        num_generations=rollout.n_samples,
        max_completion_length=rollout.max_new_tokens,
        temperature=rollout.temperature,
        top_p=rollout.top_p,
        top_k=max(rollout.top_k, 0),
        learning_rate=train.lr,
        lr_scheduler_type=_scheduler(str(getattr(train.lr_schedule, "value", train.lr_schedule))),
        warmup_steps=train.warmup_steps,
        weight_decay=train.weight_decay,
        max_grad_norm=train.grad_clip,
        epsilon=train.eps_clip_low,
        epsilon_high=train.eps_clip_high,
        loss_type=LOSS_TYPES[str(train.loss_agg)],
        scale_rewards=SCALE_REWARDS[str(getattr(train.adv_norm, "value", train.adv_norm))],
        importance_sampling_level=str(getattr(train.ratio_level, "value", train.ratio_level)),
        beta=train.kl_coef,
        use_vllm=generation == "vllm-colocate",
        vllm_mode="colocate",
    )


def _scheduler(schedule: str) -> str:
    return {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}[schedule]


def train_dataset(task: Task) -> Any:
    """Rows of `prompt` (the text sdp's prompt format renders) and the reward's `meta`."""
    from datasets import Dataset

    rows = []
    for position in range(TRAIN_PROMPTS):
        prompt = task.sample_prompt(position)
        rows.append({"prompt": prompt.text, "meta": json.dumps(prompt.meta)})
    return Dataset.from_list(rows)


def same_prompt_ids(tokenizer: Any, prompts: list[Prompt]) -> bool:
    """Whether TRL's tokenization of the prompt text (`processing_class(text=...)`) gives
    exactly the ids sdp sends to its servers."""
    return all(tokenizer(text=p.text)["input_ids"] == list(p.prompt_ids) for p in prompts)


class GreedyEvaluator:
    """sdp's held-out evaluation, run on the trainer's model: greedy, one completion per
    prompt, accuracy = the fraction with reward 1."""

    def __init__(self, cfg: SdpConfig, task: Task, tokenizer: Any) -> None:
        self.task = task
        self.tokenizer = tokenizer
        self.prompts = task.eval_prompts(cfg.eval.n_prompts)
        self.max_new_tokens = cfg.eval.max_new_tokens or cfg.rollout.max_new_tokens
        self.stops = list(task.stop_token_ids)
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.stops[0]

    @torch.no_grad()
    def run(self, model: Any, batch: int = 32) -> tuple[float, float]:
        was_training = model.training
        model.eval()
        rewards: list[float] = []
        for start in range(0, len(self.prompts), batch):
            chunk = self.prompts[start : start + batch]
            rewards += self._rewards(model, chunk)
        if was_training:
            model.train()
        accuracy = sum(r == 1.0 for r in rewards) / len(rewards)
        return accuracy, sum(rewards) / len(rewards)

    def _rewards(self, model: Any, chunk: list[Prompt]) -> list[float]:
        width = max(len(p.prompt_ids) for p in chunk)
        ids = torch.tensor([[self.pad] * (width - len(p.prompt_ids)) + p.prompt_ids for p in chunk])
        mask = torch.tensor(
            [[0] * (width - len(p.prompt_ids)) + [1] * len(p.prompt_ids) for p in chunk]
        )
        output = model.generate(
            input_ids=ids,
            attention_mask=mask,
            do_sample=False,
            max_new_tokens=self.max_new_tokens,
            eos_token_id=self.stops,
            pad_token_id=self.pad,
        )
        texts = [
            decode_completion(self.tokenizer, row[width:].tolist(), self.stops) for row in output
        ]
        return [self.task.reward(text, p.meta) for text, p in zip(texts, chunk, strict=True)]


def curve_callback(
    events: EventLog, evaluator: GreedyEvaluator, every: int, deadline: float, completions: int
) -> Any:
    from transformers import TrainerCallback

    class CurveCallback(TrainerCallback):  # type: ignore[misc]
        """Evaluates before the first step and every `every` steps, logs each step as a
        `train_step` event, and stops training at the deadline."""

        def __init__(self) -> None:
            self.step_started = 0.0
            self.step_s = 0.0

        def evaluate(self, step: int, model: Any) -> None:
            started = time.monotonic()
            accuracy, mean_reward = evaluator.run(model)
            events.emit(
                EvalEvent(
                    step=step,
                    version=step,
                    accuracy=accuracy,
                    pass_at_k=accuracy,
                    k=1,
                    mean_reward=mean_reward,
                    n_prompts=len(evaluator.prompts),
                    temperature=0.0,
                    seconds=time.monotonic() - started,
                )
            )

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.evaluate(0, kwargs["model"])

        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.step_started = time.monotonic()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.step_s = time.monotonic() - self.step_started
            if state.global_step % every == 0:
                self.evaluate(state.global_step, kwargs["model"])
            if time.time() >= deadline:
                control.should_training_stop = True

        def on_log(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            logs = kwargs.get("logs") or {}
            if "reward" not in logs:
                return
            events.emit(
                TrainStepEvent(
                    step=state.global_step - 1,
                    version=state.global_step - 1,
                    reward=logs.get("reward"),
                    loss=logs.get("loss"),
                    entropy=logs.get("entropy"),
                    kl=logs.get("kl"),
                    samples=completions,
                    step_s=self.step_s,
                    samples_per_s=completions / self.step_s if self.step_s else None,
                )
            )

    return CurveCallback()


def main() -> None:
    args, overrides = parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM
    from trl import GRPOTrainer

    cfg = load_config(args.conf, overrides)
    model_dir = ensure_model_dir(cfg.model)
    tokenizer = load_tokenizer(model_dir)
    task = get_task(cfg.task, tokenizer)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    # TRL ends a completion at every eos id the model's generation config declares: sdp's
    # stop tokens (EOS and the chat template's end of turn).
    model.generation_config.eos_token_id = list(task.stop_token_ids)
    dataset = train_dataset(task)
    args.out.mkdir(parents=True, exist_ok=True)
    sample = [task.sample_prompt(p) for p in range(32)]
    check = {"prompt_ids_match": same_prompt_ids(tokenizer, sample), "generation": args.generation}
    (args.out / "peer.json").write_text(json.dumps(check))

    samples = args.out / "samples.jsonl"

    def reward(
        prompts: list[str], completions: list[str], meta: list[str], **_: Any
    ) -> list[float]:
        scores = [task.reward(c, json.loads(m)) for c, m in zip(completions, meta, strict=True)]
        # The first batches' completions and rewards, to check what the reward sees.
        if not samples.exists() or samples.stat().st_size < 20_000:
            with samples.open("a") as out:
                for text, m, score in zip(completions, meta, scores, strict=True):
                    out.write(json.dumps({"completion": text, "meta": m, "reward": score}) + "\n")
        return scores

    completions = cfg.rollout.batch_size * cfg.rollout.n_samples
    with EventLog(args.out / "events.jsonl") as events:
        evaluator = GreedyEvaluator(cfg, task, tokenizer)
        trainer = GRPOTrainer(
            model=model,
            reward_funcs=reward,
            args=grpo_config(cfg, args.out, args.generation),
            train_dataset=dataset,
            processing_class=tokenizer,
            callbacks=[
                curve_callback(events, evaluator, args.eval_every, args.deadline, completions)
            ],
        )
        trainer.train()


if __name__ == "__main__":
    main()
