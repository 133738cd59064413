"""The `run_started` event of a config, shared by `sdp train` and `sdp simulate`."""

from __future__ import annotations

from sdp_cli.config.run_plan import RunPlan
from sdp_cli.config.schema import SdpConfig
from sdp_cli.events.event_schema import RunStartedEvent


def run_started_event(
    cfg: SdpConfig,
    plan: RunPlan,
    *,
    mode: str = "train",
    resumed_from_step: int = 0,
    version: int = 0,
) -> RunStartedEvent:
    """What the run log says about the run's shape before its first rollout."""
    return RunStartedEvent(
        run=cfg.run.name,
        mode=mode,
        steps=cfg.train.steps,
        max_staleness=cfg.rollout.max_staleness,
        batch_size=cfg.rollout.batch_size,
        strategy=cfg.rollout.strategy.value,
        prox_mode=cfg.train.prox_mode.value,
        n_samples=cfg.rollout.n_samples,
        max_concurrent=cfg.rollout.max_concurrent,
        server_count=cfg.server.count,
        resumed_from_step=resumed_from_step,
        version=version,
        overlap_reload=plan.overlaps_reload,
        score_continuations=plan.scores_continuations,
    )
