"""`sdp simulate`: one simulation, or one per value of a swept key, printed as text or JSON."""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from rich.console import Console

from sdp_cli.config import SdpConfig
from sdp_cli.errors import SdpError
from sdp_cli.events.event_log import EventLog
from sdp_cli.simulate import parse_sweep, run_simulation, run_sweep
from sdp_cli.simulate.calibrate import (
    Calibration,
    calibrated_latency_scale,
    read_calibration,
    simulate_to_log,
)
from sdp_cli.simulate.report import print_result, print_sweep, to_json

# Loads the config from the command's arguments plus the extra overrides given.
ConfigLoader = Callable[[list[str]], SdpConfig]
# Loads the config with `before` ahead of the command's arguments (which win over it) and
# `extra` after them.
BaseLoader = Callable[[list[str], list[str]], SdpConfig]


def simulate(
    load: ConfigLoader,
    *,
    as_json: bool = False,
    sweep: str | None = None,
    run_dir: Path | None = None,
    console: Console | None = None,
    calibrate_from: Path | None = None,
    load_before: BaseLoader | None = None,
) -> None:
    """`run_dir`: write the run log RUN_DIR/events.jsonl (one simulation only).
    `calibrate_from`: simulate that run's shape with timing from its log;
    `load_before(before, extra)` loads the config with `before` placed ahead of the command's
    own overrides and `extra` after them (needed with `calibrate_from`)."""
    console = console or Console()
    if calibrate_from is not None:
        if load_before is None:
            raise ValueError("calibrate_from needs load_before")
        load = calibrated_loader(load, load_before, calibrate_from, as_json, console)
    if sweep is None:
        simulate_once(load([]), as_json, console, run_dir)
    elif run_dir is not None:
        raise SdpError("--run-dir writes the log of one simulation; it cannot go with --sweep")
    else:
        simulate_sweep(load, sweep, as_json, console)


def simulate_once(
    cfg: SdpConfig, as_json: bool, console: Console, run_dir: Path | None = None
) -> None:
    if run_dir is None:
        result = run_simulation(cfg)
    else:
        with EventLog(run_dir / "events.jsonl") as events:
            result = run_simulation(cfg, events)
    if as_json:
        sys.stdout.write(to_json(result) + "\n")
    else:
        print_result(result, console)


def simulate_sweep(load: ConfigLoader, sweep: str, as_json: bool, console: Console) -> None:
    key, values = parse_sweep(sweep)
    rows = run_sweep(load, key, values)
    if as_json:
        sys.stdout.write(to_json(rows) + "\n")
    else:
        print_sweep(key, rows, console)


def calibrated_loader(
    load: ConfigLoader,
    load_before: BaseLoader,
    run_dir: Path,
    as_json: bool,
    console: Console,
) -> ConfigLoader:
    """A loader whose configs have the calibrated run's shape and simulate.* values, each with
    the step time for its own batch size; the command's own overrides still win over them."""
    calibration = read_calibration(run_dir)
    with tempfile.TemporaryDirectory(prefix="sdp-calibrate-") as scratch:
        scale = calibrated_latency_scale(
            calibration,
            # The run's shape and timing over the command's overrides (server_batch, jitter
            # and seed of the simulation still come from them).
            load,
            simulate_to_log,
            Path(scratch),
        )
    print_calibration(calibration, scale, as_json, console)

    def load_calibrated(extra: list[str]) -> SdpConfig:
        shape = list(calibration.run_shape)
        shaped = load_before(shape, extra)
        return load_before([*shape, *calibration.overrides_for(shaped, scale)], extra)

    return load_calibrated


def print_calibration(
    calibration: Calibration, scale: float, as_json: bool, console: Console
) -> None:
    # With --json stdout carries only the result, so the calibration goes to stderr.
    out = Console(stderr=True) if as_json else console
    c = calibration
    out.print(f"[bold]Calibrated from[/bold] {c.run_dir / 'events.jsonl'}")
    spans = "completions" if c.per_completion else "rollouts (no completion times)"
    out.print(
        f"  {c.rollouts} {spans}: {c.mean_new_tokens:.1f} tokens per completion, "
        f"{c.completion_s:.3f} s each ({c.rollout_token_latency_s * 1e3:.3f} ms per token)"
    )
    out.print(f"  completion lengths (20 quantiles): {list(c.new_tokens)}")
    out.print(
        f"  completion s ≈ {c.prefill_s * 1e3:.3f} ms × prefills (its own and those ahead) + "
        f"tokens × ({c.latency_intercept_s * 1e3:.3f} + {c.latency_per_seq_s * 1e3:.3f} × "
        "completions decoding per server) ms"
    )
    if c.prompt_tokens is not None:
        out.print(
            f"  prefill = {c.latency_per_seq_s * 1e3:.3f} ms × {c.prompt_tokens:.1f} prompt "
            "tokens (a vLLM step costs the same per token, prompt or decoding)"
        )
    out.print(
        f"  server time ×{scale:.3f} → simulate.prefill_s={c.prefill_s * scale:.6g}, "
        f"simulate.token_latency_s={c.latency_intercept_s * scale:.6g}, "
        f"simulate.token_latency_per_seq_s={c.latency_per_seq_s * scale:.6g}"
    )
    out.print(
        f"  {c.steps} train steps: step_s ≈ {c.step_intercept_s:.4g} + "
        f"{c.step_s_per_token:.4g}·tokens"
    )
    out.print(
        f"  {c.updates} weight updates: simulate.export_s={c.export_s:.4g} "
        f"simulate.update_s={c.update_s:.4g}"
    )
