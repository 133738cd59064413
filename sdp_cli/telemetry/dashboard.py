"""Live dashboard of a training run, fed the same events as the run log.

The training loop wraps its event log so every event also reaches the dashboard:

    dashboard = Dashboard(snapshots=[executor.snapshot])
    events = dashboard.wrap(EventLog(run_dir / "events.jsonl"))
    with dashboard:                      # Rich Live on a terminal, log lines otherwise
        ...  events.emit("train_step", step=..., ...)

Cost to the emitting thread: `emit` only stores fields under a lock (O(1) per event, bounded
history). Rendering happens in Rich's refresh thread, at most 4 times per second, from a copy of
the state taken under the lock; snapshot callables are called there too, never by `emit`. When
stdout is not a terminal, each `train_step` prints one concise line instead.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from sdp_cli.telemetry.events import EventSink
from sdp_cli.telemetry.fields import (
    as_float,
    as_float_map,
    as_int,
    as_int_list,
    as_lag_counts,
    as_str,
)
from sdp_cli.telemetry.staleness import CAPACITY_TERMS
from sdp_cli.telemetry.widgets import (
    bar,
    format_duration,
    format_number,
    format_rate,
    lag_histogram,
    sparkline,
)

# A snapshot returns live executor counters (RolloutExecutor.snapshot() fits): the `capacity`
# event's keys (version, running, accepted_live, staleness_limit, max_concurrent, submitted,
# rejected, dropped_total, consumed, queue_size, ...), plus optionally accepted_total and
# dropped ({reason: n}). They override the values counted from events when rendering.
SnapshotFn = Callable[[], Mapping[str, Any]]

MAX_REFRESH_PER_SECOND = 4.0
# The formula's terms, named as in the `capacity` event (one list for the report and the view).
CAPACITY_KEYS = CAPACITY_TERMS
# Below this console width the panels are stacked in one column.
TWO_COLUMN_WIDTH = 110
HISTORY = 120
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


@dataclass
class _State:
    """Everything the dashboard shows, as of the last event. Guarded by Dashboard._lock."""

    run: dict[str, Any] = field(default_factory=dict)
    start_ts: float | None = None
    last_ts: float | None = None
    version: int | None = None
    step: int | None = None
    steps_done: int = 0
    # Steps seen by this dashboard: a resumed run's earlier steps took no time here.
    steps_seen: int = 0
    last_step_ts: float | None = None
    finished: bool = False
    capacity: dict[str, Any] = field(default_factory=dict)
    submitted: int = 0
    accepted: int = 0
    rejected: int = 0
    drops: Counter[str] = field(default_factory=Counter)
    consumed: int = 0
    last_batch: dict[str, Any] | None = None
    last_update: dict[str, Any] | None = None
    weight_updates: int = 0
    weight_update_total_s: float = 0.0
    servers: dict[int, dict[str, Any]] = field(default_factory=dict)
    last_train: dict[str, Any] | None = None
    rewards: deque[float] = field(default_factory=lambda: deque(maxlen=HISTORY))
    losses: deque[float] = field(default_factory=lambda: deque(maxlen=HISTORY))
    gen_tokens_per_s: deque[float] = field(default_factory=lambda: deque(maxlen=HISTORY))
    samples_per_s: deque[float] = field(default_factory=lambda: deque(maxlen=HISTORY))

    def copy(self) -> _State:
        """A copy the renderer may read without the lock (containers are small and bounded)."""
        return _State(
            run=dict(self.run),
            start_ts=self.start_ts,
            last_ts=self.last_ts,
            version=self.version,
            step=self.step,
            steps_done=self.steps_done,
            steps_seen=self.steps_seen,
            last_step_ts=self.last_step_ts,
            finished=self.finished,
            capacity=dict(self.capacity),
            submitted=self.submitted,
            accepted=self.accepted,
            rejected=self.rejected,
            drops=Counter(self.drops),
            consumed=self.consumed,
            last_batch=dict(self.last_batch) if self.last_batch else None,
            last_update=dict(self.last_update) if self.last_update else None,
            weight_updates=self.weight_updates,
            weight_update_total_s=self.weight_update_total_s,
            servers={i: dict(s) for i, s in self.servers.items()},
            last_train=dict(self.last_train) if self.last_train else None,
            rewards=deque(self.rewards),
            losses=deque(self.losses),
            gen_tokens_per_s=deque(self.gen_tokens_per_s),
            samples_per_s=deque(self.samples_per_s),
        )


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
        self._state = _State()
        self._live: Live | None = None
        self._started = False
        self.ignored_errors = 0

    # --- feeding ----------------------------------------------------------------------------

    def wrap(self, sink: EventSink) -> DashboardSink:
        """An EventSink that writes to `sink` and then updates this dashboard."""
        return DashboardSink(sink, self)

    def add_snapshot(self, snapshot: SnapshotFn) -> None:
        with self._lock:
            self._snapshots.append(snapshot)

    def emit(self, type: str, **fields: Any) -> None:
        """EventSink interface: the same call the event log gets."""
        self.update({"ts": time.time(), "type": type, **fields})

    def feed(self, events: Iterable[Mapping[str, Any]]) -> None:
        """Replay logged events (tests, or showing a recorded run)."""
        for event in events:
            self.update(event)

    def update(self, event: Mapping[str, Any]) -> None:
        try:
            with self._lock:
                _apply(self._state, event)
            if event.get("type") == "train_step" and self._started and not self.live:
                self.console.print(self.log_line(), markup=False, highlight=False, soft_wrap=True)
        except Exception:
            # A display bug must never stop training; the count shows up in the header.
            self.ignored_errors += 1

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
        parts: list[RenderableType] = [_dashboard_header(state, self.ignored_errors), grid]
        if problems:
            parts.append(Text("; ".join(problems), style="dim red"))
        return Group(*parts)

    def _render_for_live(self) -> RenderableType:
        # An exception here would kill Rich's refresh thread and freeze the screen for the rest
        # of the run; show it in place of the dashboard instead.
        try:
            return self.render()
        except Exception as exc:
            self.ignored_errors += 1
            return Text(f"dashboard render failed: {exc!r}", style="red")

    def log_line(self) -> str:
        """One line for non-terminal output: progress, capacity, drops, lag, throughput."""
        state, counters, _ = self._view()
        return _log_line(state, counters)

    def _view(self) -> tuple[_State, dict[str, Any], list[str]]:
        with self._lock:
            state = self._state.copy()
            snapshots = list(self._snapshots)
        # Counts come from the events seen (they are never older than the last capacity event);
        # live snapshots, when given, are newer still and win.
        counters = {
            **state.capacity,
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

    def emit(self, type: str, **fields: Any) -> None:
        self.inner.emit(type, **fields)
        self.dashboard.emit(type, **fields)

    def close(self) -> None:
        close = getattr(self.inner, "close", None)
        if callable(close):
            close()


# --- state updates (under the lock; constant work per event, a batch's lags for batch_taken) --


def _apply(state: _State, event: Mapping[str, Any]) -> None:
    ts = as_float(event.get("ts"))
    if ts is not None:
        state.start_ts = ts if state.start_ts is None else state.start_ts
        state.last_ts = ts
    handler = _HANDLERS.get(str(event.get("type")))
    if handler is not None:
        handler(state, event)


def _on_run_started(state: _State, event: Mapping[str, Any]) -> None:
    state.run = {k: v for k, v in event.items() if k not in ("ts", "type")}
    state.start_ts = as_float(event.get("ts")) or state.start_ts


def _on_run_finished(state: _State, event: Mapping[str, Any]) -> None:
    state.finished = True


def _on_rollout_submitted(state: _State, event: Mapping[str, Any]) -> None:
    state.submitted += 1


def _on_rollout_finished(state: _State, event: Mapping[str, Any]) -> None:
    if event.get("accepted") is True:
        state.accepted += 1
    elif as_str(event.get("reason")) not in ("head_lag", "no_recompute"):
        # Staleness drops are counted from their own sample_dropped event.
        state.rejected += 1


def _on_sample_dropped(state: _State, event: Mapping[str, Any]) -> None:
    state.drops[as_str(event.get("reason")) or "unknown"] += 1


def _on_batch_taken(state: _State, event: Mapping[str, Any]) -> None:
    head_lags = as_int_list(event.get("head_lags"))
    state.last_batch = {
        "step": as_int(event.get("step")),
        "version": as_int(event.get("version")),
        "head_lags": head_lags,
        "tail_lags": as_int_list(event.get("tail_lags")),
        "tokens_by_lag": as_lag_counts(event.get("tokens_by_lag")),
        "wait_s": as_float(event.get("wait_s")),
    }
    rollout_ids = event.get("rollout_ids")
    state.consumed += len(rollout_ids) if isinstance(rollout_ids, list) else len(head_lags)
    _set_version(state, event)


def _on_capacity(state: _State, event: Mapping[str, Any]) -> None:
    state.capacity = {k: v for k, v in event.items() if k not in ("ts", "type")}
    _set_version(state, event)


def _on_weight_update(state: _State, event: Mapping[str, Any]) -> None:
    phases = as_float_map(event.get("phases"))
    total = as_float(event.get("total_s"))
    total = total if total is not None else sum(phases.values())
    state.last_update = {"version": as_int(event.get("version")), "phases": phases, "total": total}
    state.weight_updates += 1
    state.weight_update_total_s += total
    _set_version(state, event)


def _on_server_state(state: _State, event: Mapping[str, Any]) -> None:
    index = as_int(event.get("index"))
    if index is not None:
        state.servers[index] = {k: v for k, v in event.items() if k not in ("ts", "type")}


def _on_train_step(state: _State, event: Mapping[str, Any]) -> None:
    state.last_train = {k: v for k, v in event.items() if k not in ("ts", "type")}
    step = as_int(event.get("step"))
    state.step = step
    state.steps_done = step + 1 if step is not None else state.steps_done + 1
    state.steps_seen += 1
    state.last_step_ts = as_float(event.get("ts"))
    for series, key in (
        (state.rewards, "reward"),
        (state.losses, "loss"),
        (state.gen_tokens_per_s, "gen_tokens_per_s"),
        (state.samples_per_s, "samples_per_s"),
    ):
        value = as_float(event.get(key))
        if value is not None:
            series.append(value)


def _set_version(state: _State, event: Mapping[str, Any]) -> None:
    version = as_int(event.get("version"))
    if version is not None and (state.version is None or version > state.version):
        state.version = version


_HANDLERS: dict[str, Callable[[_State, Mapping[str, Any]], None]] = {
    "run_started": _on_run_started,
    "run_finished": _on_run_finished,
    "rollout_submitted": _on_rollout_submitted,
    "rollout_finished": _on_rollout_finished,
    "sample_dropped": _on_sample_dropped,
    "batch_taken": _on_batch_taken,
    "capacity": _on_capacity,
    "weight_update": _on_weight_update,
    "server_state": _on_server_state,
    "train_step": _on_train_step,
}


# --- rendering (refresh thread; reads a private copy of the state) ---------------------------


def _eta_s(state: _State) -> float | None:
    total = as_int(state.run.get("steps"))
    if total is None or state.steps_seen == 0:
        return None
    if state.start_ts is None or state.last_step_ts is None:
        return None
    per_step = (state.last_step_ts - state.start_ts) / state.steps_seen
    return max(0, total - state.steps_done) * per_step


def _progress(state: _State) -> str:
    total = as_int(state.run.get("steps"))
    step = f"step {state.steps_done}/{total}" if total is not None else f"step {state.steps_done}"
    version = f"v{state.version}" if state.version is not None else "v—"
    eta = "finished" if state.finished else f"ETA {format_duration(_eta_s(state))}"
    return f"{version} · {step} · {eta}"


def _dashboard_header(state: _State, ignored_errors: int) -> RenderableType:
    run = state.run
    elapsed = (
        state.last_ts - state.start_ts
        if state.last_ts is not None and state.start_ts is not None
        else None
    )
    text = Text()
    text.append(f"sdp · run {run.get('run', '?')} · ", style="bold")
    text.append(_progress(state), style="bold cyan")
    text.append(f" · elapsed {format_duration(elapsed)}")
    text.append(
        f"   strategy {run.get('strategy', '?')} · η={run.get('max_staleness', '?')} · "
        f"B={run.get('batch_size', '?')} · prox {run.get('prox_mode', '?')}",
        style="dim",
    )
    if ignored_errors:
        text.append(f" · {ignored_errors} display errors ignored", style="red")
    return text


def _capacity_panel(state: _State, counters: Mapping[str, Any]) -> Panel:
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
    terms = {key: as_int(counters.get(key)) for key in CAPACITY_KEYS}
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


def _counters_panel(state: _State, counters: Mapping[str, Any]) -> Panel:
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
    table.add_row("rejected", str(pick("rejected", 0)), "by the workflow")
    reasons = " · ".join(f"{reason} {n}" for reason, n in _drops_by_reason(counters).items())
    table.add_row("dropped", str(dropped_total), reasons or "stale samples")
    table.add_row("consumed", str(pick("consumed", 0)), "trained on")
    table.add_row("queue", _n(as_int(counters.get("queue_size"))), "waiting for the trainer")
    return Panel(table, title="rollouts", title_align="left")


def _batch_panel(state: _State, counters: Mapping[str, Any]) -> Panel:
    batch = state.last_batch
    if batch is None:
        return Panel(Text("no batch taken yet", style="dim"), title="last batch")
    head, tail = batch["head_lags"], batch["tail_lags"]
    summary = Text()
    summary.append(f"step {_n(batch['step'])} at v{_n(batch['version'])}", style="bold")
    summary.append(f" · waited {format_duration(batch['wait_s'])}")
    summary.append(
        f"\nhead lag max {_n(max(head, default=None))} mean {_mean_text(head)} · "
        f"tail lag max {_n(max(tail, default=None))} mean {_mean_text(tail)}"
    )
    summary.append(f" · queue {_n(as_int(counters.get('queue_size')))}")
    histogram = lag_histogram(batch["tokens_by_lag"], unit="tokens", width=16, style="magenta")
    return Panel(
        Group(summary, histogram), title="last batch: tokens by version lag", title_align="left"
    )


def _training_panel(state: _State) -> Panel:
    last = state.last_train or {}
    table = Table.grid(padding=(0, 1))
    table.add_column(style="bold", no_wrap=True)
    table.add_column(justify="right", no_wrap=True)
    table.add_column(style="cyan", no_wrap=True)
    table.add_row("reward", format_number(as_float(last.get("reward"))), sparkline(state.rewards))
    table.add_row("loss", format_number(as_float(last.get("loss"))), sparkline(state.losses))
    table.add_row(
        "gen tokens/s",
        format_rate(as_float(last.get("gen_tokens_per_s"))),
        sparkline(state.gen_tokens_per_s),
    )
    table.add_row(
        "samples/s",
        format_rate(as_float(last.get("samples_per_s"))),
        sparkline(state.samples_per_s),
    )
    details = Text(
        f"clip {format_number(as_float(last.get('clip_frac')))} · behav w mean "
        f"{format_number(as_float(last.get('behav_weight_mean')))} max "
        f"{format_number(as_float(last.get('behav_weight_max')))} · masked "
        f"{format_number(as_float(last.get('masked_frac')))} · step "
        f"{format_duration(as_float(last.get('step_s')))}",
        style="dim",
    )
    return Panel(Group(table, details), title="training", title_align="left")


def _weight_update_panel(state: _State) -> Panel:
    update = state.last_update
    if update is None:
        return Panel(
            Text("no weight update yet", style="dim"), title="weight update", title_align="left"
        )
    total: float = update["total"]
    mean = state.weight_update_total_s / state.weight_updates
    head = Text(
        f"→ v{_n(update['version'])} in {total:.2f}s · {state.weight_updates} updates, "
        f"mean {mean:.2f}s"
    )
    phases: dict[str, float] = update["phases"]
    table = Table.grid(padding=(0, 1))
    table.add_column(no_wrap=True)
    table.add_column(no_wrap=True)
    table.add_column(justify="right", no_wrap=True)
    ordered = [p for p in PHASE_ORDER if p in phases] + [p for p in phases if p not in PHASE_ORDER]
    for name in ordered:
        seconds = phases[name]
        table.add_row(name.removesuffix("_s"), bar(seconds, total, 16, "blue"), f"{seconds:.2f}s")
    return Panel(Group(head, table), title="weight update", title_align="left")


def _servers_panel(state: _State) -> Panel:
    if not state.servers:
        return Panel(Text("no server reported yet", style="dim"), title="servers")
    table = Table(box=None, pad_edge=False, padding=(0, 1))
    for header in ("#", "address", "state", "version", "in flight", "restarts"):
        table.add_column(header, justify="left" if header in ("address", "state") else "right")
    for index in sorted(state.servers):
        server = state.servers[index]
        server_state = as_str(server.get("state")) or "?"
        table.add_row(
            str(index),
            str(server.get("address", "?")),
            Text(server_state, style=SERVER_STATE_STYLES.get(server_state, "")),
            _n(as_int(server.get("version"))),
            _n(as_int(server.get("in_flight"))),
            _n(as_int(server.get("restarts"))),
        )
    return Panel(table, title="servers", title_align="left")


def _log_line(state: _State, counters: Mapping[str, Any]) -> str:
    last = state.last_train or {}
    terms = _formula_terms(counters)
    parts = [
        _progress(state),
        f"reward {format_number(as_float(last.get('reward')))}",
        f"loss {format_number(as_float(last.get('loss')))}",
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
            f"lag head≤{_n(max(state.last_batch['head_lags'], default=None))} "
            f"tail≤{_n(max(state.last_batch['tail_lags'], default=None))}"
        )
    parts.append(f"{format_rate(as_float(last.get('gen_tokens_per_s')))} gen tok/s")
    parts.append(f"{format_rate(as_float(last.get('samples_per_s')))} samples/s")
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
