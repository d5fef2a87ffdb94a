"""The chaos suite at bench scale: every scenario of tests/chaos, larger, on a private broker,
plus a soak (stage SIGKILLs spread over a long steady load).

    .venv/bin/python -m bench.chaos [--scale 10] [--hostile 10000] [--soak-s 600] [--out PATH]

Prints the results table (scenario, sent, answered, duplicates, dead-lettered, lost, restarts,
recovery) and writes it as JSON under bench/results/ with the machine, the load averages
before and after, and each scenario's wall time.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import tempfile
import time
import uuid
from pathlib import Path

from bench.common import load_average, machine, results_path, write_json
from infra.kafka.broker import BrokerConfig, start_broker, stop_broker
from pipeline.config import Settings
from tests.chaos import scenarios
from tests.chaos.hostile import OVERSIZED, SURVIVABLE, UNDECODABLE
from tests.paths import REPO_ROOT

MODEL = REPO_ROOT / "models" / "demo" / "tokenizer"


def _settings(bootstrap: str, state: Path, **extra: object) -> Settings:
    values: dict[str, object] = {
        "bootstrap_servers": bootstrap,
        "topic_prefix": f"c{uuid.uuid4().hex[:10]}.",
        "state_dir": state,
        "partitions": 3,
        "model_path": MODEL,
        "engine": "echo",
        "max_prompt_bytes": 4096,
        "breaker_cooldown_s": 2.0,
        **extra,
    }
    return Settings(**values)  # type: ignore[arg-type]


async def _run(scale: int, hostile: int, soak_s: float, root: Path) -> list[scenarios.Row]:
    data = root / "kafka"
    handle = await asyncio.to_thread(start_broker, BrokerConfig(data_dir=data))
    rows: list[scenarios.Row] = []
    try:
        for name, kinds, count in (
            ("hostile-mixed", SURVIVABLE, hostile),
            ("hostile-oversized", (OVERSIZED,), 5 * scale),
            ("hostile-undecodable-header", (UNDECODABLE,), 5 * scale),
        ):
            st = await scenarios.fresh_topics(_settings(handle.address, root / name))
            rows.append(
                await scenarios.hostile(
                    st, root / name, name=name, kinds=kinds, count=count, within=300.0
                )
            )
        st = await scenarios.fresh_topics(_settings(handle.address, root / "kill"))
        rows.append(
            await scenarios.under_load(
                st, root / "kill", name="stage-sigkill", n=500 * scale, rate=100.0,
                fault=scenarios.kill_stages(times=15, every_s=2.0), within=300.0,
            )
        )  # fmt: skip
        fault_file = root / "echo-fault"
        st = await scenarios.fresh_topics(
            _settings(handle.address, root / "engine", echo_fault_file=fault_file)
        )
        rows.append(
            await scenarios.under_load(
                st, root / "engine", name="engine-crash", n=300 * scale, rate=50.0,
                fault=scenarios.engine_crash(fault_file, after_s=3.0, for_s=10.0), within=300.0,
            )
        )  # fmt: skip
        stall_file = root / "echo-stall"
        st = await scenarios.fresh_topics(
            _settings(
                handle.address, root / "stall", echo_stall_file=stall_file, engine_stall_s=3.0
            )
        )
        rows.append(
            await scenarios.under_load(
                st, root / "stall", name="engine-stall", n=300 * scale, rate=50.0,
                fault=scenarios.engine_stall(stall_file, after_s=2.0, for_s=3.5), within=300.0,
                supervised=("compute",),
            )
        )  # fmt: skip
        for hard in (True, False):
            st = await scenarios.fresh_topics(_settings(handle.address, root / f"b{hard}"))
            name = f"broker-{'sigkill' if hard else 'sigterm'}"
            row, handle = await scenarios.broker_restart(
                handle, data, st, root / f"b{hard}", name=name,
                n=500 * scale, rate=100.0, hard=hard, within=300.0,
            )  # fmt: skip
            rows.append(row)
        st = await scenarios.fresh_topics(_settings(handle.address, root / "soak"))
        rate = 40.0
        rows.append(
            await scenarios.under_load(
                st, root / "soak", name="soak", n=int(rate * soak_s), rate=rate,
                fault=scenarios.kill_stages(times=max(1, int(soak_s // 60)), every_s=60.0),
                within=300.0,
            )
        )  # fmt: skip
    finally:
        await asyncio.to_thread(stop_broker, handle)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=int, default=10)
    parser.add_argument("--hostile", type=int, default=10_000, help="hostile-mixed records")
    parser.add_argument("--soak-s", type=float, default=600.0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    started = dt.datetime.now(dt.UTC)
    load_start = load_average()
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="sluice-chaos-") as tmp:
        rows = asyncio.run(_run(args.scale, args.hostile, args.soak_s, Path(tmp)))
    wall = time.monotonic() - t0
    header = (
        "scenario sent answered duplicates dead_lettered lost canaries_lost restarts recovery_s ok"
    )
    print(" | ".join(header.split()))
    for r in rows:
        print(
            f"{r.scenario} | {r.sent} | {r.answered} | {r.duplicates} | {r.dead_lettered} | "
            f"{r.lost} | {r.canaries_lost} | {r.restarts} | {r.recovery_s} | "
            f"{'yes' if r.passed else 'NO'}"
        )
    print(f"all scenarios in {wall / 60:.1f} min")
    report = {
        "benchmark": "chaos",
        "started": started.isoformat(timespec="seconds"),
        "parameters": {"scale": args.scale, "hostile": args.hostile, "soak_s": args.soak_s},
        "machine": machine(),
        "load_average": {"start": load_start, "end": load_average()},
        "wall_s": round(wall, 1),
        "rows": [r.as_dict() for r in rows],
    }
    out = write_json(results_path("chaos", args.out), report)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
