"""Every command answers an expected failure with one ``error:`` line and a non-zero exit.

Nothing listens on 127.0.0.1:1, so each broker-facing command fails at once: no services are
needed. A listener that is not Kafka (it accepts and hangs up) stands in for a wrong address.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiokafka.errors import KafkaConnectionError
from typer.testing import CliRunner

from sluice.cli.lognoise import EXPECTED_AT_START
from sluice.cli.main import app

DEAD = "127.0.0.1:1"
NO_BROKER = (
    "error: cannot reach the Kafka broker at {}: is it running, and is "
    "SLUICE_BOOTSTRAP_SERVERS right? (sluice up starts a local one)"
)


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """No SLUICE_* from outside, no local broker from ``sluice up``; the CLI's log filters go
    away after each test."""
    for name in [n for n in os.environ if n.startswith("SLUICE_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("SLUICE_RUN_DIR", str(tmp_path / "run"))
    monkeypatch.chdir(tmp_path)
    saved = {name: logging.getLogger(name).filters[:] for name in EXPECTED_AT_START}
    yield
    for name, filters in saved.items():
        logging.getLogger(name).filters[:] = filters


def invoke(*args: str, env: dict[str, str] | None = None) -> tuple[int, list[str]]:
    result = CliRunner().invoke(
        app, list(args), env={"SLUICE_BOOTSTRAP_SERVERS": DEAD, **(env or {})}
    )
    assert not isinstance(result.exception, Exception) or isinstance(
        result.exception, SystemExit
    ), result.exception
    return result.exit_code, result.stderr.strip().splitlines()


@pytest.fixture
def prompts(tmp_path: Path) -> Path:
    path = tmp_path / "prompts.jsonl"
    path.write_text('"What is 2 + 3?"\n')
    return path


BROKER_COMMANDS = [
    ["send", "hi"],
    ["infer", "--file", "PROMPTS"],
    ["lag"],
    ["lag", "--json"],
    ["lag", "--serve", "--port", "0"],
    ["dashboard", "--port", "0"],
    ["topics", "create"],
    ["topics", "list"],
    ["replay", "dlq", "sluice.prompts.DLT"],
    ["replay", "prompts", "--unanswered", "--check-topic"],
    ["run", "preprocess"],
    ["run", "compute"],
    ["run", "postprocess"],
    ["run", "archiver"],
    ["run", "gateway"],
    ["scale", "--max-workers", "1"],
]


@pytest.mark.parametrize("args", BROKER_COMMANDS, ids=" ".join)
def test_no_broker_is_one_line(args: list[str], prompts: Path) -> None:
    code, lines = invoke(*[str(prompts) if a == "PROMPTS" else a for a in args])
    assert code == 3
    assert lines == [NO_BROKER.format(DEAD)]


@pytest.fixture
def not_kafka() -> Iterator[str]:
    """A TCP listener that hangs up on every connection: a wrong address, not a dead one."""
    server = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        server.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield f"127.0.0.1:{server.getsockname()[1]}"
    stop.set()
    thread.join(5)
    server.close()


@pytest.mark.parametrize(
    "args", [["send", "hi"], ["topics", "list"], ["run", "gateway"]], ids=" ".join
)
def test_a_wrong_address_is_one_line(args: list[str], not_kafka: str) -> None:
    code, lines = invoke(*args, env={"SLUICE_BOOTSTRAP_SERVERS": not_kafka})
    assert code == 3
    assert lines == [NO_BROKER.format(not_kafka)]


@pytest.mark.parametrize(
    ("address", "says"),
    [
        ("127.0.0.1:notaport", "'127.0.0.1:notaport' is not HOST:PORT"),
        ("127.0.0.1:9092,:9093", "':9093' names no host"),
    ],
)
def test_a_malformed_address_is_a_setting_error(address: str, says: str) -> None:
    code, lines = invoke("topics", "list", env={"SLUICE_BOOTSTRAP_SERVERS": address})
    assert code == 2
    assert len(lines) == 1 and lines[0].startswith("error: SLUICE_BOOTSTRAP_SERVERS: ")
    assert says in lines[0]


def test_bad_settings_name_their_variables() -> None:
    code, lines = invoke("send", "hi", env={"SLUICE_PARTITIONS": "many", "SLUICE_ENGINE": "gpt"})
    assert code == 2
    assert len(lines) == 1
    assert lines[0].startswith("error: invalid setting: SLUICE_PARTITIONS: Input should be")
    assert "SLUICE_ENGINE: Input should be 'echo' or 'onnx'" in lines[0]


def test_a_missing_tls_file_is_named() -> None:
    env = {"SLUICE_SECURITY_PROTOCOL": "SSL", "SLUICE_SSL_CAFILE": "/no/such/ca.pem"}
    assert invoke("topics", "list", env=env) == (
        2,
        ["error: SLUICE_SSL_CAFILE: no file at /no/such/ca.pem"],
    )


def test_a_missing_model_stops_the_demo_before_it_starts_anything(tmp_path: Path) -> None:
    code, lines = invoke("demo", env={"SLUICE_MODEL_PATH": str(tmp_path / "nothing")})
    assert code == 3
    assert len(lines) == 1
    assert lines[0].startswith(f"error: model folder {tmp_path / 'nothing'} lacks tokenizer.json")
    assert not (tmp_path / "run").exists()  # no broker was started


def test_a_missing_or_bad_prompts_file(tmp_path: Path) -> None:
    missing = tmp_path / "missing.jsonl"
    assert invoke("infer", "--file", str(missing)) == (
        3,
        [f"error: No such file or directory: {missing}"],
    )
    bad = tmp_path / "bad.jsonl"
    bad.write_text('"fine"\n{not json\n')
    code, lines = invoke("infer", "--file", str(bad))
    assert code == 2
    assert len(lines) == 1 and lines[0].startswith(f"error: {bad}:2: not JSON")


def test_a_missing_model_source_for_model_build(tmp_path: Path) -> None:
    code, lines = invoke(
        "model", "build", "--from", str(tmp_path / "hf"), "--out", str(tmp_path / "out"),
        "--precision", "int8", "--device", "cpu",
    )  # fmt: skip
    assert code == 1
    assert lines == [
        f"error: {tmp_path / 'hf'} is not a folder (expected a Hugging Face model folder)"
    ]


def test_restore_from_an_empty_archive(tmp_path: Path) -> None:
    code, lines = invoke("restore", "--conversation", "c-1", "--restore-from", str(tmp_path / "a"))
    assert code == 2
    assert lines == [f"error: no turns of conversation 'c-1' in file://{tmp_path / 'a'}"]


def test_verbose_keeps_the_traceback() -> None:
    result = CliRunner().invoke(
        app, ["--verbose", "send", "hi"], env={"SLUICE_BOOTSTRAP_SERVERS": DEAD}
    )
    assert result.exit_code != 0
    assert isinstance(result.exception, KafkaConnectionError)


def test_an_unknown_stage_is_refused_before_anything_connects() -> None:
    code, lines = invoke("run", "preprocessing")
    assert code == 2
    assert lines == [
        "error: unknown stage 'preprocessing'; one of: preprocess, compute, postprocess, "
        "archiver, gateway, batcher"
    ]
