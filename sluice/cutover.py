"""Blue/green by consumer group: move the stages from one deployment's groups to another's.

Blue and green are two deployments of the stages that read the same topics; their consumer
groups differ by ``group_suffix`` (``sluice-compute-blue`` / ``sluice-compute-green``). A cutover,
per stage group:

1. checks the target (green) groups: no members while blue still has some, and no committed
   offset ahead of blue's (green would skip records blue has not finished);
2. stops blue (the ``stop_source`` hook: SIGTERM to ``sluice scale``, or KEDA's paused-replicas
   annotation) and waits until every blue group is empty: a stage that gets SIGTERM stops
   fetching, finishes its in-flight work, commits and leaves the group;
3. copies blue's committed offsets to the green groups and reads them back;
4. starts green (the ``start_target`` hook) and waits until every green group has a member.

A rollback is the same move from green to blue. Every step is idempotent, so a cutover that was
interrupted half-way is finished by running it again: groups already copied compare equal, and a
green group that is serving while blue's is empty counts as done. Records a stage had finished
but not committed when it stopped are read again by green: the only duplicates (at least once).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from pipeline.admin import admin_client
from pipeline.config import Settings
from pipeline.errors import FatalError

log = logging.getLogger(__name__)

SERVING_STAGES = ("preprocess", "compute", "postprocess", "archiver")
Hook = Callable[[], Awaitable[None]]
SUFFIX = re.compile(r"[A-Za-z0-9_.-]*")  # Settings.group_suffix's pattern


class CutoverError(FatalError):
    """The cutover cannot go on; the message says what was found and what to do."""

    reason = "cutover"


@dataclass(frozen=True)
class GroupView:
    """One consumer group as the cutover sees it."""

    group: str
    state: str
    members: int
    offsets: dict[TopicPartition, int] = field(default_factory=dict)


@dataclass(frozen=True)
class StageResult:
    stage: str
    source: str
    target: str
    action: Literal["copied", "done"]
    offsets: dict[TopicPartition, int]


def assess(source: GroupView, target: GroupView) -> Literal["copy", "done"]:
    """What to do for one stage: copy the offsets, or nothing (already switched); raises
    CutoverError when the target group makes a cutover unsafe."""
    if target.members:
        if source.members:
            raise CutoverError(
                f"{target.group} already has {target.members} member(s) while {source.group} "
                f"has {source.members}: both deployments are serving; stop one before a cutover"
            )
        behind = _ahead(source.offsets, target.offsets)
        if behind:
            raise CutoverError(
                f"{target.group} is serving but behind {source.group} on {behind}: stop it, "
                f"then run the cutover again"
            )
        return "done"
    ahead = _ahead(target.offsets, source.offsets)
    if ahead:
        raise CutoverError(
            f"{target.group} has committed offsets ahead of {source.group} on {ahead}: it "
            f"would skip records that {source.group} has not processed; delete the group "
            f"(kafka-consumer-groups.sh --delete --group {target.group}) or use another suffix"
        )
    return "copy"


def _ahead(these: dict[TopicPartition, int], those: dict[TopicPartition, int]) -> str:
    """The partitions where ``these`` is past ``those``, described; empty when none is."""
    found = [
        f"{tp.topic}[{tp.partition}] {offset} > {those.get(tp, 'none')}"
        for tp, offset in sorted(these.items())
        if offset > those.get(tp, -1)
    ]
    return ", ".join(found[:4]) + (f" and {len(found) - 4} more" if len(found) > 4 else "")


async def read_group(admin: AIOKafkaAdminClient, group: str) -> GroupView:
    offsets = await admin.list_consumer_group_offsets(group)
    # One group per request: aiokafka 0.14 mis-decodes a DescribeGroups answer for several.
    (response,) = await admin.describe_consumer_groups([group])
    error, _, state, _, _, members = response.groups[0][:6]
    return GroupView(
        group,
        state if error == 0 else "Unknown",
        len(members),
        {tp: m.offset for tp, m in offsets.items() if m.offset >= 0},
    )


async def commit_offsets(
    settings: Settings, group: str, offsets: dict[TopicPartition, int]
) -> None:
    """Commit ``offsets`` for ``group`` (which has no members) without joining it."""
    if not offsets:
        return
    consumer = AIOKafkaConsumer(**settings.kafka_common(), group_id=group, enable_auto_commit=False)
    await consumer.start()
    try:
        consumer.assign(list(offsets))
        await consumer.commit(dict(offsets))
    finally:
        await consumer.stop()


class Cutover:
    """Move ``stages`` from the groups with suffix ``source`` to those with suffix ``target``."""

    def __init__(
        self,
        settings: Settings,
        source: str,
        target: str,
        stages: Sequence[str] = SERVING_STAGES,
        *,
        stop_source: Hook | None = None,
        start_target: Hook | None = None,
        timeout_s: float = 120.0,
        poll_s: float = 0.5,
        say: Callable[[str], None] = log.info,
    ) -> None:
        if source == target:
            raise CutoverError(f"--from and --to are the same ({source!r}): nothing to move")
        for suffix in (source, target):
            if not SUFFIX.fullmatch(suffix):
                raise CutoverError(f"group suffix {suffix!r}: letters, digits, '.', '_', '-' only")
        unknown = sorted(set(stages) - set(SERVING_STAGES))
        if unknown or not stages:
            raise CutoverError(
                f"unknown stage(s) {', '.join(unknown) or '(none given)'}; "
                f"one or more of: {', '.join(SERVING_STAGES)}"
            )
        self.settings = settings
        self.source = settings.model_copy(update={"group_suffix": source})
        self.target = settings.model_copy(update={"group_suffix": target})
        self.stages = list(dict.fromkeys(stages))
        self.stop_source = stop_source
        self.start_target = start_target
        self.timeout_s = timeout_s
        self.poll_s = poll_s
        self.say = say

    def groups(self, stage: str) -> tuple[str, str]:
        return self.source.group_id(stage), self.target.group_id(stage)

    async def run(self) -> list[StageResult]:
        admin = admin_client(self.settings)
        await admin.start()
        try:
            return await self._run(admin)
        finally:
            await admin.close()

    async def _views(self, admin: AIOKafkaAdminClient) -> dict[str, tuple[GroupView, GroupView]]:
        views = {}
        for stage in self.stages:
            source, target = self.groups(stage)
            views[stage] = (await read_group(admin, source), await read_group(admin, target))
        return views

    async def _run(self, admin: AIOKafkaAdminClient) -> list[StageResult]:
        views = await self._views(admin)
        plan = {stage: assess(*views[stage]) for stage in self.stages}  # refuses before acting
        moving = [s for s in self.stages if plan[s] == "copy"]
        done = [
            StageResult(s, *self.groups(s), "done", views[s][1].offsets)
            for s in self.stages
            if plan[s] == "done"
        ]
        for result in done:
            self.say(f"{result.stage}: {result.target} already serves and {result.source} is empty")
        if not moving:
            return done
        serving = [views[s][0].group for s in moving if views[s][0].members]
        if serving:
            self.say(f"stopping {', '.join(serving)}")
            if self.stop_source is not None:
                await self.stop_source()
            await self._wait(admin, [views[s][0].group for s in moving], members=False)
        views = await self._views(admin)  # the offsets the stopped stages committed last
        results = []
        for stage in moving:
            source, target = views[stage]
            assess(source, target)
            await commit_offsets(self.settings, target.group, source.offsets)
            copied = (await read_group(admin, target.group)).offsets
            if any(copied.get(tp) != offset for tp, offset in source.offsets.items()):
                raise CutoverError(f"{target.group}: offsets read back differ from {source.group}")
            self.say(f"{stage}: {len(source.offsets)} offsets {source.group} -> {target.group}")
            results.append(StageResult(stage, source.group, target.group, "copied", copied))
        if self.start_target is not None:
            self.say(f"starting {', '.join(r.target for r in results)}")
            await self.start_target()
            await self._wait(admin, [r.target for r in results], members=True)
        return done + results

    async def _wait(self, admin: AIOKafkaAdminClient, groups: list[str], *, members: bool) -> None:
        """Until every group has members (``members``) or none; CutoverError at the timeout."""
        deadline = time.monotonic() + self.timeout_s
        while True:
            views = [await read_group(admin, g) for g in groups]
            pending = [v for v in views if bool(v.members) != members]
            if not pending:
                return
            if time.monotonic() > deadline:
                what = ", ".join(f"{v.group} ({v.members} members, {v.state})" for v in pending)
                want = "no member joined" if members else "still has members"
                raise CutoverError(
                    f"after {self.timeout_s:.0f}s {want}: {what}; fix that and run the same "
                    f"cutover again (it continues where it stopped)"
                )
            await asyncio.sleep(self.poll_s)
