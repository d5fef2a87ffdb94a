"""The archive layout and record format, and the reader over them."""

from __future__ import annotations

import gzip
from pathlib import Path

import orjson
import pytest

from pipeline.storage import LocalStore
from replay.archive import ArchiveReader, Window
from schemas.archive import (
    ArchivedRecord,
    ArchiveFormatError,
    decode_line,
    decode_object,
    encode_line,
    encode_object,
    object_key,
    parse_object_key,
)


def test_object_keys_follow_the_kafka_connect_s3_layout() -> None:
    key = object_key("sluice.prompts", 3, 1234)
    assert key == "topics/sluice.prompts/partition=3/sluice.prompts+3+0000001234.jsonl.gz"
    name = parse_object_key(f"some/prefix/{key}")
    assert name is not None
    assert (name.topic, name.partition, name.start_offset) == ("sluice.prompts", 3, 1234)
    assert parse_object_key("topics/a/partition=1/a+2+0000000000.jsonl.gz") is None
    assert parse_object_key("topics/a/partition=1/b+1+0000000000.jsonl.gz") is None
    assert parse_object_key("topics/a/partition=1/a+1+0000000000.json") is None
    big = object_key("t", 0, 12_345_678_901)  # past the padding: still readable
    parsed = parse_object_key(big)
    assert parsed is not None and parsed.start_offset == 12_345_678_901


def test_text_records_are_readable_json_lines() -> None:
    line = encode_line(
        7,
        1_764_300_000_000,
        b"conv-1",
        b'{"messages": [{"role": "user", "content": "h\\u00e9"}]}',
        [("ce_type", b"sluice.prompt"), ("sluice-request-id", b"r-1")],
    )
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    obj = orjson.loads(line)
    assert obj == {
        "offset": 7,
        "timestamp": 1_764_300_000_000,
        "key": "conv-1",
        "value": '{"messages": [{"role": "user", "content": "h\\u00e9"}]}',
        "headers": [["ce_type", "sluice.prompt"], ["sluice-request-id", "r-1"]],
    }


@pytest.mark.parametrize(
    ("key", "value", "headers"),
    [
        (b"k", b"v", []),
        (None, None, []),  # a tombstone without key
        (b"\xff\xfe binary key", b"\x00\x01\x02\xc3", [("bin", b"\x80\x81"), ("null", None)]),
        ("ünïcode ✓ 😀".encode(), 'line\nbreak \u2028 and "quotes" 🦀'.encode(), [("e", b"")]),
        (b"", b"", [("dup", b"1"), ("dup", b"2")]),
        (b"\xed\xa0\x80", b"surrogate bytes are not UTF-8", []),
    ],
)
def test_every_byte_round_trips_exactly(
    key: bytes | None, value: bytes | None, headers: list[tuple[str, bytes | None]]
) -> None:
    line = encode_line(42, 1, key, value, headers)
    record = decode_line(line, "t", 5)
    assert record == ArchivedRecord("t", 5, 42, 1, key, value, tuple(headers))


def test_binary_fields_are_base64_beside_a_null_text_field() -> None:
    obj = orjson.loads(encode_line(1, 2, b"\xff", b"\xfe", [("h", b"\xfd"), ("n", None)]))
    assert obj["key"] is None and obj["key_b64"] == "/w=="
    assert obj["value"] is None and obj["value_b64"] == "/g=="
    assert obj["headers"] == [["h", None, "/Q=="], ["n", None]]


def test_objects_are_deterministic_gzip_of_the_lines() -> None:
    lines = [encode_line(i, 1000 + i, b"k", f"v{i}".encode(), []) for i in range(5)]
    data = encode_object(lines)
    assert data == encode_object(lines)  # no timestamp inside: a redo writes the same bytes
    assert gzip.decompress(data) == b"".join(lines)
    records = decode_object(data, "t", 0)
    assert [r.offset for r in records] == [0, 1, 2, 3, 4]
    assert records[3].value == b"v3"


def test_unreadable_objects_and_lines_fail_loudly() -> None:
    with pytest.raises(ArchiveFormatError):
        decode_object(b"not gzip", "t", 0)
    with pytest.raises(ArchiveFormatError):
        decode_line(b'{"offset": 1}', "t", 0)
    with pytest.raises(ArchiveFormatError):
        decode_line(b"[1, 2]", "t", 0)
    with pytest.raises(ArchiveFormatError):
        decode_line(b'{"offset": 1, "timestamp": 2, "headers": [["x"]]}', "t", 0)


# --- the reader -------------------------------------------------------------------------------


async def _write(store: LocalStore, topic: str, partition: int, offsets: list[int]) -> None:
    lines = [encode_line(o, 1000 * o, b"k", f"{partition}:{o}".encode(), []) for o in offsets]
    await store.put(object_key(topic, partition, offsets[0]), encode_object(lines))


async def test_the_reader_streams_each_record_once_even_from_overlapping_objects(
    tmp_path: Path,
) -> None:
    store = LocalStore(tmp_path)
    await _write(store, "t", 0, [0, 1, 2, 3, 4])
    await _write(store, "t", 0, [3, 4, 5, 6])  # a redo that cut the objects differently
    await _write(store, "t", 0, [7, 8])
    await _write(store, "t", 1, [0, 1])
    await store.put("topics/t/partition=0/not-an-archive-object.txt", b"ignored")
    reader = ArchiveReader(store)
    assert await reader.topics() == ["t"]
    got = [(r.partition, r.offset) async for r in reader.records("t")]
    assert got == [(0, o) for o in range(9)] + [(1, 0), (1, 1)]
    assert reader.duplicates == 2


async def test_the_reader_selects_partitions_offsets_and_times(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    for start in range(0, 30, 10):
        await _write(store, "t", 0, list(range(start, start + 10)))
    await _write(store, "t", 1, list(range(0, 30)))
    reader = ArchiveReader(store)

    window = Window.of(partitions=[0], from_offset=12, to_offset=25)
    names = await reader.objects("t", window)
    assert [n.start_offset for n in names] == [10, 20]  # the object at 0 cannot hold 12..24
    got = [r.offset async for r in reader.records("t", window)]
    assert got == list(range(12, 25))

    by_time = Window.of(since_ms=5_000, until_ms=8_000)
    got_t = [(r.partition, r.offset) async for r in reader.records("t", by_time)]
    assert got_t == [(0, 5), (0, 6), (0, 7), (1, 5), (1, 6), (1, 7)]
