"""Lag-based autoscaling on the real broker: a burst scales compute out, the drain scales it in,
and no prompt is lost either way."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp

from pipeline import admin
from pipeline.config import Settings
from pipeline.scaling import ScalePolicy
from sluice.procs import StageProcess, stage_env
from sluice.supervisor import Supervisor
from tests.integration.kafka_io import Item, collect, produce, prompt
from tests.paths import REPO_ROOT

MODEL = REPO_ROOT / "models" / "demo" / "tokenizer"
SLOW = {"SLUICE_ECHO_DELAY_MS": "250", "SLUICE_MAX_IN_FLIGHT": "4"}  # ~16 prompts/s a worker


async def test_a_burst_scales_compute_out_and_the_drain_scales_it_back_in(
    settings_factory: Callable[..., Settings], tmp_path: Path
) -> None:
    settings = settings_factory(model_path=MODEL, engine="echo", partitions=3)
    await admin.create_topics(settings)
    helpers = [
        StageProcess(s, stage_env(settings), tmp_path / f"{s}.log").start()
        for s in ("preprocess", "postprocess")
    ]
    policy = ScalePolicy("compute", lag_threshold=20, min_workers=1, max_workers=8,
                         scale_up_window_s=2, scale_down_window_s=8)  # fmt: skip
    sup = Supervisor(settings, [policy], tmp_path, interval_s=0.5, worker_env=SLOW)
    task = asyncio.create_task(sup.run())
    try:
        await asyncio.sleep(3)
        assert sup.running("compute") == 1
        burst: list[Item] = [
            (f"c{i % 9}".encode(), prompt(f"burst {i}", id=f"b-{i}"), []) for i in range(300)
        ]
        await produce(settings, settings.topics.prompts, burst)
        crossed = scaled = None
        t0 = time.monotonic()
        while time.monotonic() - t0 < 60 and scaled is None:
            lag = (await sup.lags())["compute"]
            if crossed is None and lag > policy.lag_threshold:
                crossed = time.monotonic()
            if crossed is not None and _consuming(sup, tmp_path) >= 2:
                scaled = time.monotonic()
            await asyncio.sleep(0.2)
        decisions = sup.stages["compute"].decisions
        assert crossed is not None and scaled is not None, f"never scaled out: {decisions}"
        peak = sup.stages["compute"].scaler.current
        assert peak == 3  # ceil(lag/20) clamped to the 3 partitions
        time_to_scale = scaled - crossed

        # Scale-in while prompts still trickle in: nothing may be lost.
        trickle: list[Item] = [
            (f"t{i % 5}".encode(), prompt(f"trickle {i}", id=f"t-{i}"), []) for i in range(60)
        ]
        for i in range(0, 60, 6):
            await produce(settings, settings.topics.prompts, trickle[i : i + 6])
            await asyncio.sleep(1.0)
        answers = await collect(settings, settings.topics.answers, until=360, within=120)
        by_id = answers.by_request()
        missing = [r for r in [f"b-{i}" for i in range(300)] + [f"t-{i}" for i in range(60)]
                   if r not in by_id]  # fmt: skip
        assert not missing, f"{len(missing)} prompts lost, e.g. {missing[:5]}"
        for _ in range(80):  # the scale-down window, then SIGTERM and a clean exit
            if sup.running("compute") == 1:
                break
            await asyncio.sleep(0.5)
        assert sup.running("compute") == 1, "compute did not scale back in"
        async with aiohttp.ClientSession() as session:
            url = f"http://{sup.http.host}:{sup.http.port}/metrics"
            async with session.get(url) as response:
                scraped = await response.text()
        assert 'sluice_workers{kind="running",stage="compute"} 1.0' in scraped
        assert 'sluice_scale_decisions_total{direction="up",stage="compute"} 1.0' in scraped
        steps = [(round(t - t0, 1), d.current, d.desired) for t, d in decisions]
        print(
            f"\nautoscale: lag crossed {policy.lag_threshold} -> 2+ compute workers consuming "
            f"in {time_to_scale:.1f}s; decisions (t, from, to): {steps}; "
            f"{sum(len(v) - 1 for v in by_id.values())} duplicate answers"
        )
    finally:
        sup.request_stop()
        try:
            await task
        finally:
            for proc in helpers:
                proc.stop()


def _consuming(sup: Supervisor, log_dir: Path) -> int:
    """Compute workers whose log shows a non-empty partition assignment."""
    count = 0
    for slot in sup.stages["compute"].workers:
        path = log_dir / f"compute-{slot}.log"
        if path.exists() and 'stage compute: assigned ["' in path.read_text(errors="replace"):
            count += 1
    return count


async def test_a_crashed_worker_is_restarted_with_backoff(
    settings_factory: Callable[..., Settings], tmp_path: Path
) -> None:
    settings = settings_factory(model_path=MODEL, engine="echo", partitions=2)
    await admin.create_topics(settings)
    policy = ScalePolicy("compute", lag_threshold=1000, min_workers=1, max_workers=2)
    sup = Supervisor(settings, [policy], tmp_path, interval_s=0.3)
    task = asyncio.create_task(sup.run())
    try:
        for _ in range(100):
            if sup.running("compute") == 1:
                break
            await asyncio.sleep(0.1)
        first = sup.stages["compute"].workers[0].proc.proc
        assert first is not None
        first.kill()  # a crash, not a scale-in
        for _ in range(100):
            worker = sup.stages["compute"].workers.get(0)
            if worker is not None and worker.proc.proc is not first:
                break
            await asyncio.sleep(0.1)
        restarted = sup.stages["compute"].workers[0].proc.proc
        assert restarted is not None and restarted is not first and restarted.poll() is None
        assert sup.restarts_total.labels("compute")._value.get() == 1
        assert sup.stages["compute"].restarts[0] == 1  # the next crash waits longer (2 s, 4 s…)
    finally:
        sup.request_stop()
        await task
