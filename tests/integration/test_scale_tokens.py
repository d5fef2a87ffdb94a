"""``sluice scale`` on the real broker scales compute on waiting tokens alone: the lag threshold
is out of reach, the workers' sluice_compute_pending_tokens is what moves the count."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

from pipeline import admin
from pipeline.config import Settings
from pipeline.scaling import ScalePolicy
from sluice.procs import StageProcess, stage_env
from sluice.supervisor import Supervisor
from tests.integration.kafka_io import Item, collect, produce, prompt
from tests.paths import REPO_ROOT

MODEL = REPO_ROOT / "models" / "demo" / "tokenizer"
SLOW = {"SLUICE_ECHO_DELAY_MS": "400", "SLUICE_MAX_IN_FLIGHT": "4"}


async def test_waiting_tokens_scale_compute_out_when_lag_would_not(
    settings_factory: Callable[..., Settings], tmp_path: Path
) -> None:
    settings = settings_factory(model_path=MODEL, engine="echo", partitions=3)
    await admin.create_topics(settings)
    helpers = [
        StageProcess(s, stage_env(settings), tmp_path / f"{s}.log").start()
        for s in ("preprocess", "postprocess")
    ]
    policy = ScalePolicy("compute", lag_threshold=100_000, token_threshold=150, max_workers=3,
                         scale_up_window_s=1, scale_down_window_s=60)  # fmt: skip
    sup = Supervisor(settings, [policy], tmp_path, interval_s=0.5, worker_env=SLOW)
    task = asyncio.create_task(sup.run())
    try:
        items: list[Item] = [
            (f"c{i % 9}".encode(), prompt(f"tokens {i}", id=f"k-{i}", max_tokens=100), [])
            for i in range(120)
        ]
        await produce(settings, settings.topics.prompts, items)
        deadline = time.monotonic() + 60
        for _ in range(300):  # the scale-up window plus a few rounds of reading /metrics
            if sup.stages["compute"].scaler.current >= 2 or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
        decisions = [d for _, d in sup.stages["compute"].decisions]
        assert decisions, "compute never scaled on waiting tokens"
        assert "waiting tokens" in decisions[0].reason, decisions[0].reason
        assert decisions[0].desired >= 2
        answers = await collect(settings, settings.topics.answers, until=120, within=120)
        assert len(answers.by_request()) == 120
    finally:
        sup.request_stop()
        await task
        for proc in helpers:
            proc.stop()
