"""Record headers: CloudEvents (Kafka protocol binding, binary content mode), W3C trace context,
and Sluice's own (request id, timings, attempts). The dead-letter header sets of Spring
Kafka and Kafka Connect are in `schemas.dlt`.

Headers are aiokafka's shape, `list[tuple[str, bytes]]`. Values are UTF-8 text except Spring's
`kafka_dlt-original-partition/-offset/-timestamp`, which Spring writes as big-endian binary
integers (partition 4 bytes, offset and timestamp 8 bytes); Kafka Connect's
`__connect.errors.partition/-offset` are ASCII decimal. `decode_dlt_int` reads both.

Reading is tolerant: a foreign producer may send plain JSON with no CloudEvents headers at all,
so every parsed field may be None. Names match case-insensitively and, as in Kafka's
`Headers.lastHeader`, the last occurrence of a name wins.
"""

from __future__ import annotations

import re
import secrets
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final

__all__ = [
    "APPLICATION_JSON",
    "CE_ID",
    "CE_SOURCE",
    "CE_SPECVERSION",
    "CE_TIME",
    "CE_TYPE",
    "CONTENT_TYPE",
    "FIRST_ATTEMPT",
    "SLUICE_ATTEMPT",
    "SLUICE_DEGRADED",
    "SLUICE_DLT_REASON",
    "SLUICE_REQUEST_ID",
    "SLUICE_TIMINGS",
    "SPECVERSION",
    "TRACEPARENT",
    "TRACESTATE",
    "CloudEventProblem",
    "EventHeaders",
    "Headers",
    "HeadersIn",
    "TraceContext",
    "check_cloudevent",
    "child_traceparent",
    "header_bytes",
    "header_value",
    "is_valid_traceparent",
    "make_headers",
    "new_traceparent",
    "parse_attempt",
    "parse_headers",
    "parse_traceparent",
]

Headers = list[tuple[str, bytes]]
"""Headers as Sluice writes them (aiokafka's producer format)."""
HeadersIn = Sequence[tuple[str, bytes | None]]
"""Headers as they may arrive: Kafka allows null values."""

# CloudEvents, Kafka protocol binding, binary content mode.
CE_SPECVERSION: Final = "ce_specversion"
CE_ID: Final = "ce_id"
CE_SOURCE: Final = "ce_source"
CE_TYPE: Final = "ce_type"
CE_TIME: Final = "ce_time"
CONTENT_TYPE: Final = "content-type"
SPECVERSION: Final = "1.0"
APPLICATION_JSON: Final = "application/json"

# W3C trace context.
TRACEPARENT: Final = "traceparent"
TRACESTATE: Final = "tracestate"

# Sluice's own.
SLUICE_REQUEST_ID: Final = "sluice-request-id"
SLUICE_DEGRADED: Final = "sluice-degraded"
SLUICE_TIMINGS: Final = "sluice-timings"
SLUICE_DLT_REASON: Final = "sluice-dlt-reason"
SLUICE_ATTEMPT: Final = "sluice-attempt"
"""Which attempt at a request a record belongs to: decimal, 1 for the first; `sluice replay`
starts a new one, and stages copy it from input to output (see `parse_attempt`)."""
FIRST_ATTEMPT: Final = 1

_CE_RESERVED: Final = frozenset(
    {CE_SPECVERSION, CE_ID, CE_SOURCE, CE_TYPE, CE_TIME, CONTENT_TYPE, TRACEPARENT}
    | {SLUICE_REQUEST_ID}
)
# --- reading ---------------------------------------------------------------------------------


def header_bytes(headers: HeadersIn | None, name: str) -> bytes | None:
    """The raw value of the last header called `name` (case-insensitive), or None."""
    wanted = name.lower()
    for key, value in reversed(headers or ()):
        if key.lower() == wanted:
            return value
    return None


def header_value(headers: HeadersIn | None, name: str) -> str | None:
    """The last header called `name` as text (invalid UTF-8 replaced), or None if absent."""
    raw = header_bytes(headers, name)
    return None if raw is None else raw.decode("utf-8", errors="replace")


@dataclass(frozen=True, slots=True)
class EventHeaders:
    """The CloudEvents attributes and Sluice headers of one record; any may be None."""

    specversion: str | None
    id: str | None
    source: str | None
    type: str | None
    time: str | None
    content_type: str | None
    traceparent: str | None
    request_id: str | None
    degraded: bool
    timings: str | None

    @property
    def is_cloudevent(self) -> bool:
        return self.specversion is not None and self.type is not None

    @property
    def stage(self) -> str | None:
        """`preprocess` for `ce_source=/sluice/preprocess`; None for foreign sources."""
        if self.source is not None and self.source.startswith("/sluice/"):
            return self.source.removeprefix("/sluice/") or None
        return None


def parse_headers(headers: HeadersIn | None) -> EventHeaders:
    """Read CloudEvents and Sluice headers; never raises, missing ones come back as None."""
    degraded = (header_value(headers, SLUICE_DEGRADED) or "").strip().lower()
    return EventHeaders(
        specversion=header_value(headers, CE_SPECVERSION),
        id=header_value(headers, CE_ID),
        source=header_value(headers, CE_SOURCE),
        type=header_value(headers, CE_TYPE),
        time=header_value(headers, CE_TIME),
        content_type=header_value(headers, CONTENT_TYPE),
        traceparent=header_value(headers, TRACEPARENT),
        request_id=header_value(headers, SLUICE_REQUEST_ID),
        degraded=degraded in {"1", "true", "yes"},
        timings=header_value(headers, SLUICE_TIMINGS),
    )


def parse_attempt(headers: HeadersIn | None) -> int:
    """The record's `sluice-attempt`; `FIRST_ATTEMPT` when absent, unreadable or below 1."""
    value = header_value(headers, SLUICE_ATTEMPT)
    try:
        return max(FIRST_ATTEMPT, int(value)) if value is not None else FIRST_ATTEMPT
    except ValueError:
        return FIRST_ATTEMPT


@dataclass(frozen=True, slots=True)
class CloudEventProblem:
    """Why a record's CloudEvents headers make it unacceptable where it arrived."""

    reason: str  # the `sluice-dlt-reason`: `unsupported-specversion` or `wrong-ce-type`
    header: str  # the header at fault
    message: str  # for the error answer and the dead letter


def _shown(value: str) -> str:
    return repr(value if len(value) <= 64 else value[:64] + "…")


def check_cloudevent(headers: HeadersIn | None, expected_type: str) -> CloudEventProblem | None:
    """None when a record may be taken as `expected_type`, else what is wrong with it.

    Records without CloudEvents headers (plain JSON from a foreign producer) pass. A present
    `ce_specversion` must be the one this binding supports ("1.0"); a present `ce_type` must be
    `expected_type` (an answer published to the prompts topic is not a prompt).
    """
    specversion = header_value(headers, CE_SPECVERSION)
    if specversion is not None and specversion.strip() != SPECVERSION:
        return CloudEventProblem(
            "unsupported-specversion",
            CE_SPECVERSION,
            f"unsupported CloudEvents {CE_SPECVERSION} {_shown(specversion)}: only "
            f"{SPECVERSION!r} is supported (or send plain JSON without CloudEvents headers)",
        )
    ce_type = header_value(headers, CE_TYPE)
    if ce_type is not None and ce_type.strip() != expected_type:
        return CloudEventProblem(
            "wrong-ce-type",
            CE_TYPE,
            f"{CE_TYPE} {_shown(ce_type)} does not belong on this topic: it takes "
            f"{expected_type!r} (or plain JSON without CloudEvents headers)",
        )
    return None


# --- trace context ---------------------------------------------------------------------------

_TRACEPARENT_RE: Final = re.compile(
    r"(?P<version>[0-9a-f]{2})-(?P<trace_id>[0-9a-f]{32})-(?P<parent_id>[0-9a-f]{16})"
    r"-(?P<flags>[0-9a-f]{2})"
)


@dataclass(frozen=True, slots=True)
class TraceContext:
    trace_id: str
    parent_id: str
    flags: str

    @property
    def sampled(self) -> bool:
        return bool(int(self.flags, 16) & 0x01)

    def header(self) -> str:
        return f"00-{self.trace_id}-{self.parent_id}-{self.flags}"


def parse_traceparent(value: str | None) -> TraceContext | None:
    """Parse a W3C `traceparent`; None when absent or invalid.

    Version 00 must be exactly `00-<32 hex>-<16 hex>-<2 hex>` (lowercase). Version `ff` and
    all-zero trace or parent ids are invalid. A later version is read by its first four fields
    when what follows them starts with "-", as the W3C spec asks.
    """
    if value is None:
        return None
    value = value.strip()
    match = _TRACEPARENT_RE.match(value)
    if match is None:
        return None
    version = match["version"]
    rest = value[match.end() :]
    if version == "ff" or (version == "00" and rest) or (rest and not rest.startswith("-")):
        return None
    if set(match["trace_id"]) == {"0"} or set(match["parent_id"]) == {"0"}:
        return None
    return TraceContext(match["trace_id"], match["parent_id"], match["flags"])


def is_valid_traceparent(value: str | None) -> bool:
    return parse_traceparent(value) is not None


def _random_hex(nbytes: int) -> str:
    while True:
        value = secrets.token_hex(nbytes)
        if set(value) != {"0"}:
            return value


def new_traceparent(*, sampled: bool = True) -> str:
    """Start a new trace: fresh trace id and span id."""
    return f"00-{_random_hex(16)}-{_random_hex(8)}-{'01' if sampled else '00'}"


def child_traceparent(parent: str | None) -> str:
    """Continue `parent`'s trace under a new span id, keeping its flags.

    A missing or invalid `parent` starts a new trace instead.
    """
    context = parse_traceparent(parent)
    if context is None:
        return new_traceparent()
    return TraceContext(context.trace_id, _random_hex(8), context.flags).header()


# --- writing ---------------------------------------------------------------------------------


def _rfc3339_now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def make_headers(
    ce_type: str,
    source_stage: str,
    request_id: str,
    *,
    traceparent: str | None = None,
    extra: Mapping[str, str] | None = None,
) -> Headers:
    """The headers of a record Sluice produces.

    `traceparent` is the incoming record's: its trace continues under a new span id (a new
    trace starts when it is None or invalid). `extra` adds headers such as `sluice-degraded`
    or `sluice-timings`; it may not replace the CloudEvents, trace or request-id headers.
    """
    headers: Headers = [
        (CE_SPECVERSION, SPECVERSION.encode()),
        (CE_ID, str(uuid.uuid4()).encode()),
        (CE_SOURCE, f"/sluice/{source_stage}".encode()),
        (CE_TYPE, ce_type.encode()),
        (CE_TIME, _rfc3339_now().encode()),
        (CONTENT_TYPE, APPLICATION_JSON.encode()),
        (TRACEPARENT, child_traceparent(traceparent).encode()),
        (SLUICE_REQUEST_ID, request_id.encode()),
    ]
    for name, value in (extra or {}).items():
        if name.lower() in _CE_RESERVED:
            raise ValueError(f"extra header {name!r} would override a header make_headers sets")
        headers.append((name, value.encode()))
    return headers
