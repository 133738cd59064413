"""The fleet for `server.backend`: local processes, or Ray actors (only imported then, so
the process backend never needs Ray)."""

from __future__ import annotations

from pathlib import Path

from sdp_cli.config.schema import SdpConfig
from sdp_cli.config.server_settings import ServerBackend
from sdp_cli.events.event_log import EventSink
from sdp_cli.launcher.command import with_lora_serving
from sdp_cli.launcher.fleet import ServerFleet


def make_fleet(
    cfg: SdpConfig,
    model_dir: Path,
    run_dir: Path,
    *,
    registry_path: Path | None = None,
    events: EventSink | None = None,
    observe_servers: bool = False,
) -> ServerFleet:
    """An unstarted fleet of `cfg.server.count` servers on the configured backend (serving
    LoRA adapters when train.lora.rank > 0)."""
    server = with_lora_serving(cfg.server, cfg.train.lora, model_dir)
    if cfg.server.backend == ServerBackend.ray:
        from sdp_cli.launcher.ray_fleet import RayServerFleet

        return RayServerFleet(
            server,
            cfg.ray,
            model_dir,
            run_dir,
            transport=cfg.weights.transport,
            registry_path=registry_path,
            events=events,
            observe_servers=observe_servers,
        )
    return ServerFleet(
        server,
        model_dir,
        run_dir,
        registry_path=registry_path,
        events=events,
        observe_servers=observe_servers,
    )
