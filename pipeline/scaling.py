"""Lag-based scaling decisions: how many workers each stage should run.

desired = ceil(lag / (lag_threshold + in_flight_per_worker)) (for compute also
ceil(waiting tokens / token_threshold), the larger of the two), clamped to [min_workers,
max_workers], and max_workers never above the partition count of the stage's input topic (a
worker beyond that would sit idle).

``in_flight_per_worker`` is what one worker holds uncommitted while it works normally (compute:
its engine batch). Those records count in the committed-offset lag, so without it a single
compute worker running a full batch already looks like ceil(batch / lag_threshold) workers'
worth of backlog and the stage jumps towards max_workers on any load.

Two lanes: a stage that reads the batch lane too (preprocess, compute) has a
``batch_lag_threshold``, the batch-lane backlog one worker is expected to carry (larger than the
interactive one: batch work waits for spare capacity by design), and the batch lane's lag is a
third signal, ceil(batch lag / batch_lag_threshold). When every signal is below
``activation_lag`` (and no tokens wait) the desired count is 0: a policy with ``min_workers`` 0
scales the stage to zero when both lanes are idle and back to one on the first record, as
KEDA's activation thresholds do.

Like KEDA/HPA stabilization, one spike does not move the count: a scale-up takes the *lowest*
desired count seen over the scale-up window (the lag must persist), a scale-down the *highest*
over the longer scale-down window (it must have drained for that long). The same policy is what
``infra/k8s`` expresses as KEDA ScaledObjects.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections import deque
from dataclasses import dataclass, field
from typing import Literal

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScalePolicy:
    stage: str
    lag_threshold: int = 50
    token_threshold: int | None = None
    in_flight_per_worker: int = 0
    batch_lag_threshold: int | None = None  # None: the stage reads one lane
    activation_lag: int = 1  # below it on every lane (and no waiting tokens): 0 wanted
    min_workers: int = 1
    max_workers: int = 6
    scale_up_window_s: float = 5.0
    scale_down_window_s: float = 30.0

    def bounded(self, partitions: int) -> ScalePolicy:
        """The policy with max_workers clamped to the input topic's partitions."""
        top = max(self.min_workers, min(self.max_workers, partitions))
        return dataclasses.replace(self, max_workers=top)

    @property
    def lag_per_worker(self) -> int:
        """The lag one worker is expected to carry: its backlog threshold plus its in-flight."""
        return self.lag_threshold + self.in_flight_per_worker

    def raw_desired(self, lag: int, waiting_tokens: int = 0, batch_lag: int = 0) -> int:
        idle = lag < self.activation_lag and batch_lag < self.activation_lag
        if idle and waiting_tokens <= 0:
            return min(self.max_workers, self.min_workers)
        want = max(1, math.ceil(max(0, lag) / self.lag_per_worker))
        if self.batch_lag_threshold:
            want = max(want, math.ceil(max(0, batch_lag) / self.batch_lag_threshold))
        if self.token_threshold:
            want = max(want, math.ceil(max(0, waiting_tokens) / self.token_threshold))
        return min(self.max_workers, max(self.min_workers, want))


# The one source of truth for scaling, on one machine (sluice scale) and on Kubernetes (the
# KEDA ScaledObjects in infra/k8s are generated from it: python -m pipeline.scaling k8s).
DEFAULT_POLICIES = (
    # batch_lag_threshold: the batch lane's backlog per worker; a batch waits for spare
    # capacity by design, so it asks for workers only when that backlog is large.
    ScalePolicy(
        "preprocess", lag_threshold=200, batch_lag_threshold=2000, min_workers=1, max_workers=6
    ),
    # in_flight_per_worker: the CPU engine's static batch (32); sluice scale uses
    # SLUICE_ENGINE_MAX_BATCH instead when it is set (a GPU engine holds more).
    ScalePolicy(
        "compute",
        lag_threshold=50,
        token_threshold=16384,
        in_flight_per_worker=32,
        batch_lag_threshold=500,
        min_workers=1,
        max_workers=6,
    ),
    ScalePolicy("postprocess", lag_threshold=200, min_workers=1, max_workers=6),
)


@dataclass(frozen=True)
class Decision:
    stage: str
    current: int
    desired: int
    lag: int
    reason: str

    @property
    def direction(self) -> Literal["up", "down"]:
        return "up" if self.desired > self.current else "down"


@dataclass
class StageScaler:
    """The stabilized decision for one stage, fed one observation at a time."""

    policy: ScalePolicy
    current: int = 1
    _seen: deque[tuple[float, int]] = field(default_factory=deque)
    _since: float | None = None  # first observation: a window counts once it is all observed

    def observe(
        self, now: float, lag: int, waiting_tokens: int = 0, batch_lag: int = 0
    ) -> Decision | None:
        """Record an observation; a Decision when the worker count should change now."""
        want = self.policy.raw_desired(lag, waiting_tokens, batch_lag)
        if self._since is None:
            self._since = now
        self._seen.append((now, want))
        horizon = max(self.policy.scale_up_window_s, self.policy.scale_down_window_s)
        while self._seen and self._seen[0][0] < now - horizon:
            self._seen.popleft()
        up_values = self._window(now, self.policy.scale_up_window_s)
        down_values = self._window(now, self.policy.scale_down_window_s)
        up = min(up_values) if up_values else None
        down = max(down_values) if down_values else None
        if up is not None and up > self.current:
            load = f"lag {lag}" + (f", batch lane {batch_lag}" if batch_lag else "")
            load += f", {waiting_tokens} waiting tokens" if waiting_tokens else ""
            return self._decide(up, lag, f"{load} held for {self.policy.scale_up_window_s}s")
        if down is not None and down < self.current:
            return self._decide(down, lag,
                                f"lag low for {self.policy.scale_down_window_s}s")  # fmt: skip
        return None

    def _window(self, now: float, window: float) -> list[int]:
        """Desired counts over the last ``window`` seconds, once that much has been observed."""
        if self._since is None or now - self._since < window:
            return []
        return [w for t, w in self._seen if t >= now - window]

    def _decide(self, desired: int, lag: int, reason: str) -> Decision:
        decision = Decision(self.policy.stage, self.current, desired, lag, reason)
        log.info("scale %s: %d -> %d workers (%s)", decision.stage, decision.current,
                 decision.desired, reason)  # fmt: skip
        self.current = desired
        return decision
