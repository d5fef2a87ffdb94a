"""Running one batch: from its current state to a final one (``stages.batcher`` owns the rest).

``JobDriver.run(batch)`` is the job the batcher starts for each batch it owns that is not
finished; cancelling its task stops it anywhere, and running it again later on the same state
(this batcher or another) picks up where the answers topic says the batch is.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

from aiokafka import AIOKafkaProducer

from pipeline.config import Settings
from schemas.batch import (
    BatchCancel,
    BatchError,
    BatchErrors,
    BatchObject,
    error_file_id,
    line_request_id,
    output_file_id,
)
from schemas.headers import make_headers
from schemas.streaming import CancelMessage
from schemas.wire import encode
from stages.batch_answers import AnswersFollower
from stages.batch_files import FileNotFound, FileStore
from stages.batch_input import check_input
from stages.batch_job import CANCELLED_ERROR, EXPIRED_ERROR, SOURCE, Job, now_s
from stages.batch_state import BatchView

log = logging.getLogger(__name__)

Write = Callable[..., Awaitable[BatchObject]]
"""``write(batch, **update)``: record ``batch`` with ``update`` applied; returns it."""


class JobDriver:
    """What a job needs from the batcher, and the job itself."""

    def __init__(
        self,
        settings: Settings,
        *,
        files: FileStore,
        view: BatchView,
        answers: AnswersFollower,
        jobs: dict[str, Job],
        wake: dict[str, asyncio.Event],
        write: Write,
        prompts_topic: str,
        on_published: Callable[[int], None],
    ) -> None:
        self.settings = settings
        self.files = files
        self.view = view
        self.answers = answers
        self.jobs = jobs
        self.wake = wake
        self.write = write
        self.prompts_topic = prompts_topic
        self.on_published = on_published
        self.producer: AIOKafkaProducer | None = None
        self.control: str | None = None

    async def run(self, batch: BatchObject) -> None:
        """Run ``batch`` from its current state until it is finished."""
        cancel = self.view.cancel_asked(batch.id)
        if batch.status == "validating" and cancel is not None:
            now = now_s()
            await self.write(batch, status="cancelled", cancelling_at=now, cancelled_at=now)
            return
        try:
            content = await self.files.content(batch.input_file_id)
        except FileNotFound:
            error = BatchError(
                code="invalid_file",
                message=f"The input file {batch.input_file_id} does not exist.",
                param="input_file_id",
            )
            await self._fail(batch, [error])
            return
        lines, errors = check_input(
            content, max_lines=self.settings.batch_max_lines, endpoint=batch.endpoint
        )
        if errors:
            await self._fail(batch, errors)
            return
        job = Job(batch, lines)
        self.jobs[batch.id] = job
        if batch.status == "validating":
            counts = job.counts()
            batch = await self.write(
                batch, status="in_progress", in_progress_at=now_s(), request_counts=counts
            )
            log.info("batcher: batch %s in progress, %d lines", batch.id, counts.total)
        await self.answers.sync(batch.created_at * 1000)
        await self._drive(job)

    async def _fail(self, batch: BatchObject, errors: list[BatchError]) -> None:
        log.info("batcher: batch %s failed validation (%d errors)", batch.id, len(errors))
        await self.write(batch, status="failed", failed_at=now_s(), errors=BatchErrors(data=errors))

    async def _drive(self, job: Job) -> None:
        wake = self.wake[job.batch_id]
        interval = self.settings.batch_progress_interval_s
        written = job.batch.request_counts
        written_at = time.monotonic()
        while True:
            wake.clear()
            cancel = self.view.cancel_asked(job.batch_id)
            if cancel is not None:
                await self._cancel(job, cancel)
                return
            if job.done:
                await self._finish(job, "completed")
                return
            expires_at = job.batch.expires_at
            if expires_at is not None and time.time() >= expires_at:
                await self._finish(job, "expired")
                return
            await self._publish(job)
            counts = job.counts()
            if counts != written and time.monotonic() - written_at >= interval:
                await self.write(job.batch, request_counts=counts)
                written, written_at = counts, time.monotonic()
            timeout = interval
            if expires_at is not None:
                timeout = max(0.05, min(timeout, expires_at - time.time()))
            with contextlib.suppress(TimeoutError):  # time for progress, or the window
                await asyncio.wait_for(wake.wait(), timeout)

    async def _publish(self, job: Job) -> None:
        lines = job.next_to_publish(self.settings.batch_max_pending)
        if not lines:
            return
        producer = self.producer
        assert producer is not None
        acks = []
        for line in lines:
            record = job.prompt(line)
            acks.append(
                await producer.send(
                    self.prompts_topic, record.value, key=record.key, headers=record.headers
                )
            )
            job.pending.add(line.number)
        await asyncio.gather(*acks)
        self.on_published(len(lines))

    async def _cancel(self, job: Job, cancel: BatchCancel) -> None:
        if job.batch.status != "cancelling":
            await self.write(job.batch, status="cancelling", cancelling_at=cancel.requested_at)
        await self._send_cancels(job)
        wake = self.wake[job.batch_id]
        deadline = time.monotonic() + self.settings.batch_cancel_grace_s
        while job.pending and not job.done and time.monotonic() < deadline:
            wake.clear()
            try:
                await asyncio.wait_for(wake.wait(), max(0.01, deadline - time.monotonic()))
            except TimeoutError:
                break
        await self._finish(job, "cancelled")

    async def _send_cancels(self, job: Job) -> None:
        """Ask compute to drop this batch's requests still in the pipeline (control topic)."""
        if self.control is None or not job.pending:
            return
        producer = self.producer
        assert producer is not None
        acks = []
        for number in sorted(job.pending):
            request_id = line_request_id(job.batch_id, number)
            message = CancelMessage(id=request_id, reason="batch cancelled")
            headers = make_headers(message.ce_type, SOURCE, request_id)
            acks.append(
                await producer.send(
                    self.control, encode(message), key=request_id.encode(), headers=headers
                )
            )
        await asyncio.gather(*acks)

    async def _finish(self, job: Job, status: str) -> None:
        batch = job.batch
        if status == "completed":
            batch = await self.write(batch, status="finalizing", finalizing_at=now_s())
        unanswered = CANCELLED_ERROR if status == "cancelled" else EXPIRED_ERROR
        output, errors = job.render(unanswered)
        out_id = err_id = None
        if output:
            out_id = output_file_id(batch.id)
            await self.files.put(out_id, f"{batch.id}_output.jsonl", "batch_output", output)
        if errors:
            err_id = error_file_id(batch.id)
            await self.files.put(err_id, f"{batch.id}_error.jsonl", "batch_output", errors)
        await self.write(
            batch,
            status=status,
            output_file_id=out_id,
            error_file_id=err_id,
            request_counts=job.finished_counts(),
            **{f"{status}_at": now_s()},
        )
