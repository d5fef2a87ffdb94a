"""The client's prompts and its ordering of replies, with Kafka replaced by a fake."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence

import orjson
import pytest

from pipeline.client import Prepared, Reply, SluiceClient, prepare
from pipeline.config import Settings
from schemas.messages import ErrorAnswer, PromptMessage, encode
from tests.unit.pipeline.client.test_routing import completion

# --- prepare ----------------------------------------------------------------------------------


def test_prepare_text_becomes_one_user_turn_with_a_fresh_id() -> None:
    a, b = prepare("hello"), prepare("hello")
    assert a.request_id != b.request_id
    body = orjson.loads(a.value)
    assert body == {"messages": [{"role": "user", "content": "hello"}], "id": a.request_id}
    assert a.key == a.request_id.encode()


def test_prepare_keeps_the_body_and_its_id_and_keys_by_conversation() -> None:
    body = {"id": "mine", "conversation_id": "conv-1", "messages": [], "x-extra": 1}
    p = prepare(body)
    assert p.request_id == "mine"
    assert p.key == b"conv-1"
    assert orjson.loads(p.value) == body  # unknown fields kept, caller's dict untouched
    assert body["id"] == "mine"


def test_prepare_explicit_request_id_replaces_the_body_id() -> None:
    p = prepare({"id": "theirs", "messages": [{"role": "user", "content": "x"}]}, "gw-1")
    assert p.request_id == "gw-1"
    assert orjson.loads(p.value)["id"] == "gw-1"


def test_prepare_prompt_message_leaves_out_nones() -> None:
    msg = PromptMessage.model_validate({"messages": [{"role": "user", "content": "hi"}]})
    body = orjson.loads(prepare(msg).value)
    assert set(body) == {"messages", "stream", "id"}


# --- the client's ordering, with Kafka replaced by a shuffling fake ---------------------------


class ShufflingClient(SluiceClient):
    """Publishing "answers" each prompt after a random delay, some twice, some never."""

    def __init__(self, *, lose: frozenset[int] = frozenset()) -> None:
        super().__init__(Settings(), source="test", timeout_s=5.0)
        self.rng = random.Random(7)
        self.lose = lose
        self.batches: list[int] = []
        self.max_waiting = 0

    async def _publish(self, batch: Sequence[Prepared], deadline: float) -> None:
        loop = asyncio.get_running_loop()
        self.batches.append(len(batch))
        for p in batch:
            body = orjson.loads(p.value)
            index = int(body["messages"][0]["content"].removeprefix("q"))
            if index in self.lose:
                continue
            value = (
                encode(ErrorAnswer.invalid_request("bad"))
                if index % 10 == 3
                else completion(p.request_id, f"a{index}")
            )
            for _ in range(2 if index % 7 == 0 else 1):
                delay = self.rng.uniform(0, 0.05)
                loop.call_later(delay, self.router.offer, p.request_id, value, [])
        self.max_waiting = max(self.max_waiting, len(self.router))


async def test_infer_returns_replies_in_input_order_despite_shuffled_and_duplicate_answers() -> (
    None
):
    client = ShufflingClient()
    seen: list[int] = []
    replies = await client.infer(
        [f"q{i}" for i in range(200)],
        batch_size=16,
        max_in_flight=48,
        on_reply=lambda i, _: seen.append(i),
    )
    assert len(replies) == 200
    assert sorted(seen) == list(range(200)) and seen != list(range(200))
    for i, reply in enumerate(replies):
        if i % 10 == 3:
            assert reply.status == 400
        else:
            assert reply.completion().content == f"a{i}"
    assert len({r.request_id for r in replies}) == 200
    assert client.batches[0] == 16 and sum(client.batches) == 200
    assert client.max_waiting <= 48
    assert client.router.stats.duplicates > 0
    assert len(client.router) == 0


async def test_infer_turns_a_missing_answer_into_a_timeout_reply() -> None:
    client = ShufflingClient(lose=frozenset({5}))
    replies = await client.infer([f"q{i}" for i in range(10)], batch_size=4, timeout_s=0.3)
    assert [r.timed_out for r in replies] == [i == 5 for i in range(10)]
    assert replies[5].status == 504
    assert client.router.stats.timeouts == 1


async def test_infer_refuses_duplicate_request_ids_before_publishing() -> None:
    client = ShufflingClient()
    with pytest.raises(ValueError, match="unique"):
        await client.infer([{"id": "same", "messages": []}, {"id": "same", "messages": []}])
    assert client.batches == []


async def test_prompts_preprocess_would_refuse_are_answered_400_without_publishing() -> None:
    client = ShufflingClient()
    tools = {"messages": [{"role": "user", "content": "q0"}], "tools": [{"type": "function"}]}
    replies = await client.infer([tools, "q1", {"messages": []}], batch_size=8)
    assert [r.status for r in replies] == [400, 200, 400]
    assert isinstance(replies[0].answer, ErrorAnswer)
    assert replies[0].answer.error.param == "tools"
    assert replies[2].answer.error.param == "messages"  # type: ignore[union-attr]
    assert client.batches == [1]  # only the valid prompt went out
    refused = await client.request(tools)
    assert refused.status == 400 and client.batches == [1]


async def test_request_waits_for_its_own_answer() -> None:
    client = ShufflingClient()
    reply: Reply = await client.request("q1")
    assert reply.completion().content == "a1"
    assert reply.latency_s >= 0
