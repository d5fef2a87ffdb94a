"""Per-partition offset tracking: out-of-order completion, contiguous commits, epochs."""

from __future__ import annotations

import random

import pytest
from aiokafka import TopicPartition

from pipeline.runtime.offsets import OffsetTracker, PartitionOffsets

TP = TopicPartition("t.prompts", 0)
TP1 = TopicPartition("t.prompts", 1)


def _tracker_with(tp: TopicPartition, offsets: list[int]) -> tuple[OffsetTracker, int]:
    tracker = OffsetTracker()
    tracker.assign(tp)
    epoch = tracker.add_many(tp, offsets)
    return tracker, epoch


# --- PartitionOffsets ------------------------------------------------------------------------


def test_partition_has_no_position_before_any_offset() -> None:
    part = PartitionOffsets()
    assert part.position is None
    assert part.in_flight == 0


def test_partition_position_starts_at_the_first_offset() -> None:
    part = PartitionOffsets()
    part.add(10)
    part.add(11)
    assert part.position == 10


def test_out_of_order_completion_moves_only_the_contiguous_prefix() -> None:
    part = PartitionOffsets()
    for offset in range(10, 15):
        part.add(offset)
    part.finish(12)
    part.finish(11)
    assert part.position == 10  # 10 is still running: nothing past it may be committed
    part.finish(10)
    assert part.position == 13  # 10, 11, 12 done: next to read is 13
    part.finish(14)
    assert part.position == 13
    part.finish(13)
    assert part.position == 15  # last + 1
    assert part.in_flight == 0


def test_finish_in_order_moves_one_by_one() -> None:
    part = PartitionOffsets()
    for offset in range(3):
        part.add(offset)
    for offset in range(3):
        part.finish(offset)
        assert part.position == offset + 1


def test_gaps_between_offsets_are_skipped() -> None:
    # Compacted topics and transaction markers leave holes in the offsets a consumer sees.
    part = PartitionOffsets()
    for offset in (3, 7, 8):
        part.add(offset)
    part.finish(7)
    assert part.position == 3
    part.finish(3)
    assert part.position == 8
    part.finish(8)
    assert part.position == 9


@pytest.mark.parametrize("offset", [3, 4, 5])
def test_add_out_of_order_raises(offset: int) -> None:
    part = PartitionOffsets()
    part.add(4)
    part.add(5)
    with pytest.raises(ValueError, match="out of order"):
        part.add(offset)
    assert list(part.pending) == [4, 5]
    assert part.position == 4


def test_add_below_the_position_raises_while_work_is_pending() -> None:
    part = PartitionOffsets()
    part.add(20)
    with pytest.raises(ValueError):
        part.add(19)


# --- OffsetTracker ---------------------------------------------------------------------------


def test_tracker_commits_only_the_contiguous_prefix() -> None:
    tracker, epoch = _tracker_with(TP, [100, 101, 102, 103])
    assert tracker.finish(TP, 102, epoch)
    assert tracker.finish(TP, 103, epoch)
    assert tracker.positions() == {TP: 100}
    assert tracker.finish(TP, 100, epoch)
    assert tracker.committable() == {TP: 101}
    assert tracker.finish(TP, 101, epoch)
    assert tracker.committable() == {TP: 104}


def test_committable_is_empty_before_anything_is_tracked() -> None:
    tracker = OffsetTracker()
    assert tracker.committable() == {}
    tracker.assign(TP)
    assert tracker.committable() == {}  # assigned, nothing consumed: no position yet
    assert tracker.positions() == {TP: None}


def test_committable_returns_only_positions_that_moved_since_the_last_commit() -> None:
    tracker = OffsetTracker()
    tracker.assign(TP)
    tracker.assign(TP1)
    e0 = tracker.add_many(TP, [0, 1, 2])
    e1 = tracker.add_many(TP1, [50])
    tracker.finish(TP, 0, e0)
    tracker.finish(TP1, 50, e1)
    assert tracker.committable() == {TP: 1, TP1: 51}
    tracker.mark_committed({TP: 1, TP1: 51})
    assert tracker.committable() == {}

    tracker.finish(TP, 2, e0)  # out of order: the position does not move
    assert tracker.committable() == {}
    tracker.finish(TP, 1, e0)
    assert tracker.committable() == {TP: 3}  # TP1 did not move, so it is left out

    e1 = tracker.add(TP1, 51)  # consumed but unfinished: position stays at 51
    assert tracker.committable() == {TP: 3}
    tracker.mark_committed({TP: 3})
    assert tracker.committable() == {}
    tracker.finish(TP1, 51, e1)
    assert tracker.committable() == {TP1: 52}


def test_mark_committed_ignores_unknown_partitions() -> None:
    tracker, epoch = _tracker_with(TP, [0])
    tracker.finish(TP, 0, epoch)
    tracker.mark_committed({TP1: 7})
    assert tracker.committable() == {TP: 1}
    assert TP1 not in tracker.positions()


def test_a_partial_commit_keeps_the_newer_position_committable() -> None:
    tracker, epoch = _tracker_with(TP, [0, 1])
    tracker.finish(TP, 0, epoch)
    snapshot = tracker.committable()
    tracker.finish(TP, 1, epoch)  # finishes while the commit of `snapshot` is in flight
    tracker.mark_committed(snapshot)
    assert tracker.committable() == {TP: 2}


def test_revoke_then_stale_finish_is_ignored() -> None:
    tracker, epoch = _tracker_with(TP, [5, 6])
    tracker.revoke(TP)
    assert tracker.epoch(TP) == -1
    assert tracker.finish(TP, 5, epoch) is False
    assert tracker.committable() == {}
    assert tracker.positions() == {}
    assert tracker.in_flight == 0
    assert tracker.in_flight_for(TP) == 0


def test_revoke_of_an_unknown_partition_is_harmless() -> None:
    tracker = OffsetTracker()
    tracker.revoke(TP)
    assert tracker.epoch(TP) == -1


def test_reassign_gives_a_new_epoch_and_stale_work_cannot_move_it() -> None:
    tracker = OffsetTracker()
    first = tracker.assign(TP)
    old = tracker.add_many(TP, [5, 6])
    assert old == first
    tracker.revoke(TP)
    second = tracker.assign(TP)
    assert second > first
    assert tracker.epoch(TP) == second

    new = tracker.add_many(TP, [5, 6])  # the same records, fetched again by the new owner
    assert new == second
    assert tracker.finish(TP, 5, old) is False  # the old task finishing late
    assert tracker.positions() == {TP: 5}
    assert tracker.finish(TP, 5, new) is True
    assert tracker.positions() == {TP: 6}


def test_reassign_without_revoke_also_starts_a_new_epoch() -> None:
    tracker, old = _tracker_with(TP, [1])
    new = tracker.assign(TP)
    assert new != old
    assert tracker.finish(TP, 1, old) is False
    assert tracker.in_flight_for(TP) == 0


def test_epochs_are_per_partition() -> None:
    tracker = OffsetTracker()
    assert tracker.assign(TP) == tracker.assign(TP1)


def test_add_registers_an_unassigned_partition() -> None:
    tracker = OffsetTracker()
    epoch = tracker.add(TP, 3)
    assert epoch == tracker.epoch(TP)
    assert epoch > 0
    assert tracker.finish(TP, 3, epoch)
    assert tracker.committable() == {TP: 4}


def test_tracker_add_out_of_order_raises() -> None:
    tracker, _ = _tracker_with(TP, [10, 11])
    with pytest.raises(ValueError):
        tracker.add(TP, 11)
    with pytest.raises(ValueError):
        tracker.add_many(TP, [12, 9])
    assert tracker.add(TP1, 0) > 0  # another partition has its own order


def test_in_flight_counts_per_partition_and_in_total() -> None:
    tracker = OffsetTracker()
    tracker.assign(TP)
    tracker.assign(TP1)
    e0 = tracker.add_many(TP, [0, 1, 2])
    e1 = tracker.add_many(TP1, [7, 8])
    assert tracker.in_flight == 5
    assert tracker.in_flight_for(TP) == 3
    assert tracker.in_flight_for(TP1) == 2
    assert tracker.in_flight_for(TopicPartition("other", 0)) == 0

    tracker.finish(TP, 0, e0)
    assert tracker.in_flight_for(TP) == 2
    tracker.finish(TP, 2, e0)  # done, but behind an unfinished offset: still uncommitted
    assert tracker.in_flight_for(TP) == 2
    tracker.finish(TP, 1, e0)
    assert tracker.in_flight_for(TP) == 0
    tracker.finish(TP1, 7, e1)
    tracker.finish(TP1, 8, e1)
    assert tracker.in_flight == 0


def test_add_many_of_nothing_returns_the_current_epoch() -> None:
    tracker = OffsetTracker()
    assert tracker.add_many(TP, []) == -1
    epoch = tracker.assign(TP)
    assert tracker.add_many(TP, []) == epoch


# --- property: random completion orders ------------------------------------------------------


def _expected_position(added: list[int], finished: set[int]) -> int:
    """One past the highest offset below which everything added is finished."""
    position = added[0]
    for offset in added:
        if offset not in finished:
            return position
        position = offset + 1
    return position


@pytest.mark.parametrize("seed", range(40))
def test_position_never_passes_an_unfinished_offset(seed: int) -> None:
    rng = random.Random(seed)
    tracker = OffsetTracker()
    epochs = {tp: tracker.assign(tp) for tp in (TP, TP1)}
    added: dict[TopicPartition, list[int]] = {TP: [], TP1: []}
    finished: dict[TopicPartition, set[int]] = {TP: set(), TP1: set()}
    next_offset = {TP: rng.randrange(0, 1000), TP1: 0}
    total = rng.randrange(1, 60)

    def unfinished(tp: TopicPartition) -> list[int]:
        return [o for o in added[tp] if o not in finished[tp]]

    while sum(len(v) for v in added.values()) < total or any(unfinished(tp) for tp in added):
        tp = rng.choice([TP, TP1])
        if sum(len(v) for v in added.values()) < total and rng.random() < 0.5:
            count = rng.randrange(1, 5)
            offsets = []
            for _ in range(count):
                offsets.append(next_offset[tp])
                next_offset[tp] += rng.choice([1, 1, 1, 2, 5])  # sometimes a gap
            assert tracker.add_many(tp, offsets) == epochs[tp]
            added[tp].extend(offsets)
        else:
            waiting = unfinished(tp)
            if not waiting:
                continue
            offset = rng.choice(waiting)
            assert tracker.finish(tp, offset, epochs[tp])
            finished[tp].add(offset)

        for part in (TP, TP1):
            position = tracker.positions().get(part)
            if not added[part]:
                assert position is None
                continue
            assert position is not None
            assert position == _expected_position(added[part], finished[part])
            assert all(position <= o for o in unfinished(part))
            assert tracker.in_flight_for(part) == len([o for o in added[part] if o >= position])

    for part in (TP, TP1):
        if added[part]:
            assert tracker.positions()[part] == added[part][-1] + 1
            assert tracker.in_flight_for(part) == 0
    assert tracker.in_flight == 0
