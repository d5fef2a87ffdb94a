"""The OpenAI Batch API's objects: files, batches, and the lines of their JSONL files.

| model            | what                                                                    |
|------------------|-------------------------------------------------------------------------|
| `FileObject`     | OpenAI's `file` object (`POST /v1/files`, `GET /v1/files/{id}`)         |
| `BatchObject`    | OpenAI's `batch` object; also the value of the compacted batches topic |
| `BatchCancel`    | a cancel request for one batch, beside its state on the batches topic  |
| `RequestLine`    | one line of a batch input file: `{custom_id, method, url, body}`        |
| `OutputLine`     | one line of a batch output or error file, as OpenAI writes them         |

Ids are deterministic where a restart must find the same thing again: the request id of input
line ``n`` (1-based) of batch ``batch_x`` is ``batch_x-n``, and a batch's output and error files
are ``file-<batch hex>-output`` and ``file-<batch hex>-errors``.
"""

from __future__ import annotations

import uuid
from typing import Any, ClassVar, Final, Literal

from pydantic import Field

from schemas.wire import Message, WireModel

BATCH_ENDPOINT: Final = "/v1/chat/completions"
COMPLETION_WINDOW: Final = "24h"
CE_BATCH: Final = "sluice.batch"
CE_BATCH_CANCEL: Final = "sluice.batch.cancel"

FilePurpose = Literal["batch", "batch_output"]
BatchStatus = Literal[
    "validating",
    "failed",
    "in_progress",
    "finalizing",
    "completed",
    "expired",
    "cancelling",
    "cancelled",
]
TERMINAL: Final[frozenset[str]] = frozenset({"failed", "completed", "expired", "cancelled"})
"""Statuses a batch never leaves."""


def new_file_id() -> str:
    return f"file-{uuid.uuid4().hex}"


def new_batch_id() -> str:
    return f"batch_{uuid.uuid4().hex}"


def _hex_of(batch_id: str) -> str:
    return batch_id.removeprefix("batch_")


def output_file_id(batch_id: str) -> str:
    return f"file-{_hex_of(batch_id)}-output"


def error_file_id(batch_id: str) -> str:
    return f"file-{_hex_of(batch_id)}-errors"


def line_request_id(batch_id: str, line: int) -> str:
    """The request id of input line ``line`` (1-based) of ``batch_id``: the same after restarts."""
    return f"{batch_id}-{line}"


def parse_line_request_id(request_id: str) -> tuple[str, int] | None:
    """``(batch id, line)`` of a batch line's request id; None for any other request id."""
    if not request_id.startswith("batch_"):
        return None
    batch_id, sep, line = request_id.rpartition("-")
    if not sep or not line.isdigit() or not batch_id:
        return None
    return batch_id, int(line)


class FileObject(WireModel):
    """OpenAI's `file` object."""

    exclude_none_on_wire: ClassVar[bool] = False

    id: str
    object: Literal["file"] = "file"
    bytes: int = Field(ge=0)
    created_at: int
    filename: str
    purpose: FilePurpose
    status: Literal["uploaded", "processed", "error"] = "processed"
    status_details: str | None = None
    expires_at: int | None = None


class FileDeleted(WireModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool = True


class FileList(WireModel):
    object: Literal["list"] = "list"
    data: list[FileObject]
    has_more: bool = False


class BatchError(WireModel):
    """One problem with a batch's input (``line`` is 1-based), as OpenAI reports it."""

    exclude_none_on_wire: ClassVar[bool] = False

    code: str
    message: str
    param: str | None = None
    line: int | None = None


class BatchErrors(WireModel):
    object: Literal["list"] = "list"
    data: list[BatchError]


class RequestCounts(WireModel):
    total: int = Field(default=0, ge=0)
    completed: int = Field(default=0, ge=0)
    failed: int = Field(default=0, ge=0)


class BatchObject(Message):
    """OpenAI's `batch` object, exactly; the value of each batch's record on the batches topic."""

    ce_type: ClassVar[str] = CE_BATCH
    exclude_none_on_wire: ClassVar[bool] = False

    id: str
    object: Literal["batch"] = "batch"
    endpoint: str = BATCH_ENDPOINT
    errors: BatchErrors | None = None
    input_file_id: str
    completion_window: str = COMPLETION_WINDOW
    status: BatchStatus = "validating"
    output_file_id: str | None = None
    error_file_id: str | None = None
    created_at: int
    in_progress_at: int | None = None
    expires_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    request_counts: RequestCounts = Field(default_factory=RequestCounts)
    metadata: dict[str, str] | None = None

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL


class BatchCancel(Message):
    """Cancel ``batch_id``: written by the gateway, acted on by the batcher that owns the batch."""

    ce_type: ClassVar[str] = CE_BATCH_CANCEL

    batch_id: str
    requested_at: int


class BatchList(WireModel):
    exclude_none_on_wire: ClassVar[bool] = False

    object: Literal["list"] = "list"
    data: list[BatchObject]
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool = False


class RequestLine(WireModel):
    """One request of a batch input file."""

    custom_id: str = Field(min_length=1, max_length=512)
    method: str
    url: str
    body: dict[str, Any]


class LineResponse(WireModel):
    exclude_none_on_wire: ClassVar[bool] = False

    status_code: int
    request_id: str
    body: dict[str, Any]


class LineError(WireModel):
    exclude_none_on_wire: ClassVar[bool] = False

    code: str
    message: str


class OutputLine(WireModel):
    """A line of an output file (a response) or an error file (an error response, or an error
    such as ``batch_expired`` when the request was never answered)."""

    exclude_none_on_wire: ClassVar[bool] = False

    id: str
    custom_id: str
    response: LineResponse | None = None
    error: LineError | None = None


def output_line_id(batch_id: str, line: int) -> str:
    return f"batch_req_{_hex_of(batch_id)}_{line}"
