"""An asker's reply partitions: the setting when given, else its instance id's slot."""

from __future__ import annotations

import pytest

from pipeline.client.replies import choose_reply_partitions, parse_partitions


def test_the_setting_names_the_partitions() -> None:
    assert choose_reply_partitions("3", "0", 6) == [3]
    assert choose_reply_partitions(" 4, 3,4 ", "0", 6) == [3, 4]


def test_without_the_setting_the_instance_id_picks_one() -> None:
    assert [choose_reply_partitions("", str(i), 3) for i in range(4)] == [[0], [1], [2], [0]]
    named = choose_reply_partitions("", "gateway-blue", 3)
    assert named == choose_reply_partitions("", "gateway-blue", 3) and 0 <= named[0] < 3


def test_partitions_that_do_not_exist_or_garbage_are_refused() -> None:
    with pytest.raises(ValueError, match=r"\[6\] do not exist"):
        choose_reply_partitions("2,6", "0", 6)
    with pytest.raises(ValueError, match="not a partition number"):
        parse_partitions("3;4")
    with pytest.raises(ValueError, match="no partitions"):
        choose_reply_partitions("", "0", 0)
