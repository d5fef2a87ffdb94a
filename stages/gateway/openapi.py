"""The gateway's OpenAPI document (``/openapi.json``), made to say what the gateway really does.

FastAPI's generated document is corrected in three ways:

- routes that read their body raw (to bound its size before parsing) name their request schema
  with ``json_body``; ``install_openapi`` adds those models, and the ``ErrorAnswer`` every error
  response refers to, under ``components/schemas``;
- error responses are documented with ``error_responses`` as OpenAI error objects;
- FastAPI's 422 and its validation-error schemas are removed: validation errors are a 400.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from schemas.messages import ErrorAnswer

REF_TEMPLATE = "#/components/schemas/{model}"
STATUS_TEXT = {
    400: "Invalid request",
    401: "Missing or wrong API key",
    404: "Not found",
    413: "Body or prompt too large",
    500: "Server error",
    503: "Unavailable (circuit open, or Kafka unreachable)",
    504: "No answer within the request timeout",
}
_ERROR_CONTENT = {
    "application/json": {"schema": {"$ref": REF_TEMPLATE.format(model="ErrorAnswer")}}
}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries: each status answers with an OpenAI error object."""
    return {s: {"description": STATUS_TEXT[s], "content": _ERROR_CONTENT} for s in statuses}


def json_body(model: type[BaseModel]) -> dict[str, Any]:
    """``openapi_extra`` for a route that reads its JSON body itself: the body is ``model``."""
    schema = {"$ref": REF_TEMPLATE.format(model=model.__name__)}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def install_openapi(app: FastAPI, request_models: Sequence[type[BaseModel]]) -> None:
    """Serve the corrected document for ``app``; ``request_models`` are those of ``json_body``."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            spec = get_openapi(
                title=app.title,
                version=app.version,
                description=app.description,
                routes=app.routes,
            )
            schemas = spec.setdefault("components", {}).setdefault("schemas", {})
            for model in request_models:
                schema = model.model_json_schema(ref_template=REF_TEMPLATE)
                schemas.update(schema.pop("$defs", {}))
                schemas[model.__name__] = schema
            schemas.setdefault(
                "ErrorAnswer", ErrorAnswer.model_json_schema(ref_template=REF_TEMPLATE)
            )
            schemas.update(schemas["ErrorAnswer"].pop("$defs", {}))
            validation_errors_are_400(spec)
            app.openapi_schema = spec
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def validation_errors_are_400(spec: dict[str, Any]) -> None:
    """FastAPI documents its 422; this gateway answers validation errors with an OpenAI 400."""
    for operations in spec.get("paths", {}).values():
        for operation in operations.values():
            responses = operation.get("responses", {})
            if responses.pop("422", None) is not None:
                responses.setdefault("400", error_responses(400)[400])
    schemas = spec.get("components", {}).get("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
