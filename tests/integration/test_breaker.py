"""The circuit breaker on the real broker: opens after exactly 5 faults, serves cached answers
while open, dead-letters new work as circuit-open, and closes by itself once the fault clears."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp

from pipeline import admin
from pipeline.config import Settings
from pipeline.runtime.breaker import BreakerState
from pipeline.runtime.runner import StageRunner
from schemas.dlt import parse_dlt_headers
from schemas.headers import header_value, make_headers
from schemas.messages import (
    ErrorAnswer,
    GeneratedMessage,
    SamplingParams,
    TokenizedMessage,
    decode,
    decode_answer,
    encode,
)
from stages.compute import Compute
from stages.engines.echo import EchoEngine
from stages.text import TextModel
from tests.integration.kafka_io import collect, produce
from tests.paths import REPO_ROOT

MODEL = REPO_ROOT / "models" / "demo" / "tokenizer"


async def _get(runner: StageRunner, path: str) -> tuple[int, str]:
    """GET one of the stage's HTTP endpoints."""
    url = f"http://{runner.http.host}:{runner.http.port}{path}"
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        return response.status, await response.text()


def _state(runner: StageRunner) -> BreakerState:
    return runner.breaker.state


def _tokenized(text: TextModel, rid: str, content: str) -> bytes:
    ids = text.encode(text.render([{"role": "user", "content": content}]))
    msg = TokenizedMessage(
        id=rid,
        conversation_id=f"c-{rid}",
        model="demo",
        input_ids=ids,
        sampling=SamplingParams(max_tokens=64),
        created=int(time.time()),
    )
    return encode(msg)


async def test_breaker_opens_after_five_faults_serves_cache_and_closes_after_the_fault_clears(
    settings_factory: Callable[..., Settings], tmp_path: Path
) -> None:
    settings = settings_factory(
        model_path=MODEL,
        engine="echo",
        breaker_failure_threshold=5,
        breaker_cooldown_s=2.0,
        handler_retries=0,
        partitions=1,
    )
    await admin.create_topics(settings)
    topics = settings.topics
    text = TextModel.load(MODEL)
    fault = tmp_path / "gpu-on-fire"
    runner = StageRunner(settings, Compute(settings, EchoEngine(text, fault_file=fault)))
    await runner.start()
    seen = {"generated": 0, "answers": 0, "dlt": 0}

    async def send(rid: str, content: str) -> None:
        await produce(
            settings,
            topics.tokenized,
            [
                (
                    f"c-{rid}".encode(),
                    _tokenized(text, rid, content),
                    make_headers("sluice.tokenized", "test", rid),
                )
            ],
        )

    async def next_on(topic: str, name: str) -> Any:
        got = await collect(settings, topic, until=seen[name] + 1, within=30, unique=False)
        assert len(got.records) == seen[name] + 1, f"nothing new on {topic}"
        seen[name] += 1
        return got.records[-1]

    try:
        await send("good-1", "what is two plus two")
        rec = await next_on(topics.generated, "generated")
        assert decode(GeneratedMessage, rec.value).id == "good-1"
        assert _state(runner) == BreakerState.CLOSED

        fault.touch()  # the engine now fails every request
        for i in range(5):
            assert _state(runner) == BreakerState.CLOSED, f"opened after {i} faults"
            await send(f"fail-{i}", f"doomed {i}")
            answer = await next_on(topics.answers, "answers")
            err = decode_answer(answer.value)
            assert isinstance(err, ErrorAnswer) and err.error.code != "circuit_open"
            dead = await next_on(f"{topics.tokenized}.DLT", "dlt")
            info = parse_dlt_headers(list(dead.headers))
            assert info is not None and info.reason == "engine-fault"
        assert _state(runner) == BreakerState.OPEN, "not open after exactly 5 faults"
        assert runner.ready()[0] is False
        status, body = await _get(runner, "/readyz")
        assert status == 503 and "breaker open" in body
        assert (await _get(runner, "/healthz"))[0] == 200  # alive, just not ready
        _, metrics = await _get(runner, "/metrics")
        assert 'sluice_breaker_state{stage="compute"} 2.0' in metrics
        assert 'sluice_dead_letters_total{reason="engine-fault",stage="compute"} 5.0' in metrics

        # Open: the identical request is answered from the cache, degraded, under its new id.
        await send("again-1", "what is two plus two")
        rec = await next_on(topics.generated, "generated")
        cached = decode(GeneratedMessage, rec.value)
        assert cached.id == "again-1" and cached.conversation_id == "c-again-1"
        assert header_value(list(rec.headers), "sluice-degraded") == "true"

        # Open: a new request is not attempted: dead-lettered as circuit-open, error answer.
        await send("new-1", "something never seen")
        answer = await next_on(topics.answers, "answers")
        err = decode_answer(answer.value)
        assert isinstance(err, ErrorAnswer) and err.error.code == "circuit_open"
        dead = await next_on(f"{topics.tokenized}.DLT", "dlt")
        info = parse_dlt_headers(list(dead.headers))
        assert info is not None and info.reason == "circuit-open"

        fault.unlink()  # the fault clears; after the cool-down one probe goes through
        await asyncio.sleep(settings.breaker_cooldown_s + 0.2)
        await send("probe-1", "are you back")
        rec = await next_on(topics.generated, "generated")
        assert decode(GeneratedMessage, rec.value).id == "probe-1"
        assert _state(runner) == BreakerState.CLOSED
        assert runner.ready()[0] is True
        assert (await _get(runner, "/readyz"))[0] == 200
        _, metrics = await _get(runner, "/metrics")
        assert 'sluice_breaker_state{stage="compute"} 0.0' in metrics
    finally:
        runner.request_stop()
        await runner.shutdown()
    counters = runner.metrics
    assert counters.cache_answers.labels("compute")._value.get() == 1
    assert counters.dead_letters.labels("compute", "circuit-open")._value.get() == 1
    assert (tmp_path / "state").exists() or settings.state_dir.exists()
