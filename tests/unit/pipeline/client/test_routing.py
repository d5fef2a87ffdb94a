"""Answer routing without Kafka: matching answers to waiting requests, first answer wins,
duplicates and late answers told apart, and what a reply reads from the answer's headers."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from pipeline.client import AnswerError, AnswerRouter, ClientStopped
from pipeline.client.routing import parse_degraded, parse_timings
from schemas.headers import SLUICE_DEGRADED, SLUICE_TIMINGS, make_headers
from schemas.messages import ChatCompletion, ErrorAnswer, Timings, Usage, encode


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


# --- answer records as consumed, and their headers ---------------------------------------------


@dataclass(frozen=True)
class Consumed:
    """The fields of an aiokafka ``ConsumerRecord`` that the router reads."""

    value: bytes | None
    headers: list[tuple[str, bytes]]
    topic: str = "answers"
    partition: int = 2
    offset: int = 17


async def test_an_answer_record_is_routed_by_its_request_id_header(
    caplog: pytest.LogCaptureFixture,
) -> None:
    router = AnswerRouter()
    future = router.expect("r1")
    assert router.offer_record(Consumed(completion("r1"), answer_headers("r1"))) == "delivered"
    assert future.result().request_id == "r1"
    assert router.offer_record(Consumed(completion("r1"), [])) == "foreign"  # no header
    with caplog.at_level("INFO", logger="pipeline.client.routing"):
        assert router.offer_record(Consumed(completion("r1"), answer_headers("r1"))) == "duplicate"
    assert "answers[2]@17" in caplog.text and "r1" in caplog.text


def test_timings_and_degraded_headers_are_read_leniently() -> None:
    assert parse_timings(None) is None
    assert parse_timings("not json") is None
    timings = parse_timings(encode(Timings(queue_s=1.5)).decode())
    assert timings is not None and timings.queue_s == 1.5
    assert parse_degraded([(SLUICE_DEGRADED, b"TRUE")])
    assert not parse_degraded([(SLUICE_DEGRADED, b"no")]) and not parse_degraded([])
