"""`sdp inspect-staleness --plot FILE.png`: lag histograms and capacity over time.

matplotlib is an optional extra (`sdp-cli[plot]`), so it is imported only here and only when a
plot is asked for. The Agg canvas is used directly: no display, no pyplot global state.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sdp_cli.errors import MissingDependencyError, SdpError
from sdp_cli.views.event_fold import CapacityPoint
from sdp_cli.views.staleness_analysis import StalenessSummary


def write_plot(summary: StalenessSummary, path: Path) -> None:
    figure_cls, canvas_cls = _matplotlib()
    figure = figure_cls(figsize=(12, 8), layout="constrained")
    canvas_cls(figure)
    left, right, bottom_left, bottom_right = figure.subplots(2, 2).flat
    _lag_bars(left, summary)
    _token_bars(right, summary)
    _capacity_over_time(bottom_left, summary)
    _per_version_counts(bottom_right, summary)
    figure.suptitle(_title(summary))
    try:
        figure.savefig(path, format="png", dpi=100)
    except OSError as exc:
        raise SdpError(f"cannot write plot to {path}: {exc.strerror or exc}") from None


def _matplotlib() -> tuple[Any, Any]:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise MissingDependencyError(
            "--plot needs matplotlib, which is not installed: "
            "pip install 'sdp-cli[plot]' (or pip install matplotlib)"
        ) from None
    return Figure, FigureCanvasAgg


def _title(summary: StalenessSummary) -> str:
    run = summary.run
    return (
        f"run {run.get('run', '?')}: strategy {run.get('strategy', '?')}, "
        f"η={run.get('max_staleness', '?')}, B={run.get('batch_size', '?')}, "
        f"max_concurrent={run.get('max_concurrent', '?')}; {summary.steps} steps, "
        f"{summary.dropped_total} dropped"
    )


def _lag_bars(axes: Any, summary: StalenessSummary) -> None:
    lags = sorted(set(summary.lag_histogram) | set(summary.tail_lag_histogram))
    width = 0.4
    axes.bar(
        [lag - width / 2 for lag in lags],
        [summary.lag_histogram.get(lag, 0) for lag in lags],
        width,
        label="head lag",
    )
    axes.bar(
        [lag + width / 2 for lag in lags],
        [summary.tail_lag_histogram.get(lag, 0) for lag in lags],
        width,
        label="tail lag",
    )
    _mark_eta(axes, summary)
    axes.set_title("trained samples by version lag")
    axes.set_xlabel("lag (versions)")
    axes.set_ylabel("samples (rollout groups)")
    axes.set_xticks(lags or [0])
    axes.legend()


def _token_bars(axes: Any, summary: StalenessSummary) -> None:
    lags = sorted(summary.tokens_by_lag)
    axes.bar(lags, [summary.tokens_by_lag[lag] for lag in lags], color="tab:purple")
    _mark_eta(axes, summary)
    axes.set_title("trained tokens by version lag")
    axes.set_xlabel("lag (versions)")
    axes.set_ylabel("tokens")
    axes.set_xticks(lags or [0])


def _mark_eta(axes: Any, summary: StalenessSummary) -> None:
    if summary.max_staleness is not None:
        axes.axvline(summary.max_staleness + 0.5, color="red", linestyle="--", label="η bound")


def _capacity_over_time(axes: Any, summary: StalenessSummary) -> None:
    series = summary.capacity_series
    times = [p.t for p in series]
    for name, values in (
        ("capacity", [p.capacity for p in series]),
        ("running", [p.running for p in series]),
        ("accepted_live", [p.accepted_live for p in series]),
        ("concurrency room", [p.concurrency_room for p in series]),
        ("staleness room", [p.staleness_room for p in series]),
    ):
        points = [(t, v) for t, v in zip(times, values, strict=True) if v is not None]
        if points:
            xs, ys = zip(*points, strict=True)
            axes.step(xs, ys, where="post", label=name)
    _mark_version_changes(axes, series)
    axes.set_title("capacity terms over time (dotted: new version)")
    axes.set_xlabel("seconds since start")
    axes.set_ylabel("rollouts")
    if series:
        axes.legend(fontsize="small")
    else:
        axes.text(0.5, 0.5, "no capacity events", ha="center", va="center")


def _mark_version_changes(axes: Any, series: list[CapacityPoint]) -> None:
    previous = None
    for point in series:
        if previous is not None and point.version is not None and point.version != previous:
            axes.axvline(point.t, color="grey", linestyle=":", linewidth=1)
        previous = point.version if point.version is not None else previous


def _per_version_counts(axes: Any, summary: StalenessSummary) -> None:
    rows = summary.per_version
    versions = [row.version for row in rows]
    width = 0.27
    for offset, label, values in (
        (-width, "accepted", [row.accepted for row in rows]),
        (0.0, "dropped", [row.dropped for row in rows]),
        (width, "consumed", [row.consumed for row in rows]),
    ):
        axes.bar([v + offset for v in versions], values, width, label=label)
    if 0 < len(versions) <= 30:
        axes.set_xticks(versions)
    axes.set_title("rollouts per version")
    axes.set_xlabel("version")
    axes.set_ylabel("rollouts")
    if rows:
        axes.legend()
