"""ONNX Runtime GenAI behind the compute stage: a scheduler on its own thread, bridged to asyncio.

This is the event-loop side of the engine and the thread that steps it. ``generate`` submits a
request to the thread through a queue (a cancel goes the same way) and awaits its future. The
thread loads the model, picks a scheduler for it (``continuous.ContinuousScheduler``, og.Engine,
for a model built with paged attention; ``static.StaticScheduler``, og.Generator batches, for
the rest; see ``scheduler.py`` for what both offer) and steps it while there is work. Woken from
idle, it first lets the rest of a burst of submissions land, so that the burst starts as one
step, one prefill. It hands the requests that ended back to the event loop in one callback per
step that ended any (plus a gauge update a few times a second), never one per step or per token:
a wake-up of the loop per step costs throughput on a fast GPU.

A request with an ``on_tokens`` listener (streaming) is told its tokens so far as its
``StreamPolicy`` allows, in the same per-step callback, so a stream adds wake-ups of the loop
only as often as it sends.

A dead engine ends the process. The thread catches every error: one while loading fails
``start()`` (a ``FatalError``); one out of a step (an og error, an allocation that failed) is an
engine death. A watchdog on the event loop treats "requests in flight but no token for
``stall_s``" as a stall (an out-of-memory inside a step may loop without raising). Either way
``_die`` builds one ``FatalError`` (reason ``engine-death``, ``engine-oom`` or
``engine-stall``), writes a crash report with the requests in flight, fails every one of them
with that same error, and fails every later request with it: the stage loop stops on a fatal
error, ``health()`` is red, and the process exits non-zero to be restarted.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from prometheus_client import Counter, Gauge, Histogram

from pipeline.errors import FatalError, InvalidInput
from pipeline.observability import crash
from stages.engines.base import Generation, GenerationRequest, StreamPolicy
from stages.engines.continuous import ContinuousScheduler
from stages.engines.scheduler import Job, Outcome, Scheduler, Step, load_model, out_of_memory
from stages.engines.static import StaticScheduler

log = logging.getLogger(__name__)

_STOP = object()
SETTLE_S = 0.002  # how long an idle engine waits for the rest of a burst of submissions
REPORT_S = 0.25  # with work in hand and nothing ending, the gauges are updated this often


@dataclass(eq=False)
class _Pending(Job):
    """A job whose caller awaits ``future`` on the event loop."""

    future: asyncio.Future[Generation] = field(kw_only=True)

    def abandoned(self) -> bool:
        return self.future.done()  # failed by the watchdog, or its caller was cancelled


@dataclass(eq=False, frozen=True)
class _Cancel:
    job: _Pending


class OnnxEngine:
    """Continuous batching with ``og.Engine`` (or ``og.Generator``) for one model folder."""

    name = "onnx"

    def __init__(
        self,
        model_path: Path,
        *,
        max_batch: int = 0,
        token_budget: int = 0,
        threads: int = 0,
        stall_s: float = 30.0,
        mode: Literal["auto", "engine", "generator"] = "auto",
        stream: StreamPolicy | None = None,
    ) -> None:
        self.model_path = model_path
        self.requested_batch = max_batch
        self.token_budget = token_budget  # prompt + max new tokens of the running batch; 0: none
        self.threads = threads
        self.stall_s = stall_s
        self.mode = mode
        self.stream = stream or StreamPolicy()
        self.max_batch = 1
        self.broken: str | None = None  # why the engine is dead, once it is
        self.fatal: FatalError | None = None  # ... and the error every request fails with
        self._inbox: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._watchdog: asyncio.Task[None] | None = None
        self._jobs: set[_Pending] = set()
        self._active = 0
        self._last_progress = time.monotonic()
        self.max_active_seen = 0
        self.settle_s = SETTLE_S  # an idle engine's wait for the rest of a burst (og.Engine)
        self.settle_quiet_s = 0.0002  # ... which ends once this passes with nothing new
        self.metrics_running = Gauge(
            "sluice_engine_running_requests", "Requests in the engine's batch.", registry=None
        )
        self.metrics_waiting = Gauge(
            "sluice_engine_waiting_requests",
            "Requests submitted to the engine, waiting for a slot in its batch.",
            registry=None,
        )
        self.metrics_tokens = Counter(
            "sluice_engine_generated_tokens_total", "Tokens generated.", registry=None
        )
        self.metrics_ttft = Histogram(
            "sluice_engine_ttft_seconds",
            "Submission to first token.",
            registry=None,
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )
        self.metrics_queue = Histogram(
            "sluice_engine_queue_seconds",
            "Submission to admission into the batch.",
            registry=None,
            buckets=(0.001, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30),
        )

    def collectors(self) -> list[Any]:
        return [
            self.metrics_running,
            self.metrics_waiting,
            self.metrics_tokens,
            self.metrics_ttft,
            self.metrics_queue,
        ]

    # ---- lifecycle (event loop side) -------------------------------------------------------

    @property
    def last_progress(self) -> float:
        """``time.monotonic()`` of the last step that made a token (or of going idle)."""
        return self._last_progress

    async def start(self) -> None:
        """Load the model, start the engine thread, run one short generation (warm-up)."""
        self._loop = asyncio.get_running_loop()
        ready: asyncio.Future[None] = self._loop.create_future()
        self._thread = threading.Thread(
            target=self._thread_main, args=(ready,), name="onnx-engine", daemon=True
        )
        self._thread.start()
        try:
            await ready
        except Exception as exc:  # any load error (ImportError, KeyError too): no stage
            raise FatalError(
                f"cannot load the model in {self.model_path}: {type(exc).__name__}: {exc}"
            ) from exc
        self._watchdog = asyncio.create_task(self._watchdog_loop(), name="engine_watchdog_loop")
        from schemas.messages import SamplingParams

        await self.generate(GenerationRequest("warmup", [0, 1, 2], SamplingParams(max_tokens=1)))

    async def close(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            await asyncio.gather(self._watchdog, return_exceptions=True)
        if self._thread is not None:
            self._inbox.put(_STOP)
            # A stalled thread may never return from its step: do not hold the exit for it.
            await asyncio.to_thread(self._thread.join, 1 if self.fatal is not None else 10)

    def health(self) -> tuple[bool, str]:
        if self.broken is not None:
            return False, f"onnx engine dead: {self.broken}"
        return True, "ok"

    def inflight(self) -> list[dict[str, Any]]:
        """The requests submitted and not answered, as crash-report features (no text)."""
        now = time.monotonic()
        return [
            crash.request_features(
                job.request.request_id,
                prompt_tokens=len(job.request.input_ids),
                output_tokens=len(job.tokens),
                sampling=job.request.sampling.model_dump(),
                state="running" if job.started else "waiting",
                batch=self._active,
                deadline_ms=job.request.deadline_ms,
                age_s=round(now - job.submitted, 3),
            )
            for job in list(self._jobs)
            if not job.future.done()
        ]

    async def generate(self, request: GenerationRequest) -> Generation:
        if self.fatal is not None:
            raise self.fatal
        if not request.input_ids:
            raise InvalidInput("empty prompt", reason="schema", param="messages")
        assert self._loop is not None, "engine not started"
        job = _Pending(request, future=self._loop.create_future())
        if not any(not j.future.done() for j in self._jobs):
            self._last_progress = time.monotonic()  # idle time is not a stall
        self._jobs.add(job)
        self._inbox.put(job)
        try:
            return await job.future
        except asyncio.CancelledError:
            self._inbox.put(_Cancel(job))
            raise
        finally:
            self._jobs.discard(job)

    async def _watchdog_loop(self) -> None:
        while True:
            await asyncio.sleep(min(1.0, self.stall_s / 4))
            pending = [j for j in self._jobs if not j.future.done()]
            idle = time.monotonic() - self._last_progress
            if pending and idle > self.stall_s and self.fatal is None:
                self._die(
                    FatalError(
                        f"onnx engine stalled: no token for {idle:.0f}s with {len(pending)} "
                        "requests in flight",
                        reason="engine-stall",
                    )
                )

    def _die(self, error: FatalError) -> None:
        """The engine is dead: a crash report with the requests in flight, then every one of
        them, and every later request, fails with ``error`` (on the event loop)."""
        if self.fatal is not None:
            return
        self.fatal, self.broken = error, error.message
        log.error("%s; failing %d requests (restart this process)", error.message, len(self._jobs))
        crash.report(None, error)
        for job in list(self._jobs):
            if not job.future.done():
                job.future.set_exception(error)

    # ---- the engine thread -----------------------------------------------------------------

    def _thread_main(self, ready: asyncio.Future[None]) -> None:
        """The engine thread: load the model, say so to ``start()``, serve until stopped."""
        loop = self._loop
        assert loop is not None
        try:
            scheduler = self._load()
        except Exception as exc:  # noqa: BLE001 - any load error: start() raises it, no stage
            loop.call_soon_threadsafe(_set_exception, ready, exc)
            return
        loop.call_soon_threadsafe(_set_result, ready, None)
        try:
            self._serve(scheduler)
        except Exception as exc:  # noqa: BLE001 - an error out of a step: the engine is dead
            reason = "engine-oom" if out_of_memory(exc) else "engine-death"
            error = FatalError(f"onnx engine died: {type(exc).__name__}: {exc}", reason=reason)
            error.__cause__ = exc
            loop.call_soon_threadsafe(self._die, error)
        # The one place the thread ends once it serves: _serve returns when close() stops it,
        # or raises when the engine died.

    def _load(self) -> Scheduler:
        """Load the model and build the scheduler for it (on this thread: its og objects are
        owned by the thread that made them)."""
        t0 = time.monotonic()
        loaded = load_model(self.model_path, self.threads)
        scheduler: Scheduler
        if self.mode == "engine" or (self.mode == "auto" and loaded.dynamic):
            scheduler = ContinuousScheduler(
                loaded, max_batch=self.requested_batch, token_budget=self.token_budget
            )
        else:
            # A model built without paged attention (INT8/INT4, every CPU build): og.Engine
            # would run it 4 sequences at a time, og.Generator runs static batches of up to 32
            # (1.4x og.Engine at 64 requests on CPU, 9x on the H200: docs/BENCHMARKS.md).
            scheduler = StaticScheduler(
                loaded, max_batch=self.requested_batch, token_budget=self.token_budget
            )
        self.max_batch = scheduler.capacity
        log.info(
            "onnx engine: %s, on %s, loaded in %.2fs",
            scheduler.describe(),
            self.model_path,
            time.monotonic() - t0,
        )
        return scheduler

    def _serve(self, scheduler: Scheduler) -> None:
        """Step ``scheduler`` while it has work, wait for submissions while it has none;
        return on a stop."""
        reported = 0.0
        while True:
            idle = not scheduler.has_work
            if not self._drain_inbox(scheduler, block=idle):
                return
            if idle and scheduler.has_work and not self._settle(scheduler):
                return
            if not scheduler.has_work:
                continue
            step = scheduler.step()
            now = time.monotonic()
            if step.progressed:
                self._last_progress = now
            self._active = scheduler.running
            self.max_active_seen = max(self.max_active_seen, self._active)
            told = self._streams_due(step, now) if step.advanced else []
            if step.finished or told or (now - reported > REPORT_S and scheduler.has_work):
                reported = now
                self._hand_over(step, scheduler, told)

    def _streams_due(self, step: Step, now: float) -> list[tuple[Job, list[int]]]:
        """The streaming jobs this step advanced whose listener is due (``StreamPolicy``), each
        with its tokens so far; marks them told."""
        due = []
        policy = self.stream
        for job in step.advanced:
            if job.request.on_tokens is None:
                continue
            count = len(job.tokens)
            if policy.due(count - job.told, now - job.told_at):
                job.told, job.told_at = count, now
                due.append((job, job.tokens[:count]))
        return due

    def _hand_over(
        self, step: Step, scheduler: Scheduler, told: list[tuple[Job, list[int]]]
    ) -> None:
        """The one place a step's outcomes cross to the event loop (one call per step that
        ended something or has tokens to tell a stream, or a gauge update)."""
        assert self._loop is not None
        self._loop.call_soon_threadsafe(
            self._deliver, step.finished, scheduler.running, scheduler.waiting, told
        )

    def _settle(self, scheduler: Scheduler) -> bool:
        """Woken from idle by a submission: let the rest of a burst land (at most ``settle_s``,
        ending as soon as ``settle_quiet_s`` passes with nothing new) so that it starts as one
        step, one prefill, not a trickle of them. False on stop."""
        deadline = time.monotonic() + self.settle_s
        while time.monotonic() < deadline:
            before = scheduler.waiting
            time.sleep(self.settle_quiet_s)
            if not self._drain_inbox(scheduler, block=False):
                return False
            if scheduler.waiting == before:
                break
        return True

    def _drain_inbox(self, scheduler: Scheduler, block: bool) -> bool:
        """Hand submissions and cancels to ``scheduler``; False on stop. ``block``: wait up to
        half a second for the first item."""
        while True:
            try:
                item = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
            except queue.Empty:
                return True
            block = False
            if item is _STOP:
                return False
            if isinstance(item, _Cancel):
                scheduler.cancel(item.job)
                continue
            assert isinstance(item, _Pending)
            scheduler.add(item)

    # ---- back on the event loop ------------------------------------------------------------

    def _deliver(
        self,
        finished: list[tuple[Job, Outcome]],
        running: int,
        waiting: int,
        told: list[tuple[Job, list[int]]],
    ) -> None:
        self.metrics_running.set(running)
        self.metrics_waiting.set(waiting)
        for job, tokens in told:  # before the answers: a stream's last tokens come first
            assert isinstance(job, _Pending) and job.request.on_tokens is not None
            if job.future.done():
                continue
            try:
                job.request.on_tokens(tokens)
            except Exception:  # a listener's bug must not lose the step's answers
                log.exception(
                    "onnx engine: the token listener of %s failed", job.request.request_id
                )
        for job, result in finished:
            assert isinstance(job, _Pending)
            if job.future.done():
                continue
            if isinstance(result, BaseException):
                job.future.set_exception(result)
                continue
            self.metrics_tokens.inc(len(result.output_ids))
            self.metrics_ttft.observe(result.ttft_s)
            self.metrics_queue.observe(result.queue_s)
            job.future.set_result(result)


def _set_result(future: asyncio.Future[None], value: None) -> None:
    if not future.done():
        future.set_result(value)


def _set_exception(future: asyncio.Future[None], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)
