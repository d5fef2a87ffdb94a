"""The engine's event-loop side and its thread (``stages/engines/onnx.py``) on the demo model.

Through ``OnnxEngine.generate`` as the compute stage calls it: correctness under concurrency,
the settle of a burst, cancellation, the stall watchdog, timings and gauges, start-up failures
and the choice of scheduler. What each scheduler does step by step is in ``test_continuous.py``
and ``test_static.py``.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from pathlib import Path
from typing import Any, Literal

import pytest

from models.demo import task
from pipeline.errors import FatalError, SluiceError
from schemas.messages import SamplingParams
from stages.engines.base import GenerationRequest
from stages.engines.onnx import OnnxEngine
from tests.unit.stages.engines.demo import (
    GREEDY,
    INT8,
    QUESTIONS,
    TEXT,
    EngineFactory,
    HookedEngine,
    answer,
    generate_all,
    request,
    sample,
)

Mode = Literal["auto", "engine", "generator"]


async def hooked(make_engine: EngineFactory, **kwargs: Any) -> HookedEngine:
    engine = await make_engine(HookedEngine, **kwargs)
    assert isinstance(engine, HookedEngine)
    engine.hook.steps = 0  # not counting the warm-up (the thread is idle now)
    return engine


# ---- correctness --------------------------------------------------------------------------------
async def test_concurrent_greedy_answers_are_correct(make_engine: EngineFactory) -> None:
    engine = await make_engine()
    tokens_before = sample(engine.metrics_tokens, "sluice_engine_generated_tokens_total")
    ttft_before = sample(engine.metrics_ttft, "sluice_engine_ttft_seconds_count")

    gens = await generate_all(engine, [request(ex.question) for ex in QUESTIONS])

    correct = [task.check(ex.question, answer(g)) for ex, g in zip(QUESTIONS, gens, strict=True)]
    assert sum(correct) >= 0.9 * len(QUESTIONS), [
        (ex.question, answer(g))
        for ex, g, ok in zip(QUESTIONS, gens, correct, strict=True)
        if not ok
    ]
    for g in gens:
        assert g.finish_reason == "stop"
        assert 0 < len(g.output_ids) <= 24
        assert not set(g.output_ids) & set(TEXT.eos_token_ids)  # EOS ends it, is not output
        assert g.queue_s >= 0 and g.compute_s > 0 and g.ttft_s >= g.queue_s
        assert g.ttft_s <= g.queue_s + g.compute_s + 1e-6
    assert 1 < engine.max_active_seen <= engine.max_batch == 4  # og.Engine's CPU capacity
    generated = sum(len(g.output_ids) for g in gens)
    tokens = sample(engine.metrics_tokens, "sluice_engine_generated_tokens_total")
    assert tokens - tokens_before == generated
    ttft_count = sample(engine.metrics_ttft, "sluice_engine_ttft_seconds_count")
    assert ttft_count - ttft_before == len(QUESTIONS)


@pytest.mark.parametrize("settle", [True, False])
async def test_an_idle_engine_starts_a_burst_together(
    make_engine: EngineFactory, settle: bool
) -> None:
    """Woken from idle, the engine lets the rest of a burst land before its first step (the
    H200's bare og.Engine loop begins all turns before stepping; a trickle of prefills cost
    up to 10% at 128 requests). Here the burst is 4 requests 10 ms apart."""
    engine = await make_engine()
    engine.settle_s, engine.settle_quiet_s = (1.0, 0.05) if settle else (0.0, 0.0)
    tasks = []
    for ex in QUESTIONS[:4]:
        tasks.append(asyncio.create_task(engine.generate(request(ex.question))))
        await asyncio.sleep(0.01)
    gens = await asyncio.wait_for(asyncio.gather(*tasks), 10)
    queued = [g.queue_s for g in gens]
    if settle:  # admitted together: the first waited for the others, and for the quiet 50 ms
        assert queued[0] > queued[1] > queued[2] > queued[3] >= 0.04, queued
        assert queued[0] < 0.5
    else:  # the first went straight in
        assert queued[0] < 0.01, queued
    assert all(g.output_ids for g in gens)


@pytest.mark.parametrize("mode", ["engine", "generator"])
async def test_max_tokens_ends_with_length(make_engine: EngineFactory, mode: Mode) -> None:
    engine = await make_engine(mode=mode)
    gen = await engine.generate(request("Uppercase: abcdefgh", SamplingParams(max_tokens=3)))
    assert gen.finish_reason == "length"
    assert len(gen.output_ids) == 3
    assert answer(gen) == "ABC"


@pytest.mark.parametrize("mode", ["engine", "generator"])
async def test_stop_string_ends_generation_early(make_engine: EngineFactory, mode: Mode) -> None:
    """Stop strings end generation early, also on a model built without dynamic batching (every
    CPU/INT8 model, the demo included), where og.Engine refuses them and the engine watches the
    decoded text itself."""
    engine = await make_engine(stall_s=1.5, mode=mode)
    full = answer(await engine.generate(request("Spell 721 in Zorbish")))
    assert full == "fen vek tam"

    sampling = SamplingParams(max_tokens=24, stop=["vek"])
    gen = await asyncio.wait_for(engine.generate(request("Spell 721 in Zorbish", sampling)), 5)

    assert gen.finish_reason == "stop"
    assert "tam" not in answer(gen)  # it stopped at "vek", before the rest of the answer
    assert engine.broken is None


@pytest.mark.parametrize("mode", ["engine", "generator"])
async def test_a_bad_request_does_not_kill_the_engine(
    make_engine: EngineFactory, mode: Mode
) -> None:
    """A request the engine refuses at admission (here a prompt longer than the context) fails
    alone and at once; the engine keeps serving."""
    engine = await make_engine(stall_s=1.0, mode=mode)
    too_long = GenerationRequest("long", [97] * (TEXT.context_length + 44), GREEDY)

    with pytest.raises(SluiceError) as info:
        await asyncio.wait_for(engine.generate(too_long), 5)
    assert info.value.reason != "engine-stall"  # refused at admission, not timed out
    gen = await asyncio.wait_for(engine.generate(request("Reverse: abcde")), 5)
    assert answer(gen) == "edcba"
    assert engine.broken is None


# ---- cancellation -------------------------------------------------------------------------------
async def test_cancelling_a_running_request_frees_its_slot(make_engine: EngineFactory) -> None:
    engine = await hooked(make_engine, max_batch=1)
    engine.hook.delay = 0.005  # 200 tokens take over a second
    # Without the chat template the model just repeats "a" up to max_tokens.
    long_request = GenerationRequest("long", TEXT.encode("abc"), SamplingParams(max_tokens=200))
    long = asyncio.create_task(engine.generate(long_request))
    await engine.hook.steps_done(5)  # it is in the batch, generating
    long.cancel()
    with pytest.raises(asyncio.CancelledError):
        await long

    gen = await asyncio.wait_for(engine.generate(request("Reverse: abcde")), 5)
    assert answer(gen) == "edcba"
    # One slot: had the cancelled turn kept it, this answer would have waited for its 200 tokens.
    assert engine.hook.steps < 100
    assert engine.broken is None


async def test_cancelling_a_queued_request_keeps_the_others(make_engine: EngineFactory) -> None:
    engine = await hooked(make_engine, max_batch=1)
    engine.hook.delay = 0.005
    first = asyncio.create_task(engine.generate(request("Uppercase: abcdefgh")))
    queued = asyncio.create_task(engine.generate(request("Reverse: abcde")))
    await engine.hook.steps_done(1)  # the first is in the one slot, the second waits for it
    queued.cancel()
    gen = await asyncio.wait_for(first, 5)
    assert answer(gen) == "ABCDEFGH"
    with pytest.raises(asyncio.CancelledError):
        await queued
    later = await asyncio.wait_for(engine.generate(request("Reverse: xyz")), 5)
    assert answer(later) == "zyx"


async def test_generator_mode_cancel_ends_a_batch_early(make_engine: EngineFactory) -> None:
    engine = await make_engine(mode="generator")
    long_request = GenerationRequest("long", TEXT.encode("abc"), SamplingParams(max_tokens=240))
    long = asyncio.create_task(engine.generate(long_request))
    while engine._active == 0:  # noqa: ASYNC110 - the engine thread sets it: wait for the batch
        await asyncio.sleep(0.001)
    long.cancel()
    with pytest.raises(asyncio.CancelledError):
        await long
    gen = await asyncio.wait_for(engine.generate(request("Reverse: abcde")), 5)
    assert answer(gen) == "edcba"
    assert engine.broken is None


# ---- the stall watchdog -------------------------------------------------------------------------
@pytest.mark.parametrize("block", [False, True], ids=["steps-yield-nothing", "step-never-returns"])
async def test_a_stalled_engine_fails_in_flight_requests(
    make_engine: EngineFactory, block: bool
) -> None:
    engine = await hooked(make_engine, max_batch=2, stall_s=1.0)
    engine.hook.block = block
    engine.hook.stall.set()  # from now on no step produces a token (an OOM inside the step)

    t0 = time.monotonic()
    results = await asyncio.wait_for(
        asyncio.gather(
            *(engine.generate(request(ex.question)) for ex in QUESTIONS[:3]),
            return_exceptions=True,
        ),
        6,
    )
    elapsed = time.monotonic() - t0

    assert elapsed >= 1.0  # it waited stall_s before calling it a stall
    first = results[0]
    assert isinstance(first, FatalError) and first.reason == "engine-stall"
    assert all(result is first for result in results)  # two admitted, one waiting: one error
    assert engine.broken and not engine.health()[0]
    steps = engine.hook.steps
    with pytest.raises(FatalError) as info:
        await asyncio.wait_for(engine.generate(request(QUESTIONS[0].question)), 5)
    assert info.value is first
    assert engine.hook.steps == steps  # refused before any step, not after another stall


async def test_idle_time_is_not_a_stall(make_engine: EngineFactory) -> None:
    engine = await make_engine(stall_s=0.5)
    await asyncio.sleep(1.2)  # several watchdog periods with nothing in flight
    gen = await engine.generate(request("Reverse: abcde"))
    assert answer(gen) == "edcba"
    assert engine.broken is None


async def test_slow_steps_are_not_a_stall(make_engine: EngineFactory) -> None:
    engine = await hooked(make_engine, stall_s=0.5)
    engine.hook.delay = 0.1  # every step produces a token, well within stall_s
    gen = await asyncio.wait_for(engine.generate(request("Uppercase: abcdefgh")), 5)
    assert answer(gen) == "ABCDEFGH"
    assert gen.compute_s > 0.5  # longer than stall_s in all, yet never stalled
    assert engine.broken is None


# ---- timings and gauges -------------------------------------------------------------------------
async def test_ttft_includes_the_step_that_made_the_token(make_engine: EngineFactory) -> None:
    """TTFT and compute time include the step that produced the token (the prefill step is
    most of the TTFT on a GPU with long prompts)."""
    engine = await hooked(make_engine)
    engine.hook.delay = 0.2
    gen = await engine.generate(request("Reverse: abcde", SamplingParams(max_tokens=1)))
    assert len(gen.output_ids) == 1
    assert gen.ttft_s >= 0.2
    assert gen.compute_s >= 0.2


async def test_running_gauge_returns_to_zero(make_engine: EngineFactory) -> None:
    """The running-requests gauge goes back to 0 once the engine is idle."""
    engine = await make_engine()
    await generate_all(engine, [request(ex.question) for ex in QUESTIONS[:3]])
    await asyncio.sleep(0.05)
    assert sample(engine.metrics_running, "sluice_engine_running_requests") == 0


async def test_waiting_gauge_returns_to_zero_after_a_cancel(make_engine: EngineFactory) -> None:
    """A request cancelled while waiting for a slot leaves the waiting gauge."""
    engine = await hooked(make_engine, max_batch=1)
    engine.hook.delay = 0.005
    first = asyncio.create_task(engine.generate(request("Uppercase: abcdefgh")))
    queued = asyncio.create_task(engine.generate(request("Reverse: abcde")))
    await engine.hook.steps_done(1)
    queued.cancel()
    await asyncio.gather(first, queued, return_exceptions=True)
    await asyncio.sleep(0.05)
    assert sample(engine.metrics_waiting, "sluice_engine_waiting_requests") == 0


# ---- start-up -----------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["engine", "generator"])
async def test_start_without_a_model_fails_clearly(tmp_path: Path, mode: Mode) -> None:
    engine = OnnxEngine(tmp_path, threads=1, mode=mode)
    with pytest.raises(FatalError, match=r"genai_config\.json"):
        await asyncio.wait_for(engine.start(), 10)
    await asyncio.wait_for(engine.close(), 5)


async def test_start_without_the_onnx_file_fails_clearly(tmp_path: Path) -> None:
    shutil.copyfile(INT8 / "genai_config.json", tmp_path / "genai_config.json")
    engine = OnnxEngine(tmp_path, threads=1)
    with pytest.raises(FatalError, match=r"model\.onnx"):
        await asyncio.wait_for(engine.start(), 10)
    await asyncio.wait_for(engine.close(), 5)


async def test_auto_mode_picks_the_path_the_model_was_built_for(
    make_engine: EngineFactory,
) -> None:
    """og.Engine where it batches (a model built with paged attention); static og.Generator
    batches for the rest, the demo included, where og.Engine would run 4 at a time."""
    auto = await make_engine(mode="auto")
    assert auto.max_batch == 32
    gens = await generate_all(auto, [request(ex.question) for ex in QUESTIONS[:8]])
    assert all(g.finish_reason == "stop" for g in gens)
    forced = await make_engine(mode="engine")
    assert forced.max_batch == 4  # og.Engine's capacity without paged attention
