"""The demo's report as one self-contained HTML page: figures and four inline SVG charts.

`render(report)` takes the dict of `stack.report.Tally.report()` and returns the page. No
script, no font, no stylesheet or image from elsewhere: the page opens offline and in a
browser that blocks everything external. Charts: score distribution by truth, precision and
recall of the score alone against a threshold, publish-to-verdict delay, decisions over time.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["render"]

WIDTH, HEIGHT = 520, 260
LEFT, RIGHT, TOP, BOTTOM = 56, 16, 30, 42
COLOURS = {
    "fraud": "#c62828",
    "genuine": "#78909c",
    "precision": "#1565c0",
    "recall": "#ef6c00",
    "allow": "#2e7d32",
    "review": "#f9a825",
    "block": "#c62828",
    "delay": "#5e35b1",
}


def _nice_max(value: float) -> float:
    """A round axis maximum at or above value."""
    if value <= 0:
        return 1.0
    step = 10.0 ** len(str(int(value))) / 10
    for factor in (1.0, 2.0, 2.5, 5.0, 10.0):
        if value <= step * factor:
            return step * factor
    return step * 10


def _fmt(value: float) -> str:
    return f"{value:,.0f}" if abs(value) >= 10 or value == int(value) else f"{value:.2g}"


class _Plot:
    """Maps data to pixels inside the frame of one chart."""

    def __init__(self, x_max: float, y_max: float, x_min: float = 0.0) -> None:
        self.x_min, self.x_max, self.y_max = x_min, x_max if x_max > x_min else x_min + 1, y_max
        self.inner_w = WIDTH - LEFT - RIGHT
        self.inner_h = HEIGHT - TOP - BOTTOM

    def x(self, value: float) -> float:
        return LEFT + (value - self.x_min) / (self.x_max - self.x_min) * self.inner_w

    def y(self, value: float) -> float:
        return TOP + self.inner_h - min(value, self.y_max) / self.y_max * self.inner_h


def _frame(plot: _Plot, title: str, x_label: str, y_label: str, y_ticks: int = 4) -> list[str]:
    parts = [
        f'<text class="title" x="{LEFT}" y="18">{html.escape(title)}</text>',
        f'<line class="axis" x1="{LEFT}" y1="{plot.y(0)}" x2="{WIDTH - RIGHT}" y2="{plot.y(0)}"/>',
        f'<line class="axis" x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{plot.y(0)}"/>',
    ]
    for i in range(y_ticks + 1):
        value = plot.y_max * i / y_ticks
        y = plot.y(value)
        parts.append(
            f'<line class="grid" x1="{LEFT}" y1="{y:.1f}" x2="{WIDTH - RIGHT}" y2="{y:.1f}"/>'
        )
        parts.append(
            f'<text class="tick" x="{LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">{_fmt(value)}</text>'
        )
    for i in range(5):
        value = plot.x_min + (plot.x_max - plot.x_min) * i / 4
        x = plot.x(value)
        parts.append(
            f'<text class="tick" x="{x:.1f}" y="{plot.y(0) + 16:.1f}" text-anchor="middle">{_fmt(value)}</text>'
        )
    parts.append(
        f'<text class="label" x="{LEFT + plot.inner_w / 2:.1f}" y="{HEIGHT - 6}" text-anchor="middle">{html.escape(x_label)}</text>'
    )
    parts.append(
        f'<text class="label" transform="translate(14 {TOP + plot.inner_h / 2:.1f}) rotate(-90)" text-anchor="middle">{html.escape(y_label)}</text>'
    )
    return parts


def _legend(names: Sequence[str]) -> list[str]:
    parts = []
    x = WIDTH - RIGHT - 90 * len(names)
    for name in names:
        parts.append(f'<rect x="{x}" y="8" width="10" height="10" fill="{COLOURS[name]}"/>')
        parts.append(f'<text class="tick" x="{x + 14}" y="17">{html.escape(name)}</text>')
        x += 90
    return parts


def _svg(chart_id: str, parts: list[str], description: str) -> str:
    return (
        f'<svg id="{chart_id}" class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" width="{WIDTH}" '
        f'height="{HEIGHT}" role="img" aria-label="{html.escape(description)}" '
        f'xmlns="http://www.w3.org/2000/svg">' + "".join(parts) + "</svg>"
    )


def _polyline(plot: _Plot, points: Sequence[tuple[float, float]], colour: str) -> str:
    path = " ".join(f"{plot.x(x):.1f},{plot.y(y):.1f}" for x, y in points)
    return (
        f'<polyline class="series" fill="none" stroke="{colour}" stroke-width="2" points="{path}"/>'
    )


def score_chart(histogram: Mapping[str, Any]) -> str:
    """Bars: share of frauds and of genuine transactions in each score bin."""
    edges: list[float] = histogram["edges"]
    shares = {}
    for name in ("fraud", "genuine"):
        counts: list[int] = histogram[name]
        total = sum(counts) or 1
        shares[name] = [100 * c / total for c in counts]
    plot = _Plot(1.0, _nice_max(max([*shares["fraud"], *shares["genuine"], 1.0])))
    parts = _frame(plot, "Score by truth", "model score", "% of class")
    parts += _legend(["fraud", "genuine"])
    for index in range(len(edges) - 1):
        left, right = plot.x(edges[index]), plot.x(edges[index + 1])
        half = (right - left) / 2 - 1
        for offset, name in ((0.5, "genuine"), (0.5 + half, "fraud")):
            value = shares[name][index]
            top = plot.y(value)
            parts.append(
                f'<rect class="bar" x="{left + offset:.1f}" y="{top:.1f}" width="{half:.1f}" '
                f'height="{plot.y(0) - top:.1f}" fill="{COLOURS[name]}"><title>{name} '
                f"{edges[index]:.2f}-{edges[index + 1]:.2f}: {value:.1f} %</title></rect>"
            )
    return _svg("score-by-truth", parts, "score distribution of frauds and genuine transactions")


def threshold_chart(curve: Sequence[Mapping[str, Any]]) -> str:
    """Lines: precision and recall of `score > t` against t."""
    plot = _Plot(1.0, 1.0)
    parts = _frame(plot, "Precision and recall vs threshold", "score > threshold", "")
    parts += _legend(["precision", "recall"])
    for name in ("precision", "recall"):
        points = [(p["threshold"], p[name]) for p in curve if p[name] is not None]
        if points:
            parts.append(_polyline(plot, points, COLOURS[name]))
    return _svg("precision-recall", parts, "precision and recall against the score threshold")


def delay_chart(histogram: Mapping[str, Any], delay: Mapping[str, Any]) -> str:
    """Bars: how many verdicts took how long, with p50/p99 marked."""
    edges: list[float] = histogram["edges_ms"]
    counts: list[int] = histogram["counts"]
    plot = _Plot(edges[-1] if edges else 1.0, _nice_max(max(counts, default=1)))
    parts = _frame(plot, "Delay, publish to verdict", "ms", "verdicts")
    for index, count in enumerate(counts):
        left, right = plot.x(edges[index]), plot.x(edges[index + 1])
        top = plot.y(count)
        parts.append(
            f'<rect class="bar" x="{left + 0.5:.1f}" y="{top:.1f}" width="{max(right - left - 1, 1):.1f}" '
            f'height="{plot.y(0) - top:.1f}" fill="{COLOURS["delay"]}"><title>'
            f"{edges[index]:,.0f}-{edges[index + 1]:,.0f} ms: {count:,}</title></rect>"
        )
    for name in ("p50", "p99"):
        value = delay.get(name)
        if value is not None and edges:
            x = plot.x(min(value, edges[-1]))
            parts.append(
                f'<line class="marker" x1="{x:.1f}" y1="{TOP}" x2="{x:.1f}" y2="{plot.y(0)}"/>'
            )
            parts.append(
                f'<text class="tick" x="{x + 3:.1f}" y="{TOP + 10}">{name} {value:,.0f}</text>'
            )
    return _svg("delay", parts, "histogram of publish-to-verdict delays")


def decisions_chart(series: Mapping[str, Any]) -> str:
    """Lines: verdicts per second by decision, over the run."""
    starts: list[float] = series["start_s"]
    top = max([max(series[d], default=0.0) for d in ("allow", "review", "block")] + [1.0])
    plot = _Plot(max(starts, default=1.0), _nice_max(top), x_min=min(starts, default=0.0))
    parts = _frame(plot, "Decisions over time", "seconds into the run", "verdicts/s")
    parts += _legend(["allow", "review", "block"])
    for name in ("allow", "review", "block"):
        parts.append(_polyline(plot, list(zip(starts, series[name], strict=True)), COLOURS[name]))
    return _svg("decisions-over-time", parts, "allow, review and block verdicts per second")


def _ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _figures(report: Mapping[str, Any]) -> str:
    decisions = report["decisions"]
    delay = report["delay_ms"]
    amounts = report["fraud_amount"]
    rows = [
        (
            "stream",
            f"{report['transactions']:,} transactions at {report['rate']:g}/s, "
            f"{report['frauds']:,} fraud; {report['verdicts']:,} verdicts in {report['seconds']:,.0f} s",
        ),
        ("decisions", ", ".join(f"{d} {decisions[d]:,}" for d in ("allow", "review", "block"))),
        (
            "block",
            f"precision {_ratio(report['precision_block'])}, recall {_ratio(report['recall_block'])}",
        ),
        (
            "block or review",
            f"precision {_ratio(report['precision_flagged'])}, recall {_ratio(report['recall_flagged'])}",
        ),
        (
            "fraud amount",
            f"stopped {amounts['blocked']:,.0f}, to review {amounts['reviewed']:,.0f}, "
            f"let through {amounts['let_through']:,.0f}",
        ),
        ("delay", f"p50 {delay['p50']} ms, p95 {delay['p95']} ms, p99 {delay['p99']} ms"),
        ("labels", f"{report['labels_sent']:,} sent, {report['labels_applied']:,} applied"),
    ]
    body = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in rows)
    scenario_rows = "".join(
        f"<tr><td>{s['scenario']}: {html.escape(s['name'])}</td><td>{s['frauds']:,}</td>"
        f"<td>{s['blocked']:,}</td><td>{s['reviewed']:,}</td><td>{s['missed']:,}</td></tr>"
        for s in report["scenarios"]
    )
    rule_rows = "".join(
        f"<tr><td>{html.escape(r['rule'])}</td><td>{html.escape(r['action'] or '-')}"
        f"{' (shadow)' if r['shadow'] else ''}</td><td>{r['fired']:,}</td>"
        f"<td>{r['fraud']:,}</td><td>{_ratio(r['precision'])}</td></tr>"
        for r in report["rules"]
    )
    return (
        f'<table class="figures">{body}</table>'
        "<table><caption>Frauds by scenario</caption><tr><th>scenario</th><th>frauds</th>"
        f"<th>blocked</th><th>reviewed</th><th>missed</th></tr>{scenario_rows}</table>"
        "<table><caption>Rules that fired most</caption><tr><th>rule</th><th>action</th>"
        f"<th>fired</th><th>fraud</th><th>precision</th></tr>{rule_rows}</table>"
    )


_CSS = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 24px; color: #222; }
h1 { font-size: 20px; }
table { border-collapse: collapse; margin: 12px 24px 12px 0; display: inline-table;
        vertical-align: top; }
th, td { padding: 2px 10px; text-align: left; border-bottom: 1px solid #eee; }
caption { text-align: left; font-weight: bold; padding-bottom: 4px; }
.charts { display: flex; flex-wrap: wrap; gap: 16px; }
.chart { background: #fff; border: 1px solid #ddd; }
.title { font-size: 13px; font-weight: bold; }
.tick, .label { font-size: 11px; fill: #555; }
.axis { stroke: #444; }
.grid { stroke: #eee; }
.marker { stroke: #222; stroke-dasharray: 3 3; }
"""


def render(report: Mapping[str, Any]) -> str:
    """The page for a report from `Tally.report()`."""
    charts = report["charts"]
    svgs = [
        score_chart(charts["score_histogram"]),
        threshold_chart(charts["threshold_curve"]),
        delay_chart(charts["delay_histogram"], report["delay_ms"]),
        decisions_chart(charts["decisions_over_time"]),
    ]
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        "<title>Fraud detector demo report</title>"
        f"<style>{_CSS}</style></head><body>"
        "<h1>Fraud detector demo report</h1>"
        f"{_figures(report)}"
        f'<div class="charts">{"".join(svgs)}</div>'
        "</body></html>\n"
    )
