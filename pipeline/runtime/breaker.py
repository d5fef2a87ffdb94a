"""The circuit breaker of a stage, and the response cache it answers from while open.

Closed: work flows; each fault adds to a run of consecutive faults, each success ends it. At
``threshold`` consecutive faults the breaker opens: work is not attempted. After ``cooldown_s``
it half-opens: exactly one record is let through as a probe; success closes it, a fault opens
it again for another cool-down. A fault reported while it is already open (work admitted before
it opened, finishing late) is counted but does not restart the cool-down.
"""

from __future__ import annotations

import base64
import enum
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import orjson

from pipeline.runtime.batch import Output

log = logging.getLogger(__name__)


class BreakerState(enum.IntEnum):
    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2


class CircuitBreaker:
    def __init__(
        self,
        threshold: int = 5,
        cooldown_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[BreakerState], None] | None = None,
    ) -> None:
        self.threshold = threshold
        self.cooldown_s = cooldown_s
        self._clock = clock
        self._on_change = on_change
        self.state = BreakerState.CLOSED
        self.consecutive_faults = 0
        self._opened_at = 0.0
        self._probe_out = False

    def _set(self, state: BreakerState) -> None:
        if state != self.state:
            log.warning("circuit breaker %s -> %s", self.state.name, state.name)
            self.state = state
            if self._on_change is not None:
                self._on_change(state)

    def admit(self) -> bool:
        """May the next record be attempted? In half-open, only one probe at a time."""
        if self.state == BreakerState.CLOSED:
            return True
        if self.state == BreakerState.OPEN:
            if self._clock() - self._opened_at < self.cooldown_s:
                return False
            self._set(BreakerState.HALF_OPEN)
            self._probe_out = False
        if self._probe_out:
            return False
        self._probe_out = True
        return True

    @property
    def probing(self) -> bool:
        return self.state == BreakerState.HALF_OPEN

    def success(self) -> None:
        self.consecutive_faults = 0
        self._probe_out = False
        self._set(BreakerState.CLOSED)

    def fault(self) -> None:
        self.consecutive_faults += 1
        if self.state == BreakerState.OPEN:
            return  # a late fault: the cool-down runs from when it opened
        self._probe_out = False
        if self.state == BreakerState.HALF_OPEN or self.consecutive_faults >= self.threshold:
            self._opened_at = self._clock()
            self._set(BreakerState.OPEN)

    def release_probe(self) -> None:
        """A probe that ended neither in success nor fault (e.g. bad input): let another try."""
        self._probe_out = False


class ResponseCache:
    """Exact request fingerprint -> the outputs of its last good answer; LRU-bounded.

    Persisted as one JSON file in the state folder (written atomically), so a restarted stage
    still answers from it: on shutdown, and every ``save_every_s`` while it runs (the loop
    calls ``save_if_due``), so a killed stage loses at most that much.
    """

    def __init__(
        self,
        capacity: int,
        path: Path | None = None,
        *,
        save_every_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.capacity = capacity
        self.path = path
        self.save_every_s = save_every_s
        self._clock = clock
        self._saved_at = clock()
        self._items: OrderedDict[str, list[Output]] = OrderedDict()
        self.dirty = False

    def __len__(self) -> int:
        return len(self._items)

    def get(self, fingerprint: str) -> list[Output] | None:
        outputs = self._items.get(fingerprint)
        if outputs is not None:
            self._items.move_to_end(fingerprint)
        return outputs

    def put(self, fingerprint: str, outputs: list[Output]) -> None:
        if self.capacity <= 0:
            return
        self._items[fingerprint] = outputs
        self._items.move_to_end(fingerprint)
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)
        self.dirty = True

    def save_if_due(self) -> bool:
        """Save when there is something new and ``save_every_s`` has passed since the last
        save; True when it saved. Cheap to call often (the loop's commit tick)."""
        if not self.dirty or self.path is None:
            return False
        if self._clock() - self._saved_at < self.save_every_s:
            return False
        try:
            self.save()
        except OSError as exc:  # a full or read-only disk must not stop serving
            log.warning("response cache %s could not be saved (%s); will retry", self.path, exc)
            self._saved_at = self._clock()
            return False
        return True

    def save(self) -> None:
        if self.path is None or not self.dirty:
            return
        data = {
            fp: [
                {
                    "topic": o.topic,
                    "key": base64.b64encode(o.key).decode() if o.key is not None else None,
                    "value": base64.b64encode(o.value).decode(),
                    "headers": [[k, base64.b64encode(v).decode()] for k, v in o.headers],
                    "tombstone": o.tombstone,
                }
                for o in outputs
            ]
            for fp, outputs in self._items.items()
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_bytes(orjson.dumps(data))
        os.replace(tmp, self.path)
        self.dirty = False
        self._saved_at = self._clock()

    def load(self) -> None:
        """Read the persisted cache; an unreadable or foreign file means starting empty."""
        if self.path is None or not self.path.exists():
            return
        try:
            data = orjson.loads(self.path.read_bytes())
            items = {
                fp: [
                    Output(
                        topic=o["topic"],
                        key=base64.b64decode(o["key"]) if o["key"] is not None else None,
                        value=base64.b64decode(o["value"]),
                        headers=[(k, base64.b64decode(v)) for k, v in o["headers"]],
                        tombstone=bool(o.get("tombstone", False)),
                    )
                    for o in outputs
                ]
                for fp, outputs in data.items()
            }
        except (orjson.JSONDecodeError, AttributeError, KeyError, TypeError, ValueError) as exc:
            log.warning("response cache %s is unreadable (%s); starting empty", self.path, exc)
            return
        self._items = OrderedDict(items)
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)
