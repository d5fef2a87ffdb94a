"""Request fields Sluice does not implement are refused by name, unless they ask for nothing."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from schemas.errors import SchemaError
from schemas.messages import UNSUPPORTED_PARAMETERS, PromptMessage, decode

USER = [{"role": "user", "content": "hi"}]

ASKING_FOR_SOMETHING: dict[str, Any] = {
    "response_format": {"type": "json_object"},
    "tools": [{"type": "function", "function": {"name": "f"}}],
    "tool_choice": "required",
    "parallel_tool_calls": "yes",
    "functions": [{"name": "f"}],
    "function_call": {"name": "f"},
    "logprobs": True,
    "top_logprobs": 3,
    "logit_bias": {"50256": -100},
    "frequency_penalty": 0.5,
    "presence_penalty": -1,
    "audio": {"voice": "alloy", "format": "wav"},
    "modalities": ["text", "audio"],
    "prediction": {"type": "content", "content": "x"},
    "reasoning_effort": "low",
    "web_search_options": {},
}


def _decode(**extra: Any) -> PromptMessage:
    return decode(PromptMessage, orjson.dumps({"messages": USER, **extra}))


def test_every_unsupported_parameter_has_a_refused_example() -> None:
    assert set(ASKING_FOR_SOMETHING) == set(UNSUPPORTED_PARAMETERS)


@pytest.mark.parametrize("name", sorted(ASKING_FOR_SOMETHING))
def test_a_parameter_asking_for_something_is_refused_by_name(name: str) -> None:
    with pytest.raises(SchemaError) as refused:
        _decode(**{name: ASKING_FOR_SOMETHING[name]})
    assert refused.value.reason == "schema"
    assert refused.value.param == name
    assert "not supported" in refused.value.message


def test_the_off_values_the_sdks_send_are_accepted_and_not_published() -> None:
    prompt = _decode(
        response_format={"type": "text"},
        tools=[],
        tool_choice="none",
        logprobs=False,
        top_logprobs=0,
        logit_bias={},
        frequency_penalty=0.0,
        presence_penalty=0,
        modalities=["text"],
        parallel_tool_calls=True,
    )
    published = prompt.model_dump(mode="json", exclude_none=True)
    assert not set(published) & set(UNSUPPORTED_PARAMETERS)


def test_a_boolean_is_not_mistaken_for_zero() -> None:
    with pytest.raises(SchemaError) as refused:
        _decode(top_logprobs=False)
    assert refused.value.param == "top_logprobs"


def test_n_above_one_is_refused_naming_n() -> None:
    with pytest.raises(SchemaError) as refused:
        _decode(n=2)
    assert refused.value.param == "n"


def test_the_developer_role_is_read_as_system() -> None:
    prompt = decode(
        PromptMessage,
        orjson.dumps({"messages": [{"role": "developer", "content": "be brief"}, *USER]}),
    )
    assert [m.role for m in prompt.messages] == ["system", "user"]


def test_unknown_fields_are_still_ignored() -> None:
    assert _decode(store=False, service_tier="auto", x_custom=1).messages[0].content == "hi"
