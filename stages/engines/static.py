"""Static batches with ``og.Generator``: requests that sample alike run together.

The path for a model built without paged attention (INT8/INT4, a plain fp16 build, every CPU
build), where og.Engine would run 4 sequences at a time. A batch takes up to 32 waiting
requests with one set of search options (og.Generator refuses more than 32, and has one set);
prompts are right-padded with the pad token, which og.Generator masks. Each request ends on its
own (EOS, its ``max_tokens``, a stop string, a cancel) while its row runs on, unread.

Up to ``MAX_STATIC_BATCHES`` batches run at once, stepped in turn. A request that arrives while a
batch runs starts at once in a batch of its own, instead of waiting for that batch to end, as
long as at least half of ``capacity`` rows are free (``capacity`` bounds the rows of all
batches together).

An allocation that fails (prefill or step) raises out of ``step()``: the engine is dead, and
``onnx.py`` reports it; any other og error fails the batch's requests as a stage fault.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.errors import InvalidInput, StageFault
from stages.engines.scheduler import (
    Job,
    LoadedModel,
    Outcome,
    Step,
    check_top_k,
    out_of_memory,
)

STATIC_BATCH_LIMIT = 32  # og.Generator refuses batch_size > 32 (onnxruntime-genai 0.18)
MAX_STATIC_BATCHES = 4  # static batches stepped in turn, so late arrivals need not wait


@dataclass(eq=False)
class _Batch:
    """One og.Generator over ``jobs``; ``live`` holds the rows still generating."""

    jobs: list[Job]
    limits: list[int]  # new tokens each row may make
    generator: Any
    live: list[int]


class StaticScheduler:
    """og.Generator batches over ``loaded`` (see the module's text); ``max_batch``: the rows
    of all batches together, 0 for one full batch; ``token_budget`` 0: none."""

    def __init__(self, loaded: LoadedModel, *, max_batch: int = 0, token_budget: int = 0) -> None:
        self.loaded = loaded
        most = STATIC_BATCH_LIMIT * MAX_STATIC_BATCHES  # rows of all interleaved batches
        self.capacity = min(most, max_batch or STATIC_BATCH_LIMIT)
        self.token_budget = token_budget
        self._waiting: list[Job] = []
        self._batches: list[_Batch] = []

    def describe(self) -> str:
        return (
            f"og.Generator static batches of up to {STATIC_BATCH_LIMIT}, "
            f"{self.capacity} rows in all"
        )

    @property
    def running(self) -> int:
        return sum(len(b.live) for b in self._batches)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def has_work(self) -> bool:
        return bool(self._batches or self._waiting)

    def add(self, job: Job) -> None:
        self._waiting.append(job)

    def cancel(self, job: Job) -> None:
        if job in self._waiting:
            self._waiting.remove(job)
            return
        for batch in self._batches:
            for row in batch.live:
                if batch.jobs[row] is job:
                    batch.live.remove(row)  # its row runs on, unread
                    return

    def step(self) -> Step:
        out = Step()
        while self._waiting and len(self._batches) < MAX_STATIC_BATCHES:
            jobs = self._take_batch()
            if not jobs:
                break
            started = self._start_batch(jobs, out.finished)
            if started is not None:
                self._batches.append(started)
        for batch in list(self._batches):
            if batch.live:
                self._step_batch(batch, out)
            if not batch.live:
                self._batches.remove(batch)
        return out

    def _take_batch(self) -> list[Job]:
        """The oldest waiting request and the next ones that sample like it (one generator has
        one set of search options), within the rows and token budget the running batches
        leave (a request alone is always taken, or it would wait forever)."""
        waiting, batches = self._waiting, self._batches
        rows = self.capacity - sum(len(b.live) for b in batches)
        if batches and rows < max(1, self.capacity // 2):
            return []  # every step of every batch costs a forward pass: no slivers of batches
        held = sum(b.jobs[i].cost() for b in batches for i in b.live)
        while waiting and waiting[0].abandoned():  # failed elsewhere while it waited
            waiting.pop(0)
        if not waiting:
            return []
        key = sampling_key(waiting[0])
        batch: list[Job] = []
        for job in list(waiting):
            if len(batch) >= min(rows, STATIC_BATCH_LIMIT):
                break
            cost = job.cost()
            if sampling_key(job) != key or job.abandoned():
                continue
            if self.token_budget and held and held + cost > self.token_budget:
                break
            batch.append(job)
            held += cost
            waiting.remove(job)
        return batch

    def _start_batch(self, jobs: list[Job], finished: list[tuple[Job, Outcome]]) -> _Batch | None:
        """Prefill ``jobs`` as one generator (prompts right-padded with the pad token, which
        og.Generator masks); None when none of them could start."""
        context = self.loaded.context
        for job in list(jobs):
            bad_top_k = check_top_k(job, self.loaded.vocab)
            if bad_top_k is not None:
                jobs.remove(job)
                finished.append((job, bad_top_k))
            elif len(job.request.input_ids) >= context:
                jobs.remove(job)
                refused = InvalidInput(
                    f"prompt of {len(job.request.input_ids)} tokens leaves no room in the "
                    f"model's context of {context}",
                    reason="context-length",
                    param="messages",
                )
                finished.append((job, refused))
        if not jobs:
            return None
        width = max(len(j.request.input_ids) for j in jobs)
        room = context - width
        limits = [min(j.request.sampling.max_tokens or room, room) for j in jobs]
        ids = np.full((len(jobs), width), self.loaded.pad, dtype=np.int32)
        started = time.monotonic()
        for row, job in enumerate(jobs):
            ids[row, : len(job.request.input_ids)] = job.request.input_ids
            job.started = started
            if job.request.sampling.stop:
                job.stream = self.loaded.tokenizer.create_stream()
        try:
            params = self._params(jobs[0], len(jobs), width + max(limits))
            generator = self.loaded.og.Generator(self.loaded.model, params)
            generator.append_tokens(ids)
        except RuntimeError as exc:  # a model error: a fault (out of memory: a death)
            if out_of_memory(exc):
                raise
            finished.extend((job, _generator_fault(exc)) for job in jobs)
            return None
        return _Batch(jobs, limits, generator, list(range(len(jobs))))

    def _step_batch(self, batch: _Batch, out: Step) -> None:
        """One token for every live row of ``batch``; rows that end go to ``out.finished`` and
        leave ``batch.live``."""
        jobs, finished = batch.jobs, out.finished
        try:
            if batch.generator.is_done():  # every row reached max_length
                now = time.monotonic()
                finished.extend((jobs[i], jobs[i].generation("length", now)) for i in batch.live)
                batch.live = []
                return
            batch.generator.generate_next_token()
            tokens = batch.generator.get_next_tokens()
        except RuntimeError as exc:
            if out_of_memory(exc):
                raise
            finished.extend((jobs[i], _generator_fault(exc)) for i in batch.live)
            batch.live = []
            return
        now = time.monotonic()
        out.progressed = True
        eos, advanced = self.loaded.eos, out.advanced
        still = []
        for row in batch.live:
            job = jobs[row]
            if job.abandoned():  # its row runs on, unread
                continue
            token = int(tokens[row])
            job.first_token = job.first_token or now
            if token in eos:
                finished.append((job, job.generation("EOS", now)))
                continue
            job.tokens.append(token)
            advanced.append(job)
            if job.stream is not None and job.hit_stop(token):
                finished.append((job, job.generation("STOP_STRING", now)))
            elif len(job.tokens) >= batch.limits[row]:
                finished.append((job, job.generation("length", now)))
            else:
                still.append(row)
        batch.live = still

    def _params(self, job: Job, batch_size: int, max_length: int) -> Any:
        """og.GeneratorParams for a batch that samples like ``job``."""
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
        params = self.loaded.og.GeneratorParams(self.loaded.model)
        params.set_search_options(**options)
        return params


def sampling_key(job: Job) -> tuple[Any, ...]:
    """Requests with equal keys can share one og.Generator (one set of search options)."""
    s = job.request.sampling
    if not s.temperature:
        return ("greedy",)
    return (s.temperature, s.top_p, s.top_k, s.seed)


def _generator_fault(exc: RuntimeError) -> StageFault:
    return StageFault(f"generator failed: {type(exc).__name__}: {exc}", reason="engine-error")
