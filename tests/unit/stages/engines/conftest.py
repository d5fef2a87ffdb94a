"""Fixtures for the engine tests: the demo model loaded once, and engines started per test."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from stages.engines.onnx import OnnxEngine
from stages.engines.scheduler import LoadedModel, load_model
from tests.unit.stages.engines.demo import INT8, EngineFactory, HookedEngine


@pytest.fixture(scope="session")
def demo_model() -> LoadedModel:
    """The demo INT8 model, one onnxruntime thread, for schedulers stepped on the test's own
    thread (og objects belong to the thread that made them: build schedulers in the test)."""
    return load_model(INT8, threads=1)


@pytest.fixture
async def make_engine() -> AsyncIterator[EngineFactory]:
    """Start engines on the demo INT8 model (one thread each); close them all afterwards."""
    engines: list[OnnxEngine] = []

    async def make(cls: type[OnnxEngine] = OnnxEngine, **kwargs: Any) -> OnnxEngine:
        kwargs.setdefault("threads", 1)
        kwargs.setdefault("mode", "engine")  # og.Engine unless a test asks for another path
        engine = cls(kwargs.pop("path", INT8), **kwargs)
        engines.append(engine)
        await asyncio.wait_for(engine.start(), 30)
        return engine

    yield make
    for engine in engines:
        if isinstance(engine, HookedEngine):
            engine.hook.release.set()  # a step the test blocked: let it return
        await engine.close()
