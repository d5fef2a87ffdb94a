"""The stage loop's produce step: every decision's outputs acknowledged, or its record
dead-lettered; only a lost producer or broker stops the stage.

``Delivery.deliver(decisions)`` sends all outputs through ``produce_errors.send_outputs``,
keeping each output tied to the record it came from. An output Kafka refuses at record level
(too large for ``max_request_size``, an invalid record) costs only its own record: that record
gets a dead letter of what fits (``dead_letters.fit_to_request``) and an error answer that says
why, sent in a second round. A record may then also have outputs that were accepted before the
refusal (a stage with several outputs per record): at-least-once, never silence. An error
answer that is itself refused is logged and counted (the dead letter stands); a refused dead
letter, or any error that is not record level, raises ``FatalError``.

``max_record_bytes`` reads the ``max.message.bytes`` of the topics a stage writes at start-up:
the producer's ``max_request_size`` must not exceed the smallest, since a record the broker
refuses breaks the idempotent producer's sequence for that partition (fatal), while one refused
before sending costs only that record.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import KafkaError

from pipeline.admin import admin_client
from pipeline.config import Settings
from pipeline.errors import SluiceError
from pipeline.observability.metrics import StageMetrics
from pipeline.runtime.batch import Output, Record
from pipeline.runtime.processing import Decision
from pipeline.runtime.produce_errors import Refused, send_outputs

log = logging.getLogger(__name__)

# aiokafka's default max_request_size; Kafka's default max.message.bytes is 1048588.
DEFAULT_MAX_REQUEST = 1 << 20

DeadLetter = Callable[[Record, SluiceError], list[Output]]


class Delivery:
    """Produces decisions for one stage; see the module docstring."""

    def __init__(
        self,
        producer: Any,
        *,
        stage: str,
        max_request_size: int,
        dead_letter: DeadLetter,
        metrics: StageMetrics,
    ) -> None:
        self.producer = producer
        self.stage = stage
        self.max_request_size = max_request_size
        self.dead_letter = dead_letter
        self.metrics = metrics

    async def deliver(self, decisions: Sequence[Decision]) -> None:
        """Send every decision's outputs and wait for every acknowledgement."""
        outputs: list[Output] = []
        owner: list[int] = []
        for i, decision in enumerate(decisions):
            outputs.extend(decision.outputs)
            owner.extend([i] * len(decision.outputs))
        refused = await self.send(outputs)
        again: dict[int, SluiceError] = {}
        for item in refused:
            decision = decisions[owner[item.index]]
            if decision.dead_lettered:
                self._lost_answer(decision.record, item.output.topic)
            else:
                again.setdefault(owner[item.index], item.error)
        if not again:
            return
        replacements: list[Output] = []
        whose: list[Record] = []
        for i, error in again.items():
            record = decisions[i].record
            replaced = self.dead_letter(record, error)
            replacements.extend(replaced)
            whose.extend([record] * len(replaced))
        for item in await self.send(replacements):
            self._lost_answer(whose[item.index], item.output.topic)

    async def send(self, outputs: list[Output]) -> list[Refused]:
        """Send ``outputs`` (dead letters cut to fit); what Kafka refused at record level."""
        refused = await send_outputs(
            self.producer, outputs, stage=self.stage, max_request_size=self.max_request_size
        )
        gone = {r.index for r in refused}
        per_topic = Counter(o.topic for i, o in enumerate(outputs) if i not in gone)
        for topic, n in per_topic.items():
            self.metrics.produced.labels(self.stage, topic).inc(n)
        return refused

    def _lost_answer(self, record: Record, topic: str) -> None:
        self.metrics.error_answers.labels(self.stage, "answer-refused").inc()
        log.error(
            "stage %s: %s request %s: Kafka refused its error answer for %s; its dead letter "
            "stands",
            self.stage,
            record.where,
            record.request_id(),
            topic,
        )


async def max_record_bytes(settings: Settings, topics: Iterable[str]) -> int:
    """The smallest ``max.message.bytes`` of ``topics``, at most ``DEFAULT_MAX_REQUEST``.

    When the configs cannot be read (no describe permission, say), the default is used and a
    warning says so: Kafka's own default topic limit is above it."""
    names = sorted(set(topics))
    admin = admin_client(settings)
    try:
        await admin.start()
        try:
            resources = [
                ConfigResource(ConfigResourceType.TOPIC, t, {"max.message.bytes": None})
                for t in names
            ]
            responses = await admin.describe_configs(resources)
        finally:
            await admin.close()
    except KafkaError as exc:
        log.warning(
            "could not read max.message.bytes of %s (%s); producing at most %d bytes a record",
            names,
            exc,
            DEFAULT_MAX_REQUEST,
        )
        return DEFAULT_MAX_REQUEST
    limits = [DEFAULT_MAX_REQUEST]
    for response in responses:
        for resource in response.resources:
            for entry in resource[4]:
                if entry[0] == "max.message.bytes" and entry[1] is not None:
                    limits.append(int(entry[1]))
    return min(limits)
