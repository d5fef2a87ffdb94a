"""Hostile records for the prompts topic, each followed by valid canaries on its partition.

Every record carries a ``sluice-request-id`` header (``hostile-<n>``), so the checker can find
its answer or its dead letter; canaries are ordinary prompts with body ids ``canary-<n>``.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

import orjson

from tests.chaos.raw import RawHeaders

# Kinds the loop is expected to survive today, and the ones that fail until the wiring lands.
SURVIVABLE = (
    "random-bytes",
    "invalid-utf8",
    "null-value",
    "empty-value",
    "near-prompt-limit",
    "over-prompt-limit",
    "deep-nesting",
    "wrong-types",
    "ten-thousand-messages",
    "nan-infinity",
    "garbage-header-values",
    "wrong-cloudevents-version",
    "random-key",
)
OVERSIZED = "over-producer-limit"  # ~1 MiB: the broker takes it, its dead letter does not fit
UNDECODABLE = "non-utf8-header-key"  # aiokafka cannot unpack the batch


@dataclass(frozen=True)
class Hostile:
    id: str
    kind: str
    key: bytes | None
    value: bytes | None
    headers: RawHeaders


def canary(n: int) -> bytes:
    return orjson.dumps({"id": f"canary-{n}", "messages": [{"role": "user", "content": "hi"}]})


def _prompt(content: object, **fields: object) -> bytes:
    return orjson.dumps({"messages": [{"role": "user", "content": content}], **fields})


def _value(kind: str, rng: random.Random, max_prompt_bytes: int) -> bytes | None:
    if kind == "random-bytes":
        return rng.randbytes(rng.randint(1, 2048))
    if kind == "invalid-utf8":
        return b'{"messages": [{"role": "user", "content": "\xff\xfe\xc3\x28"}]}'
    if kind == "null-value":
        return None
    if kind == "empty-value":
        return b""
    if kind in {"near-prompt-limit", "over-prompt-limit"}:
        base = len(_prompt(""))
        size = max_prompt_bytes - base - 1 if kind == "near-prompt-limit" else max_prompt_bytes
        return _prompt("a" * size)
    if kind == OVERSIZED:  # the broker's default limit is 1,048,588 bytes per batch
        return _prompt("b" * (1_048_300 - len(_prompt(""))))
    if kind == "deep-nesting":
        depth = rng.choice([100, 1000, 10_000])
        return b'{"messages": ' + b"[" * depth + b"]" * depth + b"}"
    if kind == "wrong-types":
        return rng.choice(
            [
                orjson.dumps({"messages": 5}),
                orjson.dumps({"messages": [{"role": 7, "content": {"a": 1}}]}),
                orjson.dumps([1, 2, 3]),
                orjson.dumps({"messages": [{"role": "user", "content": "x"}], "max_tokens": "x"}),
                orjson.dumps("a string"),
            ]
        )
    if kind == "ten-thousand-messages":
        return orjson.dumps({"messages": [{"role": "user", "content": "x"}] * 10_000})
    if kind == "nan-infinity":
        return rng.choice(
            [
                b'{"messages": [{"role": "user", "content": "x"}], "temperature": NaN}',
                b'{"messages": [{"role": "user", "content": "x"}], "top_p": Infinity}',
                b'{"messages": [{"role": "user", "content": "x"}], "seed": -Infinity}',
            ]
        )
    return _prompt("hello")


def _headers(kind: str, rid: str, rng: random.Random) -> list[tuple[bytes, bytes | None]]:
    headers: list[tuple[bytes, bytes | None]] = [(b"sluice-request-id", rid.encode())]
    if kind == "garbage-header-values":
        headers += [
            (b"traceparent", rng.randbytes(55)),
            (b"sluice-deadline", b"\xff\xff"),
            (b"sluice-reply-to", b"nowhere:-1"),
            (b"ce_time", b"yesterday"),
            (b"x-null", None),
        ]
    elif kind == "wrong-cloudevents-version":
        headers += [(b"ce_specversion", rng.choice([b"0.3", b"9.9", b""])), (b"ce_type", b"?")]
    elif kind == UNDECODABLE:
        headers.append((b"\xff\xfe\xfd-bad-key", b"v"))
    return headers


def hostile_records(
    kinds: tuple[str, ...], count: int, *, seed: int = 7, max_prompt_bytes: int = 4096
) -> Iterator[Hostile]:
    """``count`` hostile records cycling through ``kinds`` (a seeded mix)."""
    rng = random.Random(seed)
    for n in range(count):
        kind = kinds[n % len(kinds)]
        rid = f"hostile-{n}"
        key: bytes | None = f"conv-{n % 7}".encode()
        if kind == "random-key":
            key = rng.choice([None, b"", rng.randbytes(rng.randint(1, 300))])
        yield Hostile(rid, kind, key, _value(kind, rng, max_prompt_bytes), _headers(kind, rid, rng))
