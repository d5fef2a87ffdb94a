"""Continuous batching with ``og.Engine``: requests join and leave the running batch.

Each step admits waiting requests up to the engine's batch capacity and the token budget (more
than the capacity would stall og.Engine), runs one ``engine.run`` and reads its events: a token,
a finished turn, a failed one. Stop strings go to og.Engine where it takes them (a model built
with paged attention); otherwise the scheduler decodes the new tokens and watches the text.

A request og refuses at admission is bad input (it fails alone); an allocation that fails there
or in a step raises out of ``step()``: the engine is dead (``onnx.py`` reports it).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.errors import InvalidInput, StageFault, TransientError
from stages.engines.scheduler import (
    Job,
    LoadedModel,
    Outcome,
    Step,
    check_top_k,
    out_of_memory,
)


@dataclass(eq=False, slots=True)
class _Turn:
    """A running job and the og.Engine request it runs as."""

    job: Job
    request: Any  # og.Request
    turn_id: int
    over: bool = False  # cancelled, or a stop string ended it: nothing more is reported


class ContinuousScheduler:
    """og.Engine over ``loaded`` (see the module's text); ``max_batch`` 0: the engine's own
    capacity; ``token_budget`` 0: none (else prompt + max new tokens of the running batch)."""

    def __init__(self, loaded: LoadedModel, *, max_batch: int = 0, token_budget: int = 0) -> None:
        og = loaded.og
        self.loaded = loaded
        self.engine: Any = og.Engine(loaded.model)
        self.engine_capacity = int(self.engine.get_capabilities().configured_max_batch_size) or 1
        self.capacity = min(self.engine_capacity, max_batch or self.engine_capacity)
        self.token_budget = token_budget
        self._native_stops = loaded.dynamic  # og.Engine refuses stop strings without it
        self._buffer = self.engine.create_event_buffer(max(64, self.capacity * 4))
        self._waiting: list[Job] = []
        self._running: dict[int, _Turn] = {}  # by id() of the og request its events name
        self._token_flag = int(og.EngineEventFlags.TOKEN.value)
        self._done_flag = int(og.EngineEventFlags.TURN_FINISHED.value)
        self._failed_flag = int(og.EngineEventFlags.FAILED.value)
        self._retry_flag = int(og.EngineEventFlags.RETRYABLE.value)

    def describe(self) -> str:
        return f"og.Engine, batch {self.capacity} (capacity {self.engine_capacity})"

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def has_work(self) -> bool:
        return bool(self._running or self._waiting)

    def add(self, job: Job) -> None:
        self._waiting.append(job)

    def cancel(self, job: Job) -> None:
        if job in self._waiting:
            self._waiting.remove(job)
            return
        for turn in self._running.values():
            if turn.job is job:
                # It keeps its slot until og.Engine reports the turn ended (a step or so).
                turn.over = True
                turn.request.cancel_turn(turn.turn_id)
                return

    def step(self) -> Step:
        out = Step()
        if self._waiting and len(self._running) < self.capacity:
            self._admit_waiting(out.finished)
        if self._running:
            ended = self._run(out)
            for turn in ended:
                if self._running.pop(id(turn.request), None) is not None:
                    turn.request.close()
        return out

    # ---- admission -------------------------------------------------------------------------

    def _admit_waiting(self, finished: list[tuple[Job, Outcome]]) -> None:
        """Move waiting requests into the engine's batch, up to its capacity and token budget."""
        waiting, running = self._waiting, self._running
        while waiting and len(running) < self.capacity and self._fits(waiting[0]):
            job = waiting.pop(0)
            if job.abandoned():
                continue
            refused = check_top_k(job, self.loaded.vocab)
            if refused is not None:
                finished.append((job, refused))
                continue
            request = None
            try:
                request = self.engine.create_request()
                options = self._options(job, request)
                job.started = time.monotonic()
                ids = np.asarray(job.request.input_ids, dtype=np.int32)
                turn_id = request.begin_turn(ids, options)
            except (RuntimeError, TypeError, ValueError, OverflowError) as exc:
                if out_of_memory(exc):
                    raise  # no memory for its KV cache: the engine is dead, not the request bad
                # the request's options are refused (bad input, not a fault); the engine goes on
                if request is not None:
                    request.close()
                refused = InvalidInput(
                    f"engine refused the request: {exc}", reason="engine-refused"
                )
                finished.append((job, refused))
                continue
            running[id(request)] = _Turn(job, request, turn_id)

    def _options(self, job: Job, request: Any) -> Any:
        """og.TurnOptions from the request's sampling parameters."""
        opts = self.loaded.og.TurnOptions(request)
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
            job.stream = self.loaded.tokenizer.create_stream()
        return opts

    def _fits(self, job: Job) -> bool:
        """Within the token budget (a request alone is always admitted, or it would wait
        forever)."""
        if not self.token_budget or not self._running:
            return True
        held = sum(turn.job.cost() for turn in self._running.values())
        return held + job.cost() <= self.token_budget

    # ---- one engine step -------------------------------------------------------------------

    def _run(self, out: Step) -> list[_Turn]:
        """One ``engine.run``: tokens and ends into ``out``; returns the turns that ended."""
        running = self._running
        finished, advanced = out.finished, out.advanced
        token_flag, failed_flag = self._token_flag, self._failed_flag
        end_flags = self._done_flag | failed_flag
        ended: list[_Turn] = []
        events = self.engine.run(self._buffer)
        now = time.monotonic()  # after the step: its time belongs to its tokens
        produced = False
        # The hot path (once per token): plain lookups and appends, nothing more.
        for event in events:
            turn = running.get(id(event.request))
            if turn is None:
                continue
            job = turn.job
            flags = int(event.flags.value)
            if flags & token_flag:
                tokens = job.tokens
                if not tokens:
                    job.first_token = now
                tokens.append(int(event.token))
                advanced.append(job)
                produced = True
                if job.stream is not None and not turn.over and job.hit_stop(tokens[-1]):
                    turn.over = True
                    turn.request.cancel_turn(turn.turn_id)
                    finished.append((job, job.generation("STOP_STRING", now)))
                    ended.append(turn)
                    continue
            if flags & end_flags:
                ended.append(turn)
                if turn.over:
                    continue
                if flags & failed_flag:
                    cls = TransientError if flags & self._retry_flag else StageFault
                    error = cls(f"engine failed: {event.error_code.name}", reason="engine-error")
                    finished.append((job, error))
                else:
                    finished.append((job, job.generation(event.finish_reason.name, now)))
        out.progressed = produced or bool(finished)
        return ended
