"""Which execution provider a built model asks for, and whether this installation has it.

A model folder's ``genai_config.json`` names its provider under
``model.decoder.session_options.provider_options`` (``[{"cuda": {...}}]`` for a CUDA build; an
empty list for CPU). onnxruntime-genai comes in two packages that provide the same module:
``onnxruntime-genai`` (CPU, the ``cpu`` extra) and ``onnxruntime-genai-cuda`` (the ``cuda``
extra, over ``onnxruntime-gpu``). Without this check a CUDA model on a CPU-only install fails
deep inside ``og.Model`` with a message that names neither the package nor the fix.

:func:`check_providers` is called once when the engine loads: it returns a report the engine
logs ("model wants cuda; runs on CUDAExecutionProvider; onnxruntime-genai-cuda 0.18.0") or
raises :class:`EngineSetupError` saying what to install.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from pipeline.errors import FatalError

log = logging.getLogger(__name__)

# genai_config.json provider names -> onnxruntime execution provider names
ORT_PROVIDER = {
    "cuda": "CUDAExecutionProvider",
    "dml": "DmlExecutionProvider",
    "rocm": "ROCMExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "qnn": "QNNExecutionProvider",
    "webgpu": "WebGpuExecutionProvider",
    "nvtensorrtrtx": "NvTensorRTRTXExecutionProvider",
}
CPU = "CPUExecutionProvider"
GENAI_PACKAGES = ("onnxruntime-genai", "onnxruntime-genai-cuda")
ORT_PACKAGES = ("onnxruntime", "onnxruntime-gpu")
INSTALL_HINT = "pip install 'sluice-llm[cpu]' (CPU) or 'sluice-llm[cuda]' (NVIDIA GPU)"


class EngineSetupError(FatalError):
    """The installed engine cannot run this model (missing package or provider)."""

    reason = "engine-setup"


@dataclass(frozen=True)
class ProviderReport:
    wanted: tuple[str, ...]  # the model's providers, genai names ("cuda"); empty: CPU
    available: tuple[str, ...]  # onnxruntime.get_available_providers()
    packages: dict[str, str]  # installed engine packages -> version

    @property
    def runs_on(self) -> str:
        """The onnxruntime provider the model runs on."""
        return ORT_PROVIDER.get(self.wanted[0].lower(), self.wanted[0]) if self.wanted else CPU

    def describe(self) -> str:
        wanted = ", ".join(self.wanted) or "cpu"
        installed = ", ".join(f"{name} {v}" for name, v in sorted(self.packages.items()))
        return f"model wants {wanted}; runs on {self.runs_on}; installed: {installed or 'none'}"


def wanted_providers(model_path: Path) -> tuple[str, ...]:
    """The providers a built model folder asks for, in its order; empty for CPU."""
    path = model_path / "genai_config.json"
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise EngineSetupError(
            f"{model_path} has no genai_config.json: not a model folder"
        ) from exc
    except (OSError, ValueError) as exc:
        raise EngineSetupError(f"cannot read {path}: {exc}") from exc
    options = (
        config.get("model", {})
        .get("decoder", {})
        .get("session_options", {})
        .get("provider_options", [])
    )
    if not isinstance(options, list):
        raise EngineSetupError(f"{path}: provider_options is not a list")
    return tuple(name for entry in options if isinstance(entry, dict) for name in entry)


def installed_versions(names: Sequence[str]) -> dict[str, str]:
    """The installed distributions among ``names`` and their versions."""
    found = {}
    for name in names:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def _ort_providers() -> tuple[str, ...]:
    import onnxruntime

    return tuple(onnxruntime.get_available_providers())


def check_providers(
    model_path: Path,
    *,
    available: Callable[[], Sequence[str]] = _ort_providers,
    versions: Callable[[Sequence[str]], dict[str, str]] = installed_versions,
) -> ProviderReport:
    """The provider report for ``model_path``, or EngineSetupError saying what to install."""
    wanted = wanted_providers(model_path)
    genai = versions(GENAI_PACKAGES)
    ort = versions(ORT_PACKAGES)
    if not genai:
        raise EngineSetupError(f"no ONNX Runtime GenAI engine is installed: {INSTALL_HINT}")
    clashes = [
        f"{' and '.join(sorted(both))} are both installed and provide the same module; keep "
        f"one (pip uninstall the other, then reinstall it: {INSTALL_HINT})"
        for both in (genai, ort)
        if len(both) > 1
    ]
    try:
        providers = tuple(available())
    except ImportError as exc:
        raise EngineSetupError(f"onnxruntime cannot be imported ({exc}): {INSTALL_HINT}") from exc
    report = ProviderReport(wanted, providers, {**genai, **ort})
    if clashes:
        # Two packages of one module: whichever import wins decides. Refused when it lacks the
        # provider the model needs; said loudly when it has it (a path ahead of the other, as
        # on a host whose GPU packages sit on PYTHONPATH, works as long as it stays so).
        if report.runs_on not in providers:
            raise EngineSetupError(clashes[0])
        for clash in clashes:
            log.warning("%s; the imported one offers %s, so the model runs", clash, report.runs_on)
    if report.runs_on not in providers:
        need = "sluice-llm[cuda]" if report.runs_on == ORT_PROVIDER["cuda"] else "a build with it"
        raise EngineSetupError(
            f"{model_path} is built for {', '.join(wanted)} ({report.runs_on}), but this "
            f"installation offers only {', '.join(providers) or 'no providers'} "
            f"({', '.join(f'{k} {v}' for k, v in sorted(report.packages.items()))}): "
            f"install {need}, or use a model built for CPU"
        )
    return report
