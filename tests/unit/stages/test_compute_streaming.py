"""Compute around the engine call (``stages/compute.py``, ``stages/deltas.py``), with the echo
engine and no broker: text deltas that join to exactly postprocess's answer, cancellation,
deadlines while generating, ``top_k`` above the vocabulary, and a dead engine's fatal error."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import orjson
import pytest

from pipeline.config import Settings
from pipeline.errors import Expired, FatalError, InvalidInput
from pipeline.runtime.batch import Batch, Record, Result
from schemas.headers import HeadersIn
from schemas.messages import SamplingParams, TokenizedMessage, encode
from schemas.streaming import DeltaMessage, ReplyTo, deadline_header, deadline_in
from stages.compute import Compute
from stages.deltas import DeltaPublisher, DeltaText, stable_end
from stages.engines.base import StreamPolicy
from stages.engines.echo import EchoEngine
from stages.postprocess import Postprocess
from stages.text import TextModel
from tests.unit.stages.test_stages import MODEL

TEXT = TextModel.load(MODEL)  # byte-level: a multi-byte character takes several tokens
REPLY = ReplyTo("t.replies", 2)


class Deltas(DeltaPublisher):
    """Keeps what it is asked to publish; ``full`` refuses it (a full backlog)."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.got: list[tuple[ReplyTo, DeltaMessage]] = []
        self.full = False

    async def start(self) -> None:
        return None

    def publish(
        self, reply: ReplyTo, key: bytes | None, message: DeltaMessage, trace: HeadersIn
    ) -> bool:
        if self.full:
            return False
        self.got.append((reply, message))
        return True

    def of(self, request_id: str) -> list[DeltaMessage]:
        return [m for _, m in self.got if m.id == request_id]


@pytest.fixture
def settings() -> Settings:
    return Settings(model_path=MODEL, topic_prefix="t.")


def record(
    content: str,
    *,
    rid: str = "r1",
    offset: int = 0,
    stop: list[str] | None = None,
    headers: list[tuple[str, bytes]] | None = None,
    **sampling: Any,
) -> Record:
    ids = TEXT.encode(TEXT.render([{"role": "user", "content": content}]))
    msg = TokenizedMessage(
        id=rid,
        conversation_id=f"conv-{rid}",
        model="demo",
        input_ids=ids,
        sampling=SamplingParams(stop=stop or [], **sampling),
        created=int(time.time()),
    )
    return Record("t.tokenized", 0, offset, 0, b"conv", encode(msg), headers or [])


def streaming(**kwargs: Any) -> list[tuple[str, bytes]]:
    return [REPLY.header(), *kwargs.get("extra", [])]


def make(settings: Settings, *, token_delay_s: float = 0.001, **kw: Any) -> tuple[Compute, Deltas]:
    engine = EchoEngine(
        TEXT, token_delay_s=token_delay_s, stream=StreamPolicy(3600, kw.pop("tokens", 3)), **kw
    )
    deltas = Deltas(settings)
    return Compute(settings, engine, TEXT, deltas=deltas), deltas


async def answer_of(settings: Settings, result: Result) -> dict[str, Any]:
    """What postprocess answers for compute's output: the chat.completion as a dict."""
    (out,) = result.outputs
    generated = Record(out.topic, 0, 0, 0, out.key, out.value, out.headers)
    (done,) = Postprocess(settings, TEXT).handle(Batch.of([generated]))
    (answer,) = done.outputs
    body: dict[str, Any] = orjson.loads(answer.value)
    return body


# ---- the text of deltas ------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "stops", "end"),
    [
        ("hello wor", [], 9),
        ("hello ", [], 5),  # trailing whitespace waits for what follows it
        ("h\ufffd", [], 1),  # an incomplete character waits for its other bytes
        ("say END now", ["END"], 3),  # nothing at or past a stop string
        ("say EN", ["END"], 3),  # a tail that may grow into a stop string waits
        ("abcX", ["bcd", "c"], 2),  # the earliest of several
        ("abc", ["bcd", "c"], 1),  # "bc" may still become "bcd", before "c"
    ],
)
def test_stable_end(text: str, stops: list[str], end: int) -> None:
    assert stable_end(text, stops) == end


@pytest.mark.parametrize("stops", [[], ["wör"], ["本"], [" w", "ld 日"]])
def test_pieces_join_to_the_final_content_at_every_cut(stops: list[str]) -> None:
    """Told after every token (the tightest policy): the pieces never take anything back, never
    hold text past a stop string, and with the rest they are the content postprocess makes."""
    ids = TEXT.encode("héllo wörld 日本 done")
    pieces = DeltaText(TEXT, stops)
    sent = []
    for n in range(1, len(ids) + 1):
        piece = pieces.more(ids[:n])
        pieces.took(piece)
        sent.append(piece)
        assert not any(s in "".join(sent) for s in stops)
    rest = pieces.rest(ids)
    assert rest is not None
    content = TEXT.decode(ids)
    cut = min((content.find(s) for s in stops if s in content), default=len(content))
    assert "".join(sent) + rest[0] == content[:cut]
    assert rest[1] == (cut < len(content))


# ---- streaming through compute -----------------------------------------------------------------
@pytest.mark.parametrize("stop", [None, ["wör"]])
async def test_deltas_join_to_the_answer_and_the_last_says_how_it_ended(
    settings: Settings, stop: list[str] | None
) -> None:
    compute, deltas = make(settings)
    rec = record("héllo wörld 日本 and more", stop=stop, headers=streaming())
    (result,) = await compute.handle(Batch.of([rec]))
    answer = await answer_of(settings, result)

    got = deltas.of("r1")
    assert len(got) > 3  # streamed, not one chunk at the end
    assert [m.index for m in got] == list(range(len(got)))
    assert {reply for reply, _ in deltas.got} == {REPLY}
    assert "".join(m.delta for m in got) == answer["choices"][0]["message"]["content"]
    assert all(m.finish_reason is None and m.usage is None for m in got[:-1])
    assert got[-1].finish_reason == answer["choices"][0]["finish_reason"]
    assert got[-1].usage is not None and got[-1].usage.model_dump() == answer["usage"]
    if stop:
        assert "wör" not in "".join(m.delta for m in got)


async def test_no_reply_to_no_deltas(settings: Settings) -> None:
    compute, deltas = make(settings)
    (result,) = await compute.handle(Batch.of([record("hello world")]))
    assert result.ok and deltas.got == []


async def test_a_full_backlog_delays_text_but_loses_none(settings: Settings) -> None:
    compute, deltas = make(settings, tokens=1)
    task = asyncio.create_task(
        compute.handle(Batch.of([record("abcdefghij", headers=streaming())]))
    )
    while not deltas.got:  # noqa: ASYNC110 - the echo engine's tokens come 1 ms apart
        await asyncio.sleep(0.001)
    deltas.full = True
    await asyncio.sleep(0.005)
    deltas.full = False
    (result,) = await task
    answer = await answer_of(settings, result)
    got = deltas.of("r1")
    assert [m.index for m in got] == list(range(len(got)))
    assert "".join(m.delta for m in got) == answer["choices"][0]["message"]["content"]


# ---- cancellation and deadlines ----------------------------------------------------------------
async def test_a_cancel_aborts_the_generation_with_a_cancelled_answer_and_no_dead_letter(
    settings: Settings,
) -> None:
    compute, deltas = make(settings, token_delay_s=0.05)
    long = asyncio.create_task(compute.handle(Batch.of([record("x" * 400, headers=streaming())])))
    while not deltas.got:  # noqa: ASYNC110 - generating: its first delta went out
        await asyncio.sleep(0.005)
    assert compute.cancel("r1", "client disconnected")
    (result,) = await asyncio.wait_for(long, 5)  # not the 20 s the whole echo would take

    assert result.error is None  # nothing for the loop to dead-letter
    (out,) = result.outputs
    assert out.topic == "t.answers"
    error = orjson.loads(out.value)["error"]
    assert error["code"] == "cancelled" and "client disconnected" in error["message"]
    assert not compute.cancel("r1")  # answered: a later cancel is a no-op
    assert not compute.cancel("nobody")
    assert compute._held == {}


async def test_a_cancel_after_the_answer_gives_that_answer(settings: Settings) -> None:
    compute, _ = make(settings, token_delay_s=0)
    (result,) = await compute.handle(Batch.of([record("hi")]))
    assert not compute.cancel("r1")
    assert result.ok and result.outputs[0].topic == "t.generated"


async def test_an_expired_request_is_not_generated(settings: Settings) -> None:
    compute, deltas = make(settings)
    past = [deadline_header(deadline_in(-1)), REPLY.header()]
    (result,) = await compute.handle(Batch.of([record("hello", headers=past)]))
    assert isinstance(result.error, Expired) and result.error.reason == "expired"
    assert not result.error.fault and deltas.got == []


async def test_a_deadline_passing_mid_generation_aborts_it(settings: Settings) -> None:
    compute, deltas = make(settings, token_delay_s=0.05)
    soon = [deadline_header(deadline_in(0.3)), REPLY.header()]
    (result,) = await asyncio.wait_for(
        compute.handle(Batch.of([record("y" * 400, headers=soon)])), 5
    )
    assert isinstance(result.error, Expired) and "while generating" in result.error.message
    assert deltas.got  # it had started
    assert compute.engine.inflight() == []  # type: ignore[attr-defined]


async def test_top_k_above_the_vocabulary_is_bad_input_naming_it(settings: Settings) -> None:
    compute, _ = make(settings)
    (result,) = await compute.handle(Batch.of([record("hi", temperature=0.5, top_k=67612814)]))
    assert isinstance(result.error, InvalidInput) and result.error.param == "top_k"
    assert result.error.answer().error.param == "top_k"


async def test_a_stalled_engine_is_fatal_and_red(settings: Settings, tmp_path: Path) -> None:
    stall = tmp_path / "stall"
    stall.touch()
    compute, _ = make(settings, stall_file=stall, stall_s=0.3)
    assert compute.healthy()[0]
    results = await asyncio.wait_for(
        compute.handle(Batch.of([record("a", rid="a"), record("b", rid="b", offset=1)])), 5
    )
    errors = [r.error for r in results]
    assert isinstance(errors[0], FatalError) and errors[0].reason == "engine-stall"
    assert errors[1] is errors[0]  # every request in flight fails with the one error
    ok, why = compute.healthy()
    assert not ok and "stalled" in why
