"""Preprocess refuses records whose CloudEvents headers say they are not 1.0 prompts."""

from __future__ import annotations

import orjson
import pytest

from pipeline.config import Settings
from pipeline.errors import InvalidInput
from pipeline.runtime.batch import Batch, Record
from schemas.headers import CE_SPECVERSION, CE_TYPE, Headers, make_headers
from schemas.messages import CE_ANSWER, CE_PROMPT, INVALID_REQUEST_ERROR
from stages.preprocess import Preprocess
from stages.text import TextModel
from tests.paths import REPO_ROOT

MODEL = REPO_ROOT / "models" / "demo" / "tokenizer"
BODY = orjson.dumps({"id": "req-1", "messages": [{"role": "user", "content": "hello"}]})


@pytest.fixture(scope="module")
def pre() -> Preprocess:
    settings = Settings(model_path=MODEL, topic_prefix="t.")
    return Preprocess(settings, TextModel.load(settings.model_path))


def _record(headers: Headers) -> Record:
    return Record("t.prompts", 0, 7, 1_700_000_000_000, b"conv", BODY, headers)


@pytest.mark.parametrize(
    ("headers", "reason", "says"),
    [
        ([(CE_SPECVERSION, b"0.3"), (CE_TYPE, b"sluice.prompt")], "unsupported-specversion", "0.3"),
        ([(CE_SPECVERSION, b"99")], "unsupported-specversion", "only '1.0'"),
        (make_headers(CE_ANSWER, "postprocess", "req-1"), "wrong-ce-type", "sluice.answer"),
    ],
)
def test_a_record_that_is_not_a_1_0_prompt_is_invalid_input_with_its_reason(
    pre: Preprocess, headers: Headers, reason: str, says: str
) -> None:
    (result,) = pre.handle(Batch.of([_record(headers)]))
    assert not result.outputs
    assert isinstance(result.error, InvalidInput)
    assert result.error.reason == reason  # the dead letter's sluice-dlt-reason
    assert not result.error.fault  # bad input never opens the breaker
    answer = result.error.answer().error
    assert answer.type == INVALID_REQUEST_ERROR and says in answer.message
    assert pre.fingerprint(result.record) is None  # never answered from the cache either


@pytest.mark.parametrize(
    "headers", [[], make_headers(CE_PROMPT, "gateway", "req-1"), [("content-type", b"x")]]
)
def test_plain_json_and_1_0_prompts_are_tokenized(pre: Preprocess, headers: Headers) -> None:
    (result,) = pre.handle(Batch.of([_record(headers)]))
    assert result.ok and len(result.outputs) == 1
    assert pre.fingerprint(result.record) is not None
