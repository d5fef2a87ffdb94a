"""How many attempts may run at once under a closed breaker, so that a burst cannot outrun it.

The breaker counts a fault when an attempt ends, but a stage starts many attempts at once (one
task per record for compute, up to the in-flight bound). Against an engine that has just
failed, a burst of 300 records would all be attempted before the first fault came back.

So the loop asks ``Admission`` before each attempt while the breaker is closed:

- once the stage has succeeded since its last fault, every attempt starts at once;
- otherwise (since start-up, or since the last fault) at most ``threshold - consecutive
  faults`` attempts are outstanding; the rest wait for one to finish. A success lets them all
  go; enough faults open the breaker, and the waiting records then take the open path
  (response cache or ``circuit-open``) without being attempted.

So a burst against a failing engine reaches it at most ``threshold`` times (the attempts in
flight when a success last proved it are the only others). The cost is at start-up: the first
``threshold`` attempts go alone until one succeeds.
"""

from __future__ import annotations

import asyncio

from pipeline.runtime.breaker import BreakerState, CircuitBreaker


class Admission:
    """Gates attempts under a closed ``breaker``; see the module docstring."""

    def __init__(self, breaker: CircuitBreaker) -> None:
        self.breaker = breaker
        self.outstanding = 0
        self.proven = False  # succeeded since the last fault
        self._changed: asyncio.Event | None = None

    def limit(self) -> int | None:
        """How many attempts may be outstanding now (None: no limit)."""
        if self.proven:
            return None
        return max(1, self.breaker.threshold - self.breaker.consecutive_faults)

    async def enter(self) -> bool:
        """Wait until an attempt may start; False when the breaker is not closed (any more),
        and the record must take the open path instead. True must be paired with ``leave``."""
        while True:
            if self.breaker.state != BreakerState.CLOSED:
                return False
            limit = self.limit()
            if limit is None or self.outstanding < limit:
                self.outstanding += 1
                return True
            if self._changed is None:
                self._changed = asyncio.Event()
            await self._changed.wait()

    def observe(self, ok: bool) -> None:
        """An attempt's outcome for the breaker: a success proves the stage, a fault does not."""
        self.proven = ok

    def leave(self) -> None:
        """An attempt ended (its outcome already observed): wake the waiting ones to re-check."""
        self.outstanding -= 1
        if self._changed is not None:
            self._changed.set()
            self._changed = None
