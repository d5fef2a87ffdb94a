"""The echo engine: a deterministic stand-in for a model, with a configurable delay.

It "generates" the last user turn's tokens back (cut at ``max_tokens``), so end-to-end tests
can check every answer exactly. A fault file, when it exists, makes every generation fail as a
stage fault: the way tests (and operators rehearsing) provoke the circuit breaker.
"""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path

from pipeline.errors import StageFault
from stages.engines.base import Generation, GenerationRequest
from stages.text import TextModel

_LAST_USER = re.compile(r"<\|im_start\|>user\n(.*?)<\|im_end\|>", re.DOTALL)


class EchoEngine:
    name = "echo"

    def __init__(
        self, text: TextModel, delay_s: float = 0.0, fault_file: Path | None = None
    ) -> None:
        self.text = text
        self.delay_s = delay_s
        self.fault_file = fault_file

    async def start(self) -> None:
        return None

    def echo_ids(self, input_ids: list[int]) -> list[int]:
        rendered = self.text.decode(input_ids, skip_special=False)
        turns = _LAST_USER.findall(rendered)
        if turns:
            return self.text.encode(turns[-1])
        return [i for i in input_ids if i not in self.text.special_ids]

    async def generate(self, request: GenerationRequest) -> Generation:
        t0 = time.perf_counter()
        if self.fault_file is not None and self.fault_file.exists():
            raise StageFault(
                "echo engine: fault injected (fault file present)", reason="engine-fault"
            )
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        ids = self.echo_ids(request.input_ids)
        limit = request.sampling.max_tokens
        finish: str = "stop"
        if limit is not None and len(ids) > limit:
            ids, finish = ids[:limit], "length"
        elapsed = time.perf_counter() - t0
        return Generation(ids, "length" if finish == "length" else "stop", elapsed, elapsed)

    async def close(self) -> None:
        return None
