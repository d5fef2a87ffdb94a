"""What a crash report says about the process and the machine: memory, limits, GPU, versions.

Every function here reads, never fails on a missing source (a machine without cgroups, NVML or
``/proc`` gives ``None`` or an empty mapping) and is cheap enough to call from a dying process.
``cgroup_memory_events`` also takes another process's pid: the supervisor reads a worker's OOM
counter before and after its death.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import platform
import re
import resource
import sys
from pathlib import Path
from typing import Any

import orjson
from pydantic import SecretStr

from pipeline.config import Settings
from pipeline.observability.gpu import load_nvml
from pipeline.observability.process import ProcessMemoryCollector

PROC = Path("/proc")
CGROUP_ROOT = Path("/sys/fs/cgroup")
MASK = "**********"
PACKAGES = ("sluice-llm", "aiokafka", "onnxruntime-genai", "onnxruntime", "numpy", "pydantic")
_USERINFO = re.compile(r"(?<=://)[^/@\s]+@")


def memory(pid: str = "self", proc: Path = PROC, cgroup_root: Path = CGROUP_ROOT) -> dict[str, Any]:
    """RSS, peak RSS (VmHWM), the tightest limit and where it comes from, the cgroup's counters."""
    collector = ProcessMemoryCollector(proc, cgroup_root, pid)
    status = _status(proc / pid / "status")
    peak = status.get("VmHWM")
    if peak is None and pid == "self":
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    limit = collector.limit_bytes()
    return {
        "rss_bytes": collector.rss_bytes(),
        "peak_rss_bytes": peak,
        "vm_bytes": status.get("VmSize"),
        "limit_bytes": limit[0] if limit else None,
        "limit_source": limit[1] if limit else None,
        "cgroup_events": cgroup_memory_events(pid, proc, cgroup_root),
    }


def _status(path: Path) -> dict[str, int]:
    """The ``kB`` lines of /proc/<pid>/status, in bytes."""
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return {}
    out: dict[str, int] = {}
    for line in lines:
        name, _, rest = line.partition(":")
        parts = rest.split()
        if len(parts) == 2 and parts[1] == "kB" and parts[0].isdigit():
            out[name] = int(parts[0]) * 1024
    return out


def memory_events_file(
    pid: str = "self", proc: Path = PROC, cgroup_root: Path = CGROUP_ROOT
) -> Path | None:
    """The file that counts OOM kills for this process's cgroup: v2 ``memory.events``, else the
    v1 ``memory.oom_control`` (whose ``oom_kill`` line newer kernels write); None if neither."""
    try:
        lines = (proc / pid / "cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and controllers == "":
            candidate = cgroup_root / path.lstrip("/") / "memory.events"
        elif "memory" in controllers.split(","):
            candidate = cgroup_root / "memory" / path.lstrip("/") / "memory.oom_control"
            if not candidate.exists():  # inside a container only the root shows
                candidate = cgroup_root / "memory" / "memory.oom_control"
        else:
            continue
        if candidate.exists():
            return candidate
    return None


def read_memory_events(path: Path | None) -> dict[str, int]:
    """``name value`` lines as a mapping (``oom``, ``oom_kill``, ``max``, ...)."""
    if path is None:
        return {}
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return {}
    out: dict[str, int] = {}
    for line in lines:
        parts = line.split()
        if len(parts) == 2 and parts[1].lstrip("-").isdigit():
            out[parts[0]] = int(parts[1])
    return out


def cgroup_memory_events(
    pid: str = "self", proc: Path = PROC, cgroup_root: Path = CGROUP_ROOT
) -> dict[str, int]:
    return read_memory_events(memory_events_file(pid, proc, cgroup_root))


def open_fds(pid: str = "self", proc: Path = PROC) -> int | None:
    try:
        return len(os.listdir(proc / pid / "fd"))
    except OSError:
        return None


def gpus(nvml: Any | None = None) -> list[dict[str, Any]]:
    """Per NVIDIA device: name, memory used / total, and this process's own use where NVML
    lists it; empty without pynvml, a driver or a device."""
    nvml = nvml if nvml is not None else load_nvml()
    if nvml is None:
        return []
    try:
        nvml.nvmlInit()
        count = int(nvml.nvmlDeviceGetCount())
    except nvml.NVMLError:
        return []
    out: list[dict[str, Any]] = []
    for index in range(count):
        try:
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            info = nvml.nvmlDeviceGetMemoryInfo(handle)
            name = nvml.nvmlDeviceGetName(handle)
            mine = _process_gpu_memory(nvml, handle)
        except nvml.NVMLError as exc:
            out.append({"index": index, "error": str(exc)})
            continue
        out.append(
            {
                "index": index,
                "name": name.decode() if isinstance(name, bytes) else str(name),
                "memory_used_bytes": int(info.used),
                "memory_total_bytes": int(info.total),
                "process_memory_bytes": mine,
            }
        )
    return out


def _process_gpu_memory(nvml: Any, handle: Any) -> int | None:
    try:
        procs = nvml.nvmlDeviceGetComputeRunningProcesses(handle)
    except nvml.NVMLError:
        return None
    used = [p.usedGpuMemory for p in procs if p.pid == os.getpid() and p.usedGpuMemory]
    return int(sum(used)) if used else None


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
    }
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def settings_digest(settings: Settings) -> dict[str, Any]:
    """Every setting with secrets masked (and credentials cut out of URLs), plus a sha256 of
    that view: two reports with the same digest ran with the same configuration."""
    values: dict[str, Any] = {}
    for name in sorted(type(settings).model_fields):
        value = getattr(settings, name)
        if isinstance(value, SecretStr):
            values[name] = MASK
        elif isinstance(value, str):
            values[name] = _USERINFO.sub(f"{MASK}@", value)
        elif value is None or isinstance(value, bool | int | float):
            values[name] = value
        else:
            values[name] = str(value)
    digest = hashlib.sha256(orjson.dumps(values, option=orjson.OPT_SORT_KEYS)).hexdigest()
    return {"sha256": digest, "values": values}


def process_started_at(pid: str = "self", proc: Path = PROC) -> float | None:
    """Unix time the process started (``/proc/<pid>/stat`` start time plus the boot time)."""
    try:
        stat = (proc / pid / "stat").read_text()
        boot = next(
            int(line.split()[1])
            for line in (proc / "stat").read_text().splitlines()
            if line.startswith("btime ")
        )
    except (OSError, StopIteration, ValueError):
        return None
    fields = stat.rpartition(")")[2].split()  # the command name may hold spaces
    try:
        ticks = int(fields[19])  # field 22 of stat(5); fields[0] is field 3
    except (IndexError, ValueError):
        return None
    return boot + ticks / os.sysconf("SC_CLK_TCK")
