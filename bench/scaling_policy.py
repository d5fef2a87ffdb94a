"""Compute workers over time for a burst: the old lag policy vs lag per worker + in flight.

A simulation, not a measurement of processes: a fluid model of compute workers (each runs up to
``batch`` requests at once, each request taking ``service_s``; a new worker serves only after
``startup_s``) fed through the real ``pipeline.scaling.StageScaler``, once with the old policy
(lag / 50) and once with the new one (lag / (50 + batch)). The committed-offset lag that the
supervisor reads is the queue plus everything the workers hold in flight, which is what made
the old policy ask for more workers than the load needs.

    python -m bench.scaling_policy [--batch 128] [--out FILE]
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import results_path, write_json
from pipeline.scaling import DEFAULT_POLICIES, ScalePolicy, StageScaler

TICK_S = 0.5


@dataclass(frozen=True)
class Scenario:
    name: str
    steady_per_s: float  # arrivals all along
    burst: int  # requests arriving at once at t=10 s
    seconds: float = 120.0


@dataclass
class Run:
    workers: list[tuple[float, int]]  # (t, workers serving)
    peak: int
    worker_seconds: float
    drained_at: float | None


def simulate(policy: ScalePolicy, scenario: Scenario, batch: int, service_s: float,
             startup_s: float) -> Run:  # fmt: skip
    scaler = StageScaler(policy, current=policy.min_workers)
    ready_at = [0.0] * policy.min_workers  # when each worker starts serving
    queue = 0.0
    in_flight = 0.0
    timeline: list[tuple[float, int]] = []
    worker_seconds = 0.0
    drained_at = None
    t = 0.0
    while t < scenario.seconds:
        queue += scenario.steady_per_s * TICK_S + (scenario.burst if t == 10.0 else 0)
        serving = sum(1 for r in ready_at if r <= t)
        capacity = serving * batch
        take = min(queue, max(0.0, capacity - in_flight))  # fetch up to the batch slots
        queue -= take
        in_flight += take
        in_flight -= min(in_flight, in_flight * TICK_S / service_s)  # finished this tick
        lag = math.ceil(queue + in_flight)
        decision = scaler.observe(t, lag)
        if decision is not None:
            if decision.desired > len(ready_at):
                ready_at += [t + startup_s] * (decision.desired - len(ready_at))
            else:
                ready_at = ready_at[: decision.desired]
        timeline.append((t, serving))
        worker_seconds += len(ready_at) * TICK_S
        if scenario.burst and t > 10 and drained_at is None and queue < 1:
            drained_at = t
        t += TICK_S
    return Run(timeline, max(n for _, n in timeline), worker_seconds, drained_at)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128, help="requests a worker runs at once")
    parser.add_argument("--service-s", type=float, default=4.0, help="seconds per request")
    parser.add_argument("--startup-s", type=float, default=6.0, help="a new worker's start-up")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    compute = next(p for p in DEFAULT_POLICIES if p.stage == "compute")
    policies = {
        "old (lag / 50)": dataclasses.replace(compute, in_flight_per_worker=0),
        f"new (lag / (50 + {args.batch}))": dataclasses.replace(
            compute, in_flight_per_worker=args.batch
        ),
    }
    per_worker = args.batch / args.service_s  # requests/s one worker completes at full batch
    scenarios = [
        Scenario("steady at 70% of one worker", steady_per_s=0.7 * per_worker, burst=0),
        Scenario("burst of 2,000 over 70% steady", steady_per_s=0.7 * per_worker, burst=2000),
    ]
    results: dict[str, Any] = {"batch": args.batch, "service_s": args.service_s,
                               "startup_s": args.startup_s, "scenarios": {}}  # fmt: skip
    for scenario in scenarios:
        print(f"\n{scenario.name} (one worker: {per_worker:.0f} requests/s)")
        print(f"{'policy':<28}{'peak':>6}{'worker-s':>10}{'drained':>9}  workers every 10 s")
        rows: dict[str, Any] = {}
        for label, policy in policies.items():
            run = simulate(policy, scenario, args.batch, args.service_s, args.startup_s)
            every = [n for t, n in run.workers if t % 10 == 0]
            drained = f"{run.drained_at:.0f}s" if run.drained_at is not None else "-"
            print(f"{label:<28}{run.peak:>6}{run.worker_seconds:>10.0f}{drained:>9}  {every}")
            rows[label] = {
                "peak": run.peak,
                "worker_seconds": run.worker_seconds,
                "drained_at": run.drained_at,
                "workers_each_second": [n for t, n in run.workers if t % 1 == 0],
            }
        results["scenarios"][scenario.name] = rows
    path = write_json(results_path("scaling-policy", args.out), results)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
