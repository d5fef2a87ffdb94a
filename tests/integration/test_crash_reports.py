"""Crash reports on the real broker: a worker killed under ``sluice scale`` gets a report from
the supervisor, a worker that runs out of memory under an RLIMIT reports it, and a stalled engine
reports its in-flight requests without a word of the prompt."""

from __future__ import annotations

import asyncio
import resource
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline import admin
from pipeline.config import Settings
from pipeline.scaling import ScalePolicy
from schemas.messages import SamplingParams, TokenizedMessage, encode
from sluice.crashes import CrashFile, list_reports
from sluice.procs import StageProcess, stage_env
from sluice.supervisor import Supervisor
from stages.text import TextModel
from tests.integration.kafka_io import Item, produce
from tests.paths import REPO_ROOT

MODEL = REPO_ROOT / "models" / "demo" / "tokenizer"
SECRET = "my grandmother's secret borscht recipe"


def _tokenized(rid: str, content: str) -> bytes:
    text = TextModel.load(MODEL)
    ids = text.encode(text.render([{"role": "user", "content": content}]))
    msg = TokenizedMessage(
        id=rid,
        conversation_id=f"c-{rid}",
        model="demo",
        input_ids=ids,
        sampling=SamplingParams(max_tokens=64, temperature=0.5, stop=["SECRET-STOP"]),
        created=int(time.time()),
    )
    return encode(msg)


async def _reports(folder: Path, want: Callable[[CrashFile], bool], within: float) -> CrashFile:
    deadline = time.monotonic() + within
    seen: list[CrashFile] = []
    while time.monotonic() < deadline:
        seen = list_reports(folder)
        for found in seen:
            if want(found):
                return found
        await asyncio.sleep(0.3)
    raise AssertionError(f"no such report in {folder}; found {[(f.id, f.cause) for f in seen]}")


async def _running(sup: Supervisor, within: float = 30.0) -> Any:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        worker = sup.stages["compute"].workers.get(0)
        if worker is not None and sup.deaths.workers.get(("compute", 0)) is not None:
            url = sup.deaths.workers[("compute", 0)].url
            if url is not None and sup.deaths.workers[("compute", 0)].memory:
                return worker.proc.proc
        await asyncio.sleep(0.2)
    raise AssertionError("the compute worker never served /metrics")


async def test_a_worker_killed_under_scale_gets_a_supervisor_report(
    settings_factory: Callable[..., Settings], tmp_path: Path
) -> None:
    settings = settings_factory(
        model_path=MODEL, engine="echo", partitions=1, archive_url=f"file://{tmp_path}/archive"
    )
    await admin.create_topics(settings)
    policy = ScalePolicy("compute", lag_threshold=1000, min_workers=1, max_workers=1)
    sup = Supervisor(settings, [policy], tmp_path, interval_s=0.3)
    sup.deaths.scrape_interval_s = 0.5
    task = asyncio.create_task(sup.run())
    try:
        proc = await _running(sup)
        proc.kill()
        found = await _reports(
            settings.state_dir / "crash", lambda f: f.stage == "compute", within=30
        )
    finally:
        sup.request_stop()
        await task
    report = found.report
    assert report is not None and report["written_by"] == "supervisor"
    assert report["pid"] == proc.pid and report["cause"] == "killed"
    assert report["exit"]["signal"] == "SIGKILL"
    assert report["last_scrape"]["lines"], "the last /metrics scrape is in the report"
    assert report["memory_history"] and report["memory"]["rss_bytes"] > 0
    assert any("warmed up" in line for line in report["log_tail"])


async def test_a_worker_out_of_memory_under_an_rlimit_is_reported_as_such(
    settings_factory: Callable[..., Settings], tmp_path: Path
) -> None:
    oom = tmp_path / "eat-memory"
    oom.touch()
    settings = settings_factory(
        model_path=MODEL, engine="echo", partitions=1, archive_url=f"file://{tmp_path}/archive"
    )
    await admin.create_topics(settings)
    policy = ScalePolicy("compute", lag_threshold=1000, min_workers=1, max_workers=1)
    env = {"SLUICE_ECHO_OOM_FILE": str(oom), "SLUICE_ECHO_OOM_CHUNK_MB": "32"}
    sup = Supervisor(settings, [policy], tmp_path, interval_s=0.3, worker_env=env)
    sup.deaths.scrape_interval_s = 0.5
    task = asyncio.create_task(sup.run())
    try:
        proc = await _running(sup)
        vm = _vm_size(proc.pid)
        # The address space it has now plus 256 MiB: the hook's chunks run into the limit.
        resource.prlimit(proc.pid, resource.RLIMIT_AS, (vm + (256 << 20), vm + (256 << 20)))
        items: list[Item] = [
            (f"c{i}".encode(), _tokenized(f"oom-{i}", f"hello {i}"), []) for i in range(16)
        ]
        await produce(settings, settings.topics.tokenized, items)
        found = await _reports(
            settings.state_dir / "crash", lambda f: f.cause == "out-of-memory", within=60
        )
        await asyncio.sleep(1.5)  # the supervisor reaps it: no second report for it
    finally:
        oom.unlink()
        sup.request_stop()
        await task
    report = found.report
    assert report is not None and report["pid"] == proc.pid
    assert report["written_by"] == "process" and report["stage"] == "compute"
    assert "held_bytes" in report["extra"]  # what the hook held when the limit hit
    assert "MemoryError" in "\n".join(report["error"]["traceback"])
    assert report["memory"]["limit_source"] == "rlimit"
    same = [f for f in list_reports(settings.state_dir / "crash") if f.report
            and f.report.get("pid") == proc.pid]  # fmt: skip
    assert len(same) == 1, [f.id for f in same]


def _vm_size(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmSize")


async def test_a_stalled_engine_reports_its_in_flight_requests_and_no_prompt_text(
    settings_factory: Callable[..., Settings], tmp_path: Path
) -> None:
    stall = tmp_path / "stall"
    stall.touch()
    settings = settings_factory(
        model_path=MODEL, engine="echo", partitions=1, archive_url=f"file://{tmp_path}/archive"
    )
    await admin.create_topics(settings)
    env = stage_env(settings, SLUICE_ECHO_STALL_FILE=str(stall), SLUICE_ENGINE_STALL_S="3")
    proc = StageProcess("compute", env, tmp_path / "compute.log").start()
    try:
        items: list[Item] = [
            (b"c", _tokenized(f"stuck-{i}", f"{SECRET} part {i}"), []) for i in range(3)
        ]
        await produce(settings, settings.topics.tokenized, items)
        assert proc.proc is not None
        code = await asyncio.to_thread(proc.proc.wait, 90)
    finally:
        proc.stop()
    assert code == 3, proc.log()
    (found,) = [f for f in list_reports(settings.state_dir / "crash") if f.path.suffix == ".json"]
    raw = found.path.read_text()
    report = found.report
    assert report is not None and report["cause"] == "engine-stall"
    assert {e["request_id"] for e in report["inflight"]} == {"stuck-0", "stuck-1", "stuck-2"}
    assert all(e["prompt_tokens"] > 5 for e in report["inflight"])
    assert report["inflight"][0]["sampling"]["stop_strings"] == 1
    assert report["threads"] and report["log_tail"]
    for text in (SECRET, "borscht", "SECRET-STOP"):
        assert text not in raw
    assert (tmp_path / "archive" / "crash" / found.path.name).read_bytes() == raw.encode()
    assert not list((settings.state_dir / "crash").glob("hard-*"))  # clean exit: tidied
