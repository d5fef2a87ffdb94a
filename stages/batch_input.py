"""A batch input file checked line by line, as OpenAI checks it while a batch is ``validating``.

Each non-blank line must be a JSON object ``{custom_id, method, url, body}`` with a unique
non-empty ``custom_id``, ``method`` ``POST``, ``url`` the batch's endpoint and an object
``body``. Problems fail the whole batch; each ``BatchError`` names its 1-based ``line``. The
codes: ``empty_file``, ``too_many_tasks``, ``invalid_json_line``, ``missing_required_parameter``,
``invalid_method``, ``invalid_url``, ``duplicate_custom_id``. Whether a ``body`` is a request the
model can serve is for the pipeline to say, per line, in the error file.

Pure: no storage, no Kafka; the batcher runs it on the file's bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

import orjson

from schemas.batch import BATCH_ENDPOINT, BatchError

MAX_ERRORS: Final = 100  # a broken file reports its first problems, not a million of them


@dataclass(frozen=True, slots=True)
class Line:
    """A valid request of the input file; ``number`` is its 1-based line in the file."""

    number: int
    custom_id: str
    body: dict[str, Any]


def _check(number: int, raw: bytes, endpoint: str) -> Line | BatchError:
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return BatchError(
            code="invalid_json_line",
            message=f"This line is not parseable as valid JSON (line {number}).",
            line=number,
        )
    if not isinstance(obj, dict):
        return BatchError(
            code="invalid_json_line",
            message=f"This line is not a JSON object (line {number}).",
            line=number,
        )
    for name in ("custom_id", "method", "url", "body"):
        if name not in obj:
            return BatchError(
                code="missing_required_parameter",
                message=f"Missing required parameter: '{name}' (line {number}).",
                param=name,
                line=number,
            )
    custom_id = obj["custom_id"]
    if not isinstance(custom_id, str) or not custom_id or len(custom_id) > 512:
        return BatchError(
            code="invalid_request",
            message=f"'custom_id' must be a string of 1 to 512 characters (line {number}).",
            param="custom_id",
            line=number,
        )
    if obj["method"] != "POST":
        return BatchError(
            code="invalid_method",
            message=f"The method must be POST (line {number}).",
            param="method",
            line=number,
        )
    if obj["url"] != endpoint:
        return BatchError(
            code="invalid_url",
            message=f"The url must be {endpoint}, the batch's endpoint (line {number}).",
            param="url",
            line=number,
        )
    if not isinstance(obj["body"], dict):
        return BatchError(
            code="invalid_request",
            message=f"'body' must be a JSON object (line {number}).",
            param="body",
            line=number,
        )
    return Line(number, custom_id, obj["body"])


def check_input(
    content: bytes, *, max_lines: int, endpoint: str = BATCH_ENDPOINT
) -> tuple[list[Line], list[BatchError]]:
    """The file's requests, and its problems (the batch fails when there are any)."""
    lines: list[Line] = []
    errors: list[BatchError] = []
    seen: dict[str, int] = {}
    for number, raw in enumerate(content.split(b"\n"), start=1):
        if not raw.strip():
            continue
        if len(lines) + len(errors) >= max_lines:
            errors.append(
                BatchError(
                    code="too_many_tasks",
                    message=f"The file has more than {max_lines} requests, the limit of one "
                    f"batch (line {number}).",
                    line=number,
                )
            )
            break
        checked = _check(number, raw, endpoint)
        if isinstance(checked, Line):
            first = seen.setdefault(checked.custom_id, number)
            if first != number:
                checked = BatchError(
                    code="duplicate_custom_id",
                    message=f"The custom_id {checked.custom_id!r} of line {number} is already "
                    f"used by line {first}.",
                    param="custom_id",
                    line=number,
                )
        if isinstance(checked, BatchError):
            errors.append(checked)
            if len(errors) >= MAX_ERRORS:
                break
        else:
            lines.append(checked)
    if not lines and not errors:
        errors.append(BatchError(code="empty_file", message="The input file has no requests."))
    return lines, errors
