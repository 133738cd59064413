"""The `eval.*` keys: held-out evaluation."""

from __future__ import annotations

from dataclasses import dataclass

from sdp_cli.config.setting import setting


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
