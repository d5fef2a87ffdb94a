"""The cutover's decisions per stage, without a broker: copy, already done, or refuse."""

from __future__ import annotations

import pytest
from aiokafka import TopicPartition

from pipeline.config import Settings
from sluice.cutover import Cutover, CutoverError, GroupView, assess

T0, T1 = TopicPartition("sluice.tokenized", 0), TopicPartition("sluice.tokenized", 1)


def view(group: str, members: int = 0, **offsets: int) -> GroupView:
    tps = {"p0": T0, "p1": T1}
    return GroupView(group, "Stable" if members else "Empty", members,
                     {tps[k]: v for k, v in offsets.items()})  # fmt: skip


def test_an_empty_green_group_gets_blues_offsets() -> None:
    assert assess(view("blue", 2, p0=10, p1=7), view("green")) == "copy"


def test_green_behind_or_equal_is_copied_over_an_interrupted_run_continues() -> None:
    assert assess(view("blue", 0, p0=10, p1=7), view("green", 0, p0=10, p1=3)) == "copy"


def test_green_ahead_of_blue_is_refused_naming_the_partition() -> None:
    with pytest.raises(CutoverError) as caught:
        assess(view("blue", 1, p0=10, p1=7), view("green", 0, p0=12, p1=7))
    assert "green has committed offsets ahead of blue on sluice.tokenized[0] 12 > 10" in str(
        caught.value
    )


def test_green_offsets_on_a_partition_blue_never_committed_count_as_ahead() -> None:
    with pytest.raises(CutoverError, match=r"tokenized\[1\] 4 > none"):
        assess(view("blue", 1, p0=10), view("green", 0, p0=10, p1=4))


def test_both_serving_is_refused() -> None:
    with pytest.raises(CutoverError, match=r"green already has 1 member.* while blue has 2"):
        assess(view("blue", 2, p0=1), view("green", 1, p0=1))


def test_green_serving_and_blue_empty_is_already_done() -> None:
    assert assess(view("blue", 0, p0=10), view("green", 3, p0=15)) == "done"


def test_green_serving_but_behind_an_empty_blue_is_refused() -> None:
    with pytest.raises(CutoverError, match="serving but behind blue"):
        assess(view("blue", 0, p0=10), view("green", 1, p0=4))


def test_groups_differ_only_by_the_suffix() -> None:
    job = Cutover(Settings(topic_prefix="acme."), "blue", "green", ["compute"])
    assert job.groups("compute") == ("acme-compute-blue", "acme-compute-green")
    unsuffixed = Cutover(Settings(), "", "green", ["compute"])
    assert unsuffixed.groups("compute") == ("sluice-compute", "sluice-compute-green")


@pytest.mark.parametrize(("source", "target", "stages", "message"), [
    ("blue", "blue", ["compute"], "the same"),
    ("blue", "green", ["gateway"], "unknown stage"),
    ("blue", "green", [], "none given"),
    ("blue", "gr een", ["compute"], "letters, digits"),
])  # fmt: skip
def test_bad_arguments_are_one_clear_error(
    source: str, target: str, stages: list[str], message: str
) -> None:
    with pytest.raises(CutoverError, match=message):
        Cutover(Settings(), source, target, stages)


def test_a_group_suffix_outside_the_allowed_characters_is_refused() -> None:
    with pytest.raises(ValueError, match="group_suffix"):
        Settings(group_suffix="green blue")
