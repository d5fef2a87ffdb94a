"""The og.Engine scheduler (``stages/engines/continuous.py``) on the demo model.

Most tests step a ``ContinuousScheduler`` by hand on the test's own thread, no engine thread:
what each step admits, reports and frees. The last two run it behind ``OnnxEngine``, as the
compute stage does.
"""

from __future__ import annotations

from models.demo import task
from pipeline.errors import InvalidInput
from schemas.messages import SamplingParams
from stages.engines.base import GenerationRequest
from stages.engines.continuous import ContinuousScheduler
from stages.engines.scheduler import Job, LoadedModel
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
)


class _Dropped(Job):
    """A job whose owner gave up on it (failed elsewhere) while it waited."""

    def abandoned(self) -> bool:
        return True


def test_steps_answer_every_request_and_report_each_token(demo_model: LoadedModel) -> None:
    """Requests share the batch up to og.Engine's capacity (4 here); each step's ``advanced``
    names exactly the requests that got a token (checked by ``drive``), and every answer ends
    once, with its whole output."""
    scheduler = ContinuousScheduler(demo_model)
    assert scheduler.capacity == 4
    jobs = [Job(request(ex.question)) for ex in QUESTIONS[:8]]

    outcomes = drive(scheduler, jobs)

    assert set(outcomes) == set(jobs)
    gens = [generation(outcomes[job]) for job in jobs]
    right = [task.check(ex.question, answer(g)) for ex, g in zip(QUESTIONS, gens, strict=False)]
    assert sum(right) >= 7, [answer(g) for g in gens]
    for job, gen in zip(jobs, gens, strict=True):
        assert gen.finish_reason == "stop"
        assert gen.output_ids == job.tokens  # what the steps reported is the answer
        assert not set(gen.output_ids) & set(TEXT.eos_token_ids)
        assert 0 <= gen.queue_s <= gen.ttft_s <= gen.queue_s + gen.compute_s + 1e-6
    assert scheduler.running == scheduler.waiting == 0


def test_admission_stops_at_max_batch(demo_model: LoadedModel) -> None:
    scheduler = ContinuousScheduler(demo_model, max_batch=2)
    assert scheduler.capacity == 2
    jobs = [Job(request(ex.question)) for ex in QUESTIONS[:5]]
    for job in jobs:
        scheduler.add(job)
    assert (scheduler.running, scheduler.waiting) == (0, 5)

    checked_step(scheduler, jobs)

    assert (scheduler.running, scheduler.waiting) == (2, 3)
    assert [bool(j.started) for j in jobs] == [True, True, False, False, False]
    assert len(drive(scheduler, jobs, add=False)) == 5


def test_the_token_budget_admits_what_fits(demo_model: LoadedModel) -> None:
    """With room for two requests' prompt + max new tokens, two run though og.Engine has four
    slots; a request alone is admitted whatever its cost."""
    probe = Job(request(QUESTIONS[0].question))
    scheduler = ContinuousScheduler(demo_model, token_budget=2 * probe.cost() + probe.cost() // 2)
    jobs = [Job(request(ex.question)) for ex in QUESTIONS[:4]]
    for job in jobs:
        scheduler.add(job)
    checked_step(scheduler, jobs)
    assert (scheduler.running, scheduler.waiting) == (2, 2)

    alone = ContinuousScheduler(demo_model, token_budget=probe.cost() // 2)
    outcomes = drive(alone, [probe])
    assert generation(outcomes[probe]).output_ids


def test_a_cancelled_waiting_request_is_never_admitted(demo_model: LoadedModel) -> None:
    scheduler = ContinuousScheduler(demo_model, max_batch=1)
    first, second = Job(request("Reverse: abcde")), Job(request("Reverse: xyz"))
    scheduler.add(first)
    scheduler.add(second)
    checked_step(scheduler, [first, second])

    scheduler.cancel(second)

    assert scheduler.waiting == 0
    outcomes = drive(scheduler, [first, second], add=False)
    assert list(outcomes) == [first]
    assert answer(generation(outcomes[first])) == "edcba"
    assert not second.started and not second.tokens


def test_a_cancelled_running_request_frees_its_slot(demo_model: LoadedModel) -> None:
    """Cancelled mid-generation: og.Engine ends the turn within a step or two, the slot is free
    for the next request, and the cancelled one is not reported."""
    scheduler = ContinuousScheduler(demo_model, max_batch=1)
    long = Job(repeating(200))
    scheduler.add(long)
    for _ in range(5):
        assert not checked_step(scheduler, [long]).finished
    assert scheduler.running == 1

    scheduler.cancel(long)
    for _ in range(3):
        if not scheduler.running:
            break
        assert not checked_step(scheduler, [long]).finished
    assert (scheduler.running, scheduler.has_work) == (0, False)
    assert len(long.tokens) < 10

    short = Job(request("Reverse: abcde"))
    assert answer(generation(drive(scheduler, [short])[short])) == "edcba"


def test_a_refused_request_fails_alone_in_the_first_step(demo_model: LoadedModel) -> None:
    """A prompt longer than the context is refused at admission as bad input (not a fault);
    the request beside it is admitted and answered."""
    scheduler = ContinuousScheduler(demo_model)
    too_long = Job(GenerationRequest("long", [97] * (TEXT.context_length + 44), GREEDY))
    fine = Job(request("Reverse: abcde"))
    scheduler.add(too_long)
    scheduler.add(fine)

    step = checked_step(scheduler, [too_long, fine])

    assert [job for job, _ in step.finished] == [too_long]
    error = step.finished[0][1]
    assert isinstance(error, InvalidInput) and error.reason == "engine-refused"
    assert not error.fault
    assert scheduler.running == 1
    assert answer(generation(drive(scheduler, [fine], add=False)[fine])) == "edcba"


def test_stop_strings_are_watched_in_the_text(demo_model: LoadedModel) -> None:
    """The demo model has no dynamic batching, so og.Engine takes no stop strings: the
    scheduler decodes the tokens, ends the turn at the stop string and closes it that step."""
    scheduler = ContinuousScheduler(demo_model)
    full = Job(request("Spell 721 in Zorbish"))
    assert answer(generation(drive(scheduler, [full])[full])) == "fen vek tam"

    stopped = Job(request("Spell 721 in Zorbish", SamplingParams(max_tokens=24, stop=["vek"])))
    scheduler.add(stopped)
    while not (step := checked_step(scheduler, [stopped])).finished:
        pass
    assert scheduler.running == 0  # its turn was closed in the step that hit the stop string
    gen = generation(step.finished[0][1])
    assert gen.finish_reason == "stop" and stopped.stopped
    assert "vek" in stopped.text and "tam" not in answer(gen)
    assert len(gen.output_ids) < len(full.tokens)


def test_an_abandoned_request_is_not_admitted(demo_model: LoadedModel) -> None:
    scheduler = ContinuousScheduler(demo_model)
    dropped, kept = _Dropped(request("Reverse: abcde")), Job(request("Reverse: xyz"))
    outcomes = drive(scheduler, [dropped, kept])
    assert list(outcomes) == [kept]
    assert not dropped.started


def test_an_empty_step_does_nothing(demo_model: LoadedModel) -> None:
    scheduler = ContinuousScheduler(demo_model)
    step = scheduler.step()
    assert (step.finished, step.advanced, step.progressed) == ([], [], False)
    assert not scheduler.has_work


# ---- behind the engine thread ----------------------------------------------------------------


async def test_the_token_budget_bounds_what_runs_together(make_engine: EngineFactory) -> None:
    """Prompt + max new tokens of the running batch stay within the budget: with room for two
    requests, never more than two run, though the engine has slots for four."""
    probe = request(QUESTIONS[0].question)
    cost = len(probe.input_ids) + (probe.sampling.max_tokens or 0)
    engine = await make_engine(token_budget=2 * cost + cost // 2)
    assert engine.max_batch == 4
    gens = await generate_all(engine, [request(ex.question) for ex in QUESTIONS[:12]])
    assert all(g.output_ids for g in gens)
    assert engine.max_active_seen == 2


async def test_admission_never_exceeds_max_batch(make_engine: EngineFactory) -> None:
    """More concurrent requests than slots (the H200 stall trap): the rest queue in the stage."""
    engine = await make_engine(max_batch=2)
    assert engine.max_batch == 2

    gens = await generate_all(engine, [request(ex.question) for ex in QUESTIONS[:20]])

    assert all(g.finish_reason == "stop" and g.output_ids for g in gens)
    assert engine.max_active_seen == 2
    queued = sorted(g.queue_s for g in gens)
    assert all(q > 0 for q in queued)
    # The last one admitted waited for nine pairs of requests before it: longer than any took.
    assert queued[-1] > max(g.compute_s for g in gens)
    correct = sum(
        task.check(ex.question, answer(g))
        for ex, g in zip(QUESTIONS[: len(gens)], gens, strict=True)
    )
    assert correct >= 18
