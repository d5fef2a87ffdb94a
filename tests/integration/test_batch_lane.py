"""The batch lane on the real broker: with a backlog on ``prompts.batch`` and interactive
prompts arriving, compute pauses the batch lane's partitions while interactive work waits, the
interactive prompts are answered before the batch is done, and the batch still completes."""

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
        pauses = _spy_on_pauses(compute_runner)
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
    # the loop paused the batch lane's partitions alone because interactive work was waiting
    lane = topics.tokenized_batch
    lane_pauses = [w for tps, w in pauses if tps and all(tp.topic == lane for tp in tps)]
    assert any(waiting > 0 for waiting in lane_pauses), pauses
    assert lag == 0  # the batch lane committed to its end


def _spy_on_pauses(runner: StageRunner) -> list[tuple[set[TopicPartition], int]]:
    """Each pause of the compute consumer: the partitions, and interactive work waiting then."""
    consumer = runner.pausing.consumer
    seen: list[tuple[set[TopicPartition], int]] = []
    pause = consumer.pause

    def spy(*tps: TopicPartition) -> None:
        seen.append((set(tps), runner.pausing.interactive_waiting()))
        pause(*tps)

    consumer.pause = spy
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
