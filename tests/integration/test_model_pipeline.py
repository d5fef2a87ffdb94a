"""The pipeline with the real demo model (ONNX Runtime GenAI, CPU, INT8): answers are checked."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from models.demo import task
from pipeline import admin
from pipeline.config import Settings
from schemas.messages import ChatCompletion, decode_answer
from sluice.procs import StageProcess, stage_env
from tests.integration.kafka_io import Item, collect, produce, prompt
from tests.paths import REPO_ROOT

MODEL = REPO_ROOT / "models" / "demo" / "cpu-int8"


@pytest.fixture
def stages(tmp_path: Path) -> Iterator[Callable[..., StageProcess]]:
    started: list[StageProcess] = []

    def start(stage: str, settings: Settings, **env: str) -> StageProcess:
        proc = StageProcess(stage, stage_env(settings, **env), tmp_path / f"{stage}.log").start()
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.stop()


async def test_demo_model_answers_held_out_questions_correctly_through_kafka(
    settings_factory: Callable[..., Settings], stages: Callable[..., StageProcess]
) -> None:
    settings = settings_factory(model_path=MODEL, engine="onnx", partitions=3)
    await admin.create_topics(settings)
    procs = [stages(s, settings) for s in ("preprocess", "compute", "postprocess")]
    questions = task.held_out(80, seed=99)
    items: list[Item] = [
        (f"conv-{i}".encode(), prompt(ex.question, id=f"q-{i}", max_tokens=24), [])
        for i, ex in enumerate(questions)
    ]
    await produce(settings, settings.topics.prompts, items)
    answers = await collect(settings, settings.topics.answers, until=len(items), within=180)
    by_id = answers.by_request()
    assert len(by_id) == len(items), procs[1].log()
    correct = 0
    for i, ex in enumerate(questions):
        answer = decode_answer(by_id[f"q-{i}"][0].value)
        assert isinstance(answer, ChatCompletion), answer
        assert answer.choices[0].finish_reason == "stop"
        correct += task.check(ex.question, answer.content)
    accuracy = correct / len(questions)
    print(f"\ndemo model (cpu-int8) through Kafka: {correct}/{len(questions)} held-out correct")
    assert accuracy >= 0.9, f"only {accuracy:.0%} correct"
