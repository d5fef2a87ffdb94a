"""The echo engine: a deterministic stand-in for a model, with a configurable delay.

It "generates" the last user turn's tokens back (cut at ``max_tokens``), so end-to-end tests
can check every answer exactly. ``delay_s`` delays each generation; ``token_delay_s`` makes it
produce its tokens one at a time, that long apart, telling a streaming request's listener as
``StreamPolicy`` allows (as the ONNX engine does). Fault hooks, each driven by a file that tests
(and operators rehearsing) create and remove:

- ``fault_file``: every generation fails as a stage fault (provokes the circuit breaker);
- ``oom_file``: every generation allocates ``oom_chunk`` more bytes and keeps them, until the
  process runs out of memory (a ``MemoryError`` under an RLIMIT, the kernel's OOM killer under a
  cgroup limit). A ``MemoryError`` is an engine death: a crash report, then a fatal error;
- ``stall_file``: generations make no progress; one that waits ``stall_s`` is a stall, reported
  like the ONNX engine's watchdog does: a crash report with the in-flight requests, then every
  request in flight, and every later one, fails with that one fatal error, so the process exits
  and is restarted.

``inflight()`` lists the requests being generated, as crash-report features (never text);
``health()`` is red once the engine is dead.
"""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path
from typing import Any

from pipeline.errors import FatalError, StageFault
from pipeline.observability import crash
from stages.engines.base import Generation, GenerationRequest, StreamPolicy
from stages.text import TextModel

_LAST_USER = re.compile(r"<\|im_start\|>user\n(.*?)<\|im_end\|>", re.DOTALL)


class EchoEngine:
    name = "echo"

    def __init__(
        self,
        text: TextModel,
        delay_s: float = 0.0,
        fault_file: Path | None = None,
        *,
        oom_file: Path | None = None,
        oom_chunk: int = 64 << 20,
        stall_file: Path | None = None,
        stall_s: float = 30.0,
        token_delay_s: float = 0.0,
        stream: StreamPolicy | None = None,
    ) -> None:
        self.text = text
        self.delay_s = delay_s
        self.fault_file = fault_file
        self.oom_file = oom_file
        self.oom_chunk = oom_chunk
        self.stall_file = stall_file
        self.stall_s = stall_s
        self.token_delay_s = token_delay_s
        self.stream = stream or StreamPolicy()
        self._ballast: list[bytearray] = []
        self.fatal: FatalError | None = None  # a dead engine: every request fails with it
        self._died = asyncio.Event()
        self._inflight: dict[str, tuple[GenerationRequest, float, list[int]]] = {}

    def health(self) -> tuple[bool, str]:
        if self.fatal is not None:
            return False, f"echo engine dead: {self.fatal.message}"
        return True, "ok"

    def inflight(self) -> list[dict[str, Any]]:
        """The requests being generated, as crash-report features (ids and counts, no text)."""
        now = time.monotonic()
        return [
            crash.request_features(
                rid,
                prompt_tokens=len(req.input_ids),
                output_tokens=len(made),
                sampling=req.sampling.model_dump(),
                state="running",
                batch=len(self._inflight),
                deadline_ms=req.deadline_ms,
                age_s=round(now - t0, 3),
            )
            for rid, (req, t0, made) in list(self._inflight.items())
        ]

    async def start(self) -> None:
        return None

    def echo_ids(self, input_ids: list[int]) -> list[int]:
        rendered = self.text.decode(input_ids, skip_special=False)
        turns = _LAST_USER.findall(rendered)
        if turns:
            return self.text.encode(turns[-1])
        return [i for i in input_ids if i not in self.text.special_ids]

    async def generate(self, request: GenerationRequest) -> Generation:
        """Generate, or fail with the engine's fatal error as soon as it dies (whichever
        first); cancelling the caller stops it at once."""
        if self.fatal is not None:
            raise self.fatal
        made: list[int] = []
        self._inflight[request.request_id] = (request, time.monotonic(), made)
        work = asyncio.ensure_future(self._generate(request, made))
        death = asyncio.ensure_future(self._died.wait())
        try:
            await asyncio.wait((work, death), return_when=asyncio.FIRST_COMPLETED)
            if work.done():
                return work.result()
            assert self.fatal is not None
            raise self.fatal
        finally:
            for task in (work, death):
                task.cancel()
            await asyncio.gather(work, death, return_exceptions=True)
            self._inflight.pop(request.request_id, None)

    def _die(self, error: FatalError, **extra: object) -> FatalError:
        """Dead: a crash report with the requests in flight, then every one fails with
        ``error`` (``generate`` races each against ``_died``); the error in effect (the first,
        when it died already)."""
        if self.fatal is not None:
            return self.fatal
        self.fatal = error
        crash.report(None, error, **extra)
        self._died.set()
        return error

    async def _generate(self, request: GenerationRequest, made: list[int]) -> Generation:
        t0 = time.perf_counter()
        if self.fault_file is not None and self.fault_file.exists():
            raise StageFault(
                "echo engine: fault injected (fault file present)", reason="engine-fault"
            )
        if self.oom_file is not None and self.oom_file.exists():
            self._allocate()
        if self.stall_file is not None and self.stall_file.exists():
            await self._stall()
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        ids = self.echo_ids(request.input_ids)
        limit = request.sampling.max_tokens
        finish: str = "stop"
        if limit is not None and len(ids) > limit:
            ids, finish = ids[:limit], "length"
        first = time.perf_counter() - t0
        if self.token_delay_s:
            first = await self._emit(ids, made, request)
        elapsed = time.perf_counter() - t0
        return Generation(ids, "length" if finish == "length" else "stop", first, elapsed)

    async def _emit(self, ids: list[int], made: list[int], request: GenerationRequest) -> float:
        """Produce ``ids`` one every ``token_delay_s`` into ``made``, telling a streaming
        request's listener as the stream policy allows; the time to the first token."""
        t0 = time.perf_counter()
        first = 0.0
        told, told_at = 0, float("-inf")
        for token in ids:
            await asyncio.sleep(self.token_delay_s)
            made.append(token)
            now = time.monotonic()
            first = first or time.perf_counter() - t0
            listener = request.on_tokens
            if listener is not None and self.stream.due(len(made) - told, now - told_at):
                told, told_at = len(made), now
                listener(list(made))
        return first

    def _allocate(self) -> None:
        """Grow by one chunk, touching every page so it is resident (counts against the cgroup)."""
        try:
            chunk = bytearray(self.oom_chunk)
            for i in range(0, len(chunk), 4096):
                chunk[i] = 1
            self._ballast.append(chunk)
        except MemoryError as exc:
            held = sum(len(c) for c in self._ballast)
            self._ballast.clear()  # room to write the report in
            error = FatalError(
                f"echo engine: out of memory after holding {held >> 20} MiB", reason="engine-oom"
            )
            error.__cause__ = exc
            raise self._die(error, held_bytes=held) from exc

    async def _stall(self) -> None:
        """Wait while the stall file exists; past ``stall_s`` the engine is declared stalled."""
        assert self.stall_file is not None
        t0 = time.monotonic()
        while self.stall_file.exists():
            waited = time.monotonic() - t0
            if waited > self.stall_s:
                error = FatalError(
                    f"echo engine stalled: no progress for {waited:.1f}s "
                    f"with {len(self._inflight)} requests in flight",
                    reason="engine-stall",
                )
                raise self._die(error)
            await asyncio.sleep(min(0.1, self.stall_s / 10))

    async def close(self) -> None:
        self._ballast.clear()
