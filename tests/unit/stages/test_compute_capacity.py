"""Compute tells the stage loop how much to hold and when it last made progress."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

from pipeline.config import Settings
from stages.compute import Compute


def _compute(tmp_path: Path, engine: Any) -> Compute:
    return Compute(Settings(model_path=tmp_path, topic_prefix="t."), engine)


def test_in_flight_is_twice_the_engine_batch(tmp_path: Path) -> None:
    assert _compute(tmp_path, SimpleNamespace(max_batch=128)).max_in_flight == 256


def test_an_engine_without_a_batch_size_leaves_the_setting(tmp_path: Path) -> None:
    assert _compute(tmp_path, SimpleNamespace()).max_in_flight is None
    assert _compute(tmp_path, SimpleNamespace(max_batch=0)).max_in_flight is None


def test_progress_is_the_engine_s(tmp_path: Path) -> None:
    assert _compute(tmp_path, SimpleNamespace(last_progress=42.5)).last_progress() == 42.5
    assert _compute(tmp_path, SimpleNamespace()).last_progress() == 0.0
