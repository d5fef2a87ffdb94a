"""The echo engine: a deterministic stand-in for a model, with a configurable delay.

It "generates" the last user turn's tokens back (cut at ``max_tokens``), so end-to-end tests
can check every answer exactly. Fault hooks, each driven by a file that tests (and operators
rehearsing) create and remove:

- ``fault_file``: every generation fails as a stage fault (provokes the circuit breaker);
- ``oom_file``: every generation allocates ``oom_chunk`` more bytes and keeps them, until the
  process runs out of memory (a ``MemoryError`` under an RLIMIT, the kernel's OOM killer under a
  cgroup limit). A ``MemoryError`` is an engine death: a crash report, then a fatal error;
- ``stall_file``: generations make no progress; one that waits ``stall_s`` is a stall, reported
  like the ONNX engine's watchdog does: a crash report with the in-flight requests, then a
  fatal error, so the process exits and is restarted.

``inflight()`` lists the requests being generated, as crash-report features (never text).
"""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path
from typing import Any

from pipeline.errors import FatalError, StageFault
from pipeline.observability import crash
from stages.engines.base import Generation, GenerationRequest
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
    ) -> None:
        self.text = text
        self.delay_s = delay_s
        self.fault_file = fault_file
        self.oom_file = oom_file
        self.oom_chunk = oom_chunk
        self.stall_file = stall_file
        self.stall_s = stall_s
        self._ballast: list[bytearray] = []
        self._broken: FatalError | None = None  # a dead engine: every request fails with it
        self._inflight: dict[str, tuple[GenerationRequest, float]] = {}

    def inflight(self) -> list[dict[str, Any]]:
        """The requests being generated, as crash-report features (ids and counts, no text)."""
        now = time.monotonic()
        return [
            crash.request_features(
                rid,
                prompt_tokens=len(req.input_ids),
                output_tokens=0,
                sampling=req.sampling.model_dump(),
                state="running",
                age_s=round(now - t0, 3),
            )
            for rid, (req, t0) in list(self._inflight.items())
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
        self._inflight[request.request_id] = (request, time.monotonic())
        try:
            return await self._generate(request)
        finally:
            self._inflight.pop(request.request_id, None)

    async def _generate(self, request: GenerationRequest) -> Generation:
        t0 = time.perf_counter()
        if self._broken is not None:
            raise self._broken
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
        elapsed = time.perf_counter() - t0
        return Generation(ids, "length" if finish == "length" else "stop", elapsed, elapsed)

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
            self._broken = error
            crash.report("out-of-memory", error, held_bytes=held)
            raise error from exc

    async def _stall(self) -> None:
        """Wait while the stall file exists; past ``stall_s`` the engine is declared stalled."""
        assert self.stall_file is not None
        t0 = time.monotonic()
        while self.stall_file.exists():
            if self._broken is not None:
                raise self._broken
            waited = time.monotonic() - t0
            if waited > self.stall_s:
                error = FatalError(
                    f"echo engine stalled: no progress for {waited:.1f}s "
                    f"with {len(self._inflight)} requests in flight",
                    reason="engine-stall",
                )
                self._broken = error
                crash.report("engine-stall", error)
                raise error
            await asyncio.sleep(min(0.1, self.stall_s / 10))

    async def close(self) -> None:
        self._ballast.clear()
