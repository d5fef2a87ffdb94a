"""The client's answer matching, de-duplication and ordering, without Kafka."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence

import orjson
import pytest

from pipeline.client import (
    AnswerError,
    AnswerRouter,
    ClientStopped,
    Prepared,
    Reply,
    SluiceClient,
    prepare,
)
from pipeline.config import Settings
from schemas.headers import SLUICE_DEGRADED, SLUICE_TIMINGS, make_headers
from schemas.messages import ChatCompletion, ErrorAnswer, PromptMessage, Timings, Usage, encode


def completion(request_id: str, content: str = "ok") -> bytes:
    return encode(
        ChatCompletion.build(
            id=f"chatcmpl-{request_id}",
            model="m",
            content=content,
            finish_reason="stop",
            usage=Usage.of(3, 1),
        )
    )


def answer_headers(request_id: str, **extra: str) -> list[tuple[str, bytes]]:
    return make_headers("sluice.answer", "postprocess", request_id, extra=extra)


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


# --- the router -------------------------------------------------------------------------------


async def test_first_answer_wins_and_later_copies_are_duplicates() -> None:
    router = AnswerRouter()
    future = router.expect("r1")
    assert router.offer("r1", completion("r1", "first"), answer_headers("r1")) == "delivered"
    assert router.offer("r1", completion("r1", "second"), answer_headers("r1")) == "duplicate"
    reply = future.result()
    assert isinstance(reply.answer, ChatCompletion)
    assert reply.answer.content == "first"
    assert reply.ok and reply.status == 200
    assert router.stats.delivered == 1 and router.stats.duplicates == 1
    assert len(router) == 0


async def test_answers_for_other_requests_are_ignored_without_decoding() -> None:
    router = AnswerRouter()
    router.expect("mine")
    assert router.offer("someone-else", b"not even json", []) == "foreign"
    assert router.offer(None, completion("x"), []) == "foreign"
    assert router.stats.foreign == 2 and router.stats.undecodable == 0
    assert "mine" in router


async def test_an_answer_after_the_timeout_is_late() -> None:
    router = AnswerRouter()
    future = router.expect("slow")
    reply = router.give_up("slow")
    assert reply is not None and reply.timed_out
    assert future.result() is reply
    assert isinstance(reply.answer, ErrorAnswer) and reply.status == 504
    assert router.offer("slow", completion("slow"), answer_headers("slow")) == "late"
    assert router.stats.late == 1 and router.stats.timeouts == 1
    assert router.give_up("slow") is None


async def test_error_answers_and_headers_reach_the_reply() -> None:
    router = AnswerRouter()
    future = router.expect("r")
    timings = encode(Timings(queue_s=0.25)).decode()
    headers = answer_headers("r", **{SLUICE_DEGRADED: "true", SLUICE_TIMINGS: timings})
    router.offer("r", encode(ErrorAnswer.circuit_open()), headers)
    reply = future.result()
    assert not reply.ok and reply.status == 503 and reply.degraded
    assert reply.timings is not None and reply.timings.queue_s == 0.25
    with pytest.raises(AnswerError) as caught:
        reply.completion()
    assert caught.value.status == 503
    assert caught.value.answer().error.code == "circuit_open"


async def test_an_undecodable_answer_for_a_waiting_request_is_a_server_error() -> None:
    router = AnswerRouter()
    future = router.expect("r")
    assert router.offer("r", b"{broken", answer_headers("r")) == "undecodable"
    reply = future.result()
    assert reply.status == 500
    assert router.stats.undecodable == 1


async def test_a_request_id_cannot_wait_twice_and_may_be_reused_afterwards() -> None:
    router = AnswerRouter()
    router.expect("dup")
    with pytest.raises(ValueError, match="already waiting"):
        router.expect("dup")
    router.offer("dup", completion("dup"), [])
    second = router.expect("dup")  # e.g. a retry under the same id
    router.offer("dup", completion("dup", "again"), [])
    assert isinstance(second.result().answer, ChatCompletion)


async def test_remembered_ids_are_bounded() -> None:
    router = AnswerRouter(remember=2)
    for rid in ("a", "b", "c"):
        router.expect(rid)
        router.offer(rid, completion(rid), [])
    assert router.offer("a", completion("a"), []) == "foreign"  # forgotten
    assert router.offer("c", completion("c"), []) == "duplicate"


async def test_stopping_fails_every_waiter() -> None:
    router = AnswerRouter()
    futures = [router.expect(rid) for rid in ("a", "b")]
    router.fail_all(ClientStopped("bye"))
    for future in futures:
        with pytest.raises(ClientStopped):
            future.result()
    assert len(router) == 0
    assert router.offer("a", completion("a"), []) == "late"


async def test_discard_cancels_the_waiter() -> None:
    router = AnswerRouter()
    future = router.expect("gone")
    router.discard("gone")
    assert future.cancelled()
    assert router.offer("gone", completion("gone"), []) == "late"


# --- the client's ordering, with Kafka replaced by a shuffling fake ---------------------------


class ShufflingClient(SluiceClient):
    """Publishing "answers" each prompt after a random delay, some twice, some never."""

    def __init__(self, *, lose: frozenset[int] = frozenset()) -> None:
        super().__init__(Settings(), source="test", timeout_s=5.0)
        self.rng = random.Random(7)
        self.lose = lose
        self.batches: list[int] = []
        self.max_waiting = 0

    async def _publish(self, batch: Sequence[Prepared]) -> None:
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


async def test_request_waits_for_its_own_answer() -> None:
    client = ShufflingClient()
    reply: Reply = await client.request("q1")
    assert reply.completion().content == "a1"
    assert reply.latency_s >= 0
