"""``sluice doctor`` against a live local stack: exit 0 when it is healthy; non-zero, naming the
stopped stage and the dead letters, when compute is stopped and a prompt was dead-lettered. The
HTML page renders in headless Chromium (``make images`` refreshes docs/img/doctor.png)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pipeline import admin
from pipeline.config import Settings
from sluice.procs import stage_env
from tests.integration.kafka_io import collect, produce, prompt
from tests.integration.ops_helpers import MODEL, STAGES, Fleet, chromium, wait_ready
from tests.paths import REPO_ROOT

SCREENSHOT = REPO_ROOT / "docs" / "img" / "doctor.png"


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    started = Fleet(tmp_path)
    yield started
    started.stop()


async def _doctor(settings: Settings, fleet: Fleet, *args: str) -> tuple[int, str]:
    scrape = [a for (_, port) in fleet.stages.values()
              for a in ("--scrape", f"http://127.0.0.1:{port}/metrics")]  # fmt: skip
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "sluice.cli.main", "doctor", "--samples", "2", "--interval",
         "1", *scrape, *args],
        env=stage_env(settings, COLUMNS="250"),
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )  # fmt: skip
    return done.returncode, done.stdout + done.stderr


async def test_doctor_passes_a_healthy_stack_and_names_a_stopped_stage_and_dead_letters(
    settings_factory: Callable[..., Settings], fleet: Fleet, tmp_path: Path
) -> None:
    settings = settings_factory(
        model_path=MODEL, engine="echo", partitions=2, archive_url=f"file://{tmp_path}/archive"
    )
    await admin.create_topics(settings)
    for stage in STAGES:
        fleet.stage(stage, settings)
    for url in fleet.metrics_urls():
        await wait_ready(url.replace("/metrics", "/readyz"), fleet)
    await produce(settings, settings.topics.prompts, [(b"c", prompt("hello", id="ok-1"), [])])
    await collect(settings, settings.topics.answers, until=1, within=60)

    code, out = await _doctor(settings, fleet, "--json")
    report: dict[str, Any] = json.loads(out[out.index("{") :])
    red = [c for c in report["checks"] if c["verdict"] == "red"]
    assert code == 0 and not red, f"{red}\n{fleet.logs()}"
    names = {(c["area"], c["name"]) for c in report["checks"]}
    assert {("groups", s) for s in STAGES} <= names and ("broker", "reachable") in names
    assert report["lag_series"], "lag readings for the plot"

    compute, _ = fleet.stages.pop("compute")
    compute.stop()
    await produce(settings, settings.topics.prompts, [(b"d", b"{not json", [])])
    await collect(settings, settings.topics.dlt(settings.topics.prompts), until=1, within=60)
    html = tmp_path / "doctor.html"
    code, out = await _doctor(settings, fleet, "--html", str(html))
    assert code == 1, out
    assert "compute is stopped" in out
    assert "preprocess: bad-json" in out and "replay dlq" in out
    await _render(html, tmp_path)


async def _render(html: Path, tmp_path: Path) -> None:
    """The page renders (checks table and three plots) with scripts off; ``make images`` keeps
    the screenshot."""
    try:
        from playwright.async_api import async_playwright
    except ImportError:
        pytest.fail("the playwright package is missing: pip install -e '.[dev]'")
    page_text = await asyncio.to_thread(html.read_text)
    assert "<script" not in page_text and "http://" not in page_text.split("<body>")[0]
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(
            executable_path=str(chromium()), args=["--no-sandbox", "--disable-gpu"]
        )
        try:
            page = await browser.new_page(
                viewport={"width": 1280, "height": 900}, java_script_enabled=False
            )
            await page.goto(html.as_uri())
            assert "sluice doctor" in await page.title()
            assert await page.locator("#checks tr").count() > 10
            assert await page.locator("figure svg").count() == 3
            assert await page.locator("figure polyline").count() >= 1  # lag drawn
            assert await page.locator("figure rect").count() >= 1  # dead letters drawn
            target = SCREENSHOT if os.environ.get("SLUICE_REFRESH_IMAGES") else tmp_path / "d.png"
            await page.screenshot(path=str(target), full_page=True)
            assert target.stat().st_size > 10_000
        finally:
            await browser.close()
