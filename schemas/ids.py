"""Request ids for prompts that arrive without one: unique across clusters and time.

A prompt's request id is what the archive, ``replay --unanswered`` and every client
de-duplicate by, so two different prompts must never share one, and a prompt read again (a
retry, a redelivery after a crash) must get the same one. An id derived from the record's
position alone (topic, partition, offset) fails the first rule: a topic deleted and created
again, or the same topic name on another cluster, starts again at offset 0.

:func:`positional_request_id` therefore names the record by its cluster id (KIP-78, the same
for every broker of one cluster, different for every cluster), its position, and its
timestamp in milliseconds: the same for every read of one record, and different for the record
at the same offset of a re-created topic (re-creating a topic takes longer than a
millisecond). It is a UUID (version 5), so it fits wherever a uuid4 does.
"""

from __future__ import annotations

import uuid
from typing import Final

__all__ = ["REQUEST_ID_NAMESPACE", "positional_request_id"]

REQUEST_ID_NAMESPACE: Final = uuid.UUID("6f1d3c52-8f0e-5b7a-9e65-3a1f6c2d4b80")


def positional_request_id(
    cluster_id: str, topic: str, partition: int, offset: int, timestamp_ms: int
) -> str:
    """The request id of the record at ``topic[partition]@offset`` with ``timestamp_ms`` on
    the cluster ``cluster_id``."""
    if not cluster_id:
        raise ValueError("a cluster id is needed: position alone repeats on a re-created topic")
    if partition < 0 or offset < 0:
        raise ValueError(f"not a record position: partition {partition}, offset {offset}")
    name = f"{cluster_id}/{topic}/{partition}/{offset}/{timestamp_ms}"
    return str(uuid.uuid5(REQUEST_ID_NAMESPACE, name))
