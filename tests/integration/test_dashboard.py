"""`sluice dashboard` during a live run, seen through headless Chromium: the lag shown for the
compute group moves, and the plots are drawn.

The screenshot goes to the test's temporary folder, so a test run leaves the checkout as it was;
``make images`` sets ``DOCS_IMG=docs/img`` to refresh the one the README shows.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from infra.process import free_port
from pipeline import admin
from pipeline.config import Settings
from tests.integration.kafka_io import Item, produce, prompt
from tests.integration.ops_helpers import MODEL, STAGES, Fleet, chromium, wait_ready

if TYPE_CHECKING:
    from playwright.async_api import Locator

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    started = Fleet(tmp_path)
    yield started
    started.stop()


async def test_the_dashboard_shows_lag_moving_during_a_live_run(
    settings_factory: Callable[..., Settings], fleet: Fleet, tmp_path: Path
) -> None:
    screenshot = tmp_path / "dashboard.png"
    try:
        from playwright.async_api import async_playwright
    except ImportError:
        pytest.fail("the playwright package is missing: pip install -e '.[dev]'")
    browser_path = chromium()
    settings = settings_factory(model_path=MODEL, engine="echo", partitions=3)
    await admin.create_topics(settings)
    fleet.stage("preprocess", settings)
    fleet.stage("compute", settings, SLUICE_ECHO_DELAY_MS="100", SLUICE_MAX_IN_FLIGHT="8")
    fleet.stage("postprocess", settings)
    for url in fleet.metrics_urls():
        await wait_ready(url.replace("/metrics", "/readyz"), fleet)
    port = free_port()
    scrape = [arg for url in fleet.metrics_urls() for arg in ("--scrape", url)]
    fleet.command(settings, "dashboard", "--port", str(port), *scrape)
    base = f"http://127.0.0.1:{port}"
    await wait_ready(f"{base}/readyz", fleet)

    items: list[Item] = [
        (f"conv-{i % 40}".encode(), prompt(f"question {i}", id=f"d-{i}"), []) for i in range(1500)
    ]
    items += [(b"bad", b"{broken json", [])] * 20
    await produce(settings, settings.topics.prompts, items)

    compute = settings.group_id("compute")
    errors: list[str] = []
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=str(browser_path), args=CHROMIUM_ARGS)
        try:
            page = await browser.new_page(viewport={"width": 1400, "height": 1000})
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            await page.goto(base + "/")
            shown = page.get_by_test_id(f"lag-{compute}")
            await shown.wait_for(timeout=30_000)
            first = await _lag_shown(shown, lambda v: v > 0, within=30.0)
            second = await _lag_shown(shown, lambda v: v != first, within=30.0)
            assert first != second
            await asyncio.sleep(10)  # a few more samples, so the plots have a shape
            legend = await page.locator("#legend-lag").inner_text()
            assert "compute" in legend and "preprocess" in legend, legend
            partitions = page.locator(f'[data-partitions="{compute}"]')
            assert "tokenized[0]" in await partitions.inner_text()
            breakers = await page.locator("#stages").inner_text()
            assert breakers.count("closed") == len(STAGES), breakers
            summary = await page.get_by_test_id("breaker-summary").inner_text()
            assert summary == f"{len(STAGES)} closed · 0 half-open · 0 open", summary
            drawn = await page.evaluate(_CANVAS_INK, "chart-lag")
            assert drawn > 500, f"the lag chart looks empty ({drawn} coloured pixels)"
            await page.screenshot(path=str(screenshot), full_page=True)
        finally:
            await browser.close()
    assert not errors, errors
    data = screenshot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 10_000
    if os.environ.get("DOCS_IMG"):  # make images
        screenshot = Path(shutil.copy(screenshot, Path(os.environ["DOCS_IMG"]) / "dashboard.png"))
    print(f"\ncompute lag on the page went {first} -> {second}; screenshot: {screenshot}")


async def _lag_shown(locator: Locator, accept: Callable[[int], bool], within: float) -> int:
    """Read the lag number on the page until ``accept`` says yes (or fail)."""
    deadline = time.monotonic() + within
    seen: list[str] = []
    while time.monotonic() < deadline:
        text = (await locator.inner_text()).strip()
        seen.append(text)
        if text.isdigit() and accept(int(text)):
            return int(text)
        await asyncio.sleep(0.25)
    pytest.fail(f"the lag on the page never did what was expected; it showed {seen[-10:]}")


# Counts pixels of a canvas that differ from the panel background: lines were drawn.
_CANVAS_INK = """(id) => {
  const c = document.getElementById(id);
  const d = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
  let n = 0;
  for (let i = 0; i < d.length; i += 4) {
    if (d[i + 3] > 0 && (d[i] > 80 || d[i + 1] > 110 || d[i + 2] > 140)) n++;
  }
  return n;
}"""
