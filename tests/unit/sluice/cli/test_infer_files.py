"""``sluice infer``'s files without a broker: lazy prompts, in-order writing, resume."""

from __future__ import annotations

import io
from pathlib import Path

import orjson
import pytest

from sluice.cli.infer_files import OrderedWriter, iter_prompts, scan_prompts, written_indices


def test_answers_are_written_in_input_order_as_soon_as_the_ones_before_are() -> None:
    sink = io.BytesIO()
    writer = OrderedWriter(sink)
    writer.put(1, b"one\n")
    writer.put(2, b"two\n")
    assert sink.getvalue() == b"" and len(writer.held) == 2  # waiting for 0
    writer.put(0, b"zero\n")
    assert sink.getvalue() == b"zero\none\ntwo\n" and writer.held == {}
    writer.put(3, b"three\n")
    assert sink.getvalue().endswith(b"three\n") and writer.written == 4


def test_indices_already_in_the_file_are_not_waited_for() -> None:
    sink = io.BytesIO()
    writer = OrderedWriter(sink, skip={0, 1, 3})
    writer.put(2, b"two\n")
    writer.put(4, b"four\n")
    assert sink.getvalue() == b"two\nfour\n"


def test_prompts_are_checked_counted_and_read_again_without_the_done_ones(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    path.write_bytes(b'"a"\n\n{"messages": []}\n"c"\n')
    assert scan_prompts(path) == 3  # blank lines are not prompts
    assert list(iter_prompts(path, {1})) == [(0, "a"), (2, "c")]
    path.write_bytes(b'"a"\n42\n')
    with pytest.raises(ValueError, match=r"p\.jsonl:2: expected a JSON string or object"):
        scan_prompts(path)


def test_resume_reads_the_written_indices_and_cuts_a_line_a_kill_left_half_written(
    tmp_path: Path,
) -> None:
    out = tmp_path / "answers.jsonl"
    assert written_indices(out) == set()
    whole = b"".join(orjson.dumps({"index": i}) + b"\n" for i in (0, 1, 2))
    out.write_bytes(whole + b'{"index": 3, "ans')
    assert written_indices(out) == {0, 1, 2}
    assert out.read_bytes() == whole  # appending goes on after the last complete line
