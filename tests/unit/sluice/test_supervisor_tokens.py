"""``sluice scale`` reads compute's waiting tokens from its workers' /metrics and scales on them;
SLUICE_ENGINE_MAX_BATCH sets what one compute worker holds in flight."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from pipeline.config import Settings
from pipeline.scaling import DEFAULT_POLICIES, ScalePolicy
from sluice.procs import StageProcess
from sluice.supervisor import Supervisor, Worker

COMPUTE = next(p for p in DEFAULT_POLICIES if p.stage == "compute")


@pytest.fixture
async def metrics_ports() -> AsyncIterator[list[int]]:
    """Two fake workers' /metrics: 1500 and 2500 pending tokens."""
    runners, ports = [], []
    for tokens in (1500, 2500):
        text = (
            "# HELP sluice_compute_pending_tokens Pending.\n"
            "# TYPE sluice_compute_pending_tokens gauge\n"
            f"sluice_compute_pending_tokens {tokens}.0\n"
            "sluice_engine_waiting_requests 3.0\n"
        )

        async def metrics(_: web.Request, body: str = text) -> web.Response:
            return web.Response(text=body)

        app = web.Application()
        app.router.add_get("/metrics", metrics)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        ports.append(runner.addresses[0][1])
        runners.append(runner)
    yield ports
    for runner in runners:
        await runner.cleanup()


async def test_waiting_tokens_are_summed_over_running_workers(
    metrics_ports: list[int], tmp_path: Path
) -> None:
    sup = Supervisor(Settings(), [COMPUTE], tmp_path)
    st = sup.stages["compute"]
    proc = StageProcess("compute", {}, tmp_path / "log")
    st.workers = {i: Worker(i, proc, port=port) for i, port in enumerate(metrics_ports)}
    st.workers[2] = Worker(2, proc, port=1)  # nothing listens there: starting up
    st.workers[3] = Worker(3, proc, port=metrics_ports[0], stopping=True)  # leaving
    async with aiohttp.ClientSession() as session:
        assert await sup.waiting_tokens(st, session) == 4000
    assert COMPUTE.token_threshold is not None
    # with the default threshold, 4000 tokens want one worker; a small threshold wants more
    assert st.scaler.policy.raw_desired(0, 4000) == 1
    assert ScalePolicy("compute", token_threshold=1000).raw_desired(0, 4000) == 4


def test_engine_max_batch_sets_compute_in_flight_per_worker(tmp_path: Path) -> None:
    sup = Supervisor(Settings(engine_max_batch=128), list(DEFAULT_POLICIES), tmp_path)
    assert sup.stages["compute"].scaler.policy.in_flight_per_worker == 128
    assert sup.stages["preprocess"].scaler.policy.in_flight_per_worker == 0
    default = Supervisor(Settings(), [COMPUTE], tmp_path)
    assert default.stages["compute"].scaler.policy.in_flight_per_worker == 32
