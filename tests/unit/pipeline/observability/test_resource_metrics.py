"""GPU (NVML) and process-memory collectors, and the dashboard's reading of a stage's /metrics."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client import generate_latest

from pipeline.config import Settings
from pipeline.observability import gpu
from pipeline.observability.gpu import GpuCollector
from pipeline.observability.metrics import StageMetrics
from pipeline.observability.process import ProcessMemoryCollector
from sluice.dashboard import Dashboard, Sample, Target, parse_stage_metrics
from sluice.lag import GroupInfo, LagExporter, LagSnapshot, PartitionLag


class FakeNvml:
    """The part of pynvml the collector uses, for two GPUs (the second one fails to read)."""

    class NVMLError(Exception):
        pass

    def __init__(self, count: int = 2, init_fails: bool = False) -> None:
        self.count = count
        self.init_fails = init_fails
        self.broken: set[int] = set()

    def nvmlInit(self) -> None:
        if self.init_fails:
            raise self.NVMLError("Driver Not Loaded")

    def nvmlDeviceGetCount(self) -> int:
        return self.count

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:
        return i

    def nvmlDeviceGetUtilizationRates(self, h: int) -> Any:
        if h in self.broken:
            raise self.NVMLError("GPU is lost")
        return SimpleNamespace(gpu=93 if h == 0 else 10, memory=40)

    def nvmlDeviceGetMemoryInfo(self, h: int) -> Any:
        return SimpleNamespace(used=(h + 1) * 2**30, total=80 * 2**30, free=0)


def _samples(collector: Any) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in collector.collect()
        for s in family.samples
    }


def test_gpu_metrics_per_device_and_read_errors_counted() -> None:
    nvml = FakeNvml()
    collector = GpuCollector(nvml)
    got = _samples(collector)
    assert got[("sluice_gpu_utilization_ratio", (("gpu", "0"),))] == 0.93
    assert got[("sluice_gpu_memory_used_bytes", (("gpu", "1"),))] == 2 * 2**30
    assert got[("sluice_gpu_memory_total_bytes", (("gpu", "0"),))] == 80 * 2**30
    assert got[("sluice_gpu_read_errors_total", ())] == 0
    nvml.broken.add(1)
    got = _samples(collector)
    assert ("sluice_gpu_utilization_ratio", (("gpu", "1"),)) not in got
    assert got[("sluice_gpu_read_errors_total", ())] == 1


def test_no_gpu_no_driver_or_no_pynvml_yields_nothing_and_never_fails(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert list(GpuCollector(FakeNvml(count=0)).collect()) == []
    assert list(GpuCollector(FakeNvml(init_fails=True)).collect()) == []
    monkeypatch.setattr(gpu, "load_nvml", lambda: None)
    assert list(GpuCollector().collect()) == []
    monkeypatch.undo()
    here = GpuCollector()  # this machine, through the real pynvml where it is installed
    families = list(here.collect())
    assert all(f.name.startswith("sluice_gpu_") for f in families)
    assert bool(families) == here.available


def _fake_proc(tmp_path: Path, cgroup: str, rss_pages: int = 1000) -> Path:
    proc = tmp_path / "proc"
    (proc / "self").mkdir(parents=True)
    (proc / "self" / "statm").write_text(f"5000 {rss_pages} 300 1 0 800 0\n")
    (proc / "self" / "cgroup").write_text(cgroup)
    (proc / "meminfo").write_text("MemTotal:       16000000 kB\nMemFree: 1 kB\n")
    return proc


def test_memory_limit_from_cgroup_v2_takes_the_tightest_ancestor(tmp_path: Path) -> None:
    proc = _fake_proc(tmp_path, "0::/kubepods/pod1/ctr\n")
    root = tmp_path / "cgroup"
    for path, limit in [
        ("kubepods", "max"),
        ("kubepods/pod1", "2147483648"),
        ("kubepods/pod1/ctr", "4294967296"),
    ]:
        (root / path).mkdir(parents=True)
        (root / path / "memory.max").write_text(limit + "\n")
    collector = ProcessMemoryCollector(proc, root)
    assert collector.limit_bytes() == (2 * 2**30, "cgroup")
    got = _samples(collector)
    assert got[("sluice_process_memory_bytes", ())] == 1000 * os.sysconf("SC_PAGE_SIZE")
    assert got[("sluice_process_memory_limit_bytes", ())] == 2 * 2**30


def test_memory_limit_from_cgroup_v1_and_the_host_when_unlimited(tmp_path: Path) -> None:
    proc = _fake_proc(tmp_path, "4:memory:/docker/abc\n1:cpu:/\n0::/\n")
    root = tmp_path / "cgroup"
    (root / "memory").mkdir(parents=True)
    (root / "memory" / "memory.limit_in_bytes").write_text("9223372036854771712\n")
    assert ProcessMemoryCollector(proc, root).limit_bytes() == (16000000 * 1024, "host")
    (root / "memory" / "memory.limit_in_bytes").write_text("1073741824\n")
    assert ProcessMemoryCollector(proc, root).limit_bytes() == (2**30, "cgroup")


def test_on_this_machine_both_memory_metrics_are_there() -> None:
    got = _samples(ProcessMemoryCollector())
    assert (
        0
        < got[("sluice_process_memory_bytes", ())]
        < got[("sluice_process_memory_limit_bytes", ())]
    )


def _stage_text(consumed: int, dead: int, breaker: int) -> str:
    metrics = StageMetrics("compute")
    metrics.consumed.labels("compute", "sluice.tokenized").inc(consumed)
    metrics.produced.labels("compute", "sluice.generated").inc(consumed - dead)
    metrics.dead_letters.labels("compute", "engine-fault").inc(dead)
    metrics.breaker_state.labels("compute").set(breaker)
    metrics.in_flight.labels("compute").set(7)
    metrics.ready.labels("compute").set(1)
    return generate_latest(metrics.registry).decode()


def test_a_stage_scrape_is_reduced_to_what_the_page_shows() -> None:
    values = parse_stage_metrics(_stage_text(consumed=100, dead=3, breaker=2))
    assert values.stage == "compute"
    assert values.counters["consumed"] == 100
    assert values.counters["dead_letters"] == 3
    assert values.gauges == {"breaker": 2, "in_flight": 7, "paused": 0, "ready": 1}
    target = Target("http://x/metrics")
    target.update(values, at=10.0)
    target.update(parse_stage_metrics(_stage_text(consumed=300, dead=5, breaker=0)), at=12.0)
    assert target.rates["consumed"] == 100.0
    assert target.rates["dead_letters"] == 1.0


def test_dashboard_state_has_current_values_and_history_after_since() -> None:
    settings = Settings(topic_prefix="sluice.")
    exporter = LagExporter(settings)
    board = Dashboard(settings, exporter, ["http://stage/metrics"], interval_s=1.0, history_s=60)
    rows = (
        PartitionLag("sluice-compute", "sluice.tokenized", 0, 5, 25),
        PartitionLag("sluice-compute", "sluice.tokenized", 1, None, 4),
    )
    exporter.latest = LagSnapshot(
        100.0,
        rows,
        {"sluice-compute": GroupInfo("sluice-compute", "Stable", 2)},
        {("sluice.tokenized", 0): 25, ("sluice.tokenized", 1): 4, ("sluice.prompts.DLT", 0): 9},
    )
    exporter.rates.add(exporter.latest)
    target = board.targets[0]
    target.update(parse_stage_metrics(_stage_text(10, 1, 0)), at=100.0)
    target.update(parse_stage_metrics(_stage_text(30, 2, 1)), at=101.0)
    board.history.append(Sample(100.0, board._values()))
    board.history.append(Sample(101.0, board._values()))
    state = board.state(since=100.0)
    assert state["history"]["t"] == [101.0]
    series = state["history"]["series"]
    assert series["lag/sluice-compute"] == [20]  # the partition without a commit adds nothing
    assert "plag/sluice-compute/sluice.tokenized/1" not in series
    assert series["members/sluice-compute"] == [2]
    assert series["throughput/compute"] == [20.0]
    assert series["breaker/compute"] == [1]
    assert series["dlt/sluice.prompts.DLT"] == [9]
    (group,) = state["groups"]
    assert group["lag"] == 20 and group["members"] == 2
    assert [p["committed"] for p in group["partitions"]] == [5, None]
    (stage,) = state["stages"]
    assert stage["stage"] == "compute" and stage["up"] == 1 and stage["dlq_total"] == 2
    assert stage["breaker_state"] == "half-open"
    assert state["breakers"] == {"closed": 0, "half-open": 1, "open": 0}
    assert state["dlt"] == {"sluice.prompts.DLT": 9}
    assert len(board.state()["history"]["t"]) == 2
