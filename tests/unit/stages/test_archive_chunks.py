"""The archiver's chunk buffer: when a partition's records become an object, and which."""

from __future__ import annotations

from aiokafka import TopicPartition

from schemas.archive import decode_line
from stages.archive_chunks import PartitionBuffer


def test_a_partition_buffer_seals_by_records_bytes_and_age() -> None:
    tp = TopicPartition("t", 0)
    by_records = PartitionBuffer(tp, max_records=3, max_bytes=1 << 20, max_age_s=60)
    for offset in range(7):
        by_records.add(offset, 0, b"k", b"v", [], now=0.0)
    assert [(c.first_offset, c.last_offset) for c in by_records.sealed] == [(0, 2), (3, 5)]
    assert by_records.sealed[1].key == "topics/t/partition=0/t+0+0000000003.jsonl.gz"
    assert by_records.buffered == 7 and by_records.open is not None
    assert not by_records.drained.is_set() and by_records.ready.is_set()

    by_bytes = PartitionBuffer(tp, max_records=1000, max_bytes=200, max_age_s=60)
    for offset in range(10):
        by_bytes.add(offset, 0, b"k", b"x" * 60, [], now=0.0)
    assert all(c.nbytes >= 200 for c in by_bytes.sealed)
    assert sum(len(c) for c in by_bytes.sealed) + len(by_bytes.open or ()) == 10

    by_age = PartitionBuffer(tp, max_records=1000, max_bytes=1 << 20, max_age_s=5)
    by_age.add(100, 0, None, b"v", [], now=10.0)
    by_age.add(101, 0, None, b"v", [], now=14.0)
    assert not by_age.seal_if_older(14.9)
    assert by_age.seal_if_older(15.0)
    assert [(c.first_offset, c.next_offset) for c in by_age.sealed] == [(100, 102)]
    assert not by_age.seal()  # nothing open: nothing to seal


def test_a_new_buffer_is_drained_until_a_chunk_is_sealed() -> None:
    buffer = PartitionBuffer(
        TopicPartition("t", 2), max_records=10, max_bytes=1 << 20, max_age_s=60
    )
    assert buffer.drained.is_set() and not buffer.ready.is_set() and buffer.buffered == 0
    buffer.add(40, 1_000, b"k", b"v", [("h", b"1"), ("n", None)], now=0.0)
    assert buffer.drained.is_set()  # an open chunk is not waiting for the writer yet
    assert buffer.seal() and not buffer.drained.is_set() and buffer.ready.is_set()
    assert buffer.open is None and buffer.buffered == 1


def test_a_sealed_chunk_holds_its_records_as_archive_lines_in_offset_order() -> None:
    buffer = PartitionBuffer(TopicPartition("t", 1), max_records=3, max_bytes=1 << 20, max_age_s=60)
    for offset in (7, 8, 9):
        buffer.add(offset, 100 * offset, None, f"v{offset}".encode(), [("h", b"x")], now=0.0)
    [chunk] = buffer.sealed
    assert chunk.key == "topics/t/partition=1/t+1+0000000007.jsonl.gz"
    assert (chunk.first_offset, chunk.next_offset, len(chunk)) == (7, 10, 3)
    assert chunk.nbytes == sum(len(line) for line in chunk.lines)
    records = [decode_line(line, "t", 1) for line in chunk.lines]
    assert [(r.offset, r.timestamp_ms, r.value) for r in records] == [
        (7, 700, b"v7"),
        (8, 800, b"v8"),
        (9, 900, b"v9"),
    ]
