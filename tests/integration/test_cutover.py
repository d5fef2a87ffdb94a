"""Blue/green cutover on the real broker under a steady stream of prompts: blue -> green ->
rollback to blue. Every prompt is answered, none is lost, and duplicates (records a stage had
finished but not committed at a switch) are counted and printed."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from pathlib import Path

import orjson

from pipeline import admin
from pipeline.config import Settings
from sluice.cutover import Cutover, StageResult
from sluice.procs import StageProcess, stage_env
from tests.integration.kafka_io import Item, collect, produce, prompt
from tests.paths import REPO_ROOT

MODEL = REPO_ROOT / "models" / "demo" / "tokenizer"
STAGES = ("preprocess", "compute", "postprocess")
IN_FLIGHT = 16  # SLUICE_MAX_IN_FLIGHT per stage: bounds what a switch can duplicate
RATE_S = 0.05  # one prompt every 50 ms while the cutovers run


class Deployment:
    """One colour: the three stages as ``sluice run`` processes with their group suffix."""

    def __init__(self, settings: Settings, suffix: str, logs: Path) -> None:
        self.env = stage_env(settings, SLUICE_GROUP_SUFFIX=suffix,
                             SLUICE_MAX_IN_FLIGHT=str(IN_FLIGHT))  # fmt: skip
        self.suffix = suffix
        self.logs = logs
        self.procs: list[StageProcess] = []

    async def start(self) -> None:
        self.procs = [
            StageProcess(s, self.env, self.logs / f"{s}-{self.suffix}.log").start() for s in STAGES
        ]

    async def stop(self) -> None:
        codes = await asyncio.gather(*(asyncio.to_thread(p.sigterm) for p in self.procs))
        assert all(code == 0 for code, _ in codes), [p.log() for p in self.procs]
        self.procs = []

    def close(self) -> None:
        for p in self.procs:
            p.stop()


async def steady(settings: Settings, sent: list[str], stop: asyncio.Event) -> None:
    while not stop.is_set():
        rid = f"steady-{len(sent)}"
        item: Item = (f"conv-{len(sent) % 7}".encode(), prompt(f"hello {rid}", id=rid), [])
        await produce(settings, settings.topics.prompts, [item])
        sent.append(rid)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), RATE_S)


async def test_blue_green_and_back_under_a_steady_stream_loses_nothing(
    settings_factory: Callable[..., Settings], tmp_path: Path
) -> None:
    settings = settings_factory(model_path=MODEL, engine="echo", partitions=3)
    await admin.create_topics(settings)
    blue, green = Deployment(settings, "blue", tmp_path), Deployment(settings, "green", tmp_path)
    sent: list[str] = []
    stop = asyncio.Event()
    await blue.start()
    producer = asyncio.create_task(steady(settings, sent, stop))
    try:
        warm = await collect(settings, settings.topics.answers, until=20, within=90)
        assert len(warm.by_request()) >= 20, "blue never answered"

        forward = Cutover(settings, "blue", "green", STAGES, stop_source=blue.stop,
                          start_target=green.start, timeout_s=60)  # fmt: skip
        moved = await forward.run()
        assert [r.action for r in moved] == ["copied"] * 3
        at_switch = len(sent)
        await asyncio.sleep(3)  # green serves the stream for a while

        # Run again: nothing left to do, it says so instead of failing.
        again = await Cutover(settings, "blue", "green", STAGES, timeout_s=10).run()
        assert [r.action for r in again] == ["done"] * 3

        back = Cutover(settings, "green", "blue", STAGES, stop_source=green.stop,
                       start_target=blue.start, timeout_s=60)  # fmt: skip
        rolled = await back.run()
        assert [r.action for r in rolled] == ["copied"] * 3
        _green_took_over_where_blue_stopped(moved, rolled)
        await asyncio.sleep(2)
    finally:
        stop.set()
        await producer
    try:
        answers = await collect(settings, settings.topics.answers, until=len(sent), within=120)
    finally:
        blue.close()
        green.close()
    by_id = answers.by_request()
    missing = [rid for rid in sent if rid not in by_id]
    duplicates = {rid: len(recs) for rid, recs in by_id.items() if len(recs) > 1}
    print(
        f"\ncutover: {len(sent)} prompts ({at_switch} before the switch), "
        f"{len(by_id)} answered, {len(missing)} missing, {len(duplicates)} duplicated"
    )
    assert not missing, f"{len(missing)} prompts lost, e.g. {missing[:5]}"
    assert set(by_id) <= set(sent)
    # Two switches, three stages each: at most what was in flight there can come twice.
    assert len(duplicates) <= 2 * len(STAGES) * IN_FLIGHT, duplicates
    for rid in duplicates:
        texts = {orjson.loads(rec.value)["choices"][0]["message"]["content"] for rec in by_id[rid]}
        assert len(texts) == 1, f"{rid}: duplicate answers differ"


def _green_took_over_where_blue_stopped(
    forward: list[StageResult], back: list[StageResult]
) -> None:
    """Rollback copies green's offsets: at or past what blue handed over on every partition,
    and past it in all (green served the stream in between)."""
    for there, home in zip(forward, back, strict=True):
        assert there.stage == home.stage
        for tp, offset in there.offsets.items():
            assert home.offsets[tp] >= offset
        assert sum(home.offsets.values()) > sum(there.offsets.values()), f"{home.stage} idle"
