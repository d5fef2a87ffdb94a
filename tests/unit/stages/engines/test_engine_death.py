"""A dead engine ends the process (``stages/engines/onnx.py``): a load error of any type fails
``start()``; an error out of a step, an allocation that fails at admission or in a step, and a
stall each build one ``FatalError``, write a crash report with the requests in flight and fail
every one of them (and every later one) with that same error. Also here: ``top_k`` above the
vocabulary is refused at admission, and a streaming request's listener is told its tokens."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import orjson
import pytest

from pipeline.config import Settings
from pipeline.errors import FatalError, InvalidInput
from pipeline.observability import crash
from schemas.messages import SamplingParams
from stages.engines.base import GenerationRequest, StreamPolicy
from stages.engines.onnx import OnnxEngine
from stages.engines.scheduler import Scheduler, out_of_memory
from tests.unit.stages.engines.demo import (
    QUESTIONS,
    TEXT,
    EngineFactory,
    HookedEngine,
    StepHook,
    answer,
    request,
)


class FailingHook(StepHook):
    """A fake og.Engine around the real one: ``run`` or ``create_request`` raise ``error``
    once it is set (an og bug, a KeyError, an allocation that fails)."""

    def __init__(self) -> None:
        super().__init__()
        self.step_error: BaseException | None = None
        self.admit_error: BaseException | None = None

    def run(self, buffer: Any) -> Any:
        if self.step_error is not None:
            raise self.step_error
        return super().run(buffer)

    def create_request(self) -> Any:
        if self.admit_error is not None:
            raise self.admit_error
        return self.inner.create_request()


class FailingEngine(HookedEngine):
    hook: FailingHook

    def __init__(self, model_path: Path, **kwargs: Any) -> None:
        super().__init__(model_path, **kwargs)
        self.hook = FailingHook()


@pytest.fixture
def reports(tmp_path: Path) -> Iterator[Path]:
    """A crash reporter for this test; the folder its reports go to."""
    settings = Settings(state_dir=tmp_path / "state", crash_copy_to_archive=False)
    reporter = crash.install(settings, "compute", hooks=False, hard_crashes=False)
    try:
        yield tmp_path / "state" / "crash"
    finally:
        reporter.close()


def only_report(folder: Path) -> dict[str, Any]:
    (path,) = folder.glob("*.json")
    report: dict[str, Any] = orjson.loads(path.read_bytes())
    return report


async def failing(make_engine: EngineFactory, **kwargs: Any) -> FailingEngine:
    engine = await make_engine(FailingEngine, **kwargs)
    assert isinstance(engine, FailingEngine)
    crash.add_inflight(engine.inflight)
    return engine


@pytest.mark.parametrize(
    ("error", "reason", "cause"),
    [
        (KeyError("turn"), "engine-death", "engine-death"),
        (RuntimeError("CUDA failure 2: out of memory"), "engine-oom", "out-of-memory"),
    ],
    ids=["keyerror", "oom"],
)
async def test_an_error_out_of_a_step_kills_the_engine_and_fails_every_request(
    make_engine: EngineFactory, reports: Path, error: BaseException, reason: str, cause: str
) -> None:
    engine = await failing(make_engine, max_batch=2, stall_s=30)
    engine.hook.delay = 0.02
    tasks = [asyncio.create_task(engine.generate(request(ex.question))) for ex in QUESTIONS[:3]]
    await engine.hook.steps_done(2)  # two generating, one waiting for a slot
    engine.hook.step_error = error

    results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 5)

    first = results[0]
    assert isinstance(first, FatalError) and first.reason == reason
    assert all(r is first for r in results)  # one error object, as the crash report has it
    assert first.__cause__ is error
    assert not engine.health()[0]
    report = only_report(reports)
    assert report["cause"] == cause
    ids = {e["request_id"] for e in report["inflight"]}
    assert ids == {ex.question for ex in QUESTIONS[:3]}
    assert {e["state"] for e in report["inflight"]} == {"running", "waiting"}
    with pytest.raises(FatalError) as later:
        await engine.generate(request(QUESTIONS[3].question))
    assert later.value is first


async def test_an_allocation_failing_at_admission_is_an_engine_death(
    make_engine: EngineFactory, reports: Path
) -> None:
    """Not ``InvalidInput`` (engine-refused, a 400): the engine has no memory left."""
    engine = await failing(make_engine)
    engine.hook.admit_error = RuntimeError("Failed to allocate memory for requested buffer")
    with pytest.raises(FatalError) as info:
        await asyncio.wait_for(engine.generate(request(QUESTIONS[0].question)), 5)
    assert info.value.reason == "engine-oom"
    assert only_report(reports)["cause"] == "out-of-memory"


async def test_a_refusal_at_admission_is_still_bad_input(make_engine: EngineFactory) -> None:
    engine = await failing(make_engine)
    engine.hook.admit_error = ValueError("unsupported option")
    with pytest.raises(InvalidInput):
        await asyncio.wait_for(engine.generate(request(QUESTIONS[0].question)), 5)
    engine.hook.admit_error = None
    gen = await asyncio.wait_for(engine.generate(request("Reverse: abcde")), 5)
    assert answer(gen) == "edcba" and engine.health()[0]


class _BrokenInstall(OnnxEngine):
    def __init__(self, model_path: Path, error: BaseException) -> None:
        super().__init__(model_path, threads=1)
        self.error = error

    def _load(self) -> Scheduler:
        raise self.error


@pytest.mark.parametrize("error", [ImportError("no onnxruntime_genai"), KeyError("model")])
async def test_any_load_error_fails_start(tmp_path: Path, error: BaseException) -> None:
    """Not only og's RuntimeError/OSError/ValueError: start() must never wait for ever."""
    engine = _BrokenInstall(tmp_path, error)
    with pytest.raises(FatalError, match=type(error).__name__) as info:
        await asyncio.wait_for(engine.start(), 5)
    assert info.value.__cause__ is error
    await asyncio.wait_for(engine.close(), 5)


def test_out_of_memory_is_recognised_in_the_words_og_uses() -> None:
    assert out_of_memory(MemoryError())
    assert out_of_memory(RuntimeError("std::bad_alloc"))
    assert out_of_memory(RuntimeError("CUDA error cudaErrorMemoryAllocation: out of memory"))
    assert not out_of_memory(RuntimeError("top_k must be <= vocab_size"))


@pytest.mark.parametrize("mode", ["engine", "generator"])
async def test_top_k_above_the_vocabulary_is_refused_naming_it(
    make_engine: EngineFactory, mode: Literal["engine", "generator"]
) -> None:
    engine = await make_engine(mode=mode)
    sampling = SamplingParams(max_tokens=4, temperature=0.7, top_k=67612814)
    with pytest.raises(InvalidInput) as info:
        await asyncio.wait_for(engine.generate(request("Reverse: abcde", sampling)), 5)
    assert info.value.param == "top_k" and not info.value.fault
    assert "259" in info.value.message  # the demo model's vocabulary
    ok = SamplingParams(max_tokens=8, temperature=0.7, top_k=259, seed=1)
    gen = await asyncio.wait_for(engine.generate(request("Reverse: abcde", ok)), 5)
    assert gen.output_ids and engine.health()[0]


@pytest.mark.parametrize("mode", ["engine", "generator"])
async def test_a_streaming_request_is_told_growing_prefixes_of_its_answer(
    make_engine: EngineFactory, mode: Literal["engine", "generator"]
) -> None:
    engine = await make_engine(mode=mode, stream=StreamPolicy(interval_s=3600, tokens=3))
    told: list[list[int]] = []
    long = GenerationRequest(
        "long", TEXT.encode("abc"), SamplingParams(max_tokens=10), on_tokens=told.append
    )
    gen = await asyncio.wait_for(engine.generate(long), 10)
    assert len(gen.output_ids) == 10
    # The first token at once, then every 3 new tokens (the interval never passes here).
    assert [len(t) for t in told] == [1, 4, 7, 10]
    assert all(t == gen.output_ids[: len(t)] for t in told)


async def test_inflight_lists_requests_without_text(make_engine: EngineFactory) -> None:
    engine = await failing(make_engine, max_batch=1)
    engine.hook.delay = 0.02
    tasks = [asyncio.create_task(engine.generate(request(ex.question))) for ex in QUESTIONS[:2]]
    await engine.hook.steps_done(2)
    entries = {e["request_id"]: e for e in engine.inflight()}
    await asyncio.wait_for(asyncio.gather(*tasks), 10)
    running, waiting = (entries[ex.question] for ex in QUESTIONS[:2])
    assert running["state"] == "running" and running["output_tokens"] >= 1
    assert waiting["state"] == "waiting" and waiting["output_tokens"] == 0
    assert running["prompt_tokens"] == len(request(QUESTIONS[0].question).input_ids)
    assert running["batch"] == 1 and running["age_s"] >= 0
    assert engine.inflight() == []
