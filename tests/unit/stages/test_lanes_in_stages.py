"""Both lanes through preprocess and compute: a prompt stays in its lane; compute says when the
engine holds a request, which the loop's batch-lane gate waits for."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path

import orjson

from pipeline.admin import new_topic
from pipeline.config import Settings
from pipeline.runtime.batch import Batch
from schemas.headers import SLUICE_REQUEST_ID
from stages.compute import Compute
from stages.engines.base import Generation, GenerationRequest
from stages.preprocess import Preprocess
from stages.text import TextModel
from tests.unit.stages.test_stages import MODEL, _record, _tokenized_record


def test_both_lanes_are_read_and_each_prompt_stays_in_its_lane() -> None:
    pre = Preprocess(Settings(model_path=MODEL, topic_prefix="t."), TextModel.load(MODEL))
    assert pre.spec.input_topics == ("t.prompts", "t.prompts.batch")
    body = orjson.dumps({"messages": [{"role": "user", "content": "hi"}]})
    chat = _record(body, topic="t.prompts")
    batch = _record(body, topic="t.prompts.batch", offset=1)
    results = pre.handle(Batch.of([chat, batch]))
    assert [[o.topic for o in r.outputs] for r in results] == [
        ["t.tokenized"],
        ["t.tokenized.batch"],
    ]
    # an answer cached from the interactive lane, re-used for a batch-lane prompt, stays there
    [rebound] = pre.rebind(results[0].outputs, batch)
    assert rebound.topic == "t.tokenized.batch"


class HeldEngine:
    """Generates only when told to."""

    name = "held"

    def __init__(self) -> None:
        self.go = asyncio.Event()
        self.started = asyncio.Event()

    async def generate(self, request: GenerationRequest) -> Generation:
        self.started.set()
        await self.go.wait()
        return Generation(output_ids=[1], finish_reason="stop", ttft_s=0.0, compute_s=0.0)


async def test_compute_reads_both_lanes_and_admits_a_request_once_the_engine_holds_it(
    tmp_path: Path,
) -> None:
    engine = HeldEngine()
    compute = Compute(Settings(model_path=tmp_path, topic_prefix="t."), engine)  # type: ignore[arg-type]
    assert compute.spec.input_topics == ("t.tokenized", "t.tokenized.batch")
    record = _tokenized_record(TextModel.load(MODEL), "hi", request_id="r7")
    tagged = replace(record, headers=[(SLUICE_REQUEST_ID, b"r7")])
    assert not compute.admitted(tagged)
    task = asyncio.ensure_future(compute.handle(Batch.of([tagged])))
    await asyncio.wait_for(engine.started.wait(), 5)
    assert compute.admitted(tagged)
    engine.go.set()
    [result] = await task
    assert result.error is None and not compute.admitted(tagged)


def test_topics_create_makes_the_batches_topic_compacted_and_the_lanes_plain() -> None:
    settings = Settings(topic_prefix="t.")
    assert new_topic(settings, "t.batches").topic_configs == {"cleanup.policy": "compact"}
    assert new_topic(settings, "t.prompts.batch").topic_configs == {}
    assert new_topic(settings, "t.replies").topic_configs == {
        "retention.ms": str(settings.edge_retention_ms)
    }
