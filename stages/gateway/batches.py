"""The Batches API: ``POST /v1/batches``, ``GET /v1/batches[/{id}]``, ``POST .../{id}/cancel``.

A new batch is written to the compacted batches topic as ``validating``; ``sluice run batcher``
takes it from there (``stages.batcher``). Each gateway replica reads the whole topic into a
``BatchView`` (``stages.batch_state``) at start and keeps following it, so any replica answers
for any batch; a replica that wrote a batch or a cancel sees it at once. ``batch_router`` also
includes the Files API (``stages.gateway.files``): the two go together.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from typing import TypeVar

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError
from fastapi import APIRouter, FastAPI, Query
from pydantic import BaseModel, ConfigDict, Field

from pipeline.config import Settings
from pipeline.storage import open_store
from schemas.batch import (
    BATCH_ENDPOINT,
    COMPLETION_WINDOW,
    BatchList,
    BatchObject,
    new_batch_id,
)
from schemas.messages import INVALID_REQUEST_ERROR, ErrorAnswer
from stages.batch_files import FileStore
from stages.batch_state import (
    BatchView,
    StateWriter,
    batches_topic,
    ensure_batches_topic,
    topic_partitions,
)
from stages.gateway.auth import Auth
from stages.gateway.errors import OpenAIHTTPError, unavailable
from stages.gateway.files import bad_request, files_router, stored
from stages.gateway.openapi import error_responses

log = logging.getLogger(__name__)

T = TypeVar("T")
SOURCE = "gateway"
CATCH_UP_S = 30.0
MAX_METADATA = 16
CONFLICT = {
    "description": "The batch is already finished",
    "content": error_responses(400)[400]["content"],
}


class BatchCreate(BaseModel):
    """The body of ``POST /v1/batches``."""

    model_config = ConfigDict(extra="ignore")

    input_file_id: str = Field(min_length=1)
    endpoint: str
    completion_window: str
    metadata: dict[str, str] | None = None


def no_such_batch(batch_id: str) -> OpenAIHTTPError:
    answer = ErrorAnswer.build(
        f"No such Batch object: {batch_id}", type=INVALID_REQUEST_ERROR, param="batch_id"
    )
    return OpenAIHTTPError(404, answer)


def check_create(body: BatchCreate) -> None:
    """400 for what Sluice cannot run: another endpoint or window, oversized metadata."""
    if body.endpoint != BATCH_ENDPOINT:
        raise bad_request(
            f"Invalid value for 'endpoint': only {BATCH_ENDPOINT} is supported.", "endpoint"
        )
    if body.completion_window != COMPLETION_WINDOW:
        raise bad_request(
            f"Invalid value for 'completion_window': only {COMPLETION_WINDOW} is supported.",
            "completion_window",
        )
    meta = body.metadata or {}
    if len(meta) > MAX_METADATA or any(len(k) > 64 or len(v) > 512 for k, v in meta.items()):
        raise bad_request(
            "Invalid 'metadata': at most 16 pairs, keys up to 64 and values up to 512 characters.",
            "metadata",
        )


class ViewFollower:
    """Reads every partition of the batches topic into ``view``, from the beginning."""

    def __init__(self, settings: Settings, view: BatchView) -> None:
        self.settings = settings
        self.view = view
        self.consumer: AIOKafkaConsumer | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        topic = batches_topic(self.settings)
        consumer = AIOKafkaConsumer(
            **self.settings.kafka_common(),
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
        )
        self.consumer = consumer
        await consumer.start()
        tps = await topic_partitions(self.settings, topic)
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        deadline = time.monotonic() + CATCH_UP_S
        while [tp for tp, end in ends.items() if await consumer.position(tp) < end]:
            if time.monotonic() > deadline:
                raise TimeoutError(f"reading {topic} took over {CATCH_UP_S:.0f}s")
            self._apply(await consumer.getmany(timeout_ms=200, max_records=2000))
        self._task = asyncio.create_task(self._view_loop(), name="batches_view_loop")
        self._task.add_done_callback(_log_death)
        log.info("gateway: %d batches known from %s", len(self.view.batches), topic)

    def _apply(self, data: dict[TopicPartition, list[object]]) -> None:
        for records in data.values():
            for r in records:
                self.view.apply(r.key, r.value, r.headers)  # type: ignore[attr-defined]

    async def _view_loop(self) -> None:
        consumer = self.consumer
        assert consumer is not None
        while True:
            try:
                self._apply(await consumer.getmany(timeout_ms=500, max_records=2000))
            except KafkaError as exc:
                log.warning("gateway: reading the batches topic failed: %s", exc)
                await asyncio.sleep(1.0)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self.consumer is not None:
            await self.consumer.stop()


def _log_death(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("gateway: the batches view stopped updating", exc_info=task.exception())


def batch_router(settings: Settings, auth: Auth) -> APIRouter:
    """The Batches API and the Files API; their Kafka clients start and stop with the app."""
    files = FileStore(open_store(settings))
    view = BatchView()
    follower = ViewFollower(settings, view)
    writers: list[StateWriter] = []  # made in the lifespan: a producer needs a running loop

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await ensure_batches_topic(settings)
        producer = AIOKafkaProducer(**settings.kafka_common(), acks="all", enable_idempotence=True)
        await producer.start()
        try:
            await follower.start()
            writers.append(StateWriter(settings, producer, SOURCE))
            yield
        finally:
            writers.clear()
            await follower.stop()
            await producer.stop()

    def writer() -> StateWriter:
        if not writers:
            raise unavailable("the gateway is not connected to Kafka")
        return writers[0]

    router = APIRouter(lifespan=lifespan, dependencies=auth.dependencies)
    router.include_router(files_router(settings, auth, files))

    @router.post(
        "/v1/batches",
        response_model=BatchObject,
        responses=error_responses(400, *auth.errors, 404, 503),
        summary="Create a batch",
    )
    async def create(body: BatchCreate) -> BatchObject:
        check_create(body)
        meta = await stored(files.meta(body.input_file_id), body.input_file_id)
        if meta.purpose != "batch":
            raise bad_request("The input file's purpose must be 'batch'.", "input_file_id")
        now = int(time.time())
        batch = BatchObject(
            id=new_batch_id(),
            input_file_id=body.input_file_id,
            created_at=now,
            expires_at=now + int(settings.batch_window_s),
            metadata=body.metadata,
        )
        await _write(writer().put(batch))
        view.put(batch)
        log.info("gateway: batch %s created for file %s", batch.id, batch.input_file_id)
        return batch

    @router.get(
        "/v1/batches/{batch_id}",
        response_model=BatchObject,
        responses=error_responses(*auth.errors, 404),
        summary="Retrieve a batch",
    )
    async def retrieve(batch_id: str) -> BatchObject:
        batch = view.get(batch_id)
        if batch is None:
            raise no_such_batch(batch_id)
        return batch

    @router.get(
        "/v1/batches",
        response_model=BatchList,
        responses=error_responses(400, *auth.errors),
        summary="List batches, newest first",
    )
    async def list_batches(
        after: str | None = Query(default=None),
        limit: int = Query(default=20, ge=1, le=100),
    ) -> BatchList:
        data, more = view.page(after, limit)
        return BatchList(
            data=data,
            first_id=data[0].id if data else None,
            last_id=data[-1].id if data else None,
            has_more=more,
        )

    @router.post(
        "/v1/batches/{batch_id}/cancel",
        response_model=BatchObject,
        responses={**error_responses(*auth.errors, 404, 503), 409: CONFLICT},
        summary="Cancel a batch",
    )
    async def cancel(batch_id: str) -> BatchObject:
        batch = view.get(batch_id)
        if batch is None:
            raise no_such_batch(batch_id)
        if batch.status in ("cancelling", "cancelled"):
            return batch
        if batch.terminal:
            answer = ErrorAnswer.build(
                f"Cannot cancel a batch with status {batch.status!r}.",
                type=INVALID_REQUEST_ERROR,
            )
            raise OpenAIHTTPError(409, answer)
        view.cancels[batch_id] = await _write(writer().cancel(batch_id))
        log.info("gateway: batch %s cancel requested", batch_id)
        return view.get(batch_id) or batch

    return router


async def _write(call: Awaitable[T]) -> T:
    try:
        return await call
    except KafkaError as exc:
        log.error("gateway: writing to the batches topic failed: %s", exc)
        raise unavailable("the batch could not be recorded") from exc


__all__ = ["BatchCreate", "ViewFollower", "batch_router"]
