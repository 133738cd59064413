"""The run plan: what a composed config implies for how the run goes, worked out once.

Several parts act on the same derived facts (does the prox mode need the servers' recompute,
who scores it, do continuations ask for their scores, can an update hand the next batch over
before its reload). `plan_run` resolves them from the config once, when a command starts a run,
and the parts are handed the plan instead of each deriving them again from the whole config.
"""

from __future__ import annotations

from dataclasses import dataclass

from sdp_cli.config.rollout_settings import RecomputeOn
from sdp_cli.config.schema import SdpConfig
from sdp_cli.config.train_settings import ProxMode


def needs_proximal_recompute(prox_mode: ProxMode | str) -> bool:
    """Whether `train.prox_mode` takes p_t from the servers' recompute at each update (the
    other modes compute p_t in the trainer)."""
    return ProxMode(prox_mode) == ProxMode.segment


@dataclass(frozen=True)
class RunPlan:
    # train.prox_mode=segment: p_t comes from a recompute under v of the buffered v−1 tokens.
    proximal_recompute: bool
    # rollout.recompute_on=trainer, where the recompute applies: the trainer scores what is
    # buffered before its optimizer step.
    recompute_on_trainer: bool
    # rollout.score_continuations, where the recompute applies.
    scores_continuations: bool
    # train.overlap_reload, where it can apply at all: at η = 0 no group is valid at v+1
    # before the servers hold it.
    overlaps_reload: bool


def plan_run(cfg: SdpConfig) -> RunPlan:
    recompute = needs_proximal_recompute(cfg.train.prox_mode)
    return RunPlan(
        proximal_recompute=recompute,
        recompute_on_trainer=recompute and cfg.rollout.recompute_on == RecomputeOn.trainer,
        scores_continuations=recompute and cfg.rollout.score_continuations,
        overlaps_reload=cfg.train.overlap_reload and cfg.rollout.max_staleness > 0,
    )
