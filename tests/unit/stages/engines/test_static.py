"""The og.Generator scheduler (``stages/engines/static.py``) on the demo model.

Most tests step a ``StaticScheduler`` by hand on the test's own thread, no engine thread:
which requests share a batch, when a late one starts its own, what a cancel frees. The rest run
it behind ``OnnxEngine``, as the compute stage does.
"""

from __future__ import annotations

import asyncio
from typing import Any

from models.demo import task
from pipeline.errors import InvalidInput
from schemas.messages import SamplingParams
from stages.engines import static
from stages.engines.base import GenerationRequest
from stages.engines.continuous import ContinuousScheduler
from stages.engines.scheduler import Job, LoadedModel, Outcome
from stages.engines.static import StaticScheduler, sampling_key
from tests.unit.stages.engines.demo import (
    GREEDY,
    QUESTIONS,
    TEXT,
    EngineFactory,
    answer,
    checked_step,
    drive,
    generate_all,
    generation,
    repeating,
    request,
    sample,
)


class _Recording(StaticScheduler):
    """Records the sampling keys of every batch it starts."""

    def __init__(self, loaded: LoadedModel, **kwargs: Any) -> None:
        super().__init__(loaded, **kwargs)
        self.batch_keys: list[set[tuple[Any, ...]]] = []

    def _start_batch(self, jobs: list[Job], finished: list[tuple[Job, Outcome]]) -> Any:
        self.batch_keys.append({sampling_key(j) for j in jobs})
        return super()._start_batch(jobs, finished)


class _Droppable(Job):
    """A job its owner can give up on (failed elsewhere) at any time."""

    dropped = False

    def abandoned(self) -> bool:
        return self.dropped


def test_a_batch_answers_like_og_engine_and_reports_each_row_per_step(
    demo_model: LoadedModel,
) -> None:
    """Prompts of different lengths share one batch (right-padded) and get og.Engine's greedy
    answers; every live row gets one token per step, and ``advanced`` says so."""
    requests = [request(ex.question) for ex in QUESTIONS[:12]]
    assert len({len(r.input_ids) for r in requests}) > 1
    reference = [Job(r) for r in requests]
    expected = drive(ContinuousScheduler(demo_model), reference)
    scheduler = StaticScheduler(demo_model)
    assert scheduler.capacity == 32
    jobs = [Job(r) for r in requests]
    for job in jobs:
        scheduler.add(job)

    first = checked_step(scheduler, jobs)
    assert scheduler.running + len(first.finished) == 12  # one batch: all of them at once
    assert sorted(map(id, first.advanced)) == sorted(map(id, jobs))  # nobody ends in a step
    outcomes = drive(scheduler, jobs, add=False)

    gens = [generation(outcomes[job]) for job in jobs]
    assert [g.output_ids for g in gens] == [generation(expected[j]).output_ids for j in reference]
    for gen, job in zip(gens, jobs, strict=True):
        assert gen.finish_reason == "stop" and gen.output_ids == job.tokens
    right = [task.check(ex.question, answer(g)) for ex, g in zip(QUESTIONS, gens, strict=False)]
    assert sum(right) >= 11


def test_only_requests_that_sample_alike_share_a_batch(demo_model: LoadedModel) -> None:
    """One generator has one set of search options: sampled requests run in their own batch,
    greedy ones keep their exact answers."""
    scheduler = _Recording(demo_model)
    greedy = [Job(request(ex.question)) for ex in QUESTIONS[:6]]
    sampled = [
        Job(request(ex.question, SamplingParams(max_tokens=24, temperature=0.8, seed=7)))
        for ex in QUESTIONS[6:12]
    ]
    mixed = [job for pair in zip(greedy, sampled, strict=True) for job in pair]
    for job in mixed:
        scheduler.add(job)

    checked_step(scheduler, mixed)

    assert scheduler.batch_keys == [{("greedy",)}, {(0.8, None, None, 7)}]
    outcomes = drive(scheduler, mixed, add=False)
    assert all(generation(outcomes[job]).output_ids for job in mixed)
    correct = sum(
        task.check(ex.question, answer(generation(outcomes[job])))
        for ex, job in zip(QUESTIONS[:6], greedy, strict=True)
    )
    assert correct >= 5


def test_a_late_request_starts_its_own_batch_and_a_cancel_ends_one(
    demo_model: LoadedModel,
) -> None:
    scheduler = StaticScheduler(demo_model)
    long = Job(repeating(240))
    scheduler.add(long)
    for _ in range(3):
        checked_step(scheduler, [long])

    late = Job(request("Reverse: abcde"))
    outcome = drive_until(scheduler, late, [long])

    assert answer(generation(outcome)) == "edcba"
    assert scheduler.running == 1 and len(long.tokens) < 240  # the long one runs on
    scheduler.cancel(long)
    assert scheduler.running == 0
    step = checked_step(scheduler, [long])
    assert (step.finished, step.advanced, scheduler.has_work) == ([], [], False)


def drive_until(scheduler: StaticScheduler, job: Job, others: list[Job]) -> Outcome:
    """Add ``job`` and step until it ends; its outcome (nothing else may end meanwhile)."""
    scheduler.add(job)
    for _ in range(100):
        step = checked_step(scheduler, [job, *others])
        if step.finished:
            assert [j for j, _ in step.finished] == [job]
            return step.finished[0][1]
    raise AssertionError("it never ended")


def test_a_new_batch_waits_until_half_the_rows_are_free(demo_model: LoadedModel) -> None:
    """No slivers of batches: with 4 rows and 3 busy, a new request waits; once a cancel frees
    two of them, it starts in a batch of its own."""
    scheduler = StaticScheduler(demo_model, max_batch=4)
    busy = [Job(repeating(100)) for _ in range(3)]
    for job in busy:
        scheduler.add(job)
    checked_step(scheduler, busy)
    late = Job(repeating(100))
    scheduler.add(late)

    checked_step(scheduler, [*busy, late])
    assert (scheduler.running, scheduler.waiting) == (3, 1)

    scheduler.cancel(busy[0])
    scheduler.cancel(busy[1])
    checked_step(scheduler, [*busy, late])
    assert (scheduler.running, scheduler.waiting) == (2, 0)
    assert late.tokens


def test_limits_and_refusals(demo_model: LoadedModel) -> None:
    """``max_tokens`` ends a row with ``length``; a prompt that fills the context is refused
    when its batch starts, as bad input, and its neighbours run."""
    scheduler = StaticScheduler(demo_model)
    short = Job(request("Uppercase: abcdefgh", SamplingParams(max_tokens=3)))
    too_long = Job(GenerationRequest("long", [97] * (TEXT.context_length + 44), GREEDY))
    scheduler.add(short)
    scheduler.add(too_long)

    step = checked_step(scheduler, [short, too_long])

    assert [job for job, _ in step.finished] == [too_long]
    error = step.finished[0][1]
    assert isinstance(error, InvalidInput) and error.reason == "context-length"
    gen = generation(drive(scheduler, [short], add=False)[short])
    assert (gen.finish_reason, answer(gen)) == ("length", "ABC")


def test_abandoned_requests_are_dropped_waiting_or_running(demo_model: LoadedModel) -> None:
    scheduler = StaticScheduler(demo_model, max_batch=1)
    running, waiting = _Droppable(repeating(100)), _Droppable(repeating(100))
    scheduler.add(running)
    scheduler.add(waiting)
    checked_step(scheduler, [running, waiting])
    assert (scheduler.running, scheduler.waiting) == (1, 1)

    running.dropped = waiting.dropped = True
    step = checked_step(scheduler, [running, waiting])

    assert (step.finished, scheduler.running) == ([], 0)  # its row is no longer read
    assert not drive(scheduler, [running, waiting], add=False)
    assert not waiting.started and not scheduler.has_work


# ---- behind the engine thread ----------------------------------------------------------------


async def test_generator_mode_batches_and_answers_like_the_engine(
    make_engine: EngineFactory,
) -> None:
    """og.Generator static batches (the path for CUDA models without paged attention): prompts
    of different lengths share a batch (right-padded) and get the same greedy answers."""
    engine = await make_engine()
    batched = await make_engine(mode="generator")
    assert batched.max_batch == 32  # og.Generator's limit, by default the rows of all batches
    requests = [request(ex.question) for ex in QUESTIONS]
    assert len({len(r.input_ids) for r in requests}) > 1

    expected = await generate_all(engine, requests)
    gens = await generate_all(batched, requests)

    assert [g.output_ids for g in gens] == [g.output_ids for g in expected]
    assert all(g.finish_reason == "stop" for g in gens)
    assert batched.max_active_seen > 4  # more together than og.Engine runs on this model
    correct = sum(task.check(ex.question, answer(g)) for ex, g in zip(QUESTIONS, gens, strict=True))
    assert correct >= 0.9 * len(QUESTIONS)
    await asyncio.sleep(0.05)
    assert sample(batched.metrics_running, "sluice_engine_running_requests") == 0


async def test_generator_mode_one_at_a_time(make_engine: EngineFactory) -> None:
    single = await make_engine(mode="generator", max_batch=1)
    gens = await generate_all(single, [request(ex.question) for ex in QUESTIONS[:8]])
    assert single.max_active_seen == 1
    # one at a time: the last request waited for the ones before it
    assert max(g.queue_s for g in gens) > max(g.compute_s for g in gens)


async def test_generator_mode_late_arrivals_do_not_wait_for_a_running_batch(
    make_engine: EngineFactory,
) -> None:
    """A request that arrives while a long batch runs starts in a batch of its own, stepped in
    turn with the first, and is answered long before that one ends."""
    engine = await make_engine(mode="generator")
    long = asyncio.create_task(engine.generate(repeating(240)))
    while engine._active == 0:  # noqa: ASYNC110 - the engine thread sets it: wait for the batch
        await asyncio.sleep(0.001)
    gen = await asyncio.wait_for(engine.generate(request("Reverse: abcde")), 5)
    assert answer(gen) == "edcba"
    assert not long.done()  # still generating its 240 tokens
    assert engine.max_active_seen == 2
    wider = await make_engine(mode="generator", max_batch=500)
    assert wider.max_batch == 128 == static.STATIC_BATCH_LIMIT * static.MAX_STATIC_BATCHES
    assert len((await asyncio.wait_for(long, 10)).output_ids) == 240
