"""GPU utilization and memory through NVML (``nvidia-ml-py``), when a GPU is there.

``GpuCollector`` is a Prometheus collector: on a machine with NVIDIA GPUs it yields, per device
index ``gpu``, ``sluice_gpu_utilization_ratio`` (0..1, busy time over NVML's last sample period),
``sluice_gpu_memory_used_bytes`` and ``sluice_gpu_memory_total_bytes``. Where ``pynvml`` is not
installed, the NVIDIA driver is missing or no device exists, it yields nothing and never fails:
the same stage runs on CPU machines. NVML reports whole devices, so several processes on one
GPU report the same numbers (aggregate with ``max by (instance, gpu)``).
"""

from __future__ import annotations

import importlib
import logging
import threading
from collections.abc import Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

log = logging.getLogger(__name__)


def load_nvml() -> Any | None:
    """The ``pynvml`` module (from nvidia-ml-py), or None when it is not installed."""
    try:
        return importlib.import_module("pynvml")
    except ImportError:
        return None


class GpuCollector:
    """Yields the ``sluice_gpu_*`` metrics; nothing at all on a machine without a GPU."""

    def __init__(self, nvml: Any | None = None) -> None:
        self._nvml = nvml
        self._lock = threading.Lock()
        self._started = False
        self._handles: list[Any] = []
        self._errors = 0

    @property
    def available(self) -> bool:
        self._start()
        return bool(self._handles)

    def _start(self) -> None:
        """Initialise NVML once, on the first scrape (never at import)."""
        with self._lock:
            if self._started:
                return
            self._started = True
            nvml = self._nvml if self._nvml is not None else load_nvml()
            if nvml is None:
                log.debug("pynvml is not installed: no GPU metrics")
                return
            self._nvml = nvml
            try:
                nvml.nvmlInit()
                count = int(nvml.nvmlDeviceGetCount())
                self._handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
            except nvml.NVMLError as exc:  # no driver, no device: a CPU machine
                log.info("NVML unavailable (%s): no GPU metrics", exc)
                self._handles = []
                return
            log.info("NVML: %d GPU(s) reported", len(self._handles))

    def collect(self) -> Iterator[Metric]:
        self._start()
        if not self._handles:
            return
        nvml = self._nvml
        assert nvml is not None
        util = GaugeMetricFamily(
            "sluice_gpu_utilization_ratio",
            "Fraction of NVML's last sample period in which a kernel ran on the GPU.",
            labels=["gpu"],
        )
        used = GaugeMetricFamily(
            "sluice_gpu_memory_used_bytes", "GPU memory in use (all processes).", labels=["gpu"]
        )
        total = GaugeMetricFamily(
            "sluice_gpu_memory_total_bytes", "GPU memory installed.", labels=["gpu"]
        )
        for index, handle in enumerate(self._handles):
            try:
                rates = nvml.nvmlDeviceGetUtilizationRates(handle)
                memory = nvml.nvmlDeviceGetMemoryInfo(handle)
            except nvml.NVMLError as exc:  # a device that fell off the bus: counted, logged
                self._errors += 1
                log.warning("NVML: reading GPU %d failed: %s", index, exc)
                continue
            util.add_metric([str(index)], float(rates.gpu) / 100.0)
            used.add_metric([str(index)], float(memory.used))
            total.add_metric([str(index)], float(memory.total))
        errors = CounterMetricFamily(
            "sluice_gpu_read_errors", "NVML reads that failed.", value=self._errors
        )
        yield from (util, used, total, errors)
