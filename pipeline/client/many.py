"""Many prompts through one ``SluiceClient``, without holding them: ``infer_each``.

Prompts are taken from an iterable ``batch_size`` at a time, only when fewer than
``max_in_flight`` requests wait, so at most that many prompts and replies are in memory
whatever the input's length; each reply goes to ``on_reply(index, reply)`` as it arrives (in
arrival order, not input order). ``SluiceClient.infer`` collects them into a list; ``sluice
infer`` writes each to its output file at once.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from pipeline.client.prompts import Prepared, refusal
from pipeline.client.routing import Reply

if TYPE_CHECKING:
    from pipeline.client.client import SluiceClient


async def infer_each(
    client: SluiceClient,
    prompts: Iterable[tuple[int, Prepared]],
    on_reply: Callable[[int, Reply], None],
    *,
    batch_size: int = 64,
    max_in_flight: int | None = None,
    timeout_s: float | None = None,
) -> None:
    """Send every ``(index, prepared prompt)`` (``pipeline.client.prompts.prepare``);
    ``on_reply(index, reply)`` once for each.

    A batch goes out once fewer than ``max_in_flight`` (default ``8 * batch_size``) requests
    are waiting, so each request's ``timeout_s`` (its deadline counts from its batch's
    publication; default ``settings.request_timeout_s``) measures the pipeline, not a queue in
    this client. A prompt that breaks the schema gets its refusal at once, unpublished. A
    request id already in flight is a ``ValueError``.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    window = asyncio.Semaphore(max(max_in_flight or 8 * batch_size, batch_size))
    router = client.router
    items = iter(prompts)

    async def wait_one(
        index: int, rid: str, future: asyncio.Future[Reply], deadline: float
    ) -> None:
        try:
            reply = await client._wait(rid, future, deadline)
        finally:
            router.discard(rid)
            window.release()
        on_reply(index, reply)

    async with asyncio.TaskGroup() as group:
        while chunk := list(itertools.islice(items, batch_size)):
            batch: list[tuple[int, Prepared]] = []
            for index, prepared in chunk:
                refused = refusal(prepared)
                if refused is not None:
                    on_reply(index, refused)
                else:
                    batch.append((index, prepared))
            ids = [p.request_id for _, p in batch]
            if len(set(ids)) != len(ids) or any(rid in router for rid in ids):
                raise ValueError("request ids must be unique and not already in flight")
            for _ in batch:
                await window.acquire()
            deadline = client._deadline(timeout_s)
            futures = [router.expect(rid) for rid in ids]
            try:
                await client.publish_prepared([p for _, p in batch], deadline)
            except BaseException:
                for rid in ids:
                    router.discard(rid)
                raise
            for (index, p), future in zip(batch, futures, strict=True):
                task = wait_one(index, p.request_id, future, deadline)
                group.create_task(task, name=f"answer_{index}")
