"""The chaos suite at CI scale: every scenario ends with 0 lost and every canary answered.

Scale comes from ``SLUICE_CHAOS_SCALE`` (default 1; ``bench/chaos.py`` runs larger). Each test
prints its row of the results table (docs/RELIABILITY.md).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from infra.kafka.broker import BrokerConfig, start_broker, stop_broker
from infra.process import ServiceHandle
from pipeline.config import Settings
from tests.chaos import scenarios
from tests.chaos.hostile import OVERSIZED, SURVIVABLE, UNDECODABLE
from tests.paths import REPO_ROOT

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(900)]

MODEL = REPO_ROOT / "models" / "demo" / "tokenizer"
SCALE = int(os.environ.get("SLUICE_CHAOS_SCALE", "1"))


def _settings(bootstrap: str, state: Path, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "bootstrap_servers": bootstrap,
        "topic_prefix": f"c{uuid.uuid4().hex[:10]}.",
        "state_dir": state,
        "partitions": 3,
        "model_path": MODEL,
        "engine": "echo",
        "max_prompt_bytes": 4096,
        "breaker_cooldown_s": 2.0,
    }
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


@pytest.fixture
async def make_settings(kafka_broker: ServiceHandle, tmp_path: Path) -> Callable[..., Settings]:
    def make(**overrides: object) -> Settings:
        return _settings(kafka_broker.address, tmp_path / "state", **overrides)

    return make


def _report(row: scenarios.Row) -> None:
    print(f"\nCHAOS {row.as_dict()}")
    assert row.lost == 0, f"{row.scenario}: {row.lost} lost"
    assert row.canaries_lost == 0


@pytest.mark.parametrize(
    ("name", "kinds"),
    [
        ("hostile-mixed", SURVIVABLE),
        ("hostile-oversized", (OVERSIZED,)),
        ("hostile-undecodable-header", (UNDECODABLE,)),
    ],
)
async def test_hostile_records_each_followed_by_canaries(
    make_settings: Callable[..., Settings], tmp_path: Path, name: str, kinds: tuple[str, ...]
) -> None:
    settings = await scenarios.fresh_topics(make_settings())
    count = (len(kinds) * 4 if len(kinds) > 1 else 2) * SCALE
    row = await scenarios.hostile(
        settings, tmp_path / "logs", name=name, kinds=kinds, count=count, within=60.0
    )
    _report(row)


async def test_stages_sigkilled_under_load(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    settings = await scenarios.fresh_topics(make_settings())
    row = await scenarios.under_load(
        settings,
        tmp_path / "logs",
        name="stage-sigkill",
        n=750 * SCALE,
        rate=30.0,
        fault=scenarios.kill_stages(times=15 * SCALE, every_s=1.5),  # each stage 5 times
        within=120.0,
    )
    _report(row)
    assert row.restarts >= 15 * SCALE


async def test_engine_stall_restarted_by_the_supervisor(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    """Compute runs under ``sluice scale``: the stalled engine ends the process, the supervisor
    restarts it after its backoff, and every prompt is answered."""
    stall_file = tmp_path / "echo-stall"
    settings = await scenarios.fresh_topics(
        make_settings(echo_stall_file=stall_file, engine_stall_s=3.0)
    )
    row = await scenarios.under_load(
        settings,
        tmp_path / "logs",
        name="engine-stall",
        n=600 * SCALE,
        rate=30.0,
        fault=scenarios.engine_stall(stall_file, after_s=1.0, for_s=3.5),
        within=90.0,
        supervised=("compute",),
    )
    _report(row)
    assert row.restarts >= 1, "compute did not exit on the stall"


async def test_engine_crash(make_settings: Callable[..., Settings], tmp_path: Path) -> None:
    fault_file = tmp_path / "echo-fault"
    settings = await scenarios.fresh_topics(make_settings(echo_fault_file=fault_file))
    row = await scenarios.under_load(
        settings,
        tmp_path / "logs",
        name="engine-crash",
        n=200 * SCALE,
        rate=30.0,
        fault=scenarios.engine_crash(fault_file, after_s=2.0, for_s=3.0),
        within=60.0,
    )
    _report(row)


@pytest.fixture
def own_broker(tmp_path: Path) -> Iterator[tuple[ServiceHandle, Path]]:
    data = tmp_path / "kafka"
    handle = start_broker(BrokerConfig(data_dir=data))
    box = [handle]
    yield box[0], data
    stop_broker(box[0])


@pytest.mark.parametrize("hard", [True, False], ids=["sigkill", "sigterm"])
async def test_broker_killed_mid_stream_and_restarted(
    own_broker: tuple[ServiceHandle, Path], tmp_path: Path, hard: bool
) -> None:
    handle, data = own_broker
    settings = await scenarios.fresh_topics(_settings(handle.address, tmp_path / "state"))
    row, new_handle = await scenarios.broker_restart(
        handle,
        data,
        settings,
        tmp_path / "logs",
        name=f"broker-{'sigkill' if hard else 'sigterm'}",
        n=300 * SCALE,
        rate=30.0,
        hard=hard,
        within=120.0,
    )
    stop_broker(new_handle)
    _report(row)
