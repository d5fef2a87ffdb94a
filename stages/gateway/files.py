"""The Files API: ``POST /v1/files``, ``GET /v1/files[/{id}[/content]]``, ``DELETE /v1/files/{id}``.

Uploads are ``multipart/form-data`` with ``purpose=batch`` and a ``file`` part (what the OpenAI
SDKs' ``files.create`` sends), up to ``SLUICE_FILES_MAX_BYTES``. Files live in the archive's
object store (``stages.batch_files``), so every gateway replica and the batcher see them. The
batcher's output and error files (purpose ``batch_output``) are served the same way.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

from fastapi import APIRouter, FastAPI, Query, Request
from fastapi.responses import Response

from pipeline.config import Settings
from pipeline.storage import StorageError, open_store
from schemas.batch import FileDeleted, FileList, FileObject, new_file_id
from schemas.messages import INVALID_REQUEST_ERROR, ErrorAnswer
from stages.batch_files import FileNotFound, FileStore
from stages.gateway.auth import Auth
from stages.gateway.errors import OpenAIHTTPError, too_large, unavailable
from stages.gateway.multipart import MultipartError, fields, parse_form
from stages.gateway.openapi import error_responses

log = logging.getLogger(__name__)

T = TypeVar("T")
FORM_OVERHEAD = 64 * 1024  # room for the form's other fields and part headers


def no_such_file(file_id: str) -> OpenAIHTTPError:
    answer = ErrorAnswer.build(
        f"No such File object: {file_id}", type=INVALID_REQUEST_ERROR, param="id"
    )
    return OpenAIHTTPError(404, answer)


def bad_request(message: str, param: str | None = None) -> OpenAIHTTPError:
    return OpenAIHTTPError(400, ErrorAnswer.invalid_request(message, param=param))


async def stored(call: Awaitable[T], file_id: str | None = None) -> T:
    """``call``'s result; a missing file is a 404, a failing store a 503."""
    try:
        return await call
    except FileNotFound as exc:
        raise no_such_file(file_id or "?") from exc
    except StorageError as exc:
        log.error("gateway: file storage failed: %s", exc)
        raise unavailable("file storage is not reachable") from exc


def files_router(settings: Settings, auth: Auth, files: FileStore | None = None) -> APIRouter:
    """The Files API over ``files`` (the archive's store when None), closed with the app."""
    store = files if files is not None else FileStore(open_store(settings))

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await store.close()

    router = APIRouter(lifespan=lifespan, dependencies=auth.dependencies)
    limit = settings.files_max_bytes

    @router.post(
        "/v1/files",
        response_model=FileObject,
        responses=error_responses(400, *auth.errors, 413, 503),
        summary="Upload a file (purpose batch)",
    )
    async def upload(request: Request) -> FileObject:
        from stages.gateway.app import read_body  # app.py includes this router: import late

        body = await read_body(request, limit + FORM_OVERHEAD)
        try:
            form = fields(parse_form(body, request.headers.get("content-type")))
        except MultipartError as exc:
            raise bad_request(str(exc)) from exc
        purpose = form.get("purpose")
        upload = form.get("file")
        if purpose is None:
            raise bad_request("Missing required parameter: 'purpose'.", "purpose")
        if purpose.data.decode("utf-8", "replace").strip() != "batch":
            raise bad_request("Invalid value for 'purpose': only 'batch' is supported.", "purpose")
        if upload is None or upload.filename is None:
            raise bad_request("Missing required parameter: 'file'.", "file")
        if len(upload.data) > limit:
            raise too_large("file", len(upload.data), limit)
        file_id = new_file_id()
        meta = await stored(store.put(file_id, upload.filename, "batch", upload.data))
        log.info("gateway: stored file %s (%d bytes)", file_id, meta.bytes)
        return meta

    @router.get("/v1/files", responses=error_responses(*auth.errors, 503), summary="List files")
    async def list_files(purpose: str | None = Query(default=None)) -> FileList:
        return FileList(data=await stored(store.list(purpose)))

    @router.get(
        "/v1/files/{file_id}",
        response_model=FileObject,
        responses=error_responses(*auth.errors, 404, 503),
        summary="Retrieve a file's object",
    )
    async def retrieve(file_id: str) -> FileObject:
        return await stored(store.meta(file_id), file_id)

    content_responses: dict[int | str, dict[str, Any]] = {
        200: {"content": {"application/octet-stream": {"schema": {"type": "string"}}}},
        **error_responses(*auth.errors, 404, 503),
    }

    @router.get(
        "/v1/files/{file_id}/content",
        response_class=Response,
        responses=content_responses,
        summary="Download a file's content",
    )
    async def content(file_id: str) -> Response:
        data = await stored(store.content(file_id), file_id)
        return Response(data, media_type="application/octet-stream")

    @router.delete(
        "/v1/files/{file_id}",
        response_model=FileDeleted,
        responses=error_responses(*auth.errors, 404, 503),
        summary="Delete a file",
    )
    async def delete(file_id: str) -> FileDeleted:
        await stored(store.delete(file_id), file_id)
        log.info("gateway: deleted file %s", file_id)
        return FileDeleted(id=file_id)

    return router
