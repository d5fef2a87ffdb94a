"""The base of every Sluice message, and the JSON codec they share.

Every model ignores unknown fields, so a newer producer never breaks an older consumer during a
rolling upgrade. On the wire (`encode`), Sluice's own messages leave out None fields; a model
that sets `exclude_none_on_wire = False` (the answers, which are exactly OpenAI's objects) keeps
its explicit nulls. `decode` refuses with a `SchemaError` whose reason says why.
"""

from __future__ import annotations

from typing import Any, ClassVar, TypeVar

import orjson
import pydantic
from pydantic import BaseModel, ConfigDict

from schemas.errors import SchemaError, format_loc, validation_error_reason

M = TypeVar("M", bound="WireModel")


class WireModel(BaseModel):
    """Base of everything Sluice puts on a topic: unknown fields are ignored on decode."""

    model_config = ConfigDict(extra="ignore")

    exclude_none_on_wire: ClassVar[bool] = True


class Message(WireModel):
    """A top-level message; `ce_type` is the CloudEvents type its record carries."""

    ce_type: ClassVar[str]


def encode(model: WireModel) -> bytes:
    """UTF-8 JSON bytes (orjson); None fields left out except where OpenAI keeps nulls."""
    return orjson.dumps(
        model.model_dump(mode="json", exclude_none=type(model).exclude_none_on_wire)
    )


def _json_kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    return "a string" if isinstance(value, str) else "an array"


def load_object(data: bytes | None) -> dict[str, Any]:
    """The JSON object in ``data``; `SchemaError` (`bad-json` or `schema`) when it is not one."""
    if data is None:
        raise SchemaError("bad-json", "the message has no value (tombstone)")
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise SchemaError("bad-json", f"the body is not valid UTF-8 JSON: {exc.msg}") from exc
    if not isinstance(obj, dict):
        raise SchemaError("schema", f"the body must be a JSON object, not {_json_kind(obj)}")
    return obj


def _schema_error(exc: pydantic.ValidationError) -> SchemaError:
    errors = exc.errors(include_url=False, include_input=False, include_context=False)
    first = errors[0] if errors else None
    empty = first is not None and (
        first["type"] == "empty_user_message"
        or (first["type"] == "too_short" and tuple(first["loc"]) == ("messages",))
    )
    param = (format_loc(first["loc"]) or None) if first is not None else None
    return SchemaError("empty-messages" if empty else "schema", validation_error_reason(exc), param)


def validate(model_cls: type[M], obj: dict[str, Any]) -> M:
    """``obj`` as a `model_cls`; a `SchemaError` naming the first offending field otherwise."""
    try:
        return model_cls.model_validate(obj)
    except pydantic.ValidationError as exc:
        raise _schema_error(exc) from exc


def decode(model_cls: type[M], data: bytes | None) -> M:
    """Parse bytes into `model_cls`; raises `SchemaError` (`bad-json` or `schema`) otherwise."""
    return validate(model_cls, load_object(data))
