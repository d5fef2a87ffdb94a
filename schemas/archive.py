"""The conversation log's layout and record format: what the archiver writes, replay reads.

Object names follow the Kafka Connect S3 sink (``topics.dir=topics``, zero-padded offsets as
Connect's default ``filename.offset.zero.pad.width=10``)::

    <prefix>/topics/<topic>/partition=<p>/<topic>+<p>+<startOffset>.jsonl.gz

``startOffset`` is the offset of the object's first record, so the name depends only on where
the object starts: a crash between storing an object and committing its offsets makes the redo
write the same name again (an overwrite, not a duplicate).

An object is gzip (mtime 0, so equal content gives equal bytes) of JSON lines, one record a line
in offset order::

    {"offset": 12, "timestamp": 1764300000000, "key": "conv-1",
     "headers": [["ce_type", "sluice.prompt"], ["odd", null, "3q2+7w=="], ["empty", null]],
     "value": "{\\"messages\\": ...}"}

Key, value and header values are UTF-8 text when they decode as UTF-8; otherwise the text field
is null and the bytes are base64 in ``key_b64`` / ``value_b64``, or as a third element of the
header pair. ``null`` without base64 is a null key, value (tombstone) or header value. Decoding
gives back the exact bytes Kafka held.
"""

from __future__ import annotations

import base64
import gzip
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final

import orjson

TOPICS_DIR: Final = "topics"
OFFSET_PAD: Final = 10
SUFFIX: Final = ".jsonl.gz"

ArchivedHeaders = tuple[tuple[str, bytes | None], ...]

_NAME_RE: Final = re.compile(
    r"(?:^|/)topics/(?P<topic>[^/]+)/partition=(?P<partition>\d+)/"
    r"(?P=topic)\+(?P=partition)\+(?P<start>\d+)\.jsonl\.gz$"
)


class ArchiveFormatError(ValueError):
    """An object or line that is not in the archive format."""


@dataclass(frozen=True, slots=True, order=True)
class ObjectName:
    """One archive object, parsed from its key."""

    topic: str
    partition: int
    start_offset: int
    key: str


def partition_dir(topic: str, partition: int | None = None) -> str:
    """The key prefix of a topic's objects, or of one partition's."""
    if partition is None:
        return f"{TOPICS_DIR}/{topic}/"
    return f"{TOPICS_DIR}/{topic}/partition={partition}/"


def object_key(topic: str, partition: int, start_offset: int) -> str:
    """``topics/<topic>/partition=<p>/<topic>+<p>+<startOffset>.jsonl.gz`` (no store prefix)."""
    name = f"{topic}+{partition}+{start_offset:0{OFFSET_PAD}d}{SUFFIX}"
    return f"{partition_dir(topic, partition)}{name}"


def parse_object_key(key: str) -> ObjectName | None:
    """The object a key names, or None when the key is not an archive object's."""
    match = _NAME_RE.search(key)
    if match is None:
        return None
    return ObjectName(match["topic"], int(match["partition"]), int(match["start"]), key)


@dataclass(frozen=True, slots=True)
class ArchivedRecord:
    """One Kafka record as the archive holds it."""

    topic: str
    partition: int
    offset: int
    timestamp_ms: int
    key: bytes | None
    value: bytes | None
    headers: ArchivedHeaders

    @property
    def where(self) -> str:
        return f"{self.topic}[{self.partition}]@{self.offset}"


def _text(data: bytes) -> str | None:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def encode_line(
    offset: int,
    timestamp_ms: int,
    key: bytes | None,
    value: bytes | None,
    headers: Sequence[tuple[str, bytes | None]] | None,
) -> bytes:
    """One record as one JSON line (newline included)."""
    line: dict[str, Any] = {"offset": offset, "timestamp": timestamp_ms}
    for name, data in (("key", key), ("value", value)):
        text = None if data is None else _text(data)
        line[name] = text
        if data is not None and text is None:
            line[f"{name}_b64"] = _b64(data)
    pairs: list[list[str | None]] = []
    for name, data in headers or ():
        if data is None:
            pairs.append([name, None])
        elif (text := _text(data)) is not None:
            pairs.append([name, text])
        else:
            pairs.append([name, None, _b64(data)])
    line["headers"] = pairs
    return orjson.dumps(line) + b"\n"


def _bytes_field(line: dict[str, Any], name: str) -> bytes | None:
    encoded = line.get(f"{name}_b64")
    if encoded is not None:
        return base64.b64decode(encoded, validate=True)
    text = line.get(name)
    if text is None:
        return None
    if not isinstance(text, str):
        raise ArchiveFormatError(f"{name} is {type(text).__name__}, not text")
    return text.encode("utf-8")


def _header(pair: Any) -> tuple[str, bytes | None]:
    if not isinstance(pair, list) or not 2 <= len(pair) <= 3 or not isinstance(pair[0], str):
        raise ArchiveFormatError(f"bad header entry {pair!r}")
    if len(pair) == 3:
        return pair[0], base64.b64decode(pair[2], validate=True)
    if pair[1] is None:
        return pair[0], None
    if not isinstance(pair[1], str):
        raise ArchiveFormatError(f"bad header value in {pair!r}")
    return pair[0], pair[1].encode("utf-8")


def decode_line(data: bytes, topic: str, partition: int) -> ArchivedRecord:
    try:
        line = orjson.loads(data)
        if not isinstance(line, dict):
            raise ArchiveFormatError("a line is not a JSON object")
        return ArchivedRecord(
            topic=topic,
            partition=partition,
            offset=int(line["offset"]),
            timestamp_ms=int(line["timestamp"]),
            key=_bytes_field(line, "key"),
            value=_bytes_field(line, "value"),
            headers=tuple(_header(pair) for pair in line.get("headers") or ()),
        )
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, ArchiveFormatError):
            raise
        raise ArchiveFormatError(f"unreadable archive line: {exc}") from exc


def encode_object(lines: Iterable[bytes]) -> bytes:
    """The stored bytes of an object: gzip of the lines, deterministic (mtime 0)."""
    return gzip.compress(b"".join(lines), compresslevel=6, mtime=0)


def decode_object(data: bytes, topic: str, partition: int) -> list[ArchivedRecord]:
    """Every record of an object, in the order stored (offset order)."""
    try:
        raw = gzip.decompress(data)
    except (OSError, EOFError) as exc:
        raise ArchiveFormatError(f"not a gzip object: {exc}") from exc
    return [decode_line(line, topic, partition) for line in raw.splitlines() if line.strip()]
