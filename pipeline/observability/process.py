"""Process memory against the limit it runs under, for the "memory above 85%" alert.

``ProcessMemoryCollector`` yields ``sluice_process_memory_bytes`` (resident set size of this
process) and ``sluice_process_memory_limit_bytes``: the tightest of the cgroup limit
(v2 ``memory.max`` of the process's cgroup and its ancestors, or v1
``memory.limit_in_bytes``), ``RLIMIT_AS`` and the machine's memory, so the ratio of the two is
always defined. Both are read on every scrape: a container's limit can change under it.
"""

from __future__ import annotations

import logging
import os
import resource
from collections.abc import Iterator
from pathlib import Path

from prometheus_client.core import GaugeMetricFamily, Metric

log = logging.getLogger(__name__)

_UNLIMITED = 1 << 60  # cgroup v1 writes a page-rounded 2**63-1 for "no limit"


class ProcessMemoryCollector:
    """RSS of this process and the memory limit it runs under (Linux; nothing elsewhere)."""

    def __init__(
        self,
        proc: Path = Path("/proc"),
        cgroup_root: Path = Path("/sys/fs/cgroup"),
        pid: str = "self",
    ) -> None:
        self.proc = proc
        self.cgroup_root = cgroup_root
        self.pid = pid

    def rss_bytes(self) -> int | None:
        try:
            fields = (self.proc / self.pid / "statm").read_text().split()
        except OSError:
            return None
        return int(fields[1]) * os.sysconf("SC_PAGE_SIZE")

    def limit_bytes(self) -> tuple[int, str] | None:
        """(limit, where it comes from): cgroup, rlimit or host; None if nothing is readable."""
        candidates: list[tuple[int, str]] = []
        cgroup = self._cgroup_limit()
        if cgroup is not None:
            candidates.append((cgroup, "cgroup"))
        soft, _ = resource.getrlimit(resource.RLIMIT_AS)
        if soft != resource.RLIM_INFINITY and soft > 0:
            candidates.append((soft, "rlimit"))
        host = self._host_memory()
        if host is not None:
            candidates.append((host, "host"))
        return min(candidates) if candidates else None

    def _cgroup_limit(self) -> int | None:
        try:
            lines = (self.proc / self.pid / "cgroup").read_text().splitlines()
        except OSError:
            return None
        limits: list[int] = []
        for line in lines:
            hierarchy, _, rest = line.partition(":")
            controllers, _, path = rest.partition(":")
            if hierarchy == "0" and controllers == "":  # cgroup v2: the unified hierarchy
                limits.extend(self._v2_limits(path))
            elif "memory" in controllers.split(","):  # cgroup v1: the memory controller
                limits.extend(self._v1_limits(path))
        return min(limits) if limits else None

    def _v2_limits(self, path: str) -> list[int]:
        """memory.max of the cgroup and every ancestor visible in this mount namespace."""
        found: list[int] = []
        node = self.cgroup_root / path.lstrip("/")
        while True:
            value = _read_limit(node / "memory.max")
            if value is not None:
                found.append(value)
            if node == self.cgroup_root or self.cgroup_root not in node.parents:
                break
            node = node.parent
        return found

    def _v1_limits(self, path: str) -> list[int]:
        base = self.cgroup_root / "memory"
        for node in (base / path.lstrip("/"), base):  # inside a container only the root shows
            value = _read_limit(node / "memory.limit_in_bytes")
            if value is not None:
                return [value]
        return []

    def _host_memory(self) -> int | None:
        try:
            for line in (self.proc / "meminfo").read_text().splitlines():
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            return None
        return None

    def collect(self) -> Iterator[Metric]:
        rss = self.rss_bytes()
        if rss is not None:
            yield GaugeMetricFamily(
                "sluice_process_memory_bytes", "Resident memory of this process.", value=rss
            )
        limit = self.limit_bytes()
        if limit is not None:
            yield GaugeMetricFamily(
                "sluice_process_memory_limit_bytes",
                "Memory this process may use: cgroup limit, RLIMIT_AS or the host's, the least.",
                value=limit[0],
            )


def _read_limit(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if not text or text == "max":
        return None
    value = int(text)
    return value if 0 < value < _UNLIMITED else None
