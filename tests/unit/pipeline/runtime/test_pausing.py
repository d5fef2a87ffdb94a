"""The loop's pausing, without Kafka: the batch lane waits for interactive work, and the
in-flight bound and the lane's gate never undo each other."""

from __future__ import annotations

from aiokafka import TopicPartition

from pipeline.runtime.backpressure import InFlightBound
from pipeline.runtime.batch import Record
from pipeline.runtime.pausing import Pausing

CHAT = "t.tokenized"
BATCH = "t.tokenized.batch"
CHAT_TPS = {TopicPartition(CHAT, 0), TopicPartition(CHAT, 1)}
BATCH_TPS = {TopicPartition(BATCH, 0), TopicPartition(BATCH, 1)}


class Consumer:
    """Records what is paused, as aiokafka's consumer keeps it."""

    def __init__(self) -> None:
        self.paused: set[TopicPartition] = set()

    def pause(self, *tps: TopicPartition) -> None:
        self.paused |= set(tps)

    def resume(self, *tps: TopicPartition) -> None:
        self.paused -= set(tps)


def record(topic: str, offset: int, partition: int = 0) -> Record:
    return Record(topic, partition, offset, 0, None, b"{}", [])


def pausing(
    max_records: int = 8,
    admitted: set[int] | None = None,
    batch: str | None = BATCH,
    max_bytes: int | None = None,
) -> tuple[Pausing, Consumer, list[tuple[int, int]]]:
    seen: list[tuple[int, int]] = []
    hook = None if admitted is None else (lambda r: r.offset in admitted)
    p = Pausing(
        InFlightBound(max_records, max_bytes),
        stage="compute",
        batch_topic=batch,
        admitted=hook,
        on_change=lambda a, b: seen.append((a, b)),
    )
    consumer = Consumer()
    p.attach(consumer)
    p.assign(CHAT_TPS | BATCH_TPS)
    return p, consumer, seen


def test_the_batch_lane_takes_half_the_bound_and_is_let_in_again_at_a_quarter() -> None:
    p, consumer, _ = pausing(max_records=8)
    assert p.gate is not None and (p.gate.capacity, p.gate.resume_at) == (4, 2)
    assert p.update(0, 0) == 4  # a poll may not fill more than the batch lane's share
    assert p.update(3, 0) == 1 and consumer.paused == set()
    assert p.update(4, 0) == 4  # batch lane paused: the bound's room again, for chat
    assert consumer.paused == BATCH_TPS  # interactive partitions keep being fetched
    p.update(3, 0)
    assert consumer.paused == BATCH_TPS  # no flapping between 2 and 4
    p.update(2, 0)
    assert consumer.paused == set()


def test_interactive_records_pause_the_batch_lane_until_the_handler_admits_them() -> None:
    admitted: set[int] = set()
    p, consumer, _ = pausing(admitted=admitted)
    p.fetched([record(CHAT, 7), record(BATCH, 8)])
    assert p.interactive_waiting() == 1  # the batch-lane record is not interactive work
    p.update(2, 0)
    assert consumer.paused == BATCH_TPS
    p.update(0, 0)
    assert consumer.paused == BATCH_TPS  # still waiting, however little is in flight
    admitted.add(7)
    assert p.interactive_waiting() == 0
    p.update(2, 0)
    assert consumer.paused == set()


def test_without_an_admitted_hook_interactive_work_waits_until_it_finishes() -> None:
    p, consumer, _ = pausing()
    chat = [record(CHAT, 1), record(CHAT, 2, partition=1)]
    p.fetched(chat)
    p.update(2, 0)
    assert consumer.paused == BATCH_TPS
    p.finished(chat[:1])
    p.update(1, 0)
    assert consumer.paused == BATCH_TPS and p.interactive_waiting() == 1
    p.finished(chat[1:])
    p.update(0, 0)
    assert consumer.paused == set()


def test_the_bound_and_the_gate_never_undo_each_other() -> None:
    p, consumer, _ = pausing(max_records=8, max_bytes=1000)
    p.fetched([record(CHAT, 1)])
    p.update(8, 0)  # the bound: everything; the gate: the batch lane
    assert consumer.paused == CHAT_TPS | BATCH_TPS
    p.update(4, 0)  # the bound resumes; interactive work still waits: the batch lane stays
    assert consumer.paused == BATCH_TPS
    p.update(1, 1000)  # the byte bound holds everything again
    assert consumer.paused == CHAT_TPS | BATCH_TPS
    p.finished([record(CHAT, 1)])
    p.update(1, 600)  # the gate lets the batch lane in, but the byte bound still holds all
    assert consumer.paused == CHAT_TPS | BATCH_TPS
    p.update(1, 500)  # now neither holds: both lanes come back
    assert consumer.paused == set()


def test_new_partitions_start_paused_when_a_reason_holds_them_and_revoked_work_stops_waiting() -> (
    None
):
    p, consumer, seen = pausing()
    p.revoke(CHAT_TPS | BATCH_TPS)
    consumer.paused.clear()
    p.fetched([record(CHAT, 1)])
    p.update(0, 0)
    p.assign({TopicPartition(CHAT, 0), TopicPartition(BATCH, 0)})
    assert consumer.paused == {TopicPartition(BATCH, 0)}
    assert seen[-1] == (1, 1)  # (paused partitions, paused batch-lane partitions)
    p.revoke({TopicPartition(CHAT, 0)})
    assert p.interactive_waiting() == 0  # its next owner has it now
    p.update(0, 0)
    assert consumer.paused == set() and seen[-1] == (0, 0)


def test_a_stage_with_one_lane_pauses_and_resumes_everything_at_the_bound_only() -> None:
    p, consumer, _ = pausing(max_records=4, batch=None)
    p.fetched([record(CHAT, 1)])
    assert p.gate is None and p.interactive_waiting() == 0
    assert p.update(0, 0) == 4  # no lane share: the whole bound
    assert p.update(3, 0) == 1 and consumer.paused == set()
    p.update(4, 0)
    assert consumer.paused == CHAT_TPS | BATCH_TPS
    p.update(2, 0)
    assert consumer.paused == set()
