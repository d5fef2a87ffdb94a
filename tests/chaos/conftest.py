"""The chaos suite runs only when asked for (``make chaos``: ``pytest -m chaos tests/chaos``):
it kills processes and brokers for minutes, so a plain ``pytest`` deselects it (reported as
deselected, never skipped)."""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if "chaos" in (config.getoption("markexpr") or ""):
        return
    chaos = [item for item in items if item.get_closest_marker("chaos") is not None]
    if chaos:
        config.hook.pytest_deselected(items=chaos)
        items[:] = [item for item in items if item.get_closest_marker("chaos") is None]
