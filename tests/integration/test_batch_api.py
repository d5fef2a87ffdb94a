"""The Batch API with the official ``openai`` SDK, unchanged: upload, create, poll, download.

One stack for the module: preprocess, compute (ONNX Runtime GenAI, the demo model, CPU INT8)
and postprocess, the gateway and the batcher, as processes; files in a MinIO bucket (the S3
path of the object store).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from typing import Any

import openai
import orjson
import pytest
from pydantic import SecretStr

from infra.process import ServiceHandle
from models.demo import task
from pipeline import admin
from pipeline.config import Settings
from tests.conftest import S3Endpoint
from tests.integration.batch_helpers import Stack, chat_line, jsonl
from tests.paths import REPO_ROOT

MODEL = REPO_ROOT / "models" / "demo" / "cpu-int8"
KEY = "sk-sluice-batch"


@pytest.fixture(scope="module")
async def stack(
    kafka_broker: ServiceHandle,
    minio_server: ServiceHandle,
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[Stack]:
    from infra.minio.server import TEST_ACCESS_KEY, TEST_SECRET_KEY

    s3 = S3Endpoint(f"http://{minio_server.address}", TEST_ACCESS_KEY, TEST_SECRET_KEY)
    bucket = f"sluice-{uuid.uuid4().hex[:20]}"
    async with s3.client() as client:
        await client.create_bucket(Bucket=bucket)
    folder = tmp_path_factory.mktemp("batch-api")
    settings = Settings(
        bootstrap_servers=kafka_broker.address,
        topic_prefix=f"t{uuid.uuid4().hex[:12]}.",
        state_dir=folder / "state",
        archive_url=f"s3://{bucket}/sluice",
        s3_endpoint_url=s3.endpoint_url,
        s3_access_key_id=SecretStr(s3.access_key),
        s3_secret_access_key=SecretStr(s3.secret_key),
        partitions=3,
        model_path=MODEL,
        engine="onnx",
        gateway_api_key=SecretStr(KEY),
        batch_progress_interval_s=0.5,
    )
    await admin.create_topics(settings)
    stack = Stack(settings, folder)
    try:
        stack.start_stages()
        await stack.start_gateway()
        stack.start_batcher()
        yield stack
    finally:
        stack.stop()


@contextmanager
def sdk(stack: Stack) -> Iterator[openai.OpenAI]:
    base = f"{stack.gateways[0].base_url}/v1"
    with openai.OpenAI(base_url=base, api_key=KEY, max_retries=0) as client:
        yield client


def run_batch(stack: Stack, content: bytes) -> tuple[Any, bytes]:
    """files.create -> batches.create -> batches.retrieve until it ends -> files.content."""
    with sdk(stack) as client:
        uploaded = client.files.create(file=("questions.jsonl", content), purpose="batch")
        assert uploaded.purpose == "batch" and uploaded.bytes == len(content)
        batch = client.batches.create(
            input_file_id=uploaded.id,
            endpoint="/v1/chat/completions",
            completion_window="24h",
            metadata={"suite": "batch-api"},
        )
        assert batch.status == "validating"
        deadline = time.monotonic() + 180
        while batch.status not in ("completed", "failed", "expired", "cancelled"):
            assert time.monotonic() < deadline, f"batch still {batch.status}:\n{stack.log()}"
            time.sleep(0.5)
            batch = client.batches.retrieve(batch.id)
        assert batch.status == "completed", f"{batch}\n{stack.log()}"
        assert batch.output_file_id is not None
        return batch, client.files.content(batch.output_file_id).content


async def test_the_openai_sdk_runs_a_batch_on_the_demo_model(stack: Stack) -> None:
    examples = task.held_out(24, seed=1818)
    rows = [
        chat_line(f"q{i}", ex.question, max_tokens=24, temperature=0)
        for i, ex in enumerate(examples)
    ]
    batch, output = await asyncio.to_thread(run_batch, stack, jsonl(rows))

    assert batch.request_counts is not None
    assert (batch.request_counts.total, batch.request_counts.completed) == (24, 24)
    assert batch.metadata == {"suite": "batch-api"}
    assert batch.in_progress_at and batch.finalizing_at and batch.completed_at
    lines = [orjson.loads(line) for line in output.splitlines()]
    assert sorted(line["custom_id"] for line in lines) == sorted(f"q{i}" for i in range(24))
    correct = 0
    for line in lines:
        assert line["error"] is None
        assert line["id"].startswith("batch_req_")
        response = line["response"]
        assert response["status_code"] == 200
        completion = response["body"]
        assert completion["object"] == "chat.completion"
        assert completion["id"] == f"chatcmpl-{response['request_id']}"
        question = examples[int(line["custom_id"][1:])].question
        correct += task.check(question, completion["choices"][0]["message"]["content"])
    print(f"\nbatch through the openai SDK: {correct}/24 held-out correct")
    assert correct >= 21, stack.log()


async def test_the_sdk_lists_batches_and_manages_files(stack: Stack) -> None:
    def calls() -> None:
        with sdk(stack) as client:
            content = jsonl([chat_line("only", "What is 2 + 2?", max_tokens=8)])
            uploaded = client.files.create(file=("one.jsonl", content), purpose="batch")
            assert client.files.retrieve(uploaded.id).filename == "one.jsonl"
            assert client.files.content(uploaded.id).content == content
            created = client.batches.create(
                input_file_id=uploaded.id,
                endpoint="/v1/chat/completions",
                completion_window="24h",
            )
            listed = [b.id for b in client.batches.list(limit=1)]  # pages with `after`
            assert created.id in listed
            with pytest.raises(openai.BadRequestError):
                client.batches.create(
                    input_file_id=uploaded.id,
                    endpoint="/v1/embeddings",
                    completion_window="24h",
                )
            with pytest.raises(openai.NotFoundError):
                client.batches.retrieve("batch_nothere")
            assert client.files.delete(uploaded.id).deleted
            with pytest.raises(openai.NotFoundError):
                client.files.retrieve(uploaded.id)
        base = f"{stack.gateways[0].base_url}/v1"
        stranger = openai.OpenAI(base_url=base, api_key="wrong", max_retries=0)
        with stranger, pytest.raises(openai.AuthenticationError):
            stranger.files.list()

    await asyncio.to_thread(calls)
