"""What the local Kafka and MinIO launchers share: free ports, a started process's handle, stop."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path


class InfraError(RuntimeError):
    """A local service could not be fetched, started or stopped; the message says why."""


def cache_root() -> Path:
    """Where fetched jars and binaries live between runs (``$XDG_CACHE_HOME/sluice``)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "sluice"


def run_root() -> Path:
    """Where ``sluice up`` keeps the handles and data of running local services.

    ``SLUICE_RUN_DIR`` moves it (tests use that to run a second, private set of services).
    """
    override = os.environ.get("SLUICE_RUN_DIR")
    return Path(override) if override else cache_root() / "run"


def free_port(host: str = "127.0.0.1") -> int:
    """A port the kernel says is free now (a race with other processes stays possible)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def ensure_port_free(port: int, host: str = "127.0.0.1", what: str = "service") -> None:
    """Refuse a port something listens on; TIME_WAIT leftovers of a stopped server are fine
    (servers bind with SO_REUSEADDR, so must this check, or a restart on the same port fails)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            raise InfraError(
                f"cannot start {what}: port {host}:{port} is already taken ({exc.strerror}); "
                "stop whatever holds it or choose another port"
            ) from exc


def require_tool(name: str, hint: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise InfraError(f"'{name}' was not found on PATH: {hint}")
    return path


def log_tail(path: Path, lines: int = 60) -> str:
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return f"(no log at {path})"
    return "\n".join(text.splitlines()[-lines:])


@dataclass
class ServiceHandle:
    """A started local service: enough to find it again (from another process) and stop it."""

    name: str
    pid: int
    host: str
    port: int
    log_path: str
    data_dir: str
    extra_port: int = 0

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def alive(self) -> bool:
        return pid_alive(self.pid)

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, path: Path) -> ServiceHandle | None:
        if not path.exists():
            return None
        return cls(**json.loads(path.read_text()))


def pid_alive(pid: int) -> bool:
    child = _children.get(pid)
    if child is not None:
        if child.poll() is None:
            return True
        del _children[pid]
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of ours still answers kill(0): reap it if it is ours.
    with contextlib.suppress(ChildProcessError):
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    return True


# Children started by this process, kept so they are reaped (and Popen does not warn on GC).
_children: dict[int, subprocess.Popen[bytes]] = {}


def spawn(cmd: list[str], log_path: Path, env: dict[str, str] | None = None) -> int:
    """Start ``cmd`` in its own session (so it outlives the caller's process group), log to file."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env=env,
        )
    _children[proc.pid] = proc
    return proc.pid


def stop_pid(pid: int, timeout: float = 20.0) -> None:
    """SIGTERM the process group, wait, then SIGKILL what is left."""
    if not pid_alive(pid):
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
