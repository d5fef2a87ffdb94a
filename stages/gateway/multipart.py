"""A ``multipart/form-data`` body split into its fields, for ``POST /v1/files``.

The body is read whole first (bounded by ``SLUICE_FILES_MAX_BYTES``), then cut at its boundary
lines (RFC 7578). Each part's ``Content-Disposition`` gives its field name and, for a file, its
file name. Malformed bodies raise ``MultipartError`` with a sentence a client can act on.
"""

from __future__ import annotations

from dataclasses import dataclass
from email.message import Message
from email.parser import BytesHeaderParser
from email.policy import HTTP


class MultipartError(ValueError):
    """The body is not well-formed ``multipart/form-data``."""


@dataclass(frozen=True, slots=True)
class Part:
    name: str
    filename: str | None
    data: bytes


def boundary_of(content_type: str | None) -> bytes:
    """The boundary a ``multipart/form-data`` content type names."""
    if not content_type:
        raise MultipartError("the request must be multipart/form-data (no Content-Type)")
    header = Message()
    header["content-type"] = content_type
    if header.get_content_type() != "multipart/form-data":
        raise MultipartError(
            f"the request must be multipart/form-data, not {header.get_content_type()}"
        )
    boundary = header.get_param("boundary")
    if not isinstance(boundary, str) or not boundary or len(boundary) > 200:
        raise MultipartError("the multipart/form-data Content-Type names no boundary")
    return boundary.encode("latin-1")


def parse_form(body: bytes, content_type: str | None) -> list[Part]:
    """The parts of ``body`` in order."""
    boundary = boundary_of(content_type)
    delimiter = b"--" + boundary
    start = body.find(delimiter)
    if start < 0 or (start > 0 and body[start - 2 : start] != b"\r\n"):
        raise MultipartError("the body does not start with the multipart boundary")
    parts: list[Part] = []
    pos = _after_delimiter(body, start + len(delimiter))
    separator = b"\r\n" + delimiter
    while True:
        if body.startswith(b"--", pos):
            return parts  # the closing delimiter
        if not body.startswith(b"\r\n", pos):
            raise MultipartError("a multipart boundary line is malformed")
        pos += 2
        end = body.find(separator, pos)
        while end >= 0 and not _ends_delimiter(body, end + len(separator)):
            end = body.find(separator, end + 1)  # the boundary text inside the data
        if end < 0:
            raise MultipartError("the multipart body ends before its closing boundary")
        parts.append(_part(body[pos:end]))
        pos = _after_delimiter(body, end + len(separator))


def _after_delimiter(body: bytes, pos: int) -> int:
    """Past the optional linear whitespace RFC 2046 allows after a boundary."""
    while body[pos : pos + 1] in (b" ", b"\t"):
        pos += 1
    return pos


def _ends_delimiter(body: bytes, pos: int) -> bool:
    pos = _after_delimiter(body, pos)
    return body.startswith(b"\r\n", pos) or body.startswith(b"--", pos)


def _part(raw: bytes) -> Part:
    head_end = raw.find(b"\r\n\r\n")
    if head_end < 0:
        raise MultipartError("a multipart part has no header block")
    headers = BytesHeaderParser(policy=HTTP).parsebytes(raw[: head_end + 4])
    name = headers.get_param("name", header="content-disposition")
    if headers.get_content_disposition() != "form-data" or not isinstance(name, str):
        raise MultipartError("a multipart part has no Content-Disposition: form-data; name=…")
    return Part(name, headers.get_filename(), raw[head_end + 4 :])


def fields(parts: list[Part]) -> dict[str, Part]:
    """Parts by field name; a field sent twice is refused."""
    out: dict[str, Part] = {}
    for part in parts:
        if part.name in out:
            raise MultipartError(f"the form field {part.name!r} is given more than once")
        out[part.name] = part
    return out
