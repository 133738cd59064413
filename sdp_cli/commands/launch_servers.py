"""`sdp launch-servers`: run a supervised fleet in the foreground with a live status table until
Ctrl-C (exit 130) or SIGTERM (exit 0); either way every server process group is stopped."""

from __future__ import annotations

import threading
from pathlib import Path

from rich.console import Console
from rich.live import Live
from rich.table import Table

from sdp_cli.commands.preflight import check_model_fits_servers
from sdp_cli.commands.signals import Terminated, signals_ignored
from sdp_cli.config.schema import SdpConfig
from sdp_cli.events.event_log import EventLog
from sdp_cli.inference.pool import ServerState
from sdp_cli.launcher.backends import make_fleet
from sdp_cli.launcher.command import check_vllm_installed
from sdp_cli.launcher.fleet import ServerFleet
from sdp_cli.launcher.server import ServerStartError
from sdp_cli.model import check_model_dir, ensure_model_dir
from sdp_cli.views.dashboard import short_node

_STATE_STYLE = {
    ServerState.starting: "yellow",
    ServerState.ready: "green",
    ServerState.restarting: "yellow",
    ServerState.dead: "red",
}


def status_table(fleet: ServerFleet) -> Table:
    table = Table(title=f"vLLM servers — registry {fleet.registry_path}", title_justify="left")
    # Servers on Ray run on cluster nodes; local processes have none.
    nodes = {s.index: fleet.node_of(s.index) for s in fleet.pool.snapshot()}
    with_nodes = any(nodes.values())
    columns = ["#", "address", *(["node"] if with_nodes else []), "state"]
    for column in (*columns, "version", "in-flight", "restarts", "pid"):
        table.add_column(column, justify="right" if column in ("#", "version") else "left")
    for status in fleet.pool.snapshot():
        pid = fleet.pid(status.index)
        in_flight = fleet.loads.get(status.index, status.in_flight)
        style = _STATE_STYLE[status.state]
        node = [short_node(nodes.get(status.index))] if with_nodes else []
        table.add_row(
            str(status.index),
            status.address,
            *node,
            f"[{style}]{status.state.value}[/]",
            str(status.version),
            str(in_flight),
            str(status.restarts),
            str(pid) if pid else "-",
        )
    return table


def launch_servers(cfg: SdpConfig, console: Console | None = None) -> int:
    """Start `cfg.server.count` servers, show their status until interrupted, stop them.
    Returns the exit code for SIGTERM (0); Ctrl-C propagates as KeyboardInterrupt (130).
    The caller installs the signal handlers (`commands.signals.stop_on_signals`)."""
    console = console or Console()
    check_vllm_installed()
    check_model_fits_servers(cfg, check_model_dir(cfg.model), launching=True)
    model_dir = ensure_model_dir(cfg.model)
    run_dir = Path(cfg.run.dir)
    registry = Path(cfg.server.registry) if cfg.server.registry else run_dir / "servers.json"
    events = EventLog(run_dir / "events.jsonl")
    fleet = make_fleet(
        cfg, model_dir, run_dir, registry_path=registry, events=events, observe_servers=True
    )
    try:
        console.print(
            f"starting {cfg.server.count} vLLM server(s) for {model_dir} (logs in {fleet.log_dir})",
            highlight=False,
        )
        fleet.start()
        console.print(f"ready; registry: {registry}", highlight=False)
        _show_until_interrupted(fleet, console)
    except Terminated:
        return 0
    finally:
        with signals_ignored():
            console.print("stopping servers…", highlight=False)
            fleet.stop()
            events.close()
    return 0


def _show_until_interrupted(fleet: ServerFleet, console: Console) -> None:
    idle = threading.Event()
    with Live(status_table(fleet), console=console, refresh_per_second=2) as live:
        while True:
            idle.wait(1.0)
            live.update(status_table(fleet))
            if fleet.pool.all_dead():
                raise ServerStartError(
                    f"all servers are dead (restarts exhausted); see {fleet.log_dir}"
                )
