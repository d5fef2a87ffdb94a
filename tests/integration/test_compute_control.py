"""Compute as a process on the real broker: a stalled engine ends the process (crash report with
the in-flight ids) and ``sluice scale`` restarts it, which then answers what was in flight; a
cancel on the control topic aborts a long generation and frees its slot for the next request;
text deltas reach the reply partition and join to the answer; an expired request is
dead-lettered as ``expired``."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import orjson

from pipeline import admin
from pipeline.config import Settings
from pipeline.scaling import ScalePolicy
from schemas.headers import SLUICE_DLT_REASON, header_value
from schemas.messages import GeneratedMessage, SamplingParams, TokenizedMessage, decode, encode
from schemas.streaming import (
    CancelMessage,
    DeltaMessage,
    ReplyTo,
    deadline_header,
    deadline_in,
)
from sluice.crashes import list_reports
from sluice.procs import StageProcess, stage_env
from sluice.supervisor import Supervisor
from stages.text import TextModel
from tests.integration.kafka_io import Item, collect, produce
from tests.paths import REPO_ROOT

MODEL = REPO_ROOT / "models" / "demo" / "tokenizer"
TEXT = TextModel.load(MODEL)


def tokenized(rid: str, content: str) -> bytes:
    ids = TEXT.encode(TEXT.render([{"role": "user", "content": content}]))
    msg = TokenizedMessage(
        id=rid,
        conversation_id=f"c-{rid}",
        model="demo",
        input_ids=ids,
        sampling=SamplingParams(max_tokens=4000),
        created=int(time.time()),
    )
    return encode(msg)


async def test_a_stalled_engine_exits_and_the_supervisor_restarts_it(
    settings_factory: Callable[..., Settings], tmp_path: Path
) -> None:
    stall = tmp_path / "stall"
    stall.touch()
    settings = settings_factory(model_path=MODEL, engine="echo", partitions=1)
    await admin.create_topics(settings)
    policy = ScalePolicy("compute", lag_threshold=1000, min_workers=1, max_workers=1)
    env = {"SLUICE_ECHO_STALL_FILE": str(stall), "SLUICE_ENGINE_STALL_S": "2"}
    sup = Supervisor(settings, [policy], tmp_path, interval_s=0.3, worker_env=env)
    task = asyncio.create_task(sup.run())
    try:
        while sup.running("compute") != 1:  # noqa: ASYNC110 - the supervisor starts it
            await asyncio.sleep(0.1)
        first = sup.stages["compute"].workers[0].proc.proc
        assert first is not None
        items: list[Item] = [(b"c", tokenized(f"stuck-{i}", f"hi {i}"), []) for i in range(2)]
        await produce(settings, settings.topics.tokenized, items)
        code = await asyncio.to_thread(first.wait, 60)  # engine_stall_s, then the exit
        assert code != 0
        (report,) = [
            f.report
            for f in list_reports(settings.state_dir / "crash")
            if f.report and f.report.get("written_by") == "process"
        ]
        assert report["cause"] == "engine-stall" and report["pid"] == first.pid
        assert {e["request_id"] for e in report["inflight"]} == {"stuck-0", "stuck-1"}
        stall.unlink()  # the fault is gone: the restarted worker answers what was in flight
        answered = await collect(settings, settings.topics.generated, until=2, within=90)
        assert set(answered.by_request()) == {"stuck-0", "stuck-1"}
        restarted = sup.stages["compute"].workers[0].proc.proc
        assert restarted is not None and restarted is not first
        assert sup.restarts_total.labels("compute")._value.get() >= 1
    finally:
        sup.request_stop()
        await task


async def test_a_cancel_frees_the_slot_deltas_stream_and_expired_work_is_dead_lettered(
    settings_factory: Callable[..., Settings], tmp_path: Path
) -> None:
    settings = settings_factory(model_path=MODEL, engine="echo", partitions=1)
    topics = settings.topics
    await admin.create_topics(settings)
    await admin.create_topics(settings, [topics.replies, topics.control])
    env = stage_env(
        settings, SLUICE_ECHO_TOKEN_DELAY_MS="50", SLUICE_MAX_IN_FLIGHT="1"
    )  # one request at a time; "long" alone would take 100 s
    proc = StageProcess("compute", env, tmp_path / "compute.log").start()
    reply = ReplyTo(topics.replies, 0).header()
    try:
        await produce(settings, topics.tokenized, [(b"a", tokenized("long", "z" * 2000), [reply])])
        first = await collect(settings, topics.replies, until=1, within=60, unique=False)
        assert first.records, proc.log()  # it is generating (and reading control)
        behind: list[Item] = [
            (b"a", tokenized("next", "hello there"), [reply]),
            (b"a", tokenized("late", "too late"), [deadline_header(deadline_in(-1))]),
        ]
        await produce(settings, topics.tokenized, behind)
        cancel = encode(CancelMessage(id="long", reason="client went away"))
        await produce(settings, topics.control, [(b"long", cancel, [])])

        answers = await collect(settings, topics.answers, until=2, within=60)
        generated = await collect(settings, topics.generated, until=1, within=30)
        dead = await collect(settings, topics.dlt(topics.tokenized), until=1, within=30)
        deltas = await collect(settings, topics.replies, until=10**6, within=2, unique=False)
    finally:
        proc.stop()
    log = proc.log()

    by_id = answers.by_request()
    assert "long" in by_id, log
    (cancelled,) = by_id["long"]
    assert orjson.loads(cancelled.value)["error"]["code"] == "cancelled"
    assert set(generated.by_request()) == {"next"}  # the slot was freed: it ran after "long"
    assert orjson.loads(by_id["late"][0].value)["error"]["code"] == "expired"
    (late,) = dead.records  # expired is dead-lettered for replay; cancelled is not
    assert header_value(list(late.headers), SLUICE_DLT_REASON) == "expired"

    (gen,) = generated.by_request()["next"]
    # The reply partition also carries copies of the answers: the deltas are the sluice.delta ones.
    stream = [
        decode(DeltaMessage, r.value)
        for r in deltas.records
        if header_value(list(r.headers), "ce_type") == DeltaMessage.ce_type
    ]
    copies = [
        r for r in deltas.records if header_value(list(r.headers), "ce_type") != "sluice.delta"
    ]
    assert {header_value(list(r.headers), "sluice-request-id") for r in copies} == {"long"}
    mine = [m for m in stream if m.id == "next"]
    assert [m.index for m in mine] == list(range(len(mine)))
    output = decode(GeneratedMessage, gen.value).output_ids
    assert "".join(m.delta for m in mine) == TEXT.decode(output) == "hello there"
    assert mine[-1].finish_reason == "stop" and mine[-1].usage is not None
    assert not any(m.finish_reason for m in stream if m.id == "long")
