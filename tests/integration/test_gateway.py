"""The gateway end to end: the official ``openai`` SDK, real Kafka, the demo model, schemathesis.

One pipeline for the module: preprocess, compute (ONNX Runtime GenAI, the demo model, CPU
INT8) and postprocess as ``sluice run`` processes, and the gateway as ``python -m
stages.gateway``, all started the way an operator would.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest
from aiokafka import AIOKafkaProducer
from pydantic import SecretStr

from infra.process import ServiceHandle, free_port
from models.demo import task
from pipeline import admin
from pipeline.client import SluiceClient
from pipeline.config import Settings
from schemas.headers import make_headers
from schemas.messages import CE_ANSWER, ChatCompletion, ErrorAnswer, Usage, encode
from sluice.procs import StageProcess, stage_env
from tests.paths import REPO_ROOT

MODEL = REPO_ROOT / "models" / "demo" / "cpu-int8"
KEY = "sk-sluice-test"
MAX_BODY = 64 * 1024


@dataclass
class Gateway:
    settings: Settings
    base_url: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    stages: list[StageProcess]

    def log(self) -> str:
        text = self.log_path.read_text(errors="replace")[-6000:]
        return text + "".join(f"\n--- {s.stage}\n{s.log()}" for s in self.stages)

    @contextmanager
    def sdk(self, api_key: str = KEY) -> Iterator[openai.OpenAI]:
        """The official SDK pointed at the gateway (closed after: no socket left behind)."""
        with openai.OpenAI(
            base_url=f"{self.base_url}/v1", api_key=api_key, max_retries=0
        ) as client:
            yield client


async def _wait_ready(gateway: Gateway, within: float) -> None:
    deadline = time.monotonic() + within
    async with httpx.AsyncClient() as http:
        while time.monotonic() < deadline:
            if gateway.proc.poll() is not None:
                pytest.fail(f"the gateway exited with {gateway.proc.returncode}:\n{gateway.log()}")
            try:
                if (await http.get(f"{gateway.base_url}/readyz")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.2)
    pytest.fail(f"the gateway was not ready within {within:.0f}s:\n{gateway.log()}")


def _start_gateway(settings: Settings, log_path: Path) -> subprocess.Popen[bytes]:
    with log_path.open("ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "stages.gateway"],
            env=stage_env(settings, SLUICE_GATEWAY_API_KEY=KEY),  # stage_env masks SecretStr
            cwd=REPO_ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
        )


@pytest.fixture(scope="module")
async def gateway(
    kafka_broker: ServiceHandle, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Gateway]:
    folder = tmp_path_factory.mktemp("gateway")
    port = free_port()
    settings = Settings(
        bootstrap_servers=kafka_broker.address,
        topic_prefix=f"t{uuid.uuid4().hex[:12]}.",
        state_dir=folder / "state",
        partitions=3,
        model_path=MODEL,
        engine="onnx",
        gateway_port=port,
        gateway_api_key=SecretStr(KEY),
        gateway_max_body_bytes=MAX_BODY,
        request_timeout_s=60,
    )
    await admin.create_topics(settings)
    stages = [
        StageProcess(s, stage_env(settings), folder / f"{s}.log").start()
        for s in ("preprocess", "compute", "postprocess")
    ]
    log_path = folder / "gateway.log"
    proc = _start_gateway(settings, log_path)
    gw = Gateway(settings, f"http://127.0.0.1:{port}", proc, log_path, stages)
    try:
        await _wait_ready(gw, within=60)
        yield gw
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        for stage in stages:
            stage.stop()


# --- the official SDK -------------------------------------------------------------------------


async def test_openai_sdk_gets_correct_completions_from_the_demo_model(gateway: Gateway) -> None:
    questions = task.held_out(10, seed=606)
    with gateway.sdk() as sdk:

        def ask(question: str) -> Any:
            return sdk.chat.completions.with_raw_response.create(
                model="cpu-int8",
                messages=[{"role": "user", "content": question}],
                max_tokens=24,
            )

        raws = await asyncio.gather(*(asyncio.to_thread(ask, ex.question) for ex in questions))
    correct = 0
    for ex, raw in zip(questions, raws, strict=True):
        completion = raw.parse()
        assert completion.object == "chat.completion"
        assert completion.id == f"chatcmpl-{raw.headers['x-request-id']}"
        assert completion.choices[0].finish_reason == "stop"
        assert completion.usage is not None and completion.usage.completion_tokens > 0
        correct += task.check(ex.question, completion.choices[0].message.content or "")
    print(f"\nopenai SDK through the gateway: {correct}/{len(questions)} held-out correct")
    assert correct >= 9, gateway.log()


async def test_openai_sdk_streams_the_demo_model_in_several_chunks(gateway: Gateway) -> None:
    """Compute's deltas relayed as they come: several content chunks, the first well before the
    last, joining to the non-streaming answer's content (greedy decoding: the same text)."""
    (ex,) = task.held_out(1, seed=7)

    def stream() -> list[tuple[float, Any]]:
        with gateway.sdk() as sdk:
            events = sdk.chat.completions.create(
                model="cpu-int8",
                messages=[{"role": "user", "content": ex.question}],
                max_tokens=24,
                stream=True,
                stream_options={"include_usage": True},
            )
            return [(time.monotonic(), chunk) for chunk in events]

    def whole() -> str:
        with gateway.sdk() as sdk:
            completion = sdk.chat.completions.create(
                model="cpu-int8",
                messages=[{"role": "user", "content": ex.question}],
                max_tokens=24,
            )
            return completion.choices[0].message.content or ""

    timed = await asyncio.to_thread(stream)
    chunks = [chunk for _, chunk in timed]
    content = [(t, c.choices[0].delta.content) for t, c in timed if c.choices]
    texts = [(t, text) for t, text in content if text]
    assert len(texts) > 1, "the answer came as one chunk: compute sent no deltas"
    assert texts[-1][0] > texts[0][0], "every chunk arrived at once"
    assert chunks[0].choices[0].delta.role == "assistant"
    joined = "".join(text for _, text in texts)
    assert joined == await asyncio.to_thread(whole)
    assert task.check(ex.question, joined), joined
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "stop" and set(finishes[:-1]) == {None}
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens > 0


async def test_openai_sdk_gets_proper_errors_for_bad_requests(gateway: Gateway) -> None:
    def empty_messages() -> None:
        with gateway.sdk() as sdk:
            sdk.chat.completions.create(model="cpu-int8", messages=[])

    def too_long_for_the_context() -> None:  # refused by preprocess, answered through Kafka
        with gateway.sdk() as sdk:
            sdk.chat.completions.create(
                model="cpu-int8",
                messages=[{"role": "user", "content": "Reverse: abc"}],
                max_tokens=999,
            )

    def wrong_key() -> None:
        with gateway.sdk(api_key="sk-wrong") as sdk:
            sdk.chat.completions.create(
                model="cpu-int8", messages=[{"role": "user", "content": "What is 1 + 2?"}]
            )

    def models() -> list[str]:
        with gateway.sdk() as sdk:
            return [m.id for m in sdk.models.list()]

    with pytest.raises(openai.BadRequestError) as bad:
        await asyncio.to_thread(empty_messages)
    assert bad.value.status_code == 400 and bad.value.param == "messages"
    with pytest.raises(openai.BadRequestError) as long:
        await asyncio.to_thread(too_long_for_the_context)
    assert long.value.code == "context_length_exceeded"
    with pytest.raises(openai.AuthenticationError) as auth:
        await asyncio.to_thread(wrong_key)
    assert auth.value.status_code == 401 and auth.value.code == "invalid_api_key"
    assert await asyncio.to_thread(models) == ["cpu-int8"]


async def test_a_body_over_the_limit_is_413(gateway: Gateway) -> None:
    body = {"model": "cpu-int8", "messages": [{"role": "user", "content": "x" * MAX_BODY}]}
    async with httpx.AsyncClient() as http:
        response = await http.post(
            f"{gateway.base_url}/v1/chat/completions",
            json=body,
            headers={"Authorization": f"Bearer {KEY}"},
        )
    assert response.status_code == 413, response.text
    assert response.json()["error"]["type"] == "invalid_request_error"


async def test_probes_and_metrics_of_the_running_gateway(gateway: Gateway) -> None:
    async with httpx.AsyncClient(base_url=gateway.base_url) as http:
        assert (await http.get("/healthz")).json()["ok"] is True
        assert (await http.get("/readyz")).status_code == 200
        metrics = (await http.get("/metrics")).text
    assert "sluice_gateway_requests_total" in metrics
    assert 'sluice_gateway_answers_total{outcome="delivered"}' in metrics


# --- the client -------------------------------------------------------------------------------


async def test_client_infer_returns_200_answers_in_input_order(gateway: Gateway) -> None:
    questions = task.held_out(200, seed=2024)
    prompts: list[Any] = [
        {"messages": [{"role": "user", "content": ex.question}], "max_tokens": 24}
        for ex in questions
    ]
    prompts[17] = {"messages": [{"role": "user", "content": "   "}]}  # an error, at its place
    t0 = time.monotonic()
    async with SluiceClient(gateway.settings) as client:
        replies = await client.infer(prompts, batch_size=64, timeout_s=120)
    elapsed = time.monotonic() - t0
    assert len(replies) == len(prompts)
    assert replies[17].status == 400 and not replies[17].timed_out
    correct = 0
    for i, (ex, reply) in enumerate(zip(questions, replies, strict=True)):
        if i == 17:
            continue
        correct += task.check(ex.question, reply.completion().content)
    print(f"\nSluiceClient.infer: 200 prompts in {elapsed:.1f}s, {correct}/199 correct")
    assert correct >= 0.9 * 199, gateway.log()
    assert len({r.request_id for r in replies}) == len(replies)


async def test_client_drops_duplicate_answers_and_ignores_foreign_ones(
    gateway: Gateway,
) -> None:
    """Answers made up here, on the client's real reply partition: the first copy wins."""
    settings = gateway.settings.model_copy(update={"topic_prefix": f"t{uuid.uuid4().hex[:12]}."})
    await admin.create_topics(settings)
    producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap_servers, acks="all")
    await producer.start()
    try:
        async with SluiceClient(settings, timeout_s=20) as client:

            async def answer(rid: str, content: str) -> None:
                completion = ChatCompletion.build(
                    id=f"chatcmpl-{rid}",
                    model="m",
                    content=content,
                    finish_reason="stop",
                    usage=Usage.of(1, 1),
                )
                await producer.send_and_wait(  # the client's reply partition, in order
                    settings.topics.replies,
                    encode(completion),
                    key=b"k",
                    headers=make_headers(CE_ANSWER, "test", rid),
                    partition=client.reply_partitions[0],
                )

            pending = asyncio.create_task(client.request("anything", request_id="dup-1"))
            for rid, content in (("other", "x"), ("dup-1", "first"), ("dup-1", "second")):
                await answer(rid, content)
            reply = await pending
            assert reply.completion().content == "first"
            marker = asyncio.create_task(client.request("marker", request_id="marker-1"))
            await answer("marker-1", "done")
            await marker  # read after the second copy, so that copy has been seen
            assert client.router.stats.duplicates == 1
            assert client.router.stats.foreign >= 1
            late = await client.request("nobody answers", timeout_s=0.5)
            assert late.timed_out and isinstance(late.answer, ErrorAnswer)
            assert late.status == 504
    finally:
        await producer.stop()


def _cli(settings: Settings, *args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "sluice.cli.client", *args],
        env=stage_env(settings),
        cwd=REPO_ROOT,
        capture_output=True,
        timeout=120,
        check=False,
    )


async def test_cli_send_and_infer(gateway: Gateway, tmp_path: Path) -> None:
    questions = task.held_out(12, seed=31)
    sent = await asyncio.to_thread(_cli, gateway.settings, "send", questions[0].question)
    assert sent.returncode == 0, sent.stderr.decode()
    assert task.check(questions[0].question, sent.stdout.decode())
    prompts = tmp_path / "prompts.jsonl"
    lines = [orjson.dumps(ex.question) for ex in questions]
    lines.insert(3, orjson.dumps({"messages": []}))  # an error answer, kept in its place
    prompts.write_bytes(b"\n".join(lines) + b"\n")
    out = tmp_path / "answers.jsonl"
    args = ("infer", "--file", str(prompts), "--out", str(out), "--batch-size", "5")
    done = await asyncio.to_thread(_cli, gateway.settings, *args)
    assert done.returncode == 0, done.stderr.decode()
    rows = [orjson.loads(line) for line in out.read_bytes().splitlines()]
    assert [r["index"] for r in rows] == list(range(13))
    assert rows[3]["status"] == 400 and rows[3]["answer"]["error"]["param"] == "messages"
    texts = [r["answer"]["choices"][0]["message"]["content"] for r in rows if r["index"] != 3]
    assert sum(task.check(ex.question, t) for ex, t in zip(questions, texts, strict=True)) >= 11


# --- schemathesis against the gateway's OpenAPI spec ------------------------------------------


def _case_check(
    label: str,
    base_url: str,
    *,
    headers: dict[str, str],
    checks: list[Any],
    failures: list[str],
    statuses: dict[str, int],
) -> Callable[[Any], None]:
    """Call the gateway with one generated case, validate the response, collect failures."""
    from schemathesis.core.failures import FailureGroup

    def check(case: Any) -> None:
        response = case.call(base_url=base_url, headers=headers, timeout=90)
        key = f"{case.method} {case.path} {response.status_code}"
        statuses[key] = statuses.get(key, 0) + 1
        try:
            case.validate_response(response, checks=checks, headers=headers)
        except FailureGroup as exc:  # collected, and reported all together
            failures.append(f"{label}: {exc.message}")

    return check


def _schemathesis(base_url: str, max_examples: int) -> tuple[list[str], dict[str, int]]:
    """Every operation, positive and negative cases; failures as text, and statuses seen."""
    import hypothesis
    import schemathesis
    from schemathesis.checks import not_a_server_error
    from schemathesis.core.result import Ok
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    checks = [
        not_a_server_error,
        status_code_conformance,
        content_type_conformance,
        response_schema_conformance,
    ]
    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json")
    failures: list[str] = []
    statuses: dict[str, int] = {}
    headers = {"Authorization": f"Bearer {KEY}"}
    for result in schema.get_all_operations():
        assert isinstance(result, Ok), result.err()
        operation = result.ok()
        modes = [schemathesis.GenerationMode.POSITIVE]
        if operation.body or operation.path_parameters:
            modes.append(schemathesis.GenerationMode.NEGATIVE)
        for mode in modes:
            label = f"{operation.label} ({mode.value})"
            check = _case_check(
                label,
                base_url,
                headers=headers,
                checks=checks,
                failures=failures,
                statuses=statuses,
            )
            run = hypothesis.settings(
                max_examples=max_examples,
                deadline=None,
                database=None,
                derandomize=True,
                phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate],
                suppress_health_check=list(hypothesis.HealthCheck),
            )(hypothesis.given(case=operation.as_strategy(generation_mode=mode))(check))
            run()
    return failures, statuses


async def test_schemathesis_finds_no_server_error_and_no_spec_violation(
    gateway: Gateway,
) -> None:
    t0 = time.monotonic()
    failures, statuses = await asyncio.to_thread(_schemathesis, gateway.base_url, 60)
    print(f"\nschemathesis: {sum(statuses.values())} requests in {time.monotonic() - t0:.1f}s")
    for key, count in sorted(statuses.items()):
        print(f"  {key}: {count}")
    assert not failures, "\n\n".join(failures[:10]) + "\n" + gateway.log()[-3000:]
    assert any(k.startswith("POST /v1/chat/completions 200") for k in statuses)
    assert any(k.startswith("POST /v1/chat/completions 400") for k in statuses)
