"""Request ids from a record's position: stable for one record, different everywhere else."""

from __future__ import annotations

import uuid

import pytest

from schemas.ids import positional_request_id


def test_the_same_record_always_gets_the_same_id() -> None:
    first = positional_request_id("cluster-a", "s.prompts", 2, 17, 1_700_000_000_123)
    assert first == positional_request_id("cluster-a", "s.prompts", 2, 17, 1_700_000_000_123)
    assert uuid.UUID(first).version == 5


def test_every_other_cluster_position_or_time_gets_another_id() -> None:
    base = ("cluster-a", "s.prompts", 2, 17, 1_700_000_000_123)
    variants = [
        ("cluster-b", "s.prompts", 2, 17, 1_700_000_000_123),  # another cluster
        ("cluster-a", "t.prompts", 2, 17, 1_700_000_000_123),
        ("cluster-a", "s.prompts", 3, 17, 1_700_000_000_123),
        ("cluster-a", "s.prompts", 2, 18, 1_700_000_000_123),
        ("cluster-a", "s.prompts", 2, 17, 1_700_000_000_124),  # the topic re-created
    ]
    ids = {positional_request_id(*base)} | {positional_request_id(*v) for v in variants}
    assert len(ids) == 1 + len(variants)


def test_a_missing_cluster_id_or_a_negative_position_is_refused() -> None:
    with pytest.raises(ValueError, match="cluster id"):
        positional_request_id("", "s.prompts", 0, 0, 0)
    with pytest.raises(ValueError, match="position"):
        positional_request_id("c", "s.prompts", -1, 0, 0)
