"""How the watcher shows a `Tally`: a live panel (rich) or plain lines, and the final text report.

On a terminal the live figures are a rich panel redrawn a few times a second. Anywhere else
(a pipe, a file, CI) a redrawn panel would be noise, so `LiveView` writes one plain line every
`interval` seconds instead. Both read `Tally.live()`; the final report is `format_report()`
of `Tally.summary()`. The numbers come from publisher.report; this module only lays them out.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any, TextIO

from rich.console import Console
from rich.live import Live
from rich.table import Table

from publisher.report import RateMeter, Tally

__all__ = ["LiveView", "format_live_line", "format_report", "live_table"]

#: Redraws of the live panel per second, at most.
REFRESH_PER_SECOND = 4


def _ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:,.0f} ms"


def _decisions(decisions: Mapping[str, int]) -> str:
    return ", ".join(f"{name} {count:,}" for name, count in decisions.items())


def format_live_line(figures: Mapping[str, Any], rate: float) -> str:
    """One line of live figures (from `Tally.live()`) for a log or a pipe."""
    lag = figures["lag_ms"]
    line = (
        f"watch: {figures['verdicts']:,} verdicts, {rate:,.0f}/s; "
        f"{_decisions(figures['decisions'])}; lag p50 {_ms(lag['p50'])}, p99 {_ms(lag['p99'])}"
    )
    if figures["labelled"]:
        line += (
            f"; frauds caught {figures['caught_flagged']:,} of {figures['frauds']:,} "
            f"(blocked {figures['caught_block']:,}); "
            f"flagged precision {_ratio(figures['precision_flagged'])} "
            f"recall {_ratio(figures['recall_flagged'])}; "
            f"block precision {_ratio(figures['precision_block'])} "
            f"recall {_ratio(figures['recall_block'])}"
        )
    return line


def live_table(figures: Mapping[str, Any], rate: float) -> Table:
    """The live figures as a rich table."""
    table = Table(title="verdicts", show_header=False, box=None, padding=(0, 2))
    table.add_column(style="bold")
    table.add_column(justify="right")
    table.add_column(justify="right")
    table.add_column(justify="right")
    lag = figures["lag_ms"]
    decisions = figures["decisions"]
    table.add_row("verdicts", f"{figures['verdicts']:,}", f"{rate:,.0f}/s", "")
    table.add_row(
        "decisions",
        f"allow {decisions.get('allow', 0):,}",
        f"review {decisions.get('review', 0):,}",
        f"block {decisions.get('block', 0):,}",
    )
    table.add_row("lag", f"p50 {_ms(lag['p50'])}", f"p99 {_ms(lag['p99'])}", "")
    if figures["labelled"]:
        table.add_row(
            "frauds caught",
            f"{figures['caught_flagged']:,} of {figures['frauds']:,}",
            f"blocked {figures['caught_block']:,}",
            "",
        )
        for name, key in (("flagged", "flagged"), ("block", "block")):
            table.add_row(
                name,
                f"precision {_ratio(figures['precision_' + key])}",
                f"recall {_ratio(figures['recall_' + key])}",
                "",
            )
    return table


class LiveView:
    """Shows a Tally's live figures while verdicts come in: a rich panel or plain lines.

    Args:
        stream: where to draw; a terminal gets the panel, anything else a line every
            `interval` seconds.
        interval: seconds between plain lines.
        clock: monotonic seconds (a seam for tests).
        force_terminal: draw the panel (True) or lines (False) whatever `stream` is.
    """

    def __init__(
        self,
        stream: TextIO,
        interval: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        force_terminal: bool | None = None,
    ) -> None:
        self._stream = stream
        self._interval = interval
        self._clock = clock
        self._meter = RateMeter()
        self.terminal = stream.isatty() if force_terminal is None else force_terminal
        self._live: Live | None = None
        self._tally: Tally | None = None
        self._last_total = 0
        now = clock()
        self._next = now + (1 / REFRESH_PER_SECOND if self.terminal else interval)
        self._meter.observe(now, 0)
        if self.terminal:
            console = Console(file=stream, force_terminal=True)
            # Redrawn from update() only: a refresh thread would read the tally while it changes.
            self._live = Live(console=console, auto_refresh=False, transient=True)
            self._live.start()

    def update(self, tally: Tally) -> None:
        """Note the tally's progress; redraw when due. Call it often, also when idle."""
        self._tally = tally
        now = self._clock()
        if now < self._next:
            return
        self._meter.observe(now, tally.total)
        self._draw(tally)
        self._next = now + (1 / REFRESH_PER_SECOND if self.terminal else self._interval)

    def _draw(self, tally: Tally) -> None:
        figures = tally.live()
        if self._live is not None:
            self._live.update(live_table(figures, self._meter.rate), refresh=True)
        elif tally.total != self._last_total:  # an idle watcher does not repeat itself
            self._stream.write(format_live_line(figures, self._meter.rate) + "\n")
            self._stream.flush()
        self._last_total = tally.total

    def close(self) -> None:
        """Remove the panel, or write a last line if the figures moved since the previous one."""
        if self._live is not None:
            self._live.stop()
            self._live = None
        elif self._tally is not None and self._tally.total != self._last_total:
            self._meter.observe(self._clock(), self._tally.total)
            self._draw(self._tally)

    def __enter__(self) -> LiveView:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def format_report(report: Mapping[str, Any]) -> str:
    """The final report (`Tally.summary()`, with `stopped_by` and `seconds`) as text."""
    lines = [
        f"verdicts: {report['verdicts']:,} in {report['seconds']:.1f} s "
        f"(stopped by {report['stopped_by']}; {report['duplicates']:,} duplicates ignored)",
        f"decisions: {_decisions(report['decisions'])}",
    ]
    delay = report["delay_ms"]
    if delay["count"]:
        lines.append(
            f"delay publish->verdict (ms, n={delay['count']:,}): p50 {delay['p50']}, "
            f"p95 {delay['p95']}, p99 {delay['p99']}, max {delay['max']}"
        )
    else:
        lines.append("delay publish->verdict: no source_publish_time attributes seen")
    if report["labelled"]:
        lines += [
            f"labelled: {report['labelled']:,} (unlabelled {report['unlabelled']:,}), "
            f"{report['frauds']:,} fraud",
            "                    precision  recall  frauds caught",
            f"  block or review   {_ratio(report['precision_flagged']):>9}  "
            f"{_ratio(report['recall_flagged']):>6}  {report['caught_flagged']:>13,}",
            f"  block             {_ratio(report['precision_block']):>9}  "
            f"{_ratio(report['recall_block']):>6}  {report['caught_block']:>13,}",
        ]
        if report["by_scenario"]:
            lines.append("by scenario:                 frauds  caught  blocked  missed")
            for key, s in report["by_scenario"].items():
                name = f"{key} {s['name']}" if key.isdigit() else s["name"]
                lines.append(
                    f"  {name:<26}{s['frauds']:>7,}{s['caught']:>8,}{s['blocked']:>9,}"
                    f"{s['missed']:>8,}"
                )
        lines.append(
            f"fraud amount: stopped {report['amount_stopped']:,.2f}, "
            f"in review {report['amount_reviewed']:,.2f}, "
            f"let through {report['amount_missed']:,.2f}"
        )
    if report["top_rules"]:
        width = max(len("rules fired most:"), *(len(r["rule"]) + 2 for r in report["top_rules"]))
        lines.append(f"{'rules fired most:':<{width}}    fired  precision")
        for rule in report["top_rules"]:
            lines.append(
                f"  {rule['rule']:<{width - 2}}{rule['fired']:>9,}  {_ratio(rule['precision']):>9}"
            )
    return "\n".join(lines)
