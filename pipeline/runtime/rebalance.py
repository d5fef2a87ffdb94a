"""Letting go of work: on a rebalance (partitions revoked) and on shutdown.

Both follow one rule: in-flight work gets until a deadline to finish (its outputs acknowledged
and its offsets committable); what is still running then is handed back: cancelled, left
uncommitted, and redone by the partition's next owner (at-least-once). ``Rebalance`` is the
aiokafka listener; aiokafka awaits ``on_partitions_revoked`` before the group moves on, so the
partitions are not given up until the work is finished or handed back.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Collection, Coroutine
from typing import Any

from aiokafka import ConsumerRebalanceListener, TopicPartition

log = logging.getLogger(__name__)


class Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    """Hands the group's callbacks to the loop."""

    def __init__(
        self,
        revoked: Callable[[set[TopicPartition]], Awaitable[None]],
        assigned: Callable[[set[TopicPartition]], None],
    ) -> None:
        self._revoked = revoked
        self._assigned = assigned

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self._revoked(revoked)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        self._assigned(assigned)


async def finish_or_hand_back(
    tasks: Collection[asyncio.Task[None]], timeout_s: float
) -> tuple[int, int]:
    """Wait up to ``timeout_s`` for ``tasks``; cancel the rest. (finished, handed back)."""
    if not tasks:
        return 0, 0
    pending: set[asyncio.Task[None]] = set(tasks)
    if timeout_s > 0:
        _, pending = await asyncio.wait(tasks, timeout=timeout_s)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    return len(tasks) - len(pending), len(pending)


async def within(work: Coroutine[Any, Any, None], ends: float, what: str) -> None:
    """Await ``work`` until ``ends`` (``time.monotonic()``; at least a second), else give up
    on it with a warning: shutdown must meet its deadline."""
    try:
        await asyncio.wait_for(work, timeout=max(1.0, ends - time.monotonic()))
    except TimeoutError:
        log.warning("shutdown: %s did not finish within the shutdown deadline", what)
