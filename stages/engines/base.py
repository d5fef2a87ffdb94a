"""The engine interface the compute stage drives."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

from schemas.messages import SamplingParams


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    input_ids: list[int]
    sampling: SamplingParams


@dataclass(frozen=True)
class Generation:
    output_ids: list[int]
    finish_reason: Literal["stop", "length"]
    ttft_s: float
    compute_s: float
    queue_s: float = 0.0


class Engine(Protocol):
    name: str

    async def start(self) -> None:
        """Load the model and run one short generation (warm-up)."""
        ...

    async def generate(self, request: GenerationRequest) -> Generation:
        """Generate for one request; raises a SluiceError on failure."""
        ...

    async def close(self) -> None: ...
