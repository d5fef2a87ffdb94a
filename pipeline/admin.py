"""Topic administration: create every Sluice topic (idempotent) and describe them.

Creating a topic returns before its partitions can take writes: the controller has chosen
leaders, but the broker may still be opening their logs, and the consumer-group coordinator
(``__consumer_offsets``) exists only once somebody asks for it. Clients that start in that gap
retry, and log ``NotLeaderForPartition`` / ``GroupCoordinatorNotAvailable`` while they do, so
:func:`create_topics` waits until every partition answers and :func:`wait_for_coordinator`
until the groups' coordinator has loaded.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from dataclasses import dataclass

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, KafkaTimeoutError, TopicAlreadyExistsError, for_code

from pipeline.config import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TopicInfo:
    name: str
    partitions: int
    end_offsets: dict[int, int]

    @property
    def messages(self) -> int:
        """End offsets summed: the number of records ever written (retention aside)."""
        return sum(self.end_offsets.values())


def admin_client(settings: Settings) -> AIOKafkaAdminClient:
    return AIOKafkaAdminClient(**settings.kafka_common(), request_timeout_ms=15000)


READY_TIMEOUT_S = 60.0
_POLL_S = 0.1


async def create_topics(
    settings: Settings,
    names: Iterable[str] | None = None,
    partitions: int | None = None,
    ready_timeout_s: float = READY_TIMEOUT_S,
) -> tuple[list[str], list[str]]:
    """Create topics that are missing; returns (created, already there).

    Returns once every partition of the created topics has a leader that serves it (see
    :func:`wait_for_leaders`), so a producer or consumer started next meets no leader changes.
    """
    wanted = list(names) if names is not None else settings.topics.all_topics()
    admin = admin_client(settings)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [t for t in wanted if t not in existing]
        created: list[str] = []
        if missing:
            response = await admin.create_topics(
                [new_topic(settings, t, partitions) for t in missing]
            )
            for topic, code, message in response.topic_errors:
                if code == 0:
                    created.append(topic)
                elif code != TopicAlreadyExistsError.errno:
                    raise for_code(code)(f"creating topic {topic}: {message}")
        if created:
            await wait_for_leaders(settings, created, ready_timeout_s, admin)
        return created, [t for t in wanted if t not in created]
    finally:
        await admin.close()


def new_topic(settings: Settings, name: str, partitions: int | None = None) -> NewTopic:
    """How ``name`` is created: the replies topic with ``replies_topic_partitions``, the
    control topic with ``control_topic_partitions``, both with ``edge_retention_ms``; the
    batches topic compacted (``cleanup.policy=compact``: each batch's latest state is kept);
    every other topic with ``partitions`` (default ``settings.partitions``) and the broker's
    defaults."""
    topics = settings.topics
    parts = partitions or settings.partitions
    rf = settings.replication_factor
    if name == topics.replies:
        parts = settings.replies_topic_partitions or parts
    elif name == topics.control:
        parts = settings.control_topic_partitions
    return NewTopic(name, parts, rf, topic_configs=topic_configs(settings, name))


def topic_configs(settings: Settings, name: str) -> dict[str, str]:
    """The per-topic configuration Sluice sets when it creates ``name`` (empty: the broker's
    defaults)."""
    topics = settings.topics
    if name in topics.state_topics():
        return {"cleanup.policy": "compact"}
    if name in topics.edge_topics():
        return {"retention.ms": str(settings.edge_retention_ms)}
    return {}


async def cluster_id(settings: Settings) -> str:
    """The Kafka cluster id (KIP-78), which request ids derived from a record's position
    include (``schemas.ids``)."""
    admin = admin_client(settings)
    await admin.start()
    try:
        described = await admin.describe_cluster()
    finally:
        await admin.close()
    cid = described.get("cluster_id")
    if not isinstance(cid, str) or not cid:
        raise KafkaError("the broker did not say its cluster id (Kafka 0.10.1 or newer needed)")
    return cid


async def cluster_id_or_unknown(settings: Settings) -> str:
    """The cluster id, or "" (logged) when the broker cannot say: offline tools (restore,
    a dry-run replay) then derive the ids of id-less prompts as for an unknown cluster."""
    try:
        return await cluster_id(settings)
    except (KafkaError, OSError) as exc:
        log.warning(
            "no cluster id from %s (%s): ids of prompts without one may not match",
            settings.bootstrap_servers,
            exc,
        )
        return ""


async def partition_count(settings: Settings, topic: str) -> int:
    """How many partitions ``topic`` has; 0 when it does not exist."""
    admin = admin_client(settings)
    await admin.start()
    try:
        described = await admin.describe_topics([topic])
    finally:
        await admin.close()
    for d in described:
        if d["topic"] == topic and d["error_code"] == 0:
            return len(d["partitions"])
    return 0


async def wait_for_leaders(
    settings: Settings,
    topics: Iterable[str],
    timeout_s: float = READY_TIMEOUT_S,
    admin: AIOKafkaAdminClient | None = None,
) -> None:
    """Wait until every partition of ``topics`` has a leader that answers for it.

    First the metadata must name a leader for each partition; then a ListOffsets request must
    succeed on each, which the broker answers only once it has opened the partition's log as
    leader (the same check a produce request meets). Raises KafkaTimeoutError naming the
    partitions still without one after ``timeout_s``.
    """
    names = list(topics)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    own = admin is None
    client = admin_client(settings) if admin is None else admin
    if own:
        await client.start()
    try:
        tps = await _partitions_with_leaders(client, names, deadline)
    finally:
        if own:
            await client.close()
    if not tps:
        return
    consumer = AIOKafkaConsumer(**settings.kafka_common(), enable_auto_commit=False)
    await consumer.start()
    try:
        # end_offsets retries NotLeaderForPartition quietly until each leader answers
        await asyncio.wait_for(consumer.end_offsets(tps), max(0.001, deadline - loop.time()))
    except TimeoutError as exc:
        raise KafkaTimeoutError(
            f"partitions of {', '.join(names)} had no serving leader within {timeout_s:.0f}s"
        ) from exc
    finally:
        await consumer.stop()


async def _partitions_with_leaders(
    admin: AIOKafkaAdminClient, topics: list[str], deadline: float
) -> list[TopicPartition]:
    loop = asyncio.get_running_loop()
    while True:
        described = await admin.describe_topics(topics)
        tps: list[TopicPartition] = []
        waiting: list[str] = [t for t in topics if t not in {d["topic"] for d in described}]
        for d in described:
            if d["error_code"] != 0 or not d["partitions"]:
                waiting.append(d["topic"])
                continue
            for p in d["partitions"]:
                tp = TopicPartition(d["topic"], p["partition"])
                if p["error_code"] != 0 or p["leader"] < 0:
                    waiting.append(f"{tp.topic}[{tp.partition}]")
                tps.append(tp)
        if not waiting:
            return tps
        if loop.time() > deadline:
            raise KafkaTimeoutError(f"no leader yet for {', '.join(sorted(waiting)[:10])}")
        await asyncio.sleep(_POLL_S)


async def wait_for_coordinator(
    settings: Settings, groups: Iterable[str], timeout_s: float = READY_TIMEOUT_S
) -> None:
    """Wait until the broker's group coordinator serves ``groups``.

    The first request for a group makes a fresh broker create ``__consumer_offsets``; until
    its partitions have loaded, consumers joining a group are told the coordinator is not
    available (or still loading) and log it while they retry.
    """
    wanted = list(groups)
    admin = admin_client(settings)
    await admin.start()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    try:
        while True:
            pending, last = await _groups_not_served(admin, wanted)
            if not pending:
                return
            if loop.time() > deadline:
                raise KafkaTimeoutError(
                    f"the group coordinator did not serve {', '.join(pending)} within "
                    f"{timeout_s:.0f}s (last: {last})"
                )
            await asyncio.sleep(_POLL_S)
    finally:
        await admin.close()


async def _groups_not_served(
    admin: AIOKafkaAdminClient, groups: list[str]
) -> tuple[list[str], str]:
    """The groups whose coordinator does not answer yet, and the last error seen."""
    pending: list[str] = []
    last = ""
    for group in groups:
        try:
            responses = await admin.describe_consumer_groups([group])
        except KafkaError as exc:
            if not exc.retriable:
                raise
            pending.append(group)
            last = type(exc).__name__
            continue
        for response in responses:
            for described in response.to_object()["groups"]:
                if described["error_code"] != 0:
                    pending.append(group)
                    last = for_code(described["error_code"]).__name__
    return pending, last


async def describe_topics(
    settings: Settings, names: Iterable[str] | None = None
) -> list[TopicInfo]:
    """Partitions and end offsets per topic (missing topics are left out)."""
    wanted = list(names) if names is not None else settings.topics.all_topics()
    admin = admin_client(settings)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        present = [t for t in wanted if t in existing]
        described = await admin.describe_topics(present) if present else []
    finally:
        await admin.close()
    partitions = {d["topic"]: sorted(p["partition"] for p in d["partitions"]) for d in described}
    tps = [TopicPartition(t, p) for t in present for p in partitions.get(t, [])]
    if not tps:  # (aiokafka's consumer, stopped right after it started, raises CancelledError)
        return [TopicInfo(t, 0, {}) for t in present]
    consumer = AIOKafkaConsumer(**settings.kafka_common(), enable_auto_commit=False)
    await consumer.start()
    try:
        ends = await consumer.end_offsets(tps)
    finally:
        await consumer.stop()
    return [
        TopicInfo(
            t,
            len(partitions.get(t, [])),
            {tp.partition: off for tp, off in ends.items() if tp.topic == t},
        )
        for t in present
    ]


def _offsets_of(topic: str, ends: dict[TopicPartition, int]) -> dict[int, int]:
    return {tp.partition: off for tp, off in ends.items() if tp.topic == topic}


async def missing_topics(settings: Settings, names: Iterable[str]) -> list[str]:
    admin = admin_client(settings)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
    finally:
        await admin.close()
    return [t for t in names if t not in existing]
