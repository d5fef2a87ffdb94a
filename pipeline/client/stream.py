"""One request read as it is generated: its text deltas as they arrive, then its reply.

    async with client.stream("Tell me a story") as stream:
        async for delta in stream:          # DeltaMessage: .delta text, .index, .finish_reason
            print(delta.delta, end="")
    print(stream.reply)                     # the Reply: the final answer, an error or a timeout

Entering the block publishes the prompt (retrying until its deadline, as every request does);
iteration ends when the final answer arrives (the concatenated deltas equal its content, when
compute sends deltas: an engine that does not, or an answer from a cache, sends none), or at
the deadline with a timeout reply. Leaving the block before the answer (an exception, a
``break``, the task cancelled: a web client that went away) publishes a cancel for the request,
so compute stops generating it. :meth:`ReplyStream.next_event` is the lower-level step: the
next delta, or the ``Reply`` that ends the stream.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from pipeline.client.routing import Event, Reply
from schemas.streaming import DeltaMessage

if TYPE_CHECKING:
    from pipeline.client.client import SluiceClient
    from pipeline.client.prompts import Prepared


class ReplyStream:
    """A streamed request of a ``SluiceClient`` (made by ``SluiceClient.stream``)."""

    def __init__(
        self,
        client: SluiceClient,
        prepared: Prepared,
        deadline: float,
        refused: Reply | None = None,
    ) -> None:
        self.client = client
        self.prepared = prepared
        self.deadline = deadline
        self.reply: Reply | None = refused
        self._events: asyncio.Queue[Event] | None = None
        self._opened = False

    @property
    def request_id(self) -> str:
        return self.prepared.request_id

    @property
    def done(self) -> bool:
        return self.reply is not None

    async def open(self) -> None:
        """Publish the prompt (once); a refused prompt is not published."""
        if self._opened or self.reply is not None:
            return
        self._opened = True
        router = self.client.router
        router.expect(self.request_id, stream=True)
        self._events = router.events(self.request_id)
        try:
            await self.client.publish_prepared([self.prepared], self.deadline)
        except BaseException:
            router.discard(self.request_id)
            raise

    async def next_event(self) -> Event:
        """The next delta, or the ``Reply`` that ends the stream (then always that reply)."""
        if self.reply is not None:
            return self.reply
        await self.open()
        if self.reply is not None:
            return self.reply
        events = self._events
        assert events is not None
        remaining = self.deadline - asyncio.get_running_loop().time()
        try:
            event = await asyncio.wait_for(events.get(), max(0.0, remaining))
        except TimeoutError:
            given_up = self.client.router.give_up(self.request_id)
            if given_up is not None:
                self.client.cancel_soon(self.request_id, "timeout")
            event = events.get_nowait()  # the timeout reply, or the answer of the same instant
        if isinstance(event, Reply):
            self.reply = event
            self.client.router.discard(self.request_id)
        return event

    async def __aiter__(self) -> AsyncIterator[DeltaMessage]:
        while True:
            event = await self.next_event()
            if isinstance(event, Reply):
                return
            yield event

    def close(self, reason: str = "client left") -> None:
        """Stop waiting; a request published and not yet answered is cancelled."""
        if self.reply is None and self._opened:
            self.client.router.discard(self.request_id)
            self.client.cancel_soon(self.request_id, reason)

    async def __aenter__(self) -> ReplyStream:
        await self.open()
        return self

    async def __aexit__(self, *_: object) -> None:
        self.close()
