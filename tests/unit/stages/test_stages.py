"""The stage handlers, called directly (no Kafka), and the errors they return."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson
import pytest

from pipeline.config import Settings
from pipeline.errors import (
    CircuitOpen,
    FatalError,
    InvalidInput,
    SluiceError,
    StageFault,
    TransientError,
    as_sluice_error,
)
from pipeline.runtime.batch import Batch, Output, Record, Result
from schemas.errors import SchemaError
from schemas.headers import (
    SLUICE_DEGRADED,
    SLUICE_TIMINGS,
    TRACEPARENT,
    Headers,
    header_value,
    parse_headers,
    parse_traceparent,
)
from schemas.messages import (
    CIRCUIT_OPEN,
    CONTEXT_LENGTH_EXCEEDED,
    INVALID_REQUEST_ERROR,
    SERVER_ERROR,
    ChatCompletion,
    ErrorAnswer,
    FinishReason,
    GeneratedMessage,
    SamplingParams,
    Timings,
    TokenizedMessage,
    Usage,
    decode,
    decode_answer,
    encode,
)
from stages.compute import Compute
from stages.engines.base import Generation, GenerationRequest
from stages.engines.echo import EchoEngine
from stages.postprocess import Postprocess, apply_stop
from stages.preprocess import Preprocess
from stages.text import TextModel
from tests.paths import REPO_ROOT

MODEL = REPO_ROOT / "models" / "demo" / "tokenizer"
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
INCOMING_TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"
TS_MS = 1_700_000_000_500


@pytest.fixture(scope="module")
def settings() -> Settings:
    return Settings(model_path=MODEL, topic_prefix="t.")


@pytest.fixture(scope="module")
def text(settings: Settings) -> TextModel:
    return TextModel.load(settings.model_path)


@pytest.fixture
def pre(settings: Settings, text: TextModel) -> Preprocess:
    return Preprocess(settings, text)


@pytest.fixture
def post(settings: Settings, text: TextModel) -> Postprocess:
    return Postprocess(settings, text)


def _record(
    value: bytes | None,
    *,
    topic: str = "t.prompts",
    offset: int = 0,
    key: bytes | None = b"conv",
    headers: Headers | None = None,
) -> Record:
    return Record(
        topic=topic,
        partition=0,
        offset=offset,
        timestamp_ms=TS_MS,
        key=key,
        value=value,
        headers=headers if headers is not None else [],
    )


def _prompt(messages: list[dict[str, str]] | None = None, /, **fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "messages": messages
        if messages is not None
        else [
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": "Uppercase: hello"},
        ]
    }
    body.update(fields)
    return body


def _prompt_record(body: dict[str, Any], **kwargs: Any) -> Record:
    return _record(orjson.dumps(body), **kwargs)


def _user_record(content: str) -> Record:
    return _prompt_record(_prompt([{"role": "user", "content": content}]))


def _only(results: list[Result]) -> Result:
    assert len(results) == 1
    return results[0]


def _only_output(result: Result) -> Output:
    assert result.error is None, result.error
    assert len(result.outputs) == 1
    return result.outputs[0]


def _invalid(result: Result) -> InvalidInput:
    assert not result.outputs
    assert isinstance(result.error, InvalidInput), result.error
    return result.error


def _overhead(text: TextModel) -> int:
    """ChatML tokens around a single user turn (the demo tokenizer is byte-level)."""
    return len(text.encode(text.render([{"role": "user", "content": "x"}]))) - 1


# --- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cls", "retriable", "fatal", "fault", "reason"),
    [
        (SluiceError, False, False, True, "stage-error"),
        (InvalidInput, False, False, False, "schema"),
        (TransientError, True, False, True, "transient"),
        (StageFault, False, False, True, "stage-fault"),
        (CircuitOpen, False, False, False, "circuit-open"),
        (FatalError, False, True, True, "fatal"),
    ],
)
def test_error_flags(
    cls: type[SluiceError], retriable: bool, fatal: bool, fault: bool, reason: str
) -> None:
    error = cls("something")
    assert (error.retriable, error.fatal, error.fault) == (retriable, fatal, fault)
    assert error.reason == reason
    assert error.message == "something"
    assert str(error) == "something"


def test_reason_override_is_per_instance() -> None:
    assert StageFault("x", reason="engine-fault").reason == "engine-fault"
    assert StageFault("y").reason == "stage-fault"


def test_as_sluice_error_turns_a_schema_error_into_invalid_input() -> None:
    exc = SchemaError("oversized", "the request body is too big", "messages")
    error = as_sluice_error(exc)
    assert isinstance(error, InvalidInput)
    assert error.reason == "oversized"
    assert error.param == "messages"
    assert error.message == "the request body is too big"
    assert not error.fault


def test_as_sluice_error_turns_anything_else_into_a_stage_fault() -> None:
    exc = KeyError("missing")
    error = as_sluice_error(exc)
    assert isinstance(error, StageFault)
    assert error.__cause__ is exc
    assert error.reason == "handler-exception"
    assert "KeyError" in error.message
    assert error.fault
    assert not error.retriable


def test_as_sluice_error_keeps_a_sluice_error() -> None:
    error = TransientError("busy")
    assert as_sluice_error(error) is error


def test_invalid_input_answer_is_an_openai_invalid_request_error() -> None:
    error = InvalidInput("too long", reason="context-length", param="messages", code="cl")
    answer = error.answer()
    assert answer.error.type == INVALID_REQUEST_ERROR
    assert answer.error.code == "cl"
    assert answer.error.param == "messages"
    assert answer.error.message == "too long"
    assert answer.http_status() == 400
    decoded = decode_answer(encode(answer))
    assert isinstance(decoded, ErrorAnswer)
    assert decoded == answer
    assert orjson.loads(encode(InvalidInput("bad").answer())) == {
        "error": {"message": "bad", "type": INVALID_REQUEST_ERROR, "param": None, "code": None}
    }


def test_circuit_open_answer_is_a_server_error_with_code_circuit_open() -> None:
    answer = CircuitOpen("the breaker is open").answer()
    assert answer.error.type == SERVER_ERROR
    assert answer.error.code == CIRCUIT_OPEN
    assert answer.error.param is None
    assert answer.error.message == "the breaker is open"
    assert answer.http_status() == 503


def test_a_stage_fault_answer_is_a_plain_server_error() -> None:
    answer = StageFault("model crashed").answer()
    assert answer.error.type == SERVER_ERROR
    assert answer.error.code is None
    assert answer.http_status() == 500


# --- preprocess ------------------------------------------------------------------------------


def test_preprocess_tokenizes_a_valid_prompt(pre: Preprocess, text: TextModel) -> None:
    body = _prompt(id="req-1")
    result = _only(pre.handle(Batch.of([_prompt_record(body)])))
    out = _only_output(result)
    assert out.topic == "t.tokenized"
    assert out.key == b"conv"
    msg = decode(TokenizedMessage, out.value)
    expected_ids = text.encode(text.render(body["messages"]))
    assert msg.input_ids == expected_ids
    assert msg.input_ids[0] == text.tokenizer.token_to_id("<|im_start|>")
    assert msg.id == "req-1"
    assert msg.conversation_id == "conv"  # from the record key
    assert msg.model == text.name
    assert msg.created == TS_MS // 1000
    assert msg.sampling.max_tokens == text.context_length - len(expected_ids)
    assert msg.timings.received_at == TS_MS / 1000
    assert msg.timings.preprocess_s is not None
    assert msg.timings.preprocessed_at is not None
    assert result.fingerprint is not None


def test_preprocess_keeps_the_results_in_batch_order(pre: Preprocess) -> None:
    records = [
        _prompt_record(_prompt(id="a"), offset=0),
        _record(b"{nope", offset=1),
        _prompt_record(_prompt(id="c"), offset=2),
    ]
    results = pre.handle(Batch.of(records))
    assert [r.record for r in results] == records
    assert [r.ok for r in results] == [True, False, True]


def test_preprocess_conversation_id_from_the_body_wins_over_the_key(pre: Preprocess) -> None:
    body = _prompt(id="req-1", conversation_id="c-9", model="demo-x")
    out = _only_output(_only(pre.handle(Batch.of([_prompt_record(body)]))))
    msg = decode(TokenizedMessage, out.value)
    assert msg.conversation_id == "c-9"
    assert out.key == b"c-9"
    assert msg.model == "demo-x"


def test_preprocess_without_key_or_conversation_uses_the_request_id(pre: Preprocess) -> None:
    out = _only_output(_only(pre.handle(Batch.of([_prompt_record(_prompt(id="r7"), key=None)]))))
    msg = decode(TokenizedMessage, out.value)
    assert msg.conversation_id == "r7"
    assert out.key == b"r7"


def test_preprocess_request_id_from_the_header_or_derived(pre: Preprocess) -> None:
    from_header = _prompt_record(_prompt(), headers=[("sluice-request-id", b"hdr-1")])
    derived = _prompt_record(_prompt(), offset=42)
    results = pre.handle(Batch.of([from_header, derived]))
    ids = [decode(TokenizedMessage, _only_output(r).value).id for r in results]
    assert ids == ["hdr-1", derived.request_id()]
    assert header_value(_only_output(results[1]).headers, "sluice-request-id") == ids[1]


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"max_tokens": 7}, 7),
        ({"max_completion_tokens": 5}, 5),
        ({"max_tokens": 7, "max_completion_tokens": 3}, 3),
    ],
)
def test_preprocess_keeps_the_requested_max_tokens(
    pre: Preprocess, fields: dict[str, int], expected: int
) -> None:
    out = _only_output(_only(pre.handle(Batch.of([_prompt_record(_prompt(**fields))]))))
    assert decode(TokenizedMessage, out.value).sampling.max_tokens == expected


def test_preprocess_copies_the_sampling_fields(pre: Preprocess) -> None:
    body = _prompt(temperature=0.5, top_p=0.9, top_k=40, seed=3, stop="END")
    out = _only_output(_only(pre.handle(Batch.of([_prompt_record(body)]))))
    sampling = decode(TokenizedMessage, out.value).sampling
    assert (sampling.temperature, sampling.top_p, sampling.top_k, sampling.seed) == (
        0.5,
        0.9,
        40,
        3,
    )
    assert sampling.stop == ["END"]


def test_preprocess_refuses_a_top_k_beyond_the_vocabulary(pre: Preprocess) -> None:
    """The engine would fail on it (and count a fault): a 400 naming top_k, before any work."""
    body = _prompt(top_k=pre.text.vocab_size + 1)
    result = _only(pre.handle(Batch.of([_prompt_record(body)])))
    assert isinstance(result.error, InvalidInput) and result.error.param == "top_k"
    assert not result.outputs


def test_preprocess_headers_continue_the_incoming_trace(pre: Preprocess) -> None:
    record = _prompt_record(
        _prompt(id="req-1"), headers=[(TRACEPARENT, INCOMING_TRACEPARENT.encode())]
    )
    out = _only_output(_only(pre.handle(Batch.of([record]))))
    parsed = parse_headers(out.headers)
    assert parsed.type == "sluice.tokenized"
    assert parsed.stage == "preprocess"
    assert parsed.request_id == "req-1"
    assert parsed.is_cloudevent
    assert not parsed.degraded
    context = parse_traceparent(parsed.traceparent)
    assert context is not None
    assert context.trace_id == TRACE_ID
    assert context.parent_id != "00f067aa0ba902b7"  # a new span of the same trace


def test_preprocess_starts_a_trace_without_one(pre: Preprocess) -> None:
    out = _only_output(_only(pre.handle(Batch.of([_prompt_record(_prompt())]))))
    assert parse_traceparent(header_value(out.headers, TRACEPARENT)) is not None


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (b"{this is not json", "bad-json"),
        (b"\xff\xfe", "bad-json"),
        (None, "bad-json"),
        (b'{"messages": "hello"}', "schema"),
        (b'{"messages": [{"role": "wizard", "content": "hi"}]}', "schema"),
        (b"[1, 2]", "schema"),
        (b'{"messages": []}', "empty-messages"),
        (b'{"messages": [{"role": "user", "content": "   "}]}', "empty-messages"),
    ],
)
def test_preprocess_refuses_bad_input(pre: Preprocess, value: bytes | None, reason: str) -> None:
    result = _only(pre.handle(Batch.of([_record(value)])))
    error = _invalid(result)
    assert error.reason == reason
    assert not error.fault
    assert error.answer().error.type == INVALID_REQUEST_ERROR
    assert pre.fingerprint(result.record) is None


def test_preprocess_refuses_an_oversized_prompt(text: TextModel) -> None:
    small = Preprocess(Settings(model_path=MODEL, topic_prefix="t.", max_prompt_bytes=1024), text)
    body = orjson.dumps(_prompt([{"role": "user", "content": "x" * 1100}]))
    assert len(body) > 1024
    error = _invalid(_only(small.handle(Batch.of([_record(body)]))))
    assert error.reason == "oversized"
    fits = orjson.dumps(_prompt([{"role": "user", "content": "x" * 10}]))
    assert _only(small.handle(Batch.of([_record(fits)]))).ok


def test_preprocess_refuses_a_prompt_longer_than_the_context(
    pre: Preprocess, text: TextModel
) -> None:
    assert text.context_length == 256
    content = "a" * (text.context_length - _overhead(text))  # exactly the context: no room
    error = _invalid(_only(pre.handle(Batch.of([_user_record(content)]))))
    assert error.reason == "context-length"
    assert error.code == CONTEXT_LENGTH_EXCEEDED
    assert error.param == "messages"
    assert not error.fault
    answer = error.answer()
    assert answer.error.code == CONTEXT_LENGTH_EXCEEDED
    assert answer.error.param == "messages"
    assert answer.error.type == INVALID_REQUEST_ERROR
    assert "256" in answer.error.message


def test_preprocess_refuses_a_prompt_far_over_the_context(pre: Preprocess) -> None:
    error = _invalid(_only(pre.handle(Batch.of([_user_record("long prompt " * 40)]))))
    assert (error.reason, error.code, error.param) == (
        "context-length",
        CONTEXT_LENGTH_EXCEEDED,
        "messages",
    )


def test_preprocess_accepts_a_prompt_one_token_below_the_context(
    pre: Preprocess, text: TextModel
) -> None:
    content = "a" * (text.context_length - _overhead(text) - 1)
    out = _only_output(_only(pre.handle(Batch.of([_user_record(content)]))))
    msg = decode(TokenizedMessage, out.value)
    assert len(msg.input_ids) == text.context_length - 1
    assert msg.sampling.max_tokens == 1


def test_preprocess_refuses_prompt_plus_max_tokens_over_the_context(
    pre: Preprocess, text: TextModel
) -> None:
    messages = [{"role": "user", "content": "hello"}]
    prompt_tokens = len(text.encode(text.render(messages)))
    room = text.context_length - prompt_tokens
    over = _prompt_record(_prompt(messages, max_tokens=room + 1))
    error = _invalid(_only(pre.handle(Batch.of([over]))))
    assert error.reason == "context-length"
    assert error.code == CONTEXT_LENGTH_EXCEEDED
    assert error.param == "messages"
    assert str(room + 1) in error.message
    exact = _prompt_record(_prompt(messages, max_tokens=room))
    out = _only_output(_only(pre.handle(Batch.of([exact]))))
    assert decode(TokenizedMessage, out.value).sampling.max_tokens == room


def test_preprocess_fingerprint_ignores_ids_but_not_content(pre: Preprocess) -> None:
    a = _prompt_record(_prompt(id="a", conversation_id="c1"), offset=1, key=b"k1")
    b = _prompt_record(_prompt(id="b", conversation_id="c2"), offset=2, key=b"k2")
    other = _prompt_record(
        _prompt([{"role": "user", "content": "Uppercase: goodbye"}], id="a"), offset=3
    )
    warmer = _prompt_record(_prompt(id="a", temperature=1.5), offset=4)
    fa, fb = pre.fingerprint(a), pre.fingerprint(b)
    assert fa is not None
    assert fa == fb
    assert pre.fingerprint(other) != fa
    assert pre.fingerprint(warmer) != fa
    result = _only(pre.handle(Batch.of([a])))
    assert result.fingerprint == fa


def test_preprocess_rebind_readdresses_cached_outputs(pre: Preprocess) -> None:
    first = _prompt_record(_prompt(id="a", conversation_id="c1"))
    cached = _only(pre.handle(Batch.of([first]))).outputs
    again = _prompt_record(
        _prompt(id="b"),
        offset=9,
        key=b"other-conv",
        headers=[(TRACEPARENT, INCOMING_TRACEPARENT.encode())],
    )
    assert pre.fingerprint(again) == pre.fingerprint(first)
    rebound = pre.rebind(cached, again)
    assert len(rebound) == 1
    out = rebound[0]
    assert out.topic == "t.tokenized"
    assert out.key == b"other-conv"
    msg = decode(TokenizedMessage, out.value)
    original = decode(TokenizedMessage, cached[0].value)
    assert msg.id == "b"
    assert msg.conversation_id == "other-conv"
    assert msg.input_ids == original.input_ids
    parsed = parse_headers(out.headers)
    assert parsed.request_id == "b"
    assert parsed.type == "sluice.tokenized"
    assert parsed.degraded
    assert header_value(out.headers, SLUICE_DEGRADED) == "true"
    context = parse_traceparent(parsed.traceparent)
    assert context is not None
    assert context.trace_id == TRACE_ID
    assert decode(TokenizedMessage, cached[0].value).id == "a"  # the cache is not mutated


# --- echo engine -----------------------------------------------------------------------------


def _request(
    text: TextModel, messages: list[dict[str, str]], *, max_tokens: int | None = None
) -> GenerationRequest:
    ids = text.encode(text.render(messages))
    return GenerationRequest("r1", ids, SamplingParams(max_tokens=max_tokens))


async def test_echo_returns_the_last_user_turn(text: TextModel) -> None:
    messages = [
        {"role": "system", "content": "Echo."},
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": "first answer"},
        {"role": "user", "content": "second\nline two"},
    ]
    gen = await EchoEngine(text).generate(_request(text, messages))
    assert gen.output_ids == text.encode("second\nline two")
    assert gen.finish_reason == "stop"
    assert gen.compute_s >= 0


async def test_echo_cuts_at_max_tokens(text: TextModel) -> None:
    messages = [{"role": "user", "content": "abcdefghij"}]
    gen = await EchoEngine(text).generate(_request(text, messages, max_tokens=4))
    assert gen.output_ids == text.encode("abcd")
    assert gen.finish_reason == "length"
    exact = await EchoEngine(text).generate(_request(text, messages, max_tokens=10))
    assert exact.output_ids == text.encode("abcdefghij")
    assert exact.finish_reason == "stop"


async def test_echo_without_chatml_returns_the_non_special_ids(text: TextModel) -> None:
    ids = [*text.encode("plain"), next(iter(text.eos_token_ids))]
    gen = await EchoEngine(text).generate(GenerationRequest("r", ids, SamplingParams()))
    assert gen.output_ids == text.encode("plain")


async def test_echo_fails_while_the_fault_file_exists(text: TextModel, tmp_path: Path) -> None:
    fault = tmp_path / "fault"
    engine = EchoEngine(text, fault_file=fault)
    request = _request(text, [{"role": "user", "content": "hi"}])
    assert (await engine.generate(request)).output_ids == text.encode("hi")
    fault.touch()
    with pytest.raises(StageFault) as caught:
        await engine.generate(request)
    assert caught.value.reason == "engine-fault"
    assert caught.value.fault
    fault.unlink()
    assert (await engine.generate(request)).output_ids == text.encode("hi")


async def test_echo_honours_its_delay(text: TextModel) -> None:
    delay = 0.03
    engine = EchoEngine(text, delay_s=delay)
    t0 = time.perf_counter()
    gen = await engine.generate(_request(text, [{"role": "user", "content": "hi"}]))
    assert time.perf_counter() - t0 >= delay
    assert gen.compute_s >= delay


# --- compute ---------------------------------------------------------------------------------


def _tokenized_record(
    text: TextModel,
    content: str,
    *,
    request_id: str = "r1",
    offset: int = 0,
    max_tokens: int | None = None,
) -> Record:
    ids = text.encode(text.render([{"role": "user", "content": content}]))
    msg = TokenizedMessage(
        id=request_id,
        conversation_id=f"conv-{request_id}",
        model="demo",
        input_ids=ids,
        sampling=SamplingParams(max_tokens=max_tokens, stop=["."]),
        created=TS_MS // 1000,
        timings=Timings(received_at=TS_MS / 1000, preprocessed_at=time.time()),
    )
    return _record(encode(msg), topic="t.tokenized", offset=offset)


class BrokenEngine:
    name = "broken"

    async def start(self) -> None:
        return None

    async def generate(self, request: GenerationRequest) -> Generation:
        raise RuntimeError(f"boom on {request.request_id}")

    async def close(self) -> None:
        return None


async def test_compute_generates_with_usage(settings: Settings, text: TextModel) -> None:
    compute = Compute(settings, EchoEngine(text))
    records = [
        _tokenized_record(text, "hello world", request_id="r1", offset=0),
        _tokenized_record(text, "abcdefgh", request_id="r2", offset=1, max_tokens=3),
    ]
    results = await compute.handle(Batch.of(records))
    assert [r.record for r in results] == records
    first, second = (decode(GeneratedMessage, _only_output(r).value) for r in results)
    tokenized = decode(TokenizedMessage, records[0].value)

    assert first.id == "r1"
    assert first.conversation_id == "conv-r1"
    assert first.model == "demo"
    assert first.output_ids == text.encode("hello world")
    assert first.finish_reason == "stop"
    assert first.prompt_tokens == len(tokenized.input_ids)
    assert first.usage == Usage(
        prompt_tokens=len(tokenized.input_ids),
        completion_tokens=len(text.encode("hello world")),
        total_tokens=len(tokenized.input_ids) + len(text.encode("hello world")),
    )
    assert first.sampling == tokenized.sampling
    assert first.created == tokenized.created
    assert first.timings.received_at == tokenized.timings.received_at
    assert first.timings.compute_s is not None
    assert first.timings.generated_at is not None
    assert first.timings.queue_s is not None
    assert first.timings.queue_s >= 0

    assert second.output_ids == text.encode("abc")
    assert second.finish_reason == "length"
    assert second.usage.completion_tokens == 3

    out = _only_output(results[0])
    assert out.topic == "t.generated"
    assert out.key == b"conv-r1"
    parsed = parse_headers(out.headers)
    assert parsed.type == "sluice.generated"
    assert parsed.request_id == "r1"
    assert results[0].fingerprint is not None
    assert results[0].fingerprint == compute.fingerprint(records[0])


async def test_compute_refuses_garbage_without_spoiling_the_batch(
    settings: Settings, text: TextModel
) -> None:
    compute = Compute(settings, EchoEngine(text))
    garbage = _record(b"\x00 garbage", topic="t.tokenized", offset=0)
    not_tokenized = _record(b'{"id": "x"}', topic="t.tokenized", offset=1)
    good = _tokenized_record(text, "fine", offset=2)
    results = await compute.handle(Batch.of([garbage, not_tokenized, good]))
    assert _invalid(results[0]).reason == "bad-json"
    assert _invalid(results[1]).reason == "schema"
    assert results[2].ok
    assert compute.fingerprint(garbage) is None


async def test_compute_engine_fault_is_a_result_not_an_exception(
    settings: Settings, text: TextModel, tmp_path: Path
) -> None:
    fault = tmp_path / "fault"
    fault.touch()
    compute = Compute(settings, EchoEngine(text, fault_file=fault))
    result = _only(await compute.handle(Batch.of([_tokenized_record(text, "hi")])))
    assert not result.outputs
    assert isinstance(result.error, StageFault)
    assert result.error.reason == "engine-fault"
    assert result.error.fault


async def test_compute_turns_an_engine_crash_into_a_stage_fault(
    settings: Settings, text: TextModel
) -> None:
    compute = Compute(settings, BrokenEngine())
    result = _only(await compute.handle(Batch.of([_tokenized_record(text, "hi")])))
    assert isinstance(result.error, StageFault)
    assert result.error.reason == "handler-exception"
    assert isinstance(result.error.__cause__, RuntimeError)


# --- postprocess -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "stops", "expected"),
    [
        ("Hello. World! Bye", ["!", "."], ("Hello", True)),
        ("Hello. World! Bye", [" Bye", "!"], ("Hello. World", True)),
        ("Hello world", ["STOP", "zzz"], ("Hello world", False)),
        ("Hello world", [], ("Hello world", False)),
        ("STOP now", ["STOP"], ("", True)),
        ("Hello", ["", "l"], ("He", True)),
        ("", ["x"], ("", False)),
    ],
)
def test_apply_stop(content: str, stops: Sequence[str], expected: tuple[str, bool]) -> None:
    assert apply_stop(content, stops) == expected


def _generated_record(
    text: TextModel,
    content: str,
    *,
    finish_reason: FinishReason = "length",
    stop: list[str] | None = None,
    error: str | None = None,
    extra_ids: Sequence[int] = (),
) -> tuple[Record, GeneratedMessage]:
    ids = [*text.encode(content), *extra_ids]
    msg = GeneratedMessage(
        id="r1",
        conversation_id="c1",
        model="demo",
        prompt_tokens=12,
        output_ids=ids,
        finish_reason=finish_reason,
        usage=Usage.of(12, len(ids)),
        sampling=SamplingParams(stop=stop or []),
        created=1_700_000_000,
        timings=Timings(received_at=1_700_000_000.5, compute_s=0.25),
        error=error,
    )
    return _record(encode(msg), topic="t.generated"), msg


def _answer(result: Result) -> ChatCompletion:
    answer = decode_answer(_only_output(result).value)
    assert isinstance(answer, ChatCompletion)
    return answer


def test_postprocess_builds_a_chat_completion(post: Postprocess, text: TextModel) -> None:
    record, msg = _generated_record(text, "Hello. World", stop=["."], finish_reason="length")
    result = _only(post.handle(Batch.of([record])))
    out = _only_output(result)
    assert out.topic == "t.answers"
    assert out.key == b"c1"
    answer = _answer(result)
    assert answer.id == "chatcmpl-r1"
    assert answer.object == "chat.completion"
    assert answer.model == "demo"
    assert answer.created == 1_700_000_000
    assert answer.content == "Hello"
    assert answer.choices[0].finish_reason == "stop"  # a stop string cut it
    assert answer.choices[0].message.role == "assistant"
    assert answer.usage == msg.usage
    parsed = parse_headers(out.headers)
    assert parsed.type == "sluice.answer"
    assert parsed.request_id == "r1"
    assert parsed.stage == "postprocess"


def test_postprocess_timings_header_holds_json(post: Postprocess, text: TextModel) -> None:
    record, _ = _generated_record(text, "Hi")
    out = _only_output(_only(post.handle(Batch.of([record]))))
    raw = header_value(out.headers, SLUICE_TIMINGS)
    assert raw is not None
    timings = Timings.model_validate(orjson.loads(raw))
    assert timings.received_at == 1_700_000_000.5
    assert timings.compute_s == 0.25
    assert timings.postprocess_s is not None
    assert timings.answered_at is not None


@pytest.mark.parametrize("finish", ["length", "stop"])
def test_postprocess_keeps_the_engine_finish_reason_without_a_stop(
    post: Postprocess, text: TextModel, finish: FinishReason
) -> None:
    record, _ = _generated_record(text, "Hello. World", finish_reason=finish, stop=["zz"])
    answer = _answer(_only(post.handle(Batch.of([record]))))
    assert answer.content == "Hello. World"
    assert answer.choices[0].finish_reason == finish


def test_postprocess_keeps_content_filter_as_the_finish_reason(
    post: Postprocess, text: TextModel
) -> None:
    """A filtered answer must not look like a normal one."""
    record, _ = _generated_record(text, "partial", finish_reason="content_filter")
    answer = _answer(_only(post.handle(Batch.of([record]))))
    assert answer.choices[0].finish_reason == "content_filter"


def test_postprocess_detokenizes_without_special_tokens(post: Postprocess, text: TextModel) -> None:
    record, _ = _generated_record(text, "done", finish_reason="stop", extra_ids=text.eos_token_ids)
    assert _answer(_only(post.handle(Batch.of([record])))).content == "done"


def test_postprocess_an_error_generation_is_a_stage_fault(
    post: Postprocess, text: TextModel
) -> None:
    record, _ = _generated_record(text, "", finish_reason="error", error="engine exploded")
    result = _only(post.handle(Batch.of([record])))
    assert not result.outputs
    assert isinstance(result.error, StageFault)
    assert result.error.reason == "generation-error"
    assert result.error.message == "engine exploded"
    assert result.error.fault


def test_postprocess_refuses_garbage(post: Postprocess) -> None:
    result = _only(post.handle(Batch.of([_record(b"nope", topic="t.generated")])))
    assert _invalid(result).reason == "bad-json"
