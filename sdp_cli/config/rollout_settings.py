"""The `rollout.*` keys: sampling, admission (η, concurrency) and the proximal recompute's place."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from sdp_cli.config.setting import setting


class Strategy(StrEnum):
    segment_wise = "segment_wise"
    standard = "standard"


class RecomputeOn(StrEnum):
    server = "server"
    trainer = "trainer"


class FilterGroups(StrEnum):
    none = "none"
    same_reward = "same_reward"


class Overlong(StrEnum):
    none = "none"
    filter = "filter"
    penalty = "penalty"


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
    max_new_tokens: int = setting(
        16, ge=1, help="longest completion (in an episode: longest model turn), in tokens"
    )
    max_turns: int = setting(
        4, ge=1, help="episodes: most model turns per episode (reason max_turns when reached)"
    )
    max_episode_tokens: int = setting(
        0,
        ge=0,
        help="episodes: longest episode (prompt + every turn), in tokens; 0: "
        "server.max_model_len. An episode that would overflow it ends with reason context",
    )
    filter_groups: FilterGroups = setting(
        FilterGroups.none,
        help="dynamic sampling: none trains every group; same_reward leaves out a group whose "
        "rewards are all equal (every advantage 0) and keeps generating until B informative "
        "groups are buffered. A filtered group is dropped with reason `uninformative`",
    )
    max_uninformative_fraction: float = setting(
        0.95,
        gt=0,
        le=1,
        help="same_reward: the share of uninformative groups among the last "
        "uninformative_window finished ones at which a warning is logged; still at or above "
        "it one window later with every group of the window uninformative, the run stops "
        "instead of generating forever without a batch",
    )
    uninformative_window: int = setting(
        64,
        ge=1,
        help="same_reward: how many of the last finished groups max_uninformative_fraction "
        "is measured over",
    )
    overlong: Overlong = setting(
        Overlong.none,
        help="completions cut at max_new_tokens: none; filter (left out of the loss, their "
        "reward still in the group's mean); penalty (DAPO's soft overlong punishment: reward − "
        "overlong_penalty·(len − (max_new_tokens − overlong_buffer)) / overlong_buffer past "
        "max_new_tokens − overlong_buffer)",
    )
    overlong_buffer: int = setting(
        4,
        ge=1,
        help="penalty: the last tokens before max_new_tokens over which the penalty grows "
        "from 0 to overlong_penalty (at most max_new_tokens)",
    )
    overlong_penalty: float = setting(
        1.0, ge=0, help="penalty: what a completion of max_new_tokens tokens loses from its reward"
    )
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
