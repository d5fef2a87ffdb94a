"""The batch lane on the real broker: with a backlog on ``prompts.batch`` and interactive
prompts arriving, compute has the batch lane's partitions paused whenever interactive work
waits, the interactive prompts are answered before the batch is done, and the batch still
completes."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from aiokafka import TopicPartition

from pipeline.config import Settings
from pipeline.runtime.runner import StageRunner
from schemas.headers import SLUICE_REQUEST_ID, header_value
from stages.registry import build_handler
from tests.integration.kafka_io import collect, group_lag, produce, prompt
from tests.integration.test_stage_loop import MODEL, _fresh, _running

BATCH_LINES = 120
CHAT = 6
WITHIN_S = 90.0


def _ids(records: list[Any]) -> list[str]:
    return [header_value(list(r.headers), SLUICE_REQUEST_ID) or "?" for r in records]


async def test_interactive_prompts_are_served_first_while_a_batch_backlog_completes(
    settings_factory: Callable[..., Settings],
) -> None:
    settings = await _fresh(
        settings_factory(
            partitions=2,
            model_path=MODEL,
            engine="echo",
            echo_delay_ms=300,
            max_in_flight=8,  # the batch lane may hold 4 of them
        )
    )
    topics = settings.topics
    pre = build_handler("preprocess", settings)
    compute = build_handler("compute", settings)
    async with _running(settings, pre, compute) as [_, compute_runner]:
        looks = _spy_on_looks(compute_runner)
        batch = [(b"b%d" % i, prompt(f"line {i}", id=f"b-{i}"), ()) for i in range(BATCH_LINES)]
        await produce(settings, topics.prompts_batch, batch)
        await collect(settings, topics.generated, until=8, within=WITHIN_S)  # under way
        for i in range(CHAT):
            await produce(
                settings, topics.prompts, [(b"c%d" % i, prompt(f"chat {i}", id=f"c-{i}"), ())]
            )
            await asyncio.sleep(0.4)
        out = await collect(settings, topics.generated, until=BATCH_LINES + CHAT, within=WITHIN_S)
        lag = await _batch_lane_lag(settings, compute_runner)
    ids = _ids(out.records)
    chat = [r for r, rid in zip(out.records, ids, strict=True) if rid.startswith("c-")]
    lines = [r for r, rid in zip(out.records, ids, strict=True) if rid.startswith("b-")]
    # every line of the batch and every chat prompt answered, each once
    assert sorted(rid for rid in ids if rid.startswith("b-")) == sorted(
        f"b-{i}" for i in range(BATCH_LINES)
    )
    assert sorted(rid for rid in ids if rid.startswith("c-")) == [f"c-{i}" for i in range(CHAT)]
    # the chat prompts did not wait for the batch: all answered before its last line
    assert max(r.timestamp for r in chat) < max(r.timestamp for r in lines)
    # whenever the loop looked and interactive work was waiting, the consumer had the batch
    # lane's partitions paused, and never an interactive one for it
    lane = topics.tokenized_batch
    waiting = [(paused, w) for paused, w in looks if w > 0]
    assert waiting, "no interactive record was ever seen waiting"
    for paused, _ in waiting:
        assert paused and all(tp.topic == lane for tp in paused), paused
    assert lag == 0  # the batch lane committed to its end


def _spy_on_looks(runner: StageRunner) -> list[tuple[set[TopicPartition], int]]:
    """After each of the loop's pausing decisions: the partitions the compute consumer has
    paused (aiokafka's own record), and the interactive records waiting then."""
    pausing = runner.pausing
    seen: list[tuple[set[TopicPartition], int]] = []
    update = pausing.update

    def spy(in_flight: int, in_flight_bytes: int) -> int:
        room = update(in_flight, in_flight_bytes)
        seen.append((set(pausing.consumer.paused()), pausing.interactive_waiting()))
        return room

    pausing.update = spy  # type: ignore[method-assign]
    return seen


async def _batch_lane_lag(settings: Settings, runner: StageRunner) -> int:
    """Records of the batch lane compute has not committed yet (after its commits catch up)."""
    for _ in range(50):
        lag = await group_lag(settings, runner.group_id, settings.topics.tokenized_batch)
        behind = sum(end - committed for committed, end in lag.values())
        if behind == 0:
            return 0
        await asyncio.sleep(0.2)
    return behind
