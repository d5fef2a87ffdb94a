"""Compute: tokenized requests in, generated tokens out, through an engine.

Each record is its own unit of work (``unit="record"``), so requests finish in any order and
their offsets are committed as they finish; the loop's in-flight bound is the admission bound.

Around the engine call:

- admission: a ``top_k`` above the vocabulary is invalid input (``param`` ``top_k``); a request
  whose ``sluice-deadline`` has passed is not generated (``Expired``: an ``expired`` error
  answer and a dead letter the loop writes, for ``sluice replay dlq --reason expired``);
- while generating, a request is aborted (its engine slot freed) when its deadline passes
  (``Expired`` again) or when a cancel for it arrives on the control topic
  (``stages/control.py``): then its answer is a ``cancelled`` error answer and there is no dead
  letter, since the asker gave up. A cancel that races the final token gives one answer, the
  one that came first;
- a request with a ``sluice-reply-to`` header streams text deltas to that partition
  (``stages/deltas.py``); the last carries ``finish_reason`` and ``usage``;
- two lanes: ``<prefix>tokenized`` and the batch lane ``<prefix>tokenized.batch``. The stage
  loop pauses the batch lane while interactive requests wait to be admitted (``admitted``) or
  while the work in flight fills the batch lane's share (half the bound: the engine's batch), so
  interactive requests never queue behind batch ones;
- an engine that dies or stalls fails its requests with one ``FatalError``: the loop stops the
  stage, ``healthy()`` is red, and the process exits to be restarted.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from prometheus_client import Counter, Gauge

from pipeline.config import Settings
from pipeline.errors import Cancelled, Expired, InvalidInput, SluiceError, as_sluice_error
from pipeline.runtime.batch import Batch, Output, Record, Result
from pipeline.runtime.stage import StageSpec, output_for, rebind_ids
from schemas.errors import SchemaError
from schemas.headers import SLUICE_REQUEST_ID, header_value
from schemas.messages import GeneratedMessage, TokenizedMessage, Usage, decode
from schemas.streaming import now_ms, parse_deadline, parse_reply_to
from stages.control import CancelListener
from stages.deltas import DeltaPublisher, DeltaStream
from stages.engines.base import Engine, Generation, GenerationRequest
from stages.engines.providers import check_providers
from stages.text import TextModel, fingerprint

STAGE = "compute"
log = logging.getLogger(__name__)


@dataclass(eq=False)
class _Held:
    """A request being generated here: its engine call, and why it was stopped, if it was."""

    task: asyncio.Future[Generation]
    why: SluiceError | None = None
    timer: asyncio.TimerHandle | None = None

    def stop(self, why: SluiceError) -> bool:
        """Abort the generation (its slot is freed) to answer ``why``; False once it ended."""
        if self.task.done() or self.why is not None:
            return False
        self.why = why
        self.task.cancel()
        return True


class Compute:
    """The compute handler. ``text``: the model's tokenizer (streaming and the ``top_k`` check
    need it). ``deltas``: where deltas go (none: no streaming). ``cancels``: read the control
    topic (``sluice run`` turns both on; unit tests pass their own)."""

    def __init__(
        self,
        settings: Settings,
        engine: Engine,
        text: TextModel | None = None,
        *,
        deltas: DeltaPublisher | None = None,
        cancels: bool = False,
    ) -> None:
        topics = settings.topics
        self.spec = StageSpec(
            STAGE,
            topics.tokenized,
            topics.answers,
            unit="record",
            output_topics=(topics.generated,),
            batch_input_topic=topics.tokenized_batch,
        )
        self.engine = engine
        self.model_path = settings.model_path
        self.out_topic = topics.generated
        # The waiting-tokens signal `sluice scale` and KEDA's Prometheus trigger scale on.
        self.pending_tokens = Gauge(
            "sluice_compute_pending_tokens",
            "Prompt plus requested max new tokens of the requests handed to the engine and "
            "not finished yet (running or waiting for a slot).",
            registry=None,
        )
        self.text = text
        self.deltas = deltas
        self.control = CancelListener(settings, self.cancel) if cancels else None
        self._held: dict[str, list[_Held]] = {}
        self.stopped = Counter(
            "sluice_compute_aborted_total",
            "Generations aborted mid-way, by why: `cancelled` (a cancel on the control topic), "
            "`expired` (the deadline passed while it generated).",
            ["reason"],
            registry=None,
        )

    async def handle(self, batch: Batch) -> list[Result]:
        return list(await asyncio.gather(*(self._one(r) for r in batch)))

    async def _one(self, record: Record) -> Result:
        try:
            msg = decode(TokenizedMessage, record.value)
        except SchemaError as exc:
            return Result(record, error=InvalidInput.from_schema(exc))
        deadline = parse_deadline(record.headers)
        try:
            self._admit(msg, deadline)
        except SluiceError as exc:
            return Result(record, error=exc)
        stream = self._stream(record, msg)
        request = GenerationRequest(
            msg.id,
            msg.input_ids,
            msg.sampling,
            deadline_ms=deadline,
            on_tokens=stream.tokens if stream is not None else None,
        )
        started = time.time()
        tokens = len(msg.input_ids) + (msg.sampling.max_tokens or 0)
        self.pending_tokens.inc(tokens)
        try:
            gen = await self._generate(request)
        except Cancelled as exc:  # an error answer, no dead letter: the asker gave up
            answer = output_for(
                record, self.spec.answers_topic, exc.answer(), stage=STAGE, request_id=msg.id,
                key=record.key,
            )  # fmt: skip
            return Result(record, outputs=[answer])
        except Exception as exc:  # noqa: BLE001 - per-record failure: flags decide retry/DLT
            return Result(record, error=as_sluice_error(exc))
        finally:
            self.pending_tokens.dec(tokens)
        usage = Usage.of(len(msg.input_ids), len(gen.output_ids))
        if stream is not None:
            stream.finish(gen.output_ids, gen.finish_reason, usage)
        waited = max(0.0, started - (msg.timings.preprocessed_at or started))
        timings = msg.timings.model_copy(
            update={
                "queue_s": gen.queue_s or waited,
                "ttft_s": gen.ttft_s,
                "compute_s": gen.compute_s,
                "generated_at": time.time(),
            }
        )
        out = GeneratedMessage(
            id=msg.id,
            conversation_id=msg.conversation_id,
            model=msg.model,
            prompt_tokens=len(msg.input_ids),
            output_ids=gen.output_ids,
            finish_reason=gen.finish_reason,
            usage=usage,
            sampling=msg.sampling,
            created=msg.created,
            timings=timings,
        )
        output = output_for(
            record,
            self.out_topic,
            out,
            stage=STAGE,
            request_id=msg.id,
            key=msg.conversation_id.encode(),
        )
        return Result(record, outputs=[output], fingerprint=_fingerprint(msg))

    def _admit(self, msg: TokenizedMessage, deadline: int | None) -> None:
        """Refuse what must not reach the engine: a ``top_k`` above the vocabulary, a request
        already past its deadline."""
        if self.text is not None:
            self.text.check_top_k(msg.sampling.top_k)
        if deadline is not None and now_ms() >= deadline:
            raise Expired(f"request {msg.id} passed its deadline before generation")

    def _stream(self, record: Record, msg: TokenizedMessage) -> DeltaStream | None:
        """A delta stream for a request that names a reply partition (when streaming is on)."""
        reply = parse_reply_to(record.headers)
        if reply is None or self.deltas is None or self.text is None:
            return None
        return DeltaStream(
            self.deltas,
            self.text,
            request_id=msg.id,
            reply=reply,
            key=msg.conversation_id.encode(),
            stops=msg.sampling.stop,
            trace=record.headers,
        )

    async def _generate(self, request: GenerationRequest) -> Generation:
        """The engine's answer, unless a cancel or the deadline stops it first (raised as
        ``Cancelled`` / ``Expired``); the request is held (``cancel`` finds it) meanwhile."""
        held = _Held(asyncio.ensure_future(self.engine.generate(request)))
        holders = self._held.setdefault(request.request_id, [])
        holders.append(held)
        if request.deadline_ms is not None:
            late = Expired(f"request {request.request_id} passed its deadline while generating")
            delay = max(0.0, (request.deadline_ms - now_ms()) / 1000)
            held.timer = asyncio.get_running_loop().call_later(delay, self._abort, held, late)
        try:
            return await held.task
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if held.why is not None and (current is None or not current.cancelling()):
                raise held.why from None  # stopped by a cancel or the deadline, not our caller
            raise
        finally:
            if held.timer is not None:
                held.timer.cancel()
            holders.remove(held)
            if not holders:
                del self._held[request.request_id]

    def _abort(self, held: _Held, why: SluiceError) -> bool:
        if not held.stop(why):
            return False
        self.stopped.labels(why.reason).inc()
        return True

    def cancel(self, request_id: str, reason: str = "cancelled") -> bool:
        """Abort the request ``request_id`` if it is generated here (its answer: ``cancelled``);
        False, doing nothing, when it is not (unknown, or already answered)."""
        why = Cancelled(f"request {request_id} was cancelled ({reason})")
        return any([self._abort(held, why) for held in self._held.get(request_id, [])])

    def admitted(self, record: Record) -> bool:
        """Whether the engine holds ``record``'s request (running, or next for a slot): the
        stage loop's batch-lane gate counts interactive work as waiting until then."""
        return header_value(record.headers, SLUICE_REQUEST_ID) in self._held

    @property
    def max_in_flight(self) -> int | None:
        """Records the stage loop may hold for compute: twice what the engine runs at once (one
        batch running, one ready to admit), so the rest stays in Kafka as lag that other
        workers and the autoscaler see. None when the engine does not say (echo)."""
        batch = getattr(self.engine, "max_batch", None)
        return 2 * batch if isinstance(batch, int) and batch > 0 else None

    def last_progress(self) -> float:
        """When the engine last made a token (``time.monotonic()``), so a long generation is
        progress for the loop's liveness check; 0.0 when the engine does not say."""
        return float(getattr(self.engine, "last_progress", 0.0))

    def healthy(self) -> tuple[bool, str]:
        """The engine's health: red once it is dead or stalled (the process must restart)."""
        health = getattr(self.engine, "health", None)
        return health() if health is not None else (True, "ok")

    def fingerprint(self, record: Record) -> str | None:
        try:
            return _fingerprint(decode(TokenizedMessage, record.value))
        except SchemaError:
            return None

    def rebind(self, cached: Sequence[Output], record: Record) -> list[Output]:
        msg = decode(TokenizedMessage, record.value)
        return rebind_ids(
            cached,
            record,
            stage=STAGE,
            request_id=msg.id,
            conversation_id=msg.conversation_id,
            key=msg.conversation_id.encode(),
        )

    def collectors(self) -> list[Any]:
        """Pending tokens, and the engine's own metrics (running, waiting, tokens, TTFT, queue)."""
        collectors: list[Any] = getattr(self.engine, "collectors", list)()
        for side in (self.deltas, self.control):
            if side is not None:
                collectors.extend(side.collectors())
        return [self.pending_tokens, self.stopped, *collectors]

    async def warmup(self) -> None:
        if self.engine.name == "onnx":  # which provider, or a clear error before loading
            log.info("compute engine: %s", check_providers(self.model_path).describe())
        await self.engine.start()
        if self.deltas is not None:
            await self.deltas.start()
        if self.control is not None:
            await self.control.start()

    async def close(self) -> None:
        if self.control is not None:
            await self.control.close()
        if self.deltas is not None:
            await self.deltas.close()
        await self.engine.close()


def _fingerprint(msg: TokenizedMessage) -> str:
    return fingerprint(msg.model, msg.input_ids, msg.sampling.model_dump())
