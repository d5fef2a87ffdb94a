"""A whole batch stack for the Batch API tests: three stages, gateways and batchers as processes.

Everything runs the way an operator starts it (``sluice run <stage>``, ``python -m
stages.gateway``), configured by ``stage_env``; files live in the folder or bucket the settings'
``archive_url`` names.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from infra.process import free_port
from pipeline.config import Settings
from sluice.procs import StageProcess, stage_env
from tests.paths import REPO_ROOT


@dataclass
class Gateway:
    base_url: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


@dataclass
class Stack:
    settings: Settings
    folder: Path
    stages: list[StageProcess] = field(default_factory=list)
    gateways: list[Gateway] = field(default_factory=list)
    batchers: list[StageProcess] = field(default_factory=list)

    def log(self) -> str:
        parts = [
            f"--- gateway\n{g.log_path.read_text(errors='replace')[-4000:]}" for g in self.gateways
        ]
        parts += [
            f"--- {s.stage} {s.log_path.name}\n{s.log()}" for s in self.stages + self.batchers
        ]
        return "\n".join(parts)

    def start_stages(
        self, names: tuple[str, ...] = ("preprocess", "compute", "postprocess")
    ) -> None:
        for name in names:
            path = self.folder / f"{name}.log"
            self.stages.append(StageProcess(name, stage_env(self.settings), path).start())

    def start_batcher(self, **env: str) -> StageProcess:
        path = self.folder / f"batcher-{len(self.batchers)}.log"
        batcher = StageProcess("batcher", stage_env(self.settings, **env), path).start()
        self.batchers.append(batcher)
        return batcher

    async def start_gateway(self, **env: str) -> Gateway:
        port = free_port()
        path = self.folder / f"gateway-{len(self.gateways)}.log"
        proc = _spawn_gateway(stage_env(self.settings, SLUICE_GATEWAY_PORT=str(port), **env), path)
        gateway = Gateway(f"http://127.0.0.1:{port}", proc, path)
        self.gateways.append(gateway)
        deadline = time.monotonic() + 60
        async with httpx.AsyncClient() as http:
            while time.monotonic() < deadline:
                if proc.poll() is not None:
                    pytest.fail(f"the gateway exited with {proc.returncode}:\n{self.log()}")
                try:
                    if (await http.get(f"{gateway.base_url}/readyz")).status_code == 200:
                        return gateway
                except httpx.TransportError:
                    pass
                await asyncio.sleep(0.2)
        pytest.fail(f"the gateway was not ready within 60s:\n{self.log()}")

    def stop(self) -> None:
        for gateway in self.gateways:
            gateway.stop()
        for proc in self.batchers + self.stages:
            proc.stop()


def _spawn_gateway(env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    with log_path.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "stages.gateway"],
            env=env,
            cwd=REPO_ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def jsonl(rows: list[dict[str, Any]]) -> bytes:
    return b"".join(orjson.dumps(r) + b"\n" for r in rows)


def chat_line(custom_id: str, content: str, **body: Any) -> dict[str, Any]:
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": "demo", "messages": [{"role": "user", "content": content}], **body},
    }


async def upload(http: httpx.AsyncClient, content: bytes, name: str = "input.jsonl") -> str:
    response = await http.post(
        "/v1/files", files={"file": (name, content)}, data={"purpose": "batch"}
    )
    assert response.status_code == 200, response.text
    file_id: str = response.json()["id"]
    return file_id


async def create_batch(http: httpx.AsyncClient, file_id: str) -> dict[str, Any]:
    response = await http.post(
        "/v1/batches",
        json={
            "input_file_id": file_id,
            "endpoint": "/v1/chat/completions",
            "completion_window": "24h",
        },
    )
    assert response.status_code == 200, response.text
    batch: dict[str, Any] = response.json()
    return batch


async def wait_batch(
    http: httpx.AsyncClient,
    batch_id: str,
    until: Callable[[dict[str, Any]], bool],
    stack: Stack,
    within: float = 90.0,
) -> dict[str, Any]:
    """Poll ``GET /v1/batches/{id}`` until ``until(batch)``; fail with the logs otherwise."""
    deadline = time.monotonic() + within
    batch: dict[str, Any] = {}
    while time.monotonic() < deadline:
        response = await http.get(f"/v1/batches/{batch_id}")
        if response.status_code == 200:
            batch = response.json()
            if until(batch):
                return batch
        await asyncio.sleep(0.2)
    pytest.fail(f"batch {batch_id} never got there; last seen {batch}\n{stack.log()}")


async def file_lines(http: httpx.AsyncClient, file_id: str | None) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    response = await http.get(f"/v1/files/{file_id}/content")
    assert response.status_code == 200, response.text
    return [orjson.loads(line) for line in response.content.splitlines() if line.strip()]
