"""Compute's pending-tokens gauge (what ``sluice scale`` and KEDA read as waiting tokens) and its
provider check before the onnx engine loads."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from pipeline.config import Settings
from pipeline.runtime.batch import Batch
from stages.compute import Compute
from stages.engines.base import Generation, GenerationRequest
from stages.engines.providers import EngineSetupError
from stages.text import TextModel
from tests.unit.stages.test_stages import MODEL, _tokenized_record


class GatedEngine:
    """Holds every generation until the gate opens; fails requests named ``fail-*``."""

    name = "gated"

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.all_started = asyncio.Event()
        self.started = 0
        self.loaded = False

    async def start(self) -> None:
        self.loaded = True

    async def generate(self, request: GenerationRequest) -> Generation:
        self.started += 1
        if self.started == 3:
            self.all_started.set()
        await self.gate.wait()
        if request.request_id.startswith("fail"):
            raise RuntimeError("boom")
        return Generation([1], "stop", 0.0, 0.0)

    async def close(self) -> None:
        return None


def pending(compute: Compute) -> float:
    ((sample,),) = [metric.samples for metric in compute.pending_tokens.collect()]
    return float(sample.value)


async def test_pending_tokens_count_prompt_and_max_new_tokens_until_each_finishes() -> None:
    settings = Settings(model_path=MODEL, topic_prefix="t.")
    text = TextModel.load(MODEL)
    engine = GatedEngine()
    compute = Compute(settings, engine)
    records = [
        _tokenized_record(text, "hello world", request_id="r1", max_tokens=30),
        _tokenized_record(text, "abc", request_id="fail-2", offset=1, max_tokens=10),
        _tokenized_record(text, "no limit", request_id="r3", offset=2),
    ]
    prompts = [len(text.encode(text.render([{"role": "user", "content": c}])))
               for c in ("hello world", "abc", "no limit")]  # fmt: skip
    task = asyncio.create_task(compute.handle(Batch.of(records)))
    await asyncio.wait_for(engine.all_started.wait(), 10)
    assert pending(compute) == sum(prompts) + 30 + 10
    engine.gate.set()
    results = await task
    assert [r.error is not None for r in results] == [False, True, False]
    assert pending(compute) == 0  # failures give their tokens back too
    assert compute.pending_tokens in compute.collectors()


async def test_warmup_checks_the_onnx_provider_before_loading(tmp_path: Path) -> None:
    (tmp_path / "genai_config.json").write_text(
        '{"model": {"decoder": {"session_options": {"provider_options": [{"cuda": {}}]}}}}'
    )
    engine = GatedEngine()
    engine.name = "onnx"
    compute = Compute(Settings(model_path=tmp_path, topic_prefix="t."), engine)
    with pytest.raises(EngineSetupError, match=r"sluice-llm\[cuda\]"):
        await compute.warmup()  # this test environment is the CPU install
    assert not engine.loaded
