"""ONNX Runtime GenAI behind the compute stage, on a dedicated thread bridged to asyncio.

``og.Engine`` (continuous batching) is driven by one thread: it admits queued requests up to the
engine's batch capacity (more would stall it: DESIGN.md "Compute"), runs one scheduling step at
a time, and hands the requests that finished back to the event loop in one callback (no
cross-thread hop per step or per token). Requests join and leave the running batch as they
arrive and finish. A model built without paged attention (INT8/INT4, CPU builds) runs as
static ``og.Generator`` batches of up to 32 requests that sample alike, right-padded.

A watchdog on the event loop treats "requests in flight but no token for ``stall_s``" as a
stall (an out-of-memory inside a step loops without raising): every waiting request fails as a
stage fault, the engine is marked broken (health goes red, the breaker opens), and the process
is meant to be restarted by its supervisor.
"""

from __future__ import annotations

import asyncio
import json
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from prometheus_client import Counter, Gauge, Histogram

from pipeline.errors import FatalError, InvalidInput, StageFault, TransientError
from stages.engines.base import Generation, GenerationRequest

log = logging.getLogger(__name__)

_STOP, _CANCEL = object(), object()
SETTLE_S = 0.002  # how long an idle engine waits for the rest of a burst of submissions
STATIC_BATCH_LIMIT = 32  # og.Generator refuses batch_size > 32 (onnxruntime-genai 0.18)
MAX_STATIC_BATCHES = 4  # static batches stepped in turn, so late arrivals need not wait


@dataclass(eq=False)
class _Job:
    request: GenerationRequest
    future: asyncio.Future[Generation]
    submitted: float = field(default_factory=time.monotonic)
    started: float = 0.0
    first_token: float = 0.0
    tokens: list[int] = field(default_factory=list)
    og_request: Any = None
    turn_id: int = 0
    stream: Any = None  # incremental detokenizer, only where we check stop strings ourselves
    text: str = ""
    stopped: bool = False


@dataclass(eq=False)
class _StaticBatch:
    """One og.Generator over ``jobs``; ``live`` holds the rows still generating."""

    jobs: list[_Job]
    limits: list[int]  # new tokens each row may make
    generator: Any
    live: list[int]


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
    ) -> None:
        self.model_path = model_path
        self.requested_batch = max_batch
        self.token_budget = token_budget  # prompt + max new tokens of the running batch; 0: none
        self.threads = threads
        self.stall_s = stall_s
        self.mode = mode
        self.max_batch = 1
        self.broken: str | None = None
        self._inbox: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._watchdog: asyncio.Task[None] | None = None
        self._jobs: set[_Job] = set()
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
        except (RuntimeError, OSError, ValueError) as exc:
            raise FatalError(f"cannot load the model in {self.model_path}: {exc}") from exc
        self._watchdog = asyncio.create_task(self._watchdog_loop(), name="engine_watchdog_loop")
        from schemas.messages import SamplingParams

        await self.generate(GenerationRequest("warmup", [0, 1, 2], SamplingParams(max_tokens=1)))

    async def close(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            await asyncio.gather(self._watchdog, return_exceptions=True)
        if self._thread is not None:
            self._inbox.put(_STOP)
            await asyncio.to_thread(self._thread.join, 10)

    async def generate(self, request: GenerationRequest) -> Generation:
        if self.broken is not None:
            raise StageFault(f"onnx engine is broken: {self.broken}", reason="engine-broken")
        if not request.input_ids:
            raise InvalidInput("empty prompt", reason="schema", param="messages")
        assert self._loop is not None, "engine not started"
        job = _Job(request, self._loop.create_future())
        if not any(not j.future.done() for j in self._jobs):
            self._last_progress = time.monotonic()  # idle time is not a stall
        self._jobs.add(job)
        self._inbox.put(job)
        try:
            return await job.future
        except asyncio.CancelledError:
            self._inbox.put((_CANCEL, job))
            raise
        finally:
            self._jobs.discard(job)

    async def _watchdog_loop(self) -> None:
        while True:
            await asyncio.sleep(min(1.0, self.stall_s / 4))
            pending = [j for j in self._jobs if not j.future.done()]
            idle = time.monotonic() - self._last_progress
            if pending and idle > self.stall_s and self.broken is None:
                self.broken = f"no token for {idle:.0f}s with {len(pending)} requests in flight"
                log.error(
                    "onnx engine stalled: %s; failing them (restart this process)", self.broken
                )
                for job in pending:
                    job.future.set_exception(
                        StageFault(f"engine stalled: {self.broken}", reason="engine-stall")
                    )

    # ---- the engine thread -----------------------------------------------------------------

    def _thread_main(self, ready: asyncio.Future[None]) -> None:
        loop = self._loop
        assert loop is not None
        try:
            runner = self._load()
        except (RuntimeError, OSError, ValueError) as exc:  # start() raises it: no stage
            loop.call_soon_threadsafe(_set_exception, ready, exc)
            return
        loop.call_soon_threadsafe(_set_result, ready, None)
        runner()

    def _load(self) -> Any:
        import onnxruntime_genai as og

        config = og.Config(str(self.model_path))
        if self.threads:
            overlay = {
                "model": {"decoder": {"session_options": {"intra_op_num_threads": self.threads}}}
            }
            config.overlay(json.dumps(overlay))
        t0 = time.monotonic()
        self._og = og
        self._model = og.Model(config)
        genai = json.loads((self.model_path / "genai_config.json").read_text())
        eos = genai["model"].get("eos_token_id", [])
        self._eos = set(eos if isinstance(eos, list) else [eos])
        self._context = int(genai["model"].get("context_length", 2048))
        dynamic = "dynamic_batching" in genai.get("engine", {})
        self._tokenizer = og.Tokenizer(self._model)
        if self.mode == "engine" or (self.mode == "auto" and dynamic):
            self._engine = og.Engine(self._model)
            self._native_stops = dynamic
            capacity = int(self._engine.get_capabilities().configured_max_batch_size) or 1
            self.max_batch = min(capacity, self.requested_batch or capacity)
            log.info(
                "onnx engine: og.Engine on %s, batch %d (capacity %d), loaded in %.2fs",
                self.model_path,
                self.max_batch,
                capacity,
                time.monotonic() - t0,
            )
            return self._engine_loop
        # A model built without paged attention (INT8/INT4, every CPU build): og.Engine would
        # run it 4 sequences at a time, og.Generator runs static batches of up to 32 (DESIGN.md
        # "Compute"; 1.4x og.Engine at 64 requests on CPU, 9x on the H200: docs/BENCHMARKS.md).
        pad = genai["model"].get("pad_token_id", next(iter(self._eos), 0))
        self._pad = int(pad[0] if isinstance(pad, list) else pad)
        most = STATIC_BATCH_LIMIT * MAX_STATIC_BATCHES  # rows of all interleaved batches
        self.max_batch = min(most, self.requested_batch or STATIC_BATCH_LIMIT)
        log.info(
            "onnx engine: og.Generator static batches of up to %d, %d rows in all, on %s, "
            "loaded in %.2fs",
            STATIC_BATCH_LIMIT,
            self.max_batch,
            self.model_path,
            time.monotonic() - t0,
        )
        return self._generator_loop

    def _post(self, fn: Any, *args: Any) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(fn, *args)

    def _engine_loop(self) -> None:
        og = self._og
        engine = self._engine
        buffer = engine.create_event_buffer(max(64, self.max_batch * 4))
        waiting: list[_Job] = []
        running: dict[int, _Job] = {}
        token_flag = int(og.EngineEventFlags.TOKEN.value)
        done_flag = int(og.EngineEventFlags.TURN_FINISHED.value)
        failed_flag = int(og.EngineEventFlags.FAILED.value)
        retry_flag = int(og.EngineEventFlags.RETRYABLE.value)
        end_flags = done_flag | failed_flag
        monotonic = time.monotonic
        reported = 0.0
        while True:
            block = not running and not waiting
            if not self._drain_inbox(waiting, running, block):
                return
            if block and waiting and not self._settle(waiting, running):
                return
            finished: list[tuple[_Job, Generation | BaseException]] = []
            if waiting and len(running) < self.max_batch:
                self._admit_waiting(waiting, running, finished)
            if running:
                events = engine.run(buffer)
                now = monotonic()  # after the step: its time belongs to its tokens
                produced = False
                # The hot path (once per token): plain lookups, no per-token calls back into
                # the event loop. Stop strings are checked here only where the engine cannot.
                for event in events:
                    job = running.get(id(event.request))
                    if job is None:
                        continue
                    flags = int(event.flags.value)
                    if flags & token_flag:
                        tokens = job.tokens
                        if not tokens:
                            job.first_token = now
                        tokens.append(int(event.token))
                        produced = True
                        if job.stream is not None and self._hit_stop(job, tokens[-1]):
                            job.og_request.cancel_turn(job.turn_id)
                            finished.append((job, self._generation(job, "STOP_STRING", now)))
                            continue
                    if flags & end_flags:
                        if flags & failed_flag:
                            cls = TransientError if flags & retry_flag else StageFault
                            error = cls(
                                f"engine failed: {event.error_code.name}", reason="engine-error"
                            )
                            finished.append((job, error))
                        elif not job.stopped:
                            reason = event.finish_reason.name
                            finished.append((job, self._generation(job, reason, now)))
                if produced or finished:  # a step that yields nothing is not progress
                    self._last_progress = now
            for job, _ in finished:
                if job.og_request is not None and running.pop(id(job.og_request), None) is not None:
                    job.og_request.close()
            self._active = len(running)
            self.max_active_seen = max(self.max_active_seen, len(running))
            # One hop to the event loop when requests end, else at most a few a second (for
            # the gauges): a call per step would wake the loop and fight for the GIL each time.
            now = monotonic()
            if finished or (now - reported > 0.25 and (running or waiting)):
                reported = now
                self._post(self._deliver, finished, len(running), len(waiting))

    def _settle(self, waiting: list[_Job], running: dict[int, _Job]) -> bool:
        """Woken from idle by a submission: let the rest of a burst land (at most ``settle_s``,
        ending as soon as ``settle_quiet_s`` passes with nothing new) so that it starts as one
        step, one prefill, not a trickle of them. False on stop."""
        deadline = time.monotonic() + self.settle_s
        while time.monotonic() < deadline:
            before = len(waiting)
            time.sleep(self.settle_quiet_s)
            if not self._drain_inbox(waiting, running, block=False):
                return False
            if len(waiting) == before:
                break
        return True

    def _admit_waiting(
        self,
        waiting: list[_Job],
        running: dict[int, _Job],
        finished: list[tuple[_Job, Generation | BaseException]],
    ) -> None:
        """Move waiting requests into the engine's batch, up to its capacity and token budget."""
        while waiting and len(running) < self.max_batch and self._fits(waiting[0], running):
            job = waiting.pop(0)
            if job.future.done():
                continue
            try:
                self._admit(job)
            except (RuntimeError, TypeError, ValueError, OverflowError) as exc:
                # the request's options are refused (bad input, not a fault); engine goes on
                if job.og_request is not None:
                    job.og_request.close()
                refused = InvalidInput(
                    f"engine refused the request: {exc}", reason="engine-refused"
                )
                finished.append((job, refused))
                continue
            running[id(job.og_request)] = job

    def _admit(self, job: _Job) -> None:
        og = self._og
        req = self._engine.create_request()
        opts = og.TurnOptions(req)
        s = job.request.sampling
        greedy = not s.temperature
        opts.set_do_sample(not greedy)
        if not greedy:
            opts.set_temperature(float(s.temperature or 0.0))
            if s.top_p is not None:
                opts.set_top_p(float(s.top_p))
            if s.top_k is not None:
                opts.set_top_k(int(s.top_k))
        if s.seed is not None and self._native_stops:  # per-turn seeds need dynamic batching
            opts.set_seed(int(s.seed) & (2**64 - 1))  # OpenAI's int64 seed as og's uint64
        if s.max_tokens:
            opts.set_max_generated_tokens(int(s.max_tokens))
        if s.stop and self._native_stops:
            opts.set_stop_strings(list(s.stop))
        elif s.stop:  # og.Engine without dynamic batching has no stop strings: we watch text
            job.stream = self._tokenizer.create_stream()
        job.og_request = req
        job.started = time.monotonic()
        job.turn_id = req.begin_turn(np.asarray(job.request.input_ids, dtype=np.int32), opts)

    def _cost(self, job: _Job) -> int:
        """Tokens a request may hold in the KV cache: its prompt plus its new-token limit."""
        return len(job.request.input_ids) + (job.request.sampling.max_tokens or 0)

    def _fits(self, job: _Job, running: dict[int, _Job]) -> bool:
        """Within the token budget (a request alone is always admitted, or it would wait
        forever)."""
        if not self.token_budget or not running:
            return True
        held = sum(self._cost(j) for j in running.values())
        return held + self._cost(job) <= self.token_budget

    def _hit_stop(self, job: _Job, token: int) -> bool:
        """Decode incrementally; True once the text holds one of the request's stop strings."""
        assert job.stream is not None
        job.text += job.stream.decode(token)
        if any(stop in job.text for stop in job.request.sampling.stop):
            job.stopped = True
        return job.stopped

    def _drain_inbox(self, waiting: list[_Job], running: dict[int, _Job], block: bool) -> bool:
        """Move submissions into ``waiting``, apply cancels; False on stop."""
        while True:
            try:
                item = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
            except queue.Empty:
                return True
            block = False
            if item is _STOP:
                return False
            if isinstance(item, tuple) and item[0] is _CANCEL:
                job = item[1]
                if job in waiting:
                    waiting.remove(job)
                elif job.og_request is not None and id(job.og_request) in running:
                    job.og_request.cancel_turn(job.turn_id)
                continue
            assert isinstance(item, _Job)
            waiting.append(item)

    def _generator_loop(self) -> None:
        """Static batches with ``og.Generator``: requests that sample alike run together.

        Up to ``MAX_STATIC_BATCHES`` batches run at once, stepped in turn. A request that
        arrives while a batch runs starts at once in a batch of its own, instead of waiting for
        that batch to end, as long as at least half of ``max_batch`` rows are free (``max_batch``
        bounds the rows of all batches together).
        """
        waiting: list[_Job] = []
        batches: list[_StaticBatch] = []
        reported = 0.0
        while True:
            idle = not batches and not waiting
            if not self._drain_inbox(waiting, {}, block=idle):
                return
            if idle and waiting and not self._settle(waiting, {}):
                return
            finished: list[tuple[_Job, Generation | BaseException]] = []
            while waiting and len(batches) < MAX_STATIC_BATCHES:
                jobs = self._take_batch(waiting, batches)
                if not jobs:
                    break
                started = self._start_batch(jobs, finished)
                if started is not None:
                    batches.append(started)
            for batch in list(batches):
                self._step_batch(batch, finished)
                if not batch.live:
                    batches.remove(batch)
            self._active = sum(len(b.live) for b in batches)
            self.max_active_seen = max(self.max_active_seen, self._active)
            now = time.monotonic()
            if finished or (now - reported > 0.25 and (batches or waiting)):
                reported = now
                self._post(self._deliver, finished, self._active, len(waiting))

    def _take_batch(self, waiting: list[_Job], batches: list[_StaticBatch]) -> list[_Job]:
        """The oldest waiting request and the next ones that sample like it (one generator has
        one set of search options), within the rows and token budget the running batches
        leave (a request alone is always taken, or it would wait forever)."""
        rows = self.max_batch - sum(len(b.live) for b in batches)
        if batches and rows < max(1, self.max_batch // 2):
            return []  # every step of every batch costs a forward pass: no slivers of batches
        held = sum(self._cost(b.jobs[i]) for b in batches for i in b.live)
        while waiting and waiting[0].future.done():  # failed by the watchdog while it waited
            waiting.pop(0)
        if not waiting:
            return []
        key = _sampling_key(waiting[0])
        batch: list[_Job] = []
        for job in list(waiting):
            if len(batch) >= min(rows, STATIC_BATCH_LIMIT):
                break
            cost = self._cost(job)
            if _sampling_key(job) != key or job.future.done():
                continue
            if self.token_budget and held and held + cost > self.token_budget:
                break
            batch.append(job)
            held += cost
            waiting.remove(job)
        return batch

    def _start_batch(
        self, jobs: list[_Job], finished: list[tuple[_Job, Generation | BaseException]]
    ) -> _StaticBatch | None:
        """Prefill ``jobs`` as one generator (prompts right-padded with the pad token, which
        og.Generator masks); None when none of them could start."""
        for job in list(jobs):
            if len(job.request.input_ids) >= self._context:
                jobs.remove(job)
                refused = InvalidInput(
                    f"prompt of {len(job.request.input_ids)} tokens leaves no room in the "
                    f"model's context of {self._context}",
                    reason="context-length",
                    param="messages",
                )
                finished.append((job, refused))
        if not jobs:
            return None
        width = max(len(j.request.input_ids) for j in jobs)
        room = self._context - width
        limits = [min(j.request.sampling.max_tokens or room, room) for j in jobs]
        ids = np.full((len(jobs), width), self._pad, dtype=np.int32)
        started = time.monotonic()
        for row, job in enumerate(jobs):
            ids[row, : len(job.request.input_ids)] = job.request.input_ids
            job.started = started
            if job.request.sampling.stop:
                job.stream = self._tokenizer.create_stream()
        try:
            params = self._params(jobs[0], len(jobs), width + max(limits))
            generator = self._og.Generator(self._model, params)
            generator.append_tokens(ids)
        except RuntimeError as exc:  # a model error (e.g. out of memory): a fault
            finished.extend((job, _generator_fault(exc)) for job in jobs)
            return None
        return _StaticBatch(jobs, limits, generator, list(range(len(jobs))))

    def _step_batch(
        self, batch: _StaticBatch, finished: list[tuple[_Job, Generation | BaseException]]
    ) -> None:
        """One token for every live row of ``batch``; rows that end are appended to
        ``finished`` and leave ``batch.live``."""
        jobs = batch.jobs
        try:
            if batch.generator.is_done():  # every row reached max_length
                now = time.monotonic()
                finished.extend(
                    (jobs[i], self._generation(jobs[i], "length", now)) for i in batch.live
                )
                batch.live = []
                return
            batch.generator.generate_next_token()
            tokens = batch.generator.get_next_tokens()
        except RuntimeError as exc:
            finished.extend((jobs[i], _generator_fault(exc)) for i in batch.live)
            batch.live = []
            return
        now = time.monotonic()
        self._last_progress = now
        still = []
        for row in batch.live:
            job = jobs[row]
            if job.future.done():  # cancelled: its row runs on, unread
                continue
            token = int(tokens[row])
            job.first_token = job.first_token or now
            if token in self._eos:
                finished.append((job, self._generation(job, "EOS", now)))
                continue
            job.tokens.append(token)
            if job.stream is not None and self._hit_stop(job, token):
                finished.append((job, self._generation(job, "STOP_STRING", now)))
            elif len(job.tokens) >= batch.limits[row]:
                finished.append((job, self._generation(job, "length", now)))
            else:
                still.append(row)
        batch.live = still

    def _params(self, job: _Job, batch_size: int, max_length: int) -> Any:
        s = job.request.sampling
        options: dict[str, Any] = {
            "max_length": max_length,
            "batch_size": batch_size,
            "do_sample": bool(s.temperature),
        }
        if s.temperature:
            options["temperature"] = float(s.temperature)
            if s.top_p is not None:
                options["top_p"] = float(s.top_p)
            if s.top_k is not None:
                options["top_k"] = int(s.top_k)
            if s.seed is not None:
                options["random_seed"] = int(s.seed) & (2**63 - 1)
        params = self._og.GeneratorParams(self._model)
        params.set_search_options(**options)
        return params

    @staticmethod
    def _generation(job: _Job, reason: str, now: float) -> Generation:
        finish: Literal["stop", "length"] = (
            "length"
            if reason in ("MAX_GENERATED_TOKENS", "MAX_SESSION_TOKENS", "length")
            else "stop"
        )
        first = job.first_token or now
        return Generation(
            output_ids=list(job.tokens),
            finish_reason=finish,
            ttft_s=first - job.submitted,
            compute_s=now - job.started,
            queue_s=job.started - job.submitted,
        )

    # ---- back on the event loop ------------------------------------------------------------

    def _deliver(
        self,
        finished: list[tuple[_Job, Generation | BaseException]],
        running: int,
        waiting: int,
    ) -> None:
        self.metrics_running.set(running)
        self.metrics_waiting.set(waiting)
        for job, result in finished:
            if job.future.done():
                continue
            if isinstance(result, BaseException):
                job.future.set_exception(result)
                continue
            self.metrics_tokens.inc(len(result.output_ids))
            self.metrics_ttft.observe(result.ttft_s)
            self.metrics_queue.observe(result.queue_s)
            job.future.set_result(result)


def _generator_fault(exc: RuntimeError) -> StageFault:
    return StageFault(f"generator failed: {type(exc).__name__}: {exc}", reason="engine-error")


def _sampling_key(job: _Job) -> tuple[Any, ...]:
    """Requests with equal keys can share one og.Generator (one set of search options)."""
    s = job.request.sampling
    if not s.temperature:
        return ("greedy",)
    return (s.temperature, s.top_p, s.top_k, s.seed)


def _set_result(future: asyncio.Future[None], value: None) -> None:
    if not future.done():
        future.set_result(value)


def _set_exception(future: asyncio.Future[None], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)
