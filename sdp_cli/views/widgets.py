"""Small text widgets shared by the dashboard and `sdp inspect-staleness`: bars, sparklines,
lag histograms and number formats. Plain characters, so a recorded console shows them too."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from rich.table import Table
from rich.text import Text

SPARK_CHARS = "▁▂▃▄▅▆▇█"
FULL = "█"
EMPTY = "░"


def bar(value: float, total: float, width: int = 20, style: str = "cyan") -> Text:
    """A horizontal bar of `width` cells, filled in proportion value/total (clamped to 0..1)."""
    fraction = 0.0 if total <= 0 else min(1.0, max(0.0, value / total))
    filled = round(fraction * width)
    text = Text(FULL * filled, style=style)
    text.append(EMPTY * (width - filled), style="grey35")
    return text


def sparkline(values: Sequence[float], width: int = 30) -> str:
    """The last `width` values as block characters scaled between their min and max."""
    recent = list(values)[-width:]
    if not recent:
        return ""
    low, high = min(recent), max(recent)
    if high == low:
        return SPARK_CHARS[len(SPARK_CHARS) // 2] * len(recent)
    scale = (len(SPARK_CHARS) - 1) / (high - low)
    return "".join(SPARK_CHARS[round((v - low) * scale)] for v in recent)


def lag_histogram(
    counts: Mapping[int, int], *, unit: str, width: int = 24, style: str = "cyan"
) -> Table:
    """One row per lag: `lag 1  ██████░░  12 samples (40%)`. Lags with no count in between
    are shown as zero rows so the shape is not misread."""
    table = Table.grid(padding=(0, 1))
    table.add_column(justify="right", style="bold")
    table.add_column()
    table.add_column(justify="right")
    table.add_column(justify="right", style="dim")
    if not counts:
        table.add_row("", Text(f"no {unit} yet", style="dim"), "", "")
        return table
    total = sum(counts.values())
    peak = max(counts.values())
    for lag in range(min(min(counts), 0), max(counts) + 1):
        n = counts.get(lag, 0)
        share = f"{n / total:.0%}" if total else ""
        table.add_row(f"lag {lag}", bar(n, peak, width, style), f"{n} {unit}", share)
    return table


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    seconds = max(0.0, seconds)
    if 0 < seconds < 1:
        # A tiny model's optimizer step takes milliseconds; "0.0s" would say nothing.
        return f"{seconds * 1000:.0f}ms"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def format_rate(value: float | None) -> str:
    """1234.5 → '1.2k', keeping three significant figures at most."""
    if value is None:
        return "—"
    for limit, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= limit:
            return f"{value / limit:.1f}{suffix}"
    return f"{value:.1f}" if abs(value) < 100 else f"{value:.0f}"


def format_number(value: float | None, digits: int = 3) -> str:
    """Significant figures for small values (loss 0.0123), thousands separators for big ones."""
    if value is None:
        return "—"
    if isinstance(value, int):
        return str(value)
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.{digits}g}"
