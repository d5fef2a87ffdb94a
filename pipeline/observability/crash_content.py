"""What goes into a crash report, and where it is kept.

Pure pieces the process's ``CrashReporter`` (``pipeline.observability.crash``) and the
supervisor's death reports (``sluice scale``) share: the report's common fields
(``new_report``), in-flight request features and their sanitising (ids, token counts, sampling
numbers, batch, deadline: never text), thread stacks, the error and its cause, and
``save_report``: an atomic JSON file under ``<state_dir>/crash/`` plus a copy in the archive's
object store under ``crash/``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import orjson

from pipeline.config import Settings
from pipeline.errors import SluiceError
from pipeline.observability import vitals

log = logging.getLogger(__name__)

REPORT_FORMAT = "sluice.crash/1"

# What an in-flight entry may carry. Anything else is dropped, so no prompt or answer text can
# reach a report even if a source hands it over by mistake.
FEATURE_KEYS = frozenset(
    {
        "request_id",
        "conversation_id",
        "state",
        "prompt_tokens",
        "output_tokens",
        "sampling",
        "batch",
        "deadline_ms",
        "age_s",
        "topic",
        "partition",
        "offset",
        "lane",
    }
)
_NUMERIC_SAMPLING = ("temperature", "top_p", "top_k", "seed", "max_tokens")
MAX_FRAMES = 40


def crash_dir(settings: Settings) -> Path:
    return settings.state_dir / "crash"


def hard_crash_file(directory: Path, stage: str, pid: int) -> Path:
    return directory / f"hard-{stage}-{pid}.txt"


def request_features(
    request_id: str,
    *,
    prompt_tokens: int,
    output_tokens: int | None = None,
    sampling: Mapping[str, Any] | None = None,
    state: str | None = None,
    batch: int | str | None = None,
    deadline_ms: int | None = None,
    age_s: float | None = None,
) -> dict[str, Any]:
    """One in-flight request as an in-flight source should describe it (no text)."""
    return {
        "request_id": request_id,
        "prompt_tokens": prompt_tokens,
        "output_tokens": output_tokens,
        "sampling": dict(sampling or {}),
        "state": state,
        "batch": batch,
        "deadline_ms": deadline_ms,
        "age_s": age_s,
    }


def sanitize_features(entry: Mapping[str, Any]) -> dict[str, Any]:
    """Keep only the known feature keys; sampling keeps numbers, and of ``stop`` (client text)
    only how many strings there are."""
    out: dict[str, Any] = {}
    for key, value in entry.items():
        if key not in FEATURE_KEYS:
            continue
        if key == "sampling" and isinstance(value, Mapping):
            sampling: dict[str, Any] = {
                k: value[k]
                for k in _NUMERIC_SAMPLING
                if k in value and (value[k] is None or isinstance(value[k], int | float))
            }
            stop = value.get("stop")
            if stop:
                sampling["stop_strings"] = len(stop) if isinstance(stop, list | tuple) else 1
            out[key] = sampling
        elif value is None or isinstance(value, int | float | str | bool):
            out[key] = value
    return out


def summarize_inflight(entries: list[dict[str, Any]]) -> dict[str, Any]:
    """Batch composition: how many requests in which state, and their token totals."""
    states: dict[str, int] = {}
    for entry in entries:
        state = str(entry.get("state") or "in-flight")
        states[state] = states.get(state, 0) + 1
    return {
        "requests": len(entries),
        "by_state": states,
        "batches": len({e["batch"] for e in entries if e.get("batch") is not None}),
        "prompt_tokens": sum(int(e.get("prompt_tokens") or 0) for e in entries),
        "output_tokens": sum(int(e.get("output_tokens") or 0) for e in entries),
    }


def thread_stacks() -> list[dict[str, Any]]:
    """Every Python thread's stack, innermost frame last."""
    names = {t.ident: t for t in threading.enumerate()}
    out = []
    for ident, frame in sys._current_frames().items():
        thread = names.get(ident)
        lines = "".join(traceback.format_stack(frame)[-MAX_FRAMES:]).rstrip("\n").splitlines()
        out.append(
            {
                "name": thread.name if thread else f"thread-{ident}",
                "ident": ident,
                "daemon": thread.daemon if thread else None,
                "stack": lines,
            }
        )
    return out


def asyncio_tasks() -> list[dict[str, Any]]:
    """The tasks of the event loop running in this thread (none outside one)."""
    try:
        tasks = asyncio.all_tasks()
    except RuntimeError:
        return []
    out = []
    for task in tasks:
        frames = task.get_stack(limit=1)
        where = (
            f"{frames[-1].f_code.co_filename}:{frames[-1].f_lineno} {frames[-1].f_code.co_name}"
            if frames
            else None
        )
        out.append({"name": task.get_name(), "where": where})
    return sorted(out, key=lambda t: t["name"])


def describe_error(exc: BaseException | None) -> dict[str, Any] | None:
    if exc is None:
        return None
    return {
        "type": f"{type(exc).__module__}.{type(exc).__qualname__}",
        "message": str(exc),
        "reason": getattr(exc, "reason", None),
        "traceback": "".join(traceback.format_exception(exc)).rstrip("\n").splitlines(),
    }


def error_chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    node: BaseException | None = exc
    while node is not None and not any(node is s for s in seen):
        seen.append(node)
        node = node.__cause__ or node.__context__
    return seen


def cause_of(exc: BaseException) -> str:
    """The short cause a report is grouped by, from the error and what caused it."""
    chain = error_chain(exc)
    reasons = {getattr(e, "reason", None) for e in chain}
    if any(isinstance(e, MemoryError) for e in chain) or "engine-oom" in reasons:
        return "out-of-memory"
    if "engine-stall" in reasons:
        return "engine-stall"
    if reasons & {"engine-death", "engine-died", "engine-dead"}:
        return "engine-death"
    if isinstance(exc, SluiceError) and exc.fatal:
        return "fatal-error"
    return "unhandled-exception"


def new_report(
    settings: Settings,
    stage: str,
    cause: str,
    *,
    pid: int,
    written_by: str,
    started_at: float | None,
) -> dict[str, Any]:
    """The fields every report has, whoever writes it (the process or the supervisor)."""
    now = time.time()
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))
    return {
        "format": REPORT_FORMAT,
        "id": f"{stamp}-{stage}-{pid}-{uuid.uuid4().hex[:6]}",
        "cause": cause,
        "stage": stage,
        "pid": pid,
        "host": socket.gethostname(),
        "written_by": written_by,
        "time": now,
        "started_at": started_at,
        "uptime_s": round(now - started_at, 3) if started_at else None,
        "versions": vitals.versions(),
        "settings": vitals.settings_digest(settings),
    }


def save_report(settings: Settings, report: Mapping[str, Any]) -> Path:
    """Write atomically to ``<state_dir>/crash/<id>.json`` and copy to the archive's store.

    Raises OSError when the local file cannot be written; a failed copy is only logged."""
    directory = crash_dir(settings)
    directory.mkdir(parents=True, exist_ok=True)
    data = orjson.dumps(report, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY)
    path = directory / f"{report['id']}.json"
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    if settings.crash_copy_to_archive:
        copy_to_store(settings, f"crash/{path.name}", data)
    return path


def copy_to_store(settings: Settings, key: str, data: bytes, timeout_s: float = 15.0) -> bool:
    """Put one object in the archive's store from a thread of its own (the caller may be inside
    a running event loop, or dying); False, logged, when it fails or takes too long."""
    from pipeline.storage import open_store

    outcome: list[BaseException | None] = []

    async def put() -> None:
        store = open_store(settings)
        try:
            await store.put(key, data)
        finally:
            await store.close()

    def run() -> None:
        try:
            asyncio.run(put())
        except Exception as exc:  # noqa: BLE001 - handed to the caller's thread, logged there
            outcome.append(exc)
        else:
            outcome.append(None)

    thread = threading.Thread(target=run, name="crash_copy", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if not outcome:
        log.warning("crash report %s: copy to the archive timed out after %.0fs", key, timeout_s)
        return False
    if outcome[0] is not None:
        log.warning("crash report %s: copy to the archive failed: %s", key, outcome[0])
        return False
    log.info("crash report copied to the archive as %s", key)
    return True
