"""The tolerant batch reader: what aiokafka cannot unpack is read, and said to be bad."""

from __future__ import annotations

import pytest
from aiokafka.record.default_records import DefaultRecordBatchBuilder

from pipeline.runtime.raw_records import read_batches
from pipeline.runtime.undecodable import as_record
from tests.chaos.raw import build_raw_batch

BAD_KEY = b"\xff\xfe-not-utf8"


def test_reads_records_aiokafka_refuses() -> None:
    raw = build_raw_batch(
        [
            (b"k0", b"v0", [(b"ok", b"1")]),
            (None, None, [(BAD_KEY, None), (b"fine", b"2")]),
            (b"k2", b"v2", []),
        ],
        base_offset=100,
    )
    (batch,) = read_batches(raw)
    assert (batch.base_offset, batch.next_offset, batch.control) == (100, 103, False)
    first, bad, last = batch.records
    assert (first.offset, first.key, first.value, first.headers) == (
        100,
        b"k0",
        b"v0",
        ((b"ok", b"1"),),
    )
    assert first.problem is None
    assert (bad.offset, bad.key, bad.value) == (101, None, None)
    assert bad.headers == ((BAD_KEY, None), (b"fine", b"2"))
    assert bad.problem == "a header key is not UTF-8"
    assert last.offset == 102
    record = as_record("t", 3, first)
    assert (record.topic, record.partition, record.offset) == ("t", 3, 100)
    assert record.headers == [("ok", b"1")]
    assert record.timestamp_ms == 1_700_000_000_000


def test_several_batches_and_a_cut_last_one() -> None:
    one = build_raw_batch([(None, b"a", [])], base_offset=0)
    two = build_raw_batch([(None, b"b", []), (None, b"c", [])], base_offset=1)
    batches = list(read_batches(one + two + two[:20]))
    assert [[r.value for r in b.records] for b in batches] == [[b"a"], [b"b", b"c"]]


def test_compressed_batches_are_read() -> None:
    builder = DefaultRecordBatchBuilder(2, 1, False, -1, -1, -1, 1 << 20)
    for i in range(3):
        builder.append(i, timestamp=5, key=None, value=b"z" * 100, headers=[("h", b"v")])
    raw = bytes(builder.build())
    (batch,) = read_batches(raw)
    assert [r.value for r in batch.records] == [b"z" * 100] * 3


def test_garbage_is_one_clear_error() -> None:
    raw = bytearray(build_raw_batch([(None, b"a", [])]))
    raw[16] = 1  # magic
    with pytest.raises(ValueError, match="magic 1"):
        list(read_batches(bytes(raw)))
