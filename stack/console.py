"""The demo in the terminal: live figures while the stream runs, then the report as tables.

Drawn with rich. Off a terminal (CI, a pipe) the live view draws nothing and the final
report prints as plain tables.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

from rich.console import Console, Group
from rich.live import Live as RichLive
from rich.table import Table
from rich.text import Text

from publisher.report import DECISIONS

__all__ = ["LiveView", "live_view", "print_report", "report_tables"]

_STYLE = {"allow": "green", "review": "yellow", "block": "bold red"}


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f} ms"


def _ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _money(value: float) -> str:
    return f"{value:,.0f}"


class LiveView:
    """A live panel: progress, rate, decisions, lag, frauds caught so far."""

    def __init__(self, live: RichLive) -> None:
        self._live = live

    def update(
        self, figures: Mapping[str, Any], rate: float, sent: int, total: int, elapsed: float
    ) -> None:
        self._live.update(live_table(figures, rate, sent, total, elapsed))


def live_table(
    figures: Mapping[str, Any], rate: float, sent: int, total: int, elapsed: float
) -> Table:
    """The live panel's table, of `Tally.live()` and the verdicts' rate."""
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold")
    table.add_column()
    table.add_row("elapsed", f"{elapsed:,.0f} s")
    table.add_row("published", f"{sent:,} / {total:,}")
    table.add_row("verdicts", f"{figures['verdicts']:,}  ({rate:,.0f}/s)")
    decisions = Text()
    for name in DECISIONS:
        decisions.append(f"{name} {figures['decisions'].get(name, 0):,}  ", style=_STYLE[name])
    table.add_row("decisions", decisions)
    lag = figures["lag_ms"]
    table.add_row("lag", f"p50 {_ms(lag['p50'])}  p99 {_ms(lag['p99'])}")
    table.add_row("frauds caught", f"{figures['caught_flagged']:,} of {figures['frauds']:,} so far")
    return table


@contextlib.contextmanager
def live_view(console: Console | None = None) -> Iterator[LiveView | None]:
    """A live panel on a terminal; None elsewhere (nothing to redraw in a log)."""
    console = console or Console()
    if not console.is_terminal:
        yield None
        return
    with RichLive(console=console, refresh_per_second=4, transient=False) as live:
        yield LiveView(live)


def report_tables(report: Mapping[str, Any]) -> Group:
    """The final report as rich tables."""
    head = Table(title="Demo report", show_header=False, title_justify="left")
    head.add_column(style="bold")
    head.add_column()
    decisions = report["decisions"]
    head.add_row(
        "stream",
        f"{report['transactions']:,} transactions at {report['rate']:g}/s, "
        f"{report['frauds']:,} of them fraud; {report['verdicts']:,} verdicts in "
        f"{report['seconds']:,.0f} s ({report['missing']:,} missing)",
    )
    head.add_row("decisions", ", ".join(f"{d} {decisions[d]:,}" for d in DECISIONS))
    head.add_row(
        "block",
        f"precision {_ratio(report['precision_block'])}, recall {_ratio(report['recall_block'])}",
    )
    head.add_row(
        "block or review",
        f"precision {_ratio(report['precision_flagged'])}, "
        f"recall {_ratio(report['recall_flagged'])}",
    )
    amounts = report["fraud_amount"]
    head.add_row(
        "fraud amount",
        f"stopped {_money(amounts['blocked'])}, sent to review {_money(amounts['reviewed'])}, "
        f"let through {_money(amounts['let_through'])}",
    )
    delay = report["delay_ms"]
    head.add_row(
        "delay publish->verdict",
        f"p50 {_ms(delay['p50'])}, p95 {_ms(delay['p95'])}, p99 {_ms(delay['p99'])} "
        f"at {report['rate']:g}/s",
    )
    head.add_row(
        "labels",
        f"{report['labels_sent']:,} chargebacks sent, {report['labels_applied']:,} applied "
        "by record_feedback",
    )

    scenarios = Table(title="Frauds by scenario", title_justify="left")
    for column in ("scenario", "frauds", "blocked", "reviewed", "missed"):
        scenarios.add_column(column, justify="left" if column == "scenario" else "right")
    for row in report["scenarios"]:
        scenarios.add_row(
            f"{row['scenario']}: {row['name']}",
            f"{row['frauds']:,}",
            f"{row['blocked']:,}",
            f"{row['reviewed']:,}",
            f"{row['missed']:,}",
        )

    rules = Table(title="Rules that fired most", title_justify="left")
    for column in ("rule", "action", "fired", "fraud", "precision"):
        rules.add_column(column, justify="left" if column in ("rule", "action") else "right")
    for row in report["rules"]:
        action = (row["action"] or "-") + (" (shadow)" if row["shadow"] else "")
        rules.add_row(
            row["rule"], action, f"{row['fired']:,}", f"{row['fraud']:,}", _ratio(row["precision"])
        )
    return Group(head, scenarios, rules)


def print_report(report: Mapping[str, Any], console: Console | None = None) -> None:
    """Print the final report."""
    (console or Console()).print(report_tables(report))
