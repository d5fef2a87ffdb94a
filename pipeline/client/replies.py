"""Which partitions of the replies topic an asker reads: its own, assigned, not a group.

Every prompt names its asker's reply address (``sluice-reply-to``: the replies topic and one of
the asker's partitions); compute sends the request's deltas there and the stage that answers
sends a copy of the answer there. An asker (a ``SluiceClient``, so each gateway replica) reads
only its own partitions, assigned directly (no consumer group: nothing to rebalance, no
offsets to commit; it starts at the end, before it publishes anything).

The partitions are ``SLUICE_REPLY_PARTITIONS`` (``3`` or ``3,4``) when set; otherwise one,
``SLUICE_INSTANCE_ID`` modulo the topic's partition count (an id that is not a number is
hashed), so replicas numbered 0..N-1 (a StatefulSet's ordinals, ``sluice scale``'s slots) each
get their own while N does not exceed the partition count. Askers that share a partition are
still correct, since answers are matched by request id: each just reads the other's traffic.
"""

from __future__ import annotations

import zlib


def parse_partitions(spec: str) -> list[int]:
    """``"3"`` or ``"3, 4"`` as sorted, distinct partition numbers; ``""`` as none."""
    parts: set[int] = set()
    for raw in spec.split(","):
        item = raw.strip()
        if not item:
            continue
        if not item.isdigit():
            raise ValueError(f"not a partition number: {item!r} (expected e.g. '3' or '3,4')")
        parts.add(int(item))
    return sorted(parts)


def choose_reply_partitions(spec: str, instance_id: str, count: int) -> list[int]:
    """The partitions an asker reads, of a replies topic with ``count`` partitions."""
    if count < 1:
        raise ValueError("the replies topic has no partitions")
    chosen = parse_partitions(spec)
    if chosen:
        beyond = [p for p in chosen if p >= count]
        if beyond:
            raise ValueError(
                f"reply partitions {beyond} do not exist: the replies topic has {count} "
                f"(0..{count - 1})"
            )
        return chosen
    slot = int(instance_id) if instance_id.isdigit() else zlib.crc32(instance_id.encode())
    return [slot % count]
