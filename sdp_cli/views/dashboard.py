"""Live dashboard of a training run, fed the same events as the run log.

The training loop wraps its event log so every event also reaches the dashboard:

    dashboard = Dashboard(snapshots=[executor.snapshot])
    events = dashboard.wrap(EventLog(run_dir / "events.jsonl"))
    with dashboard:                      # Rich Live on a terminal, log lines otherwise
        ...  events.emit(TrainStepEvent(step=..., ...))

It reads the typed events of `sdp_cli.events.event_schema`, so a field renamed there breaks here
at once (in the type checker and the tests), not silently on screen. A bug in a handler or in
rendering never stops training: it is logged with its traceback, counted in `errors` and shown
in the header.

Cost to the emitting thread: `emit` only stores the event under a lock (O(1) per event, bounded
history). Rendering happens in Rich's refresh thread, at most 4 times per second, from a copy of
the state taken under the lock; snapshot callables are called there too, never by `emit`. When
stdout is not a terminal, each `train_step` prints one concise line instead.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from sdp_cli.events.event_log import EventSink
from sdp_cli.events.event_schema import (
    CAPACITY_TERMS,
    EvalEvent,
    Event,
    TrainStepEvent,
)
from sdp_cli.events.fields import as_int, as_lag_counts
from sdp_cli.views.event_fold import RunFold
from sdp_cli.views.health_view import health_table
from sdp_cli.views.widgets import (
    bar,
    format_duration,
    format_number,
    format_rate,
    lag_histogram,
    sparkline,
)

log = logging.getLogger(__name__)

# A snapshot returns live executor counters (RolloutExecutor.snapshot() fits): the `capacity`
# event's keys (version, running, accepted_live, staleness_limit, max_concurrent, submitted,
# rejected, dropped_total, consumed, queue_size, ...), plus optionally accepted_total and
# dropped ({reason: n}). They override the values counted from events when rendering.
SnapshotFn = Callable[[], Mapping[str, Any]]

MAX_REFRESH_PER_SECOND = 4.0
# The display errors kept for `Dashboard.errors` (the count goes on).
KEPT_ERRORS = 20
# Below this console width the panels are stacked in one column.
TWO_COLUMN_WIDTH = 110
PHASE_ORDER = (
    "pause_s",
    "export_s",
    "recompute_s",
    "abort_s",
    "reload_s",
    "set_version_s",
    "resume_s",
)
SERVER_STATE_STYLES = {
    "ready": "green",
    "starting": "yellow",
    "restarting": "yellow",
    "dead": "bold red",
}


class Dashboard:
    """Rich Live view of a run on a terminal; one log line per training step otherwise.

    `live=None` decides from the console (a terminal gets Live). `refresh_per_second` is capped
    at 4. `snapshots` are called at render time for live executor counters."""

    def __init__(
        self,
        *,
        console: Console | None = None,
        live: bool | None = None,
        refresh_per_second: float = MAX_REFRESH_PER_SECOND,
        snapshots: Sequence[SnapshotFn] = (),
    ) -> None:
        self.console = console or Console()
        self.live = self.console.is_terminal if live is None else live
        self.refresh_per_second = max(0.1, min(MAX_REFRESH_PER_SECOND, refresh_per_second))
        self._snapshots: list[SnapshotFn] = list(snapshots)
        self._lock = threading.Lock()
        # The capacity series is the report's; a live view never reads it.
        self._state = RunFold(keep_series=False)
        self._live: Live | None = None
        self._started = False
        # Display bugs: how many, and the last few messages (tests assert there are none).
        self.error_count = 0
        self.errors: deque[str] = deque(maxlen=KEPT_ERRORS)

    # --- feeding ----------------------------------------------------------------------------

    def wrap(self, sink: EventSink) -> DashboardSink:
        """An EventSink that writes to `sink` and then updates this dashboard."""
        return DashboardSink(sink, self)

    def add_snapshot(self, snapshot: SnapshotFn) -> None:
        with self._lock:
            self._snapshots.append(snapshot)

    def emit(self, event: Event) -> None:
        """EventSink interface: the same call the event log gets."""
        self.update(event, time.time() if event.ts is None else event.ts)

    def feed(self, events: Iterable[Event]) -> None:
        """Replay logged events (tests, or showing a recorded run)."""
        for event in events:
            self.update(event, event.ts)

    def update(self, event: Event, ts: float | None) -> None:
        try:
            with self._lock:
                self._state.add(event, ts)
            if isinstance(event, TrainStepEvent) and self._started and not self.live:
                self.console.print(self.log_line(), markup=False, highlight=False, soft_wrap=True)
        except Exception as exc:
            # A display bug must never stop training, nor go unseen: it is logged with its
            # traceback, kept in `errors` and counted in the header.
            self._record_error(f"{event.type}: {exc!r}")

    def _record_error(self, message: str) -> None:
        log.exception("dashboard: %s", message)
        self.error_count += 1
        self.errors.append(message)

    # --- lifecycle --------------------------------------------------------------------------

    def start(self) -> Dashboard:
        if self._started:
            return self
        self._started = True
        if self.live:
            self._live = Live(
                get_renderable=self._render_for_live,
                console=self.console,
                refresh_per_second=self.refresh_per_second,
                transient=False,
            )
            self._live.start()
        return self

    def stop(self) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None
        self._started = False

    def __enter__(self) -> Dashboard:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- rendering --------------------------------------------------------------------------

    def render(self) -> RenderableType:
        """The whole dashboard as one renderable (what Live refreshes; usable without Live)."""
        state, counters, problems = self._view()
        panels = [
            _capacity_panel(state, counters),
            _counters_panel(state, counters),
            _batch_panel(state, counters),
            _training_panel(state),
            _weight_update_panel(state),
            _servers_panel(state),
        ]
        columns = 2 if self.console.width >= TWO_COLUMN_WIDTH else 1
        grid = Table.grid(expand=True, padding=(0, 1))
        for _ in range(columns):
            grid.add_column(ratio=1)
        for row in range(0, len(panels), columns):
            grid.add_row(*panels[row : row + columns])
        parts: list[RenderableType] = [_dashboard_header(state, self.error_count), grid]
        # Full width: the by-lag table has a dozen columns, too many for half the screen.
        parts.append(_health_panel(state))
        if problems:
            parts.append(Text("; ".join(problems), style="dim red"))
        return Group(*parts)

    def _render_for_live(self) -> RenderableType:
        # An exception here would kill Rich's refresh thread and freeze the screen for the rest
        # of the run; show it in place of the dashboard instead.
        try:
            return self.render()
        except Exception as exc:
            self._record_error(f"render: {exc!r}")
            return Text(f"dashboard render failed: {exc!r}", style="red")

    def log_line(self) -> str:
        """One line for non-terminal output: progress, capacity, drops, lag, throughput."""
        state, counters, _ = self._view()
        return _log_line(state, counters)

    def _view(self) -> tuple[RunFold, dict[str, Any], list[str]]:
        with self._lock:
            state = self._state.view_copy()
            snapshots = list(self._snapshots)
        # Counts come from the events seen (they are never older than the last capacity event);
        # live snapshots, when given, are newer still and win.
        counters = {
            **(state.capacity.fields_dict() if state.capacity is not None else {}),
            "submitted": state.submitted,
            "accepted_total": state.accepted,
            "rejected": state.rejected,
            "dropped": dict(state.drops),
            "dropped_total": sum(state.drops.values()),
            "consumed": state.consumed,
        }
        problems = []
        for snapshot in snapshots:
            try:
                counters.update(snapshot())
            except Exception as exc:
                problems.append(f"snapshot {getattr(snapshot, '__name__', '?')} failed: {exc}")
        live_version = as_int(counters.get("version"))
        if live_version is not None and (state.version is None or live_version > state.version):
            state.version = live_version
        return state, counters, problems


class DashboardSink:
    """Writes each event to the inner sink (the run log) first, then to the dashboard."""

    def __init__(self, inner: EventSink, dashboard: Dashboard) -> None:
        self.inner = inner
        self.dashboard = dashboard

    def emit(self, event: Event) -> None:
        self.inner.emit(event)
        self.dashboard.emit(event)

    def close(self) -> None:
        close = getattr(self.inner, "close", None)
        if callable(close):
            close()


# --- rendering (refresh thread; reads a private copy of the state) ---------------------------


def _planned_steps(state: RunFold) -> int | None:
    return state.run.steps if state.run is not None else None


def _eta_s(state: RunFold) -> float | None:
    total = _planned_steps(state)
    if total is None or state.steps_seen == 0:
        return None
    if state.start_ts is None or state.last_step_ts is None:
        return None
    per_step = (state.last_step_ts - state.start_ts) / state.steps_seen
    return max(0, total - state.steps_done) * per_step


def _progress(state: RunFold) -> str:
    total = _planned_steps(state)
    step = f"step {state.steps_done}/{total}" if total is not None else f"step {state.steps_done}"
    version = f"v{state.version}" if state.version is not None else "v—"
    eta = "finished" if state.finished else f"ETA {format_duration(_eta_s(state))}"
    return f"{version} · {step} · {eta}"


def _dashboard_header(state: RunFold, errors: int) -> RenderableType:
    run = state.run
    elapsed = (
        state.last_ts - state.start_ts
        if state.last_ts is not None and state.start_ts is not None
        else None
    )
    text = Text()
    text.append(f"sdp · run {run.run if run else '?'} · ", style="bold")
    text.append(_progress(state), style="bold cyan")
    text.append(f" · elapsed {format_duration(elapsed)}")
    if run is not None:
        text.append(
            f"   strategy {run.strategy} · η={run.max_staleness} · B={run.batch_size} · "
            f"prox {run.prox_mode}",
            style="dim",
        )
    if errors:
        text.append(f" · {errors} display errors (see the log)", style="red")
    return text


def _capacity_panel(state: RunFold, counters: Mapping[str, Any]) -> Panel:
    terms = _formula_terms(counters)
    limit, max_concurrent = terms["staleness_limit"], terms["max_concurrent"]
    running, accepted_live = terms["running"], terms["accepted_live"]
    conc_room, stale_room = terms["concurrency_room"], terms["staleness_room"]
    capacity = terms["capacity"]
    formula = Text()
    formula.append(f"capacity {_n(capacity)}", style="bold")
    formula.append(f" = min(conc room {_n(conc_room)}, stale room {_n(stale_room)})\n")
    formula.append(
        f"conc room  = max_concurrent − running = {_n(max_concurrent)} − {_n(running)}\n"
        f"stale room = (η+v+1)·B − (accepted + running)"
        f" = {_n(limit)} − ({_n(accepted_live)} + {_n(running)})",
        style="dim",
    )
    bars = Table.grid(padding=(0, 1))
    bars.add_column(no_wrap=True)
    bars.add_column(no_wrap=True)
    bars.add_column(no_wrap=True)
    bars.add_row(
        "concurrency bound",
        bar(conc_room or 0, max_concurrent or 0, 16, "green"),
        f"room {_n(conc_room)} of {_n(max_concurrent)}",
    )
    bars.add_row(
        "staleness bound",
        bar(stale_room or 0, limit or 0, 16, "green"),
        f"room {_n(stale_room)} of {_n(limit)}",
    )
    bars.add_row(
        "in flight",
        bar(running or 0, max_concurrent or 0, 16, "cyan"),
        f"{_n(running)} of {_n(max_concurrent)}",
    )
    bars.add_row(
        "accepted",
        bar(accepted_live or 0, limit or 0, 16, "magenta"),
        f"{_n(accepted_live)} of {_n(limit)}",
    )
    return Panel(Group(formula, bars), title="capacity", title_align="left")


def _formula_terms(counters: Mapping[str, Any]) -> dict[str, int | None]:
    """The formula's terms, with the rooms recomputed from their inputs when those are known,
    so a live snapshot of `running` and the logged rooms can never disagree on screen."""
    terms = {key: as_int(counters.get(key)) for key in CAPACITY_TERMS}
    max_concurrent, running = terms["max_concurrent"], terms["running"]
    limit, accepted_live = terms["staleness_limit"], terms["accepted_live"]
    if max_concurrent is not None and running is not None:
        terms["concurrency_room"] = max_concurrent - running
    if limit is not None and accepted_live is not None and running is not None:
        terms["staleness_room"] = limit - (accepted_live + running)
    conc_room, stale_room = terms["concurrency_room"], terms["staleness_room"]
    if conc_room is not None and stale_room is not None:
        terms["capacity"] = max(0, min(conc_room, stale_room))
    return terms


def _counters_panel(state: RunFold, counters: Mapping[str, Any]) -> Panel:
    def pick(key: str, fallback: int) -> int:
        value = as_int(counters.get(key))
        return value if value is not None else fallback

    dropped_total = pick("dropped_total", 0)
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold")
    table.add_column(justify="right")
    table.add_column(style="dim")
    table.add_row("submitted", str(pick("submitted", 0)), "")
    table.add_row("running", _n(as_int(counters.get("running"))), "in flight now")
    table.add_row(
        "accepted",
        str(pick("accepted_total", 0)),
        f"live {_n(as_int(counters.get('accepted_live')))} (minus drops)",
    )
    by_reason = " · ".join(f"{reason} {n}" for reason, n in state.rejected_by_reason().items())
    table.add_row("rejected", str(pick("rejected", 0)), by_reason or "by the workflow")
    reasons = " · ".join(f"{reason} {n}" for reason, n in _drops_by_reason(counters).items())
    table.add_row("dropped", str(dropped_total), reasons or "stale samples")
    table.add_row("consumed", str(pick("consumed", 0)), "trained on")
    table.add_row("queue", _n(as_int(counters.get("queue_size"))), "waiting for the trainer")
    return Panel(table, title="rollouts", title_align="left")


def _batch_panel(state: RunFold, counters: Mapping[str, Any]) -> Panel:
    batch = state.last_batch
    if batch is None:
        return Panel(Text("no batch taken yet", style="dim"), title="last batch")
    head, tail = batch.head_lags, batch.tail_lags
    summary = Text()
    summary.append(f"step {_n(batch.step)} at v{batch.version}", style="bold")
    summary.append(f" · waited {format_duration(batch.wait_s)}")
    summary.append(
        f"\nhead lag max {_n(max(head, default=None))} mean {_mean_text(head)} · "
        f"tail lag max {_n(max(tail, default=None))} mean {_mean_text(tail)}"
    )
    summary.append(f" · queue {_n(as_int(counters.get('queue_size')))}")
    tokens_by_lag = as_lag_counts(batch.tokens_by_lag)
    histogram = lag_histogram(tokens_by_lag, unit="tokens", width=16, style="magenta")
    return Panel(
        Group(summary, histogram), title="last batch: tokens by version lag", title_align="left"
    )


def _training_panel(state: RunFold) -> Panel:
    last = state.last_train
    table = Table.grid(padding=(0, 1))
    table.add_column(style="bold", no_wrap=True)
    table.add_column(justify="right", no_wrap=True)
    table.add_column(style="cyan", no_wrap=True)
    table.add_row("reward", format_number(last and last.reward), sparkline(state.rewards))
    table.add_row("loss", format_number(last and last.loss), sparkline(state.losses))
    table.add_row(
        "gen tokens/s",
        format_rate(last and last.gen_tokens_per_s),
        sparkline(state.gen_tokens_per_s),
    )
    table.add_row(
        "samples/s", format_rate(last and last.samples_per_s), sparkline(state.samples_per_s)
    )
    details = Text(
        f"clip {format_number(last and last.clip_frac)} · behav w mean "
        f"{format_number(last and last.behav_weight_mean)} max "
        f"{format_number(last and last.behav_weight_max)} · masked "
        f"{format_number(last and last.masked_frac)}\n"
        f"last step: waited {format_duration(last and last.wait_s)} · trained "
        f"{format_duration(last and last.step_s)} · weight update "
        f"{format_duration(last and last.update_s)}"
        f"{_eval_line(state.last_eval)}"
        f"{_episodes_line(state)}",
        style="dim",
    )
    return Panel(Group(table, details), title="training", title_align="left")


def _health_panel(state: RunFold) -> Panel:
    if not state.health.run.steps:
        return Panel(
            Text("no train step yet", style="dim"), title="off-policy health", title_align="left"
        )
    table = health_table(state.health.summary(), state.health.summary_by_lag(), "")
    return Panel(table, title="off-policy health (run so far, by lag)", title_align="left")


def _episodes_line(state: RunFold) -> str:
    """Multi-turn runs: model turns per episode, environment against generation seconds."""
    tally = state.episodes
    if not tally.episodes:
        return ""
    return (
        f"\nepisodes {tally.episodes}: {tally.turns_per_episode:.2f} turns each · generation "
        f"{format_duration(tally.generate_s)} · environment {format_duration(tally.env_s)} "
        f"({tally.env_fraction:.0%})"
    )


def _eval_line(last: EvalEvent | None) -> str:
    if last is None:
        return ""
    return (
        f"\neval at step {last.step} (v{last.version}): accuracy {last.accuracy:.3f} · "
        f"pass@{last.k} {last.pass_at_k:.3f} · {last.n_prompts} prompts"
    )


def _weight_update_panel(state: RunFold) -> Panel:
    update = state.last_update
    if update is None:
        return Panel(
            Text("no weight update yet", style="dim"), title="weight update", title_align="left"
        )
    total = update.total_s
    mean = state.weight_update_total_s / state.weight_updates
    head = Text(
        f"→ v{update.version} in {total:.2f}s · {state.weight_updates} updates, mean {mean:.2f}s"
    )
    phases = update.phases
    table = Table.grid(padding=(0, 1))
    table.add_column(no_wrap=True)
    table.add_column(no_wrap=True)
    table.add_column(justify="right", no_wrap=True)
    ordered = [p for p in PHASE_ORDER if p in phases] + [p for p in phases if p not in PHASE_ORDER]
    for name in ordered:
        seconds = phases[name]
        table.add_row(name.removesuffix("_s"), bar(seconds, total, 16, "blue"), f"{seconds:.2f}s")
    return Panel(Group(head, table, _pause_line(state)), title="weight update", title_align="left")


def _pause_line(state: RunFold) -> Text:
    """ "Pause per update": the seconds the servers generated nothing, last and mean."""
    pauses = state.generation_pauses
    if not pauses:
        return Text("")
    mean = sum(pauses) / len(pauses)
    return Text(f"pause per update ({state.update_mode}): last {pauses[-1]:.3f}s, mean {mean:.3f}s")


def short_node(node: str | None) -> str:
    """A Ray node id is 56 hex digits; its first 12 tell nodes apart."""
    return node[:12] if node else "-"


def _servers_panel(state: RunFold) -> Panel:
    if not state.servers:
        return Panel(Text("no server reported yet", style="dim"), title="servers")
    servers = [state.servers[index] for index in sorted(state.servers)]
    # The node column only when some server runs elsewhere (local processes have none).
    with_node = any(server.node is not None for server in servers)
    last_trouble = {s.server: state.last_incident(s.server) for s in servers}
    with_reason = any(server.reason or last_trouble[server.server] for server in servers)
    headers = ["#", "address", *(["node"] if with_node else []), "state", "version", "restarts"]
    table = Table(box=None, pad_edge=False, padding=(0, 1))
    for header in [*headers, *(["last reason"] if with_reason else [])]:
        numeric = header in ("#", "version", "restarts")
        table.add_column(header, justify="right" if numeric else "left")
    for server in servers:
        row: list[RenderableType] = [str(server.server), server.address]
        if with_node:
            row.append(short_node(server.node) if server.node else "local")
        row += [
            Text(server.state, style=SERVER_STATE_STYLES.get(server.state, "")),
            _n(server.version),
            str(server.restarts),
        ]
        if with_reason:
            # A server back at work keeps showing what it last died of.
            incident = last_trouble[server.server]
            reason = server.reason or (incident.reason if incident is not None else None)
            row.append(Text(reason or "", style="dim"))
        table.add_row(*row)
    return Panel(table, title="servers", title_align="left")


def _log_line(state: RunFold, counters: Mapping[str, Any]) -> str:
    last = state.last_train
    terms = _formula_terms(counters)
    parts = [
        _progress(state),
        f"reward {format_number(last and last.reward)}",
        f"loss {format_number(last and last.loss)}",
        f"cap {_n(terms['capacity'])}"
        f"=min({_n(terms['concurrency_room'])},{_n(terms['staleness_room'])})",
        f"run {_n(terms['running'])}",
        f"queue {_n(as_int(counters.get('queue_size')))}",
    ]
    dropped = as_int(counters.get("dropped_total"))
    reasons = ",".join(f"{r}={n}" for r, n in _drops_by_reason(counters).items())
    parts.append(f"dropped {_n(dropped)}" + (f" ({reasons})" if reasons else ""))
    if state.last_batch is not None:
        parts.append(
            f"lag head≤{_n(max(state.last_batch.head_lags, default=None))} "
            f"tail≤{_n(max(state.last_batch.tail_lags, default=None))}"
        )
    parts.append(f"{format_rate(last and last.gen_tokens_per_s)} gen tok/s")
    parts.append(f"{format_rate(last and last.samples_per_s)} samples/s")
    return "[sdp] " + " · ".join(parts)


def _drops_by_reason(counters: Mapping[str, Any]) -> dict[str, int]:
    by_reason = counters.get("dropped")
    if not isinstance(by_reason, Mapping):
        return {}
    counts = {str(reason): as_int(n) for reason, n in by_reason.items()}
    return {reason: n for reason, n in sorted(counts.items()) if n}


def _n(value: int | None) -> str:
    return "—" if value is None else str(value)


def _mean_text(values: list[int]) -> str:
    return f"{sum(values) / len(values):.2f}" if values else "—"
