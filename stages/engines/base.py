"""The engine interface the compute stage drives."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, Protocol

from schemas.messages import SamplingParams

# Told the tokens generated so far (a new list each time), on the event loop, while a request
# generates; see ``StreamPolicy`` for how often.
TokenListener = Callable[[list[int]], None]


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    input_ids: list[int]
    sampling: SamplingParams
    deadline_ms: int | None = None  # epoch ms (``sluice-deadline``): for crash reports
    on_tokens: TokenListener | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class Generation:
    output_ids: list[int]
    finish_reason: Literal["stop", "length"]
    ttft_s: float
    compute_s: float
    queue_s: float = 0.0


@dataclass(frozen=True, slots=True)
class StreamPolicy:
    """How often an engine tells a request's ``on_tokens`` listener: once ``tokens`` new tokens
    are there, or once ``interval_s`` has passed since it last told it and any new token is
    there, whichever comes first (the first token is told at once). The final tokens come with
    the ``Generation``, not necessarily through the listener."""

    interval_s: float = 0.03
    tokens: int = 16

    def due(self, new_tokens: int, since_s: float) -> bool:
        return new_tokens >= self.tokens or (new_tokens > 0 and since_s >= self.interval_s)


class Engine(Protocol):
    """What compute needs of an engine. Engines may also offer ``health() -> (ok, why)`` (False
    once dead or stalled: the process must be restarted), ``inflight()`` (the requests held, as
    ``crash.request_features`` dicts) and ``collectors()``; compute uses them where present."""

    name: str

    async def start(self) -> None:
        """Load the model and run one short generation (warm-up)."""
        ...

    async def generate(self, request: GenerationRequest) -> Generation:
        """Generate for one request; raises a SluiceError on failure (a ``FatalError`` once the
        engine is dead). Cancelling the awaiting task aborts the generation and frees its slot."""
        ...

    async def close(self) -> None: ...
