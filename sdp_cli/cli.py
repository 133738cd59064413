"""Typer commands only: parse, call one function, map errors to exit codes."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from sdp_cli.errors import SdpError

app = typer.Typer(
    name="sdp",
    help="Segment-wise decoupled PPO: asynchronous RL for language models on vLLM.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
config_app = typer.Typer(help="Inspect configuration.", no_args_is_help=True)
app.add_typer(config_app, name="config")

err_console = Console(stderr=True)
F = TypeVar("F", bound=Callable[..., Any])

OverridesArg = Annotated[
    list[str] | None,
    typer.Argument(
        help="conf=NAME_OR_PATH (a config in sdp_cli/conf/ or a YAML file) and Hydra "
        "overrides key=value, e.g. rollout.max_staleness=4",
        show_default=False,
    ),
]


def user_errors(func: F) -> F:
    """Turn SdpError into a short red message and exit code 2; Ctrl-C into exit code 130."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except SdpError as exc:
            err_console.print(
                f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True
            )
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            err_console.print("[yellow]interrupted[/]")
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


def _load(args: list[str] | None):  # -> SdpConfig
    from sdp_cli.config import load_config, split_conf_arg

    conf, overrides = split_conf_arg(list(args or []))
    return load_config(conf, overrides)


@app.command()
@user_errors
def train(
    args: OverridesArg = None,
    dry_run: Annotated[
        bool,
        typer.Option("--dry-run", help="Print the resolved config and capacity plan, then exit."),
    ] = False,
) -> None:
    """Launch vLLM servers, run the async rollout executor and the trainer."""
    cfg = _load(args)
    if dry_run:
        from sdp_cli.plan import print_dry_run
        from sdp_cli.runner import with_cpu_placement

        print_dry_run(with_cpu_placement(cfg), Console())
        return
    from sdp_cli.runner import print_summary, run_training

    console = Console()
    print_summary(run_training(cfg, console), console)


@app.command("launch-servers")
@user_errors
def launch_servers(args: OverridesArg = None) -> None:
    """Run vLLM servers on their own, supervised, with a registry file (until Ctrl-C)."""
    from sdp_cli.launcher.foreground import run_foreground

    raise typer.Exit(run_foreground(_load(args)))


@app.command("inspect-staleness")
@user_errors
def inspect_staleness(
    run_dir: Annotated[
        Path, typer.Argument(help="A run directory holding events.jsonl (or the log itself).")
    ],
    follow: Annotated[
        bool,
        typer.Option("--follow", "-f", help="Keep re-reading and refreshing until Ctrl-C."),
    ] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the numbers as one JSON object.")
    ] = False,
    plot: Annotated[
        Path | None,
        typer.Option(
            "--plot",
            metavar="FILE.png",
            help="Also write lag histograms and capacity over time as a PNG (needs matplotlib).",
        ),
    ] = None,
) -> None:
    """Show what happened to staleness, capacity and drops in a run."""
    from sdp_cli.telemetry.report import inspect_run

    inspect_run(run_dir, follow=follow, as_json=as_json, plot=plot)


@app.command()
@user_errors
def simulate(
    args: OverridesArg = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print one JSON object (a list with --sweep).")
    ] = False,
    sweep: Annotated[
        str | None,
        typer.Option(
            "--sweep",
            metavar="KEY=V1,V2,...",
            help="One simulation per value, e.g. rollout.max_staleness=0,1,2,4,8.",
        ),
    ] = None,
) -> None:
    """Run the real executor against simulated servers and trainer (capacity planning)."""
    from sdp_cli.simulate import parse_sweep, run_simulation, run_sweep
    from sdp_cli.simulate.report import print_result, print_sweep, to_json

    console = Console()
    if sweep is None:
        result = run_simulation(_load(args))
        if as_json:
            sys.stdout.write(to_json(result) + "\n")
        else:
            print_result(result, console)
        return
    key, values = parse_sweep(sweep)
    rows = run_sweep(lambda extra: _load([*(args or []), *extra]), key, values)
    if as_json:
        sys.stdout.write(to_json(rows) + "\n")
    else:
        print_sweep(key, rows, console)


@app.command("init-model")
@user_errors
def init_model(
    args: Annotated[
        list[str] | None,
        typer.Argument(
            help="Optional target DIR, then conf=... and model.* overrides.", show_default=False
        ),
    ] = None,
) -> None:
    """Create the built-in tiny model (deterministic from model.init_seed); a no-op if present."""
    from sdp_cli.model import TinyModelSpec, init_tiny_model, resolve_model_path

    items = list(args or [])
    dirs = [a for a in items if "=" not in a]
    if len(dirs) > 1:
        raise SdpError(f"init-model takes at most one DIR (got {dirs})")
    cfg = _load([a for a in items if "=" in a])
    target = Path(dirs[0]) if dirs else resolve_model_path(cfg.model)
    path, created = init_tiny_model(TinyModelSpec.from_config(cfg.model), target)
    Console().print(f"{'created' if created else 'already present'}: {path}", highlight=False)


@config_app.command("show")
@user_errors
def config_show(args: OverridesArg = None) -> None:
    """Print the fully resolved config as YAML."""
    from sdp_cli.config import config_to_yaml

    sys.stdout.write(config_to_yaml(_load(args)))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
