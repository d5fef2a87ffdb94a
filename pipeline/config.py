"""One settings model for every Sluice process, read from ``SLUICE_*`` at start-up.

Nothing here reads the environment at import time: call :func:`load_settings` once in ``main``
and pass the result down.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# The folder that holds Sluice's packages: the checkout, or site-packages after `pip install`.
# The demo model ships beside them as package data of `models.demo`.
PACKAGE_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = PACKAGE_ROOT / "models" / "demo" / "cpu-int8"

SecurityProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
SaslMechanism = Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"]


@dataclass(frozen=True)
class Topics:
    """The topic names of DESIGN.md under one prefix, and their dead-letter twins."""

    prefix: str = "sluice."

    @property
    def prompts(self) -> str:
        return f"{self.prefix}prompts"

    @property
    def tokenized(self) -> str:
        return f"{self.prefix}tokenized"

    @property
    def generated(self) -> str:
        return f"{self.prefix}generated"

    @property
    def answers(self) -> str:
        return f"{self.prefix}answers"

    @staticmethod
    def dlt(topic: str) -> str:
        return f"{topic}.DLT"

    def main_topics(self) -> list[str]:
        return [self.prompts, self.tokenized, self.generated, self.answers]

    def all_topics(self) -> list[str]:
        """Every topic Sluice uses: the four of the flow and a ``.DLT`` for each."""
        return [t for topic in self.main_topics() for t in (topic, self.dlt(topic))]


class Settings(BaseSettings):
    """Everything a Sluice process is configured by. Env: ``SLUICE_<FIELD>`` (upper case)."""

    model_config = SettingsConfigDict(
        env_prefix="SLUICE_", env_file=None, extra="ignore", validate_default=True
    )

    # Kafka connection and security
    bootstrap_servers: str = "127.0.0.1:9092"
    security_protocol: SecurityProtocol = "PLAINTEXT"
    sasl_mechanism: SaslMechanism | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    ssl_cafile: Path | None = None
    ssl_certfile: Path | None = None
    ssl_keyfile: Path | None = None
    ssl_key_password: SecretStr | None = None
    client_id: str = "sluice"

    # Topics
    topic_prefix: str = "sluice."
    group_suffix: str = Field(
        default="",
        pattern=r"^[A-Za-z0-9_.-]*$",
        description="Blue/green: appended to every consumer group (sluice-compute-green), so two "
        "deployments of the stages read the same topics as separate groups; sluice cutover "
        "moves the committed offsets between them.",
    )
    partitions: int = Field(default=6, ge=1)
    replication_factor: int = Field(default=1, ge=1)

    # Conversation log (object storage)
    archive_url: str = "file://.sluice/archive"
    s3_endpoint_url: str | None = None
    s3_region: str = "us-east-1"
    s3_access_key_id: SecretStr | None = None
    s3_secret_access_key: SecretStr | None = None

    # Archiver: an object is written when any of these is reached
    archive_max_records: int = Field(default=1000, ge=1)
    archive_max_bytes: int = Field(default=16 * 1024 * 1024, ge=1024)
    archive_max_age_s: float = Field(default=30.0, gt=0)

    # Producer client and HTTP gateway
    request_timeout_s: float = Field(default=120.0, gt=0)
    gateway_host: str = "127.0.0.1"
    gateway_port: int = Field(default=8000, ge=0, le=65535)
    gateway_api_key: SecretStr | None = None
    gateway_max_body_bytes: int = Field(default=1024 * 1024, ge=1024)

    # Model and local state
    model_path: Path = DEFAULT_MODEL
    state_dir: Path = Path(".sluice")

    # Stage runtime
    batch_max_records: int = Field(default=256, ge=1)
    batch_max_wait_ms: int = Field(default=20, ge=0)
    max_in_flight: int = Field(default=2048, ge=1)
    handler_retries: int = Field(default=2, ge=0)
    retry_backoff_ms: int = Field(default=100, ge=0)
    breaker_failure_threshold: int = Field(default=5, ge=1)
    breaker_cooldown_s: float = Field(default=10.0, gt=0)
    response_cache_size: int = Field(default=1024, ge=0)
    shutdown_deadline_s: float = Field(default=20.0, gt=0)
    stall_after_s: float = Field(default=60.0, gt=0)
    # Exactly-once (Kafka transactions, read_committed) for preprocess/postprocess. aiokafka
    # sends no KIP-447 group metadata, so a rebalance inside a transaction is not fenced: run
    # each process with its own stable instance_id (the transactional id is group + instance),
    # so a restarted process fences its predecessor and aborts its open transaction.
    exactly_once: bool = False
    instance_id: str = "0"
    transaction_timeout_ms: int = Field(default=15_000, ge=1000)
    max_prompt_bytes: int = Field(default=256 * 1024, ge=1024)
    http_host: str = "127.0.0.1"
    http_port: int = Field(default=0, ge=0, le=65535)

    # Compute engine: "onnx" (ONNX Runtime GenAI) or "echo" (a deterministic stand-in)
    engine: Literal["echo", "onnx"] = "onnx"
    engine_max_batch: int = Field(default=0, ge=0)  # 0: the engine's own capacity
    engine_token_budget: int = Field(default=0, ge=0)  # prompt+max new tokens in flight; 0: none
    engine_threads: int = Field(default=0, ge=0)  # 0: onnxruntime's default
    engine_stall_s: float = Field(default=30.0, gt=0)
    engine_mode: Literal["auto", "engine", "generator"] = "auto"
    echo_delay_ms: float = Field(default=0.0, ge=0)
    echo_fault_file: Path | None = None  # while this file exists, every generation fails

    @model_validator(mode="after")
    def _check_security(self) -> Settings:
        if self.security_protocol.startswith("SASL"):
            if self.sasl_mechanism is None:
                raise ValueError(f"security_protocol={self.security_protocol} needs sasl_mechanism")
            if not self.sasl_username or self.sasl_password is None:
                raise ValueError("SASL needs sasl_username and sasl_password")
        if (self.ssl_certfile is None) != (self.ssl_keyfile is None):
            raise ValueError("ssl_certfile and ssl_keyfile go together (client TLS certificate)")
        return self

    @property
    def topics(self) -> Topics:
        return Topics(self.topic_prefix)

    def group_id(self, stage: str) -> str:
        """A stage's consumer group: ``sluice-preprocess`` under the default prefix, plus
        ``-<group_suffix>`` when one is set (``sluice-preprocess-green``)."""
        base = f"{self.topic_prefix.rstrip('.')}-{stage}"
        return f"{base}-{self.group_suffix}" if self.group_suffix else base

    def kafka_common(self) -> dict[str, Any]:
        """Connection keyword arguments shared by aiokafka producers, consumers and admins."""
        kwargs: dict[str, Any] = {
            "bootstrap_servers": self.bootstrap_servers,
            "security_protocol": self.security_protocol,
            "client_id": self.client_id,
        }
        if self.security_protocol in ("SSL", "SASL_SSL"):
            kwargs["ssl_context"] = self.ssl_context()
        if self.security_protocol.startswith("SASL"):
            assert self.sasl_password is not None  # checked by the validator
            kwargs["sasl_mechanism"] = self.sasl_mechanism
            kwargs["sasl_plain_username"] = self.sasl_username
            kwargs["sasl_plain_password"] = self.sasl_password.get_secret_value()
        return kwargs

    def ssl_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.ssl_cafile) if self.ssl_cafile else None)
        if self.ssl_certfile and self.ssl_keyfile:
            password = self.ssl_key_password.get_secret_value() if self.ssl_key_password else None
            ctx.load_cert_chain(str(self.ssl_certfile), str(self.ssl_keyfile), password)
        return ctx


def load_settings(**overrides: Any) -> Settings:
    """Build the settings once: environment, then explicit overrides (e.g. from CLI flags)."""
    return Settings(**overrides)
