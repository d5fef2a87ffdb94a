"""Message models and codec: answers are what the OpenAI SDK parses; refusals are exact."""

from __future__ import annotations

import importlib
from typing import Any

import openai
import orjson
import pydantic
import pytest
from openai.types.chat import ChatCompletion as OpenAIChatCompletion
from openai.types.shared import ErrorObject

from schemas import (
    CE_ANSWER,
    CE_ANSWER_ERROR,
    CE_GENERATED,
    CE_PROMPT,
    CE_TOKENIZED,
    MESSAGE_TYPES,
    ChatCompletion,
    ErrorAnswer,
    GeneratedMessage,
    PromptMessage,
    SamplingParams,
    SchemaError,
    Timings,
    TokenizedMessage,
    Usage,
    decode,
    decode_answer,
    encode,
    parse_prompt,
    validation_error_reason,
)

MAX_BYTES = 64 * 1024


def _completion() -> ChatCompletion:
    return ChatCompletion.build(
        id="chatcmpl-req-1",
        model="sluice-demo",
        content="The answer is 42.",
        finish_reason="length",
        usage=Usage.of(prompt_tokens=11, completion_tokens=7),
        created=1_732_000_000,
        system_fingerprint="fp_sluice",
    )


def _assert_no_extra(model: Any) -> None:
    """OpenAI's models keep unknown keys in `model_extra`; ours must add none, at any depth."""
    assert not model.model_extra, f"{type(model).__name__} got unknown keys {model.model_extra}"
    for name in type(model).model_fields:
        value = getattr(model, name)
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, pydantic.BaseModel):
                _assert_no_extra(item)


# --- answers ---------------------------------------------------------------------------------


def test_chat_completion_validates_with_openai_types() -> None:
    data = encode(_completion())

    parsed = OpenAIChatCompletion.model_validate(orjson.loads(data))

    assert parsed.id == "chatcmpl-req-1"
    assert parsed.object == "chat.completion"
    assert parsed.created == 1_732_000_000
    assert parsed.model == "sluice-demo"
    assert parsed.system_fingerprint == "fp_sluice"
    assert len(parsed.choices) == 1
    choice = parsed.choices[0]
    assert (choice.index, choice.finish_reason, choice.logprobs) == (0, "length", None)
    assert choice.message.role == "assistant"
    assert choice.message.content == "The answer is 42."
    assert choice.message.refusal is None
    assert parsed.usage is not None
    assert (parsed.usage.prompt_tokens, parsed.usage.completion_tokens) == (11, 7)
    assert parsed.usage.total_tokens == 18
    _assert_no_extra(parsed)


def test_chat_completion_keeps_openai_nulls_and_key_order() -> None:
    body = orjson.loads(encode(ChatCompletion.build(**_completion_kwargs())))

    assert list(body) == [
        "id",
        "object",
        "created",
        "model",
        "choices",
        "usage",
        "system_fingerprint",
    ]
    assert body["system_fingerprint"] is None
    assert body["choices"][0]["logprobs"] is None
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "ok", "refusal": None}


def _completion_kwargs() -> dict[str, Any]:
    return {
        "id": "chatcmpl-2",
        "model": "m",
        "content": "ok",
        "finish_reason": "stop",
        "usage": Usage.of(1, 1),
    }


def test_chat_completion_round_trips_through_our_decoder() -> None:
    completion = _completion()

    decoded = decode_answer(encode(completion))

    assert decoded == completion
    assert isinstance(decoded, ChatCompletion)
    assert decoded.content == "The answer is 42."


@pytest.mark.parametrize(
    ("answer", "type_", "code", "param", "status"),
    [
        (
            ErrorAnswer.invalid_request("messages: Field required", param="messages"),
            "invalid_request_error",
            None,
            "messages",
            400,
        ),
        (
            ErrorAnswer.context_length_exceeded(prompt_tokens=5000, max_context=4096),
            "invalid_request_error",
            "context_length_exceeded",
            "messages",
            400,
        ),
        (ErrorAnswer.circuit_open(), "server_error", "circuit_open", None, 503),
        (ErrorAnswer.timeout(), "server_error", "timeout", None, 504),
        (ErrorAnswer.server_error(), "server_error", None, None, 500),
        (
            ErrorAnswer.build("custom", type="server_error", code="x"),
            "server_error",
            "x",
            None,
            500,
        ),
    ],
)
def test_error_answers_are_openai_error_objects(
    answer: ErrorAnswer, type_: str, code: str | None, param: str | None, status: int
) -> None:
    body = orjson.loads(encode(answer))

    assert list(body) == ["error"]
    assert set(body["error"]) == {"message", "type", "param", "code"}
    error = ErrorObject.model_validate(body["error"])
    _assert_no_extra(error)
    assert (error.type, error.code, error.param) == (type_, code, param)
    assert error.message
    assert answer.http_status() == status
    assert decode_answer(encode(answer)) == answer


def test_context_length_message_reads_like_openai() -> None:
    answer = ErrorAnswer.context_length_exceeded(prompt_tokens=5000, max_context=4096)

    assert "maximum context length is 4096 tokens" in answer.error.message
    assert "resulted in 5000 tokens" in answer.error.message


def _http_module() -> Any:
    """The HTTP library this openai release is built on (httpx, or httpx2 in later releases)."""
    client_base = openai.DefaultHttpxClient.__mro__[1]
    return importlib.import_module(client_base.__module__.partition(".")[0])


def test_openai_client_reads_our_answers_and_sends_prompts_we_accept() -> None:
    http = _http_module()
    answers: list[tuple[int, bytes]] = [
        (200, encode(_completion())),
        (400, encode(ErrorAnswer.invalid_request("temperature: too hot", param="temperature"))),
        (503, encode(ErrorAnswer.circuit_open())),
    ]
    prompts: list[PromptMessage] = []

    def handler(request: Any) -> Any:
        prompts.append(parse_prompt(request.read(), MAX_BYTES))
        status, body = answers[len(prompts) - 1]
        return http.Response(status, content=body, headers={"content-type": "application/json"})

    client = openai.OpenAI(
        api_key="test",
        base_url="http://sluice.test/v1",
        max_retries=0,
        http_client=openai.DefaultHttpxClient(transport=http.MockTransport(handler)),
    )
    request: dict[str, Any] = {
        "model": "sluice-demo",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "What is 6 x 7?"},
        ],
        "max_completion_tokens": 16,
        "temperature": 0.2,
        "stop": "\n",
        "seed": 7,
        "extra_body": {"conversation_id": "conv-1"},
    }
    with client:
        completion = client.chat.completions.create(**request)
        with pytest.raises(openai.BadRequestError) as bad:
            client.chat.completions.create(**request)
        with pytest.raises(openai.InternalServerError) as unavailable:
            client.chat.completions.create(**request)

    assert completion.id == "chatcmpl-req-1"
    assert completion.choices[0].message.content == "The answer is 42."
    assert completion.choices[0].finish_reason == "length"
    assert (bad.value.type, bad.value.param, bad.value.code) == (
        "invalid_request_error",
        "temperature",
        None,
    )
    assert unavailable.value.status_code == 503
    assert unavailable.value.code == "circuit_open"
    prompt = prompts[0]
    assert prompt.model == "sluice-demo"
    assert [m.role for m in prompt.messages] == ["system", "user"]
    assert prompt.stop == ["\n"]
    assert (prompt.requested_max_tokens, prompt.seed, prompt.temperature) == (16, 7, 0.2)
    assert prompt.conversation_id == "conv-1"


# --- prompts ---------------------------------------------------------------------------------


def _prompt(**fields: Any) -> bytes:
    body: dict[str, Any] = {"messages": [{"role": "user", "content": "hello"}]}
    body.update(fields)
    return orjson.dumps(body)


@pytest.mark.parametrize(
    ("raw", "reason", "param", "message"),
    [
        (
            _prompt(messages=[{"role": "user", "content": ""}]),
            "empty-messages",
            "messages[0].content",
            "messages[0].content: the last user message must not be empty",
        ),
        (
            _prompt(
                messages=[
                    {"role": "user", "content": "first"},
                    {"role": "assistant", "content": "ok"},
                    {"role": "user", "content": "  \n"},
                ]
            ),
            "empty-messages",
            "messages[2].content",
            "messages[2].content: the last user message must not be empty",
        ),
        (
            _prompt(messages=[]),
            "empty-messages",
            "messages",
            "messages: List should have at least 1 item",
        ),
        (b'{"model": "m"}', "schema", "messages", "messages: Field required"),
        (
            _prompt(messages=[{"role": "user", "content": 5}]),
            "schema",
            "messages[0].content",
            "messages[0].content: Input should be a valid string",
        ),
        (
            _prompt(messages=[{"role": "robot", "content": "x"}]),
            "schema",
            "messages[0].role",
            "messages[0].role: Input should be 'system', 'user', 'assistant' or 'tool'",
        ),
        (
            _prompt(messages=[{"role": "user", "content": [{"type": "image_url"}]}]),
            "schema",
            "messages[0].content",
            "messages[0].content: only text content parts are supported (part 0 is not one)",
        ),
        (
            _prompt(temperature=2.5),
            "schema",
            "temperature",
            "temperature: Input should be less than or equal to 2",
        ),
        (_prompt(top_p=0), "schema", "top_p", "top_p: Input should be greater than 0"),
        (
            _prompt(max_tokens=0),
            "schema",
            "max_tokens",
            "max_tokens: Input should be greater than or equal to 1",
        ),
        (_prompt(n=2), "schema", "n", "n: only n=1 is supported"),
        (
            _prompt(stop=["a", "b", "c", "d", "e"]),
            "schema",
            "stop",
            "stop: List should have at most 4 items",
        ),
        (
            _prompt(metadata={"k": 1}),
            "schema",
            "metadata.k",
            "metadata.k: Input should be a valid string",
        ),
    ],
)
def test_bad_prompts_name_the_field(raw: bytes, reason: str, param: str, message: str) -> None:
    with pytest.raises(SchemaError) as caught:
        parse_prompt(raw, MAX_BYTES)

    assert caught.value.reason == reason
    assert caught.value.param == param
    assert caught.value.message.startswith(message)
    assert caught.value.retriable is False


def test_several_problems_are_joined() -> None:
    raw = _prompt(messages=[{"role": "robot", "content": 1}], temperature=-1)

    with pytest.raises(SchemaError) as caught:
        parse_prompt(raw, MAX_BYTES)

    assert caught.value.message == (
        "messages[0].role: Input should be 'system', 'user', 'assistant' or 'tool'; "
        "messages[0].content: Input should be a valid string; "
        "temperature: Input should be greater than or equal to 0"
    )
    assert caught.value.param == "messages[0].role"


@pytest.mark.parametrize(
    ("raw", "reason", "fragment"),
    [
        (b'{"messages": [', "bad-json", "not valid UTF-8 JSON"),
        (b"", "bad-json", "not valid UTF-8 JSON"),
        (b"\xff\xfe{}", "bad-json", "not valid UTF-8 JSON"),
        (b'{"messages": [{"role": "user", "content": "\xc3\x28"}]}', "bad-json", "UTF-8"),
        (None, "bad-json", "tombstone"),
        (b"[1, 2]", "schema", "must be a JSON object, not an array"),
        (b'"hello"', "schema", "must be a JSON object, not a string"),
        (b"42", "schema", "must be a JSON object, not a number"),
        (b"true", "schema", "must be a JSON object, not a boolean"),
        (b"null", "schema", "must be a JSON object, not null"),
    ],
)
def test_bad_bodies_do_not_crash(raw: bytes | None, reason: str, fragment: str) -> None:
    with pytest.raises(SchemaError) as caught:
        parse_prompt(raw, MAX_BYTES)

    assert caught.value.reason == reason
    assert fragment in caught.value.message
    assert caught.value.param is None


def test_oversized_prompt_is_refused_before_parsing() -> None:
    raw = _prompt(messages=[{"role": "user", "content": "x" * 200}])

    with pytest.raises(SchemaError) as caught:
        parse_prompt(raw + b"garbage that would not parse", 100)

    assert caught.value.reason == "oversized"
    assert "the limit is 100 bytes" in caught.value.message
    assert parse_prompt(raw, len(raw)).messages[0].content == "x" * 200


def test_refusals_never_quote_the_prompt() -> None:
    raw = _prompt(
        messages=[{"role": "user", "content": ["s3cret"]}],
        temperature="s3cret",
        metadata={"k": ["s3cret"]},
    )

    with pytest.raises(SchemaError) as caught:
        parse_prompt(raw, MAX_BYTES)

    assert "s3cret" not in caught.value.message
    assert "s3cret" not in str(caught.value)
    assert "s3cret" not in str(caught.value.__cause__)


def test_validation_error_reason_is_capped() -> None:
    raw = _prompt(messages=[{"role": "robot", "content": 1}] * 40)

    with pytest.raises(pydantic.ValidationError) as caught:
        PromptMessage.model_validate(orjson.loads(raw))

    reason = validation_error_reason(caught.value)
    assert len(reason) <= 500
    assert reason.startswith("messages[0].role: ")
    assert reason.endswith("(80 errors)")
    assert len(validation_error_reason(caught.value, max_chars=60)) <= 60


def test_prompt_accepts_openai_shapes_and_ignores_unknown_fields() -> None:
    raw = _prompt(
        messages=[
            {"role": "system", "content": ""},
            {
                "role": "user",
                "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
                "name": "ann",
            },
            {"role": "assistant", "content": ""},
        ],
        stop="END",
        max_tokens=9,
        top_k=40,
        n=1,
        tools=[],  # asks for nothing: accepted (tests/unit/schemas/test_refusals.py)
        response_format={"type": "text"},
        something_new=True,
        id="req-9",
        metadata={"tenant": "t1"},
    )

    prompt = parse_prompt(raw, MAX_BYTES)

    assert prompt.messages[1].content == "a\nb"
    assert prompt.messages[1].name == "ann"
    assert prompt.stop == ["END"]
    assert prompt.requested_max_tokens == 9
    assert (prompt.top_k, prompt.id, prompt.metadata) == (40, "req-9", {"tenant": "t1"})
    assert prompt.tools is None  # "off" is the same as absent
    body = orjson.loads(encode(prompt))
    assert "tools" not in body
    assert "temperature" not in body  # None fields stay off the wire
    assert decode(PromptMessage, encode(prompt)) == prompt


def test_max_completion_tokens_wins_over_max_tokens() -> None:
    prompt = parse_prompt(_prompt(max_tokens=100, max_completion_tokens=10), MAX_BYTES)

    assert prompt.requested_max_tokens == 10


def test_empty_stop_strings_are_dropped() -> None:
    assert parse_prompt(_prompt(stop=["", "x"]), MAX_BYTES).stop == ["x"]
    assert parse_prompt(_prompt(stop=None), MAX_BYTES).stop is None


# --- internal messages -----------------------------------------------------------------------


def test_sampling_params_come_from_the_prompt() -> None:
    prompt = parse_prompt(
        _prompt(temperature=0.5, top_p=0.9, top_k=5, seed=3, max_tokens=50, stop="."), MAX_BYTES
    )

    assert SamplingParams.from_prompt(prompt) == SamplingParams(
        temperature=0.5, top_p=0.9, top_k=5, seed=3, max_tokens=50, stop=["."]
    )
    assert SamplingParams.from_prompt(prompt, max_tokens=20).max_tokens == 20


def test_tokenized_and_generated_round_trip_without_nulls() -> None:
    sampling = SamplingParams(temperature=0.0, max_tokens=8, stop=["\n"])
    timings = Timings(received_at=1_732_000_000.25, preprocess_s=0.004)
    tokenized = TokenizedMessage(
        id="req-1",
        conversation_id="conv-1",
        model="sluice-demo",
        input_ids=[1, 2, 3],
        sampling=sampling,
        created=1_732_000_000,
        timings=timings,
    )
    generated = GeneratedMessage(
        id="req-1",
        conversation_id="conv-1",
        model="sluice-demo",
        prompt_tokens=3,
        output_ids=[7, 8],
        finish_reason="stop",
        usage=Usage.of(3, 2),
        sampling=sampling,
        created=1_732_000_000,
        timings=timings.model_copy(update={"queue_s": 0.01, "ttft_s": 0.02, "compute_s": 0.1}),
    )

    for message in (tokenized, generated):
        data = encode(message)
        assert b"null" not in data
        assert decode(type(message), data) == message
    body = orjson.loads(encode(generated))
    assert body["timings"] == {
        "received_at": 1_732_000_000.25,
        "preprocess_s": 0.004,
        "queue_s": 0.01,
        "ttft_s": 0.02,
        "compute_s": 0.1,
    }
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}


def test_decode_reports_schema_errors_for_internal_messages() -> None:
    with pytest.raises(SchemaError) as caught:
        decode(TokenizedMessage, b'{"id": "r", "conversation_id": "c", "model": "m"}')

    assert caught.value.reason == "schema"
    assert caught.value.message == "input_ids: Field required; created: Field required"


def test_generated_finish_reason_is_checked() -> None:
    data = orjson.dumps(
        {
            "id": "r",
            "conversation_id": "c",
            "model": "m",
            "prompt_tokens": 1,
            "output_ids": [],
            "finish_reason": "tool_calls",
            "usage": {"prompt_tokens": 1, "completion_tokens": 0, "total_tokens": 1},
            "created": 0,
        }
    )

    with pytest.raises(SchemaError) as caught:
        decode(GeneratedMessage, data)

    assert caught.value.param == "finish_reason"


def test_unknown_fields_from_newer_producers_are_ignored() -> None:
    data = orjson.dumps(
        {
            "id": "r",
            "conversation_id": "c",
            "model": "m",
            "input_ids": [1],
            "created": 0,
            "added_in_v2": {"x": 1},
        }
    )

    assert decode(TokenizedMessage, data).input_ids == [1]


def test_message_types_map_ce_types_to_models() -> None:
    assert {
        CE_PROMPT: PromptMessage,
        CE_TOKENIZED: TokenizedMessage,
        CE_GENERATED: GeneratedMessage,
        CE_ANSWER: ChatCompletion,
        CE_ANSWER_ERROR: ErrorAnswer,
    } == MESSAGE_TYPES


def test_schema_errors_become_error_answers() -> None:
    with pytest.raises(SchemaError) as caught:
        parse_prompt(_prompt(top_p=2), MAX_BYTES)

    answer = ErrorAnswer.from_schema_error(caught.value)

    assert answer.error.type == "invalid_request_error"
    assert answer.error.param == "top_p"
    assert answer.error.message == "top_p: Input should be less than or equal to 1"
