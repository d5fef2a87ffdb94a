"""Helpers for the archive and replay tests: processes, the raw archive on MinIO, lag, metrics."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiokafka import AIOKafkaConsumer, TopicPartition

from pipeline.admin import describe_topics
from pipeline.config import Settings
from schemas.archive import ArchivedRecord, decode_object
from sluice.procs import StageProcess, stage_env
from tests.conftest import S3Endpoint
from tests.integration.kafka_io import group_lag
from tests.paths import REPO_ROOT

MODEL = REPO_ROOT / "models" / "demo" / "tokenizer"
PIPELINE = ("preprocess", "compute", "postprocess")


def s3_settings(endpoint: S3Endpoint, bucket: str, prefix: str = "log") -> dict[str, Any]:
    """Settings overrides that point the archive at ``s3://bucket/prefix`` on MinIO."""
    return {
        "archive_url": f"s3://{bucket}/{prefix}",
        "s3_endpoint_url": endpoint.endpoint_url,
        "s3_region": endpoint.region,
        "s3_access_key_id": endpoint.access_key,
        "s3_secret_access_key": endpoint.secret_key,
    }


def process_env(settings: Settings, **extra: str) -> dict[str, str]:
    """``stage_env`` plus the S3 secrets (stage_env writes SecretStr fields masked)."""
    env = stage_env(settings, **extra)
    for name in ("s3_access_key_id", "s3_secret_access_key"):
        secret = getattr(settings, name)
        if secret is not None:
            env[f"SLUICE_{name.upper()}"] = secret.get_secret_value()
    return env


class ArchiverProcess(StageProcess):
    """``python -m stages.archiver`` (``sluice run archiver`` once the CLI knows it)."""

    def start(self) -> ArchiverProcess:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "stages.archiver"],
                env=self.env,
                cwd=REPO_ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        return self


@dataclass
class Procs:
    """Processes a test starts; all stopped at its end."""

    folder: Path
    started: list[StageProcess] = field(default_factory=list)

    def stage(self, stage: str, settings: Settings, **env: str) -> StageProcess:
        log = self.folder / f"{stage}-{len(self.started)}.log"
        proc = StageProcess(stage, process_env(settings, **env), log).start()
        self.started.append(proc)
        return proc

    def archiver(self, settings: Settings, **env: str) -> ArchiverProcess:
        log = self.folder / f"archiver-{len(self.started)}.log"
        proc = ArchiverProcess("archiver", process_env(settings, **env), log).start()
        self.started.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in self.started:
            proc.stop()

    def assert_alive(self) -> None:
        for proc in self.started:
            assert proc.proc is not None and proc.proc.poll() is None, proc.log()


async def run_cli(settings: Settings, *args: str, within: float = 120) -> tuple[int, str]:
    """``python -m sluice.cli.replay ARGS`` configured like ``settings``: (exit code, output)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "sluice.cli.replay",
        *args,
        env=process_env(settings, COLUMNS="200"),
        cwd=REPO_ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), within)
    return proc.returncode or 0, out.decode(errors="replace")


async def wait_committed(
    settings: Settings, group: str, topics: list[str], within: float, proc: StageProcess | None
) -> dict[str, int]:
    """Wait until ``group`` has committed every partition of ``topics`` to its end; the lag."""
    deadline = time.monotonic() + within
    while True:
        lags = {}
        for topic in topics:
            parts = await group_lag(settings, group, topic)
            lags[topic] = sum(end - committed for committed, end in parts.values())
        if all(v == 0 for v in lags.values()):
            return lags
        if time.monotonic() > deadline:
            raise AssertionError(f"{group} lag {lags}\n{proc.log() if proc else ''}")
        await asyncio.sleep(0.5)


async def end_offsets(settings: Settings, topic: str) -> dict[int, int]:
    (info,) = await describe_topics(settings, [topic])
    return info.end_offsets


@dataclass
class RawArchive:
    """Every object under a bucket prefix, read with a plain S3 client (not Sluice's store)."""

    keys: list[str]
    records: dict[tuple[str, int], list[ArchivedRecord]]  # in object order, duplicates kept

    def offsets(self, topic: str, partition: int) -> list[int]:
        return [r.offset for r in self.records.get((topic, partition), [])]

    def duplicates(self) -> dict[tuple[str, int], list[int]]:
        out = {}
        for where, records in self.records.items():
            counts = Counter(r.offset for r in records)
            if dup := sorted(o for o, n in counts.items() if n > 1):
                out[where] = dup
        return out


_KEY_RE = re.compile(
    r"(?P<prefix>.+)/topics/(?P<topic>[^/]+)/partition=(?P<p>\d+)/"
    r"(?P=topic)\+(?P=p)\+(?P<start>\d{10})\.jsonl\.gz"
)


async def read_raw_archive(endpoint: S3Endpoint, bucket: str, prefix: str) -> RawArchive:
    keys: list[str] = []
    records: dict[tuple[str, int], list[ArchivedRecord]] = {}
    async with endpoint.client() as s3:
        paginator = s3.get_paginator("list_objects_v2")
        async for page in paginator.paginate(Bucket=bucket, Prefix=f"{prefix}/"):
            keys.extend(obj["Key"] for obj in page.get("Contents", []))
        keys.sort()
        for key in keys:
            match = _KEY_RE.fullmatch(key)
            assert match is not None, f"object {key} is not named in the Connect S3 layout"
            assert match["prefix"] == prefix
            response = await s3.get_object(Bucket=bucket, Key=key)
            async with response["Body"] as body:
                data = await body.read()
            topic, partition = match["topic"], int(match["p"])
            decoded = decode_object(data, topic, partition)
            assert decoded, f"{key} is empty"
            assert decoded[0].offset == int(match["start"]), f"{key} starts at {decoded[0].offset}"
            offsets = [r.offset for r in decoded]
            assert offsets == sorted(set(offsets)), f"{key} is not in offset order"
            records.setdefault((topic, partition), []).extend(decoded)
    return RawArchive(keys, records)


async def read_topic(settings: Settings, topic: str) -> dict[tuple[int, int], Any]:
    """Every record of a topic, by (partition, offset), read to the current end."""
    ends = await end_offsets(settings, topic)
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.bootstrap_servers, group_id=None)
    await consumer.start()
    out: dict[tuple[int, int], Any] = {}
    try:
        tps = [TopicPartition(topic, p) for p in ends]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        while len(out) < sum(ends.values()):
            batch = await consumer.getmany(timeout_ms=1000)
            assert batch or len(out) == sum(ends.values()), f"{topic}: only {len(out)} records"
            for tp, recs in batch.items():
                for rec in recs:
                    out[(tp.partition, rec.offset)] = rec
    finally:
        await consumer.stop()
    return out


async def http_get(port: int, path: str) -> tuple[int, str]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{port}{path}") as response,
    ):
        return response.status, await response.text()


def metric(text: str, name: str) -> float:
    """The sum of a metric's samples (every label set) in Prometheus text."""
    total = 0.0
    found = False
    for line in text.splitlines():
        if line.startswith(f"{name}{{") or line.startswith(f"{name} "):
            total += float(line.rsplit(" ", 1)[1])
            found = True
    assert found, f"metric {name} not exported"
    return total
