"""The demo's HTML report in a real browser: headless Chromium draws its charts, quietly."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import pytest

from publisher.labels import Label
from publisher.report import Reason, Verdict
from stack.report import Tally
from stack.report_html import render

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# Offline and quiet: no update checks, no background fetches, nothing that could log an error
# of its own in the page's console.
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]

pytestmark = pytest.mark.skipif(
    not Path(CHROMIUM).exists(),
    reason="chromium is not installed (Debian: apt-get install chromium); CI installs it",
)


def sample_report() -> dict[str, object]:
    """A report from 2,000 made-up verdicts: frauds score high, delays spread over 30-400 ms."""
    rng = random.Random(18)
    truth = {f"t{i}": Label(i % 40 == 0, 1 + i % 3 if i % 40 == 0 else None) for i in range(2000)}
    tally = Tally(truth)
    for i, (tid, fact) in enumerate(truth.items()):
        score = min(0.999, rng.betavariate(5, 1.5) if fact.is_fraud else rng.betavariate(1, 30))
        decision = "block" if score > 0.9 else "review" if score > 0.5 else "allow"
        reasons = (Reason(f"model-{decision}", decision, False),) if decision != "allow" else ()
        verdict = Verdict(tid, decision, rng.uniform(0.03, 0.4), 20.0 + i % 50, reasons, score)
        tally.add(verdict, i / 100)
    return tally.report(rate=100.0, seconds=20.0, labels_sent=50, labels_applied=50)


def test_report_page_renders_its_charts_without_console_errors(tmp_path: Path) -> None:
    """Four SVG charts with drawn bars and lines; no console error, no request leaves the page."""
    from playwright.sync_api import sync_playwright

    page_file = tmp_path / "report.html"
    page_file.write_text(render(sample_report()), encoding="utf-8")
    errors: list[str] = []
    requests: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = browser.new_page()
            page.on(
                "console",
                lambda message: errors.append(message.text) if message.type == "error" else None,
            )
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.on("request", lambda request: requests.append(request.url))
            page.goto(page_file.as_uri())
            page.wait_for_load_state("load")
            charts = page.locator("svg.chart")
            assert charts.count() == 4
            for chart_id in ("score-by-truth", "precision-recall", "delay", "decisions-over-time"):
                chart = page.locator(f"svg#{chart_id}")
                box = chart.bounding_box()
                assert box is not None and box["width"] > 300 and box["height"] > 150, chart_id
                marks = chart.locator("rect.bar, polyline.series")
                assert marks.count() > 0, chart_id
            # Bars have real height: the histogram of scores is not all zeros on screen.
            heights = page.eval_on_selector_all(
                "svg#score-by-truth rect.bar", "bars => bars.map(b => b.getBBox().height)"
            )
            assert max(heights) > 10
            lines = page.eval_on_selector_all(
                "svg#precision-recall polyline.series", "ls => ls.map(l => l.points.numberOfItems)"
            )
            assert len(lines) == 2 and min(lines) > 50  # precision, recall: a point per threshold
        finally:
            browser.close()
    assert errors == []
    assert requests == [page_file.as_uri()]
