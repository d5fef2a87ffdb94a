"""One settings model for every Sluice process, read from ``SLUICE_*`` at start-up.

Nothing here reads the environment at import time: call :func:`load_settings` once in ``main``
and pass the result down.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal, NamedTuple

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
    """The topic names of the flow under one prefix, and their dead-letter twins."""

    prefix: str = "sluice."

    @property
    def prompts(self) -> str:
        return f"{self.prefix}prompts"

    @property
    def tokenized(self) -> str:
        return f"{self.prefix}tokenized"

    @property
    def prompts_batch(self) -> str:
        """The batch lane's prompts: what the batcher publishes (``SLUICE_BATCH_LANE=batch``)."""
        return f"{self.prefix}prompts.batch"

    @property
    def tokenized_batch(self) -> str:
        """The batch lane's tokenized requests: compute reads them into spare capacity only."""
        return f"{self.prefix}tokenized.batch"

    @property
    def generated(self) -> str:
        return f"{self.prefix}generated"

    @property
    def answers(self) -> str:
        return f"{self.prefix}answers"

    @property
    def replies(self) -> str:
        """Reply partitions: each asker's text deltas and answer copies (``sluice-reply-to``)."""
        return f"{self.prefix}replies"

    @property
    def control(self) -> str:
        """Cancels by request id, read by every compute worker."""
        return f"{self.prefix}control"

    @property
    def batches(self) -> str:
        """Batch job state, compacted: each batch's latest ``BatchObject`` and its cancel."""
        return f"{self.prefix}batches"

    @staticmethod
    def dlt(topic: str) -> str:
        return f"{topic}.DLT"

    def main_topics(self) -> list[str]:
        """The flow's topics, each with a ``.DLT`` twin: the interactive lane's four, then the
        batch lane's two."""
        return [
            self.prompts,
            self.tokenized,
            self.generated,
            self.answers,
            self.prompts_batch,
            self.tokenized_batch,
        ]

    def edge_topics(self) -> list[str]:
        """The replies and control topics: short-lived traffic, no ``.DLT`` twins."""
        return [self.replies, self.control]

    def state_topics(self) -> list[str]:
        """Compacted state (``cleanup.policy=compact``), no ``.DLT`` twin: the batches topic."""
        return [self.batches]

    def all_topics(self) -> list[str]:
        """Every topic Sluice uses: the flow's (both lanes) with a ``.DLT`` each, then replies
        and control, then the batches topic."""
        flow = [t for topic in self.main_topics() for t in (topic, self.dlt(topic))]
        return [*flow, *self.edge_topics(), *self.state_topics()]


class Settings(BaseSettings):
    """Everything a Sluice process is configured by. Env: ``SLUICE_<FIELD>`` (upper case).

    Frozen: built once at start-up and passed down; derive a variant with
    ``settings.model_copy(update={...})``. ``docs/CONFIGURATION.md`` is generated from the
    descriptions below (``make config-docs``), grouped as in ``GROUPS``.
    """

    model_config = SettingsConfigDict(
        env_prefix="SLUICE_", env_file=None, extra="ignore", validate_default=True, frozen=True
    )

    # Kafka connection and security
    bootstrap_servers: str = Field(
        default="127.0.0.1:9092",
        description="Kafka brokers to bootstrap from, comma-separated `host:port`. When it is "
        "not set, the `sluice` command uses the broker `sluice up` started, if one runs.",
    )
    security_protocol: SecurityProtocol = Field(
        default="PLAINTEXT",
        description="How every Kafka client talks to the brokers.",
    )
    sasl_mechanism: SaslMechanism | None = Field(
        default=None,
        description="SASL mechanism. Required with a `SASL_*` protocol.",
    )
    sasl_username: str | None = Field(
        default=None, description="SASL user name. Required with a `SASL_*` protocol."
    )
    sasl_password: SecretStr | None = Field(
        default=None, description="SASL password. Required with a `SASL_*` protocol."
    )
    ssl_cafile: Path | None = Field(
        default=None,
        description="CA bundle that verifies the brokers' certificates (`SSL`, `SASL_SSL`); "
        "the system's default CAs when unset.",
    )
    ssl_certfile: Path | None = Field(
        default=None,
        description="Client certificate for mutual TLS. Set together with `SLUICE_SSL_KEYFILE`.",
    )
    ssl_keyfile: Path | None = Field(
        default=None,
        description="Private key of the client certificate. Set together with "
        "`SLUICE_SSL_CERTFILE`.",
    )
    ssl_key_password: SecretStr | None = Field(
        default=None, description="Password of `SLUICE_SSL_KEYFILE`, when the key is encrypted."
    )
    client_id: str = Field(
        default="sluice",
        description="Client id every Kafka producer, consumer and admin client sends to the "
        "brokers (it shows in broker logs and quotas).",
    )

    # Topics
    topic_prefix: str = Field(
        default="sluice.",
        description="Prefix of every topic name (`<prefix>prompts`, `<prefix>tokenized`, "
        "`<prefix>generated`, `<prefix>answers`, each with a `.DLT` twin) and, without its "
        "trailing dot, of every consumer group (`sluice-preprocess`, …).",
    )
    group_suffix: str = Field(
        default="",
        pattern=r"^[A-Za-z0-9_.-]*$",
        description="Blue/green: appended to every consumer group (sluice-compute-green), so two "
        "deployments of the stages read the same topics as separate groups; sluice cutover "
        "moves the committed offsets between them.",
    )
    partitions: int = Field(
        default=6,
        ge=1,
        description="Partitions of each topic `sluice topics create` makes. A stage can use at "
        "most this many workers.",
    )
    replication_factor: int = Field(
        default=1,
        ge=1,
        description="Replication factor of the topics `sluice topics create` makes.",
    )
    replies_topic_partitions: int = Field(
        default=0,
        ge=0,
        description="Partitions of the replies topic (`<prefix>replies`: each asker's text "
        "deltas and answer copies); 0: `SLUICE_PARTITIONS`. Askers (gateway replicas, "
        "clients) with different reply partitions read nothing of each other's traffic.",
    )
    control_topic_partitions: int = Field(
        default=1,
        ge=1,
        description="Partitions of the control topic (`<prefix>control`: cancels by request "
        "id, read by every compute worker).",
    )
    edge_retention_ms: int = Field(
        default=3_600_000,
        ge=60_000,
        description="Retention of the replies and control topics: deltas, answer copies and "
        "cancels matter only while their request is alive (the answers topic keeps every "
        "answer).",
    )

    # Conversation log (object storage)
    archive_url: str = Field(
        default="file://.sluice/archive",
        description="Where the archiver stores the conversation log and replay reads it: "
        "`file://DIR` or a plain path (a relative one starts at the current folder), or "
        "`s3://BUCKET/PREFIX`.",
    )
    s3_endpoint_url: str | None = Field(
        default=None,
        description="S3 endpoint for an `s3://` archive (e.g. MinIO's URL); AWS's when unset.",
    )
    s3_region: str = Field(default="us-east-1", description="S3 region for an `s3://` archive.")
    s3_access_key_id: SecretStr | None = Field(
        default=None,
        description="S3 access key id. Without the key pair, boto's own credential chain is "
        "used (environment, profile, instance role).",
    )
    s3_secret_access_key: SecretStr | None = Field(
        default=None, description="S3 secret access key, paired with `SLUICE_S3_ACCESS_KEY_ID`."
    )

    # Archiver
    archive_max_records: int = Field(
        default=1000,
        ge=1,
        description="Records at which the archiver seals a partition's open chunk into one object.",
    )
    archive_max_bytes: int = Field(
        default=16 * 1024 * 1024,
        ge=1024,
        description="Bytes of JSON lines (counted before gzip) at which the archiver seals a "
        "chunk.",
    )
    archive_max_age_s: float = Field(
        default=30.0,
        gt=0,
        description="Age (from its first record) at which the archiver seals a chunk.",
    )

    # Producer client and HTTP gateway
    request_timeout_s: float = Field(
        default=120.0,
        gt=0,
        description="How long the producer client (so also the gateway, `sluice send` and "
        "`sluice infer`) waits for a request's answer; then the request is answered with a "
        "`timeout` error (HTTP 504 at the gateway).",
    )
    reply_partitions: str = Field(
        default="",
        pattern=r"^\s*([0-9]+\s*(,\s*[0-9]+\s*)*)?$",
        description="The partitions of the replies topic this client or gateway replica reads "
        "its answers and deltas from, and names in every prompt's `sluice-reply-to`: `3` or "
        "`3,4`. Empty: `SLUICE_INSTANCE_ID` (a number, else its hash) modulo the topic's "
        "partition count. Askers that share a partition still get only their own answers, "
        "each reading the other's traffic too.",
    )
    publish_backoff_max_s: float = Field(
        default=5.0,
        gt=0,
        description="Longest wait between two attempts to publish a prompt while the broker "
        "is unreachable; attempts go on until the request's own deadline.",
    )
    gateway_host: str = Field(default="127.0.0.1", description="Address the gateway listens on.")
    gateway_port: int = Field(
        default=8000, ge=0, le=65535, description="Port the gateway listens on."
    )
    gateway_api_key: SecretStr | None = Field(
        default=None,
        description="When set, the gateway requires `Authorization: Bearer <key>` and answers "
        "401 without it.",
    )
    gateway_max_body_bytes: int = Field(
        default=1024 * 1024,
        ge=1024,
        description="Largest HTTP request body the gateway accepts; larger ones get 413.",
    )

    # Model and local state
    model_path: Path = Field(
        default=DEFAULT_MODEL,
        description="A built model folder (ONNX Runtime GenAI model and its tokenizer), read "
        "by preprocess, compute and postprocess. The default is the demo model installed "
        "with Sluice.",
    )
    state_dir: Path = Field(
        default=Path(".sluice"),
        description="Folder for local state (a relative path starts at the current folder): "
        "each stage keeps its response cache in `<state_dir>/cache/<stage>.json`.",
    )

    # Stage runtime
    batch_max_records: int = Field(
        default=256,
        ge=1,
        description="Most records one fetch takes from Kafka, so the largest batch a stage's "
        "handler is given.",
    )
    batch_max_wait_ms: int = Field(
        default=20,
        ge=0,
        description="How long a fetch waits for records before it returns what it has.",
    )
    max_in_flight: int = Field(
        default=2048,
        ge=1,
        description="Unfinished records at which a stage pauses every partition it reads; it "
        "resumes at half. This bounds what a stage holds in memory.",
    )
    max_in_flight_bytes: int = Field(
        default=256 * 1024 * 1024,
        ge=1,
        description="Bytes of unfinished records' values at which a stage pauses every "
        "partition it reads (like `max_in_flight`, resumed at half), so a flood of large "
        "records cannot hold gigabytes. One poll may overshoot it by at most a fetch.",
    )
    handler_retries: int = Field(
        default=2,
        ge=0,
        description="Further attempts at a record whose failure is retriable, before it is "
        "dead-lettered.",
    )
    retry_backoff_ms: int = Field(
        default=100, ge=0, description="Wait before the first retry; it doubles on each retry."
    )
    breaker_failure_threshold: int = Field(
        default=5,
        ge=1,
        description="Consecutive stage faults that open a stage's circuit breaker. Bad input "
        "is not a fault.",
    )
    breaker_cooldown_s: float = Field(
        default=10.0,
        gt=0,
        description="How long an open circuit breaker waits before it lets one probe through.",
    )
    response_cache_size: int = Field(
        default=1024,
        ge=0,
        description="Answers each stage keeps (least recently used dropped first) to answer "
        "from while its breaker is open; saved in the state folder when the stage stops and "
        "read when it starts. 0: no cache.",
    )
    shutdown_deadline_s: float = Field(
        default=20.0,
        gt=0,
        description="On SIGTERM, how long in-flight work may take to finish; what is left is "
        "cancelled, uncommitted, and redone by the partition's next owner.",
    )
    revoke_deadline_s: float = Field(
        default=10.0,
        ge=0,
        description="On a rebalance, how long a stage may take to finish the in-flight work "
        "of partitions it loses before it gives them up; what is left is cancelled, "
        "uncommitted, and redone by the new owner. Keep it well under `max.poll.interval.ms`.",
    )
    stall_after_s: float = Field(
        default=60.0,
        gt=0,
        description="`/healthz` fails when the fetch loop has not polled, or in-flight work has "
        "made no progress (no record finished, and the handler reported none), for this long.",
    )
    max_prompt_bytes: int = Field(
        default=256 * 1024,
        ge=1024,
        description="Largest prompt accepted, in bytes of the record's value; larger ones are "
        "refused as `oversized` (HTTP 413 at the gateway).",
    )
    http_host: str = Field(
        default="127.0.0.1",
        description="Address of a service's `/metrics`, `/healthz` and `/readyz` server.",
    )
    http_port: int = Field(
        default=0,
        ge=0,
        le=65535,
        description="Port of a service's `/metrics`, `/healthz` and `/readyz` server; 0 picks "
        "a free one and logs it at start.",
    )

    # Exactly-once delivery. aiokafka sends no KIP-447 group metadata, so a rebalance inside a
    # transaction is not fenced: each process needs its own stable instance_id (the
    # transactional id is group + instance), so a restarted process fences its predecessor and
    # aborts its open transaction.
    exactly_once: bool = Field(
        default=False,
        description="Kafka transactions, meant for preprocess and postprocess: a batch's "
        "outputs and its input offsets commit together, and the input is read "
        "`read_committed`. Give each process a stable `SLUICE_INSTANCE_ID`.",
    )
    instance_id: str = Field(
        default="0",
        description="This process's stable slot in its stage. In exactly-once mode the "
        "transactional id is `<group>-<SLUICE_INSTANCE_ID>`, so a restarted process fences its "
        "predecessor. `sluice scale` sets it for each worker.",
    )
    transaction_timeout_ms: int = Field(
        default=15_000,
        ge=1000,
        description="Transaction timeout in exactly-once mode: the broker aborts a transaction "
        "left open longer.",
    )

    # Compute engine
    engine: Literal["echo", "onnx"] = Field(
        default="onnx",
        description="The compute stage's engine: `onnx` (ONNX Runtime GenAI) or `echo` (a "
        "deterministic stand-in that repeats the last user turn, for testing the pipeline).",
    )
    engine_max_batch: int = Field(
        default=0,
        ge=0,
        description="Most sequences generating at once. 0: og.Engine's configured capacity, "
        "or 32 for static og.Generator batches (which allow at most 128 over the batches "
        "stepped in turn). og.Engine never goes above its capacity.",
    )
    engine_token_budget: int = Field(
        default=0,
        ge=0,
        description="Prompt tokens plus new-token limits of the running requests together; a "
        "request that would exceed it waits (a request alone is always admitted). 0: no "
        "budget.",
    )
    engine_threads: int = Field(
        default=0, ge=0, description="ONNX Runtime intra-op threads; 0: onnxruntime's default."
    )
    engine_stall_s: float = Field(
        default=30.0,
        gt=0,
        description="Requests in flight and no token for this long is an engine stall: a "
        "crash report is written, they fail with a fatal `engine-stall` error and the compute "
        "process exits non-zero, to be restarted by `sluice scale` or Kubernetes.",
    )
    engine_mode: Literal["auto", "engine", "generator"] = Field(
        default="auto",
        description="`auto`: og.Engine (continuous batching) for models built with paged "
        "attention, static og.Generator batches otherwise; `engine` or `generator` forces "
        "one path.",
    )
    delta_interval_ms: float = Field(
        default=30.0,
        gt=0,
        description="Token streaming: compute sends a request's text deltas (to its "
        "`sluice-reply-to` partition) at most once per this interval, or per delta_tokens new "
        "tokens, whichever comes first.",
    )
    delta_tokens: int = Field(
        default=16, ge=1, description="Token streaming: new tokens that make a delta due."
    )
    echo_delay_ms: float = Field(
        default=0.0, ge=0, description="Delay the echo engine adds to every generation."
    )
    echo_token_delay_ms: float = Field(
        default=0.0,
        ge=0,
        description="The echo engine makes its tokens one at a time, this long apart "
        "(streaming, cancellation and deadlines mid-generation can then be watched).",
    )
    echo_fault_file: Path | None = Field(
        default=None,
        description="While this file exists, every echo-engine generation fails as a stage "
        "fault (to rehearse the circuit breaker).",
    )
    echo_oom_file: Path | None = Field(
        default=None,
        description="Echo engine fault hook: while this file exists, every generation allocates "
        "and keeps echo_oom_chunk_mb more memory, until the process runs out of it.",
    )
    echo_oom_chunk_mb: int = Field(
        default=64, ge=1, description="Memory (MiB) the echo OOM hook allocates per generation."
    )
    echo_stall_file: Path | None = Field(
        default=None,
        description="Echo engine fault hook: while this file exists, generations make no "
        "progress; after engine_stall_s the engine declares a stall and the process exits.",
    )

    # Crash reports and the supervisor's death reports
    crash_log_lines: int = Field(
        default=200,
        ge=0,
        description="Log lines kept in memory and written into a crash report (never prompts).",
    )
    crash_copy_to_archive: bool = Field(
        default=True,
        description="Also copy each crash report to the archive's object store, under crash/.",
    )
    crash_loop_deaths: int = Field(
        default=5,
        ge=2,
        description="sluice scale: this many deaths of one stage's workers within "
        "crash_loop_window_s is a crash loop: reported, and restarts are backed off.",
    )
    crash_loop_window_s: float = Field(
        default=300.0, gt=0, description="The window in which crash_loop_deaths are counted."
    )
    crash_loop_backoff_s: float = Field(
        default=300.0, ge=0, description="How long a crash-looping stage waits to restart."
    )

    # Batch jobs (OpenAI Batch API)
    files_max_bytes: int = Field(
        default=100 * 1024 * 1024,
        ge=1024,
        description="Largest file `POST /v1/files` accepts; larger uploads get 413. Files are "
        "kept in the archive's object store (`SLUICE_ARCHIVE_URL`) under `files/`.",
    )
    batch_max_lines: int = Field(
        default=50_000,
        ge=1,
        description="Most requests one batch input file may hold; a longer file fails the "
        "batch (`too_many_tasks`).",
    )
    batch_window_s: float = Field(
        default=24 * 3600.0,
        gt=0,
        description="How long the `24h` completion window really is: a batch not finished "
        "this long after its creation expires (lines not answered by then go to its error "
        "file as `batch_expired`). Shorten it only to rehearse expiry.",
    )
    batch_lane: Literal["batch", "interactive"] = Field(
        default="batch",
        description="Where the batcher publishes a batch's requests: `batch` (the "
        "`<prefix>prompts.batch` topic: preprocess and compute read it too, and compute "
        "pauses it while interactive work waits) or `interactive` (`<prefix>prompts`, beside "
        "chat traffic, with no priority for chat).",
    )
    batch_max_pending: int = Field(
        default=1000,
        ge=1,
        description="Requests of one batch the batcher keeps published and unanswered at a "
        "time; it publishes the next ones as answers come.",
    )
    batch_progress_interval_s: float = Field(
        default=2.0,
        gt=0,
        description="How often the batcher records a running batch's `request_counts` in the "
        "batches topic.",
    )
    batch_cancel_grace_s: float = Field(
        default=30.0,
        ge=0,
        description="How long a cancelled batch waits for answers to requests already in the "
        "pipeline before it is `cancelled` with what it has.",
    )

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


class SettingsGroup(NamedTuple):
    """A section of the configuration reference: ``first`` and the fields declared after it."""

    title: str
    first: str
    intro: str = ""


GROUPS: Final[tuple[SettingsGroup, ...]] = (
    SettingsGroup("Kafka connection and security", "bootstrap_servers"),
    SettingsGroup("Topics", "topic_prefix"),
    SettingsGroup(
        "Conversation log (object storage)",
        "archive_url",
        "Where the archiver writes prompts and answers, and where `sluice replay` and "
        "`sluice restore` read them.",
    ),
    SettingsGroup(
        "Archiver",
        "archive_max_records",
        "Each partition's records gather in a chunk, stored as one object when the first of "
        "these limits is reached.",
    ),
    SettingsGroup("Producer client and HTTP gateway", "request_timeout_s"),
    SettingsGroup("Model and local state", "model_path"),
    SettingsGroup(
        "Stage runtime",
        "batch_max_records",
        "The loop every stage runs: fetching, backpressure, retries, the circuit breaker, "
        "shutdown and health.",
    ),
    SettingsGroup(
        "Exactly-once delivery",
        "exactly_once",
        "Off by default: delivery is at least once. aiokafka sends no KIP-447 group metadata, "
        "so a rebalance inside a transaction is not fenced; a stable `SLUICE_INSTANCE_ID` per "
        "process limits the damage.",
    ),
    SettingsGroup("Compute engine", "engine"),
    SettingsGroup(
        "Batch jobs",
        "files_max_bytes",
        "The OpenAI Batch API: files on the gateway, batches run by `sluice run batcher`.",
    ),
)
"""The sections of ``docs/CONFIGURATION.md``, in declaration order of ``Settings``' fields."""


def load_settings(**overrides: Any) -> Settings:
    """Build the settings once: environment, then explicit overrides (e.g. from CLI flags)."""
    return Settings(**overrides)
