"""Records, batches and the request id every answer is addressed by."""

from __future__ import annotations

import dataclasses
import uuid

import orjson
import pytest

from pipeline.errors import StageFault
from pipeline.runtime.batch import Batch, Output, Record, Result, derived_request_id
from schemas.headers import SLUICE_REQUEST_ID, Headers


def _rec(
    offset: int,
    *,
    topic: str = "t.prompts",
    partition: int = 0,
    value: bytes | None = b"{}",
    headers: Headers | None = None,
) -> Record:
    return Record(
        topic=topic,
        partition=partition,
        offset=offset,
        timestamp_ms=1_700_000_000_000 + offset,
        key=b"conv",
        value=value,
        headers=headers if headers is not None else [],
    )


def _offsets(batch: Batch) -> list[int]:
    return [r.offset for r in batch]


# --- Batch -----------------------------------------------------------------------------------


def test_batch_of_keeps_order_and_sizes() -> None:
    records = [_rec(3, value=b"abc"), _rec(4, value=None), _rec(5, value=b"de")]
    batch = Batch.of(records)
    assert len(batch) == 3
    assert list(batch) == records
    assert batch.records == tuple(records)
    assert batch.size_bytes == 5  # a tombstone counts as 0 bytes


def test_split_cuts_consecutive_chunks() -> None:
    batch = Batch.of([_rec(i) for i in range(5)])
    parts = batch.split(2)
    assert [_offsets(p) for p in parts] == [[0, 1], [2, 3], [4]]
    assert all(isinstance(p, Batch) for p in parts)


@pytest.mark.parametrize("size", [5, 99])
def test_split_by_at_least_the_length_is_one_batch(size: int) -> None:
    batch = Batch.of([_rec(i) for i in range(5)])
    assert [_offsets(p) for p in batch.split(size)] == [[0, 1, 2, 3, 4]]


@pytest.mark.parametrize("size", [0, -3, 1])
def test_split_by_less_than_one_is_one_record_each(size: int) -> None:
    batch = Batch.of([_rec(i) for i in range(3)])
    assert [_offsets(p) for p in batch.split(size)] == [[0], [1], [2]]


def test_split_of_an_empty_batch_is_no_batches() -> None:
    assert Batch.of([]).split(4) == []


def test_by_partition_groups_by_topic_and_partition_in_offset_order() -> None:
    records = [
        _rec(10, partition=0),
        _rec(7, partition=1),
        _rec(11, partition=0),
        _rec(3, topic="t.other", partition=0),  # same partition number, another topic
        _rec(8, partition=1),
        _rec(12, partition=0),
        _rec(4, topic="t.other", partition=0),
    ]
    groups = Batch.of(records).by_partition()
    assert [(g.records[0].topic, g.records[0].partition, _offsets(g)) for g in groups] == [
        ("t.prompts", 0, [10, 11, 12]),
        ("t.prompts", 1, [7, 8]),
        ("t.other", 0, [3, 4]),
    ]
    for group in groups:
        assert len({(r.topic, r.partition) for r in group}) == 1
    assert sorted(r.offset for g in groups for r in g) == sorted(r.offset for r in records)


def test_by_partition_of_an_empty_batch_is_no_batches() -> None:
    assert Batch.of([]).by_partition() == []


def test_filter_keeps_matching_records_in_order() -> None:
    batch = Batch.of([_rec(i) for i in range(6)])
    even = batch.filter(lambda r: r.offset % 2 == 0)
    assert isinstance(even, Batch)
    assert _offsets(even) == [0, 2, 4]
    assert len(batch) == 6  # the original is untouched
    assert len(batch.filter(lambda r: False)) == 0


def test_where_names_the_record() -> None:
    assert _rec(42, partition=3).where == "t.prompts[3]@42"


def test_result_ok_is_the_absence_of_an_error() -> None:
    record = _rec(0)
    assert Result(record, outputs=[Output("t", None, b"x", [])]).ok
    assert not Result(record, error=StageFault("boom")).ok


# --- Record.request_id -----------------------------------------------------------------------


def test_request_id_body_id_wins_over_the_header() -> None:
    record = _rec(
        0, value=orjson.dumps({"id": "from-body"}), headers=[(SLUICE_REQUEST_ID, b"from-header")]
    )
    assert record.request_id() == "from-body"


def test_request_id_header_name_is_case_insensitive_and_the_last_wins() -> None:
    headers: Headers = [(SLUICE_REQUEST_ID, b"first"), ("Sluice-Request-Id", b"second")]
    assert _rec(0, headers=headers).request_id() == "second"


def test_request_id_from_the_body_id_without_a_header() -> None:
    record = _rec(0, value=orjson.dumps({"id": "from-body", "messages": []}))
    assert record.request_id() == "from-body"


def test_request_id_empty_header_falls_through_to_the_body() -> None:
    record = _rec(0, value=orjson.dumps({"id": "from-body"}), headers=[(SLUICE_REQUEST_ID, b"")])
    assert record.request_id() == "from-body"


def test_derived_request_id_is_a_stable_uuid5_of_the_position() -> None:
    rid = _rec(7, value=b"{}").request_id()
    assert uuid.UUID(rid).version == 5
    assert rid == derived_request_id(_rec(7))
    # A redelivery of the same record (same topic/partition/offset) gets the same id.
    assert _rec(7, value=b'{"other": 1}').request_id() == rid
    assert _rec(8).request_id() != rid
    assert _rec(7, partition=1).request_id() != rid
    assert _rec(7, topic="t.tokenized").request_id() != rid


@pytest.mark.parametrize(
    "value",
    [
        b"{not json",
        b"\xff\xfe\x00",  # not UTF-8
        b"",
        None,  # tombstone
        b'["id", "x"]',  # JSON, but not an object
        b'{"id": 12}',  # id not a string
        b'{"id": ""}',  # empty id
        b'{"id": null}',
        b'{"messages": []}',  # no id at all
    ],
)
def test_request_id_falls_back_to_the_derived_id(value: bytes | None) -> None:
    record = _rec(5, value=value)
    assert record.request_id() == derived_request_id(_rec(5))


def test_derived_ids_differ_across_clusters_and_re_created_topics() -> None:
    """The same position on another cluster, or on the same topic deleted and created again
    (a later timestamp), is another prompt: it must not share an id."""
    here = dataclasses.replace(_rec(3), cluster_id="cluster-a")
    assert here.request_id() == dataclasses.replace(_rec(3), cluster_id="cluster-a").request_id()
    assert here.request_id() != dataclasses.replace(here, cluster_id="cluster-b").request_id()
    later = dataclasses.replace(here, timestamp_ms=here.timestamp_ms + 1)
    assert here.request_id() != later.request_id()
