"""A burst of 300 records against compute's failing echo engine (its fault file present) reaches
the engine at most the breaker's threshold times; the rest are refused as ``circuit-open``."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

from pipeline.config import Settings
from pipeline.observability.metrics import StageMetrics
from pipeline.runtime.batch import Batch
from pipeline.runtime.breaker import BreakerState, CircuitBreaker, ResponseCache
from pipeline.runtime.processing import RecordProcessor, RetryPolicy
from stages.compute import Compute
from stages.engines.base import Generation, GenerationRequest
from stages.engines.echo import EchoEngine
from stages.text import TextModel
from tests.unit.stages.test_stages import MODEL, _tokenized_record

BURST = 300
THRESHOLD = 5


async def test_a_burst_against_a_failing_echo_engine_is_attempted_at_most_threshold_times(
    tmp_path: Path,
) -> None:
    fault = tmp_path / "echo-fault"
    settings = Settings(model_path=MODEL, topic_prefix="t.", engine="echo", echo_fault_file=fault)
    # compute as sluice run builds it, less what needs a broker (deltas, cancels): no services
    handler = Compute(
        settings, EchoEngine(TextModel.load(MODEL), 0.0, fault), TextModel.load(MODEL)
    )
    await handler.warmup()
    fault.touch()  # the engine fails every generation from now on
    attempts = 0
    generate = handler.engine.generate

    async def counted(request: GenerationRequest) -> Generation:
        nonlocal attempts
        attempts += 1
        return await generate(request)

    handler.engine.generate = counted  # type: ignore[method-assign]
    breaker = CircuitBreaker(THRESHOLD, 60.0)
    processor = RecordProcessor(
        handler,
        group_id="g",
        breaker=breaker,
        cache=ResponseCache(0),
        metrics=StageMetrics("compute"),
        retry=RetryPolicy(2, 0.0),
    )
    text = TextModel.load(MODEL)
    records = [
        _tokenized_record(text, f"hello {i}", request_id=f"r{i}", offset=i) for i in range(BURST)
    ]
    # As the loop runs a unit="record" stage: one task per record, all at once.
    decided = await asyncio.gather(*(processor.process(Batch.of([r])) for r in records))
    reasons = Counter(d.error.reason for [d] in decided if d.error is not None)
    assert attempts <= THRESHOLD
    assert reasons == {"engine-fault": attempts, "circuit-open": BURST - attempts}
    assert breaker.state == BreakerState.OPEN
    await handler.close()
