"""Settings for the ``sluice`` command: the environment, plus the broker ``sluice up`` started.

Services read plain :func:`pipeline.config.load_settings`; only the command line (and the
processes it starts, which inherit the address) looks for a local broker, so the local commands
work with no configuration at all.
"""

from __future__ import annotations

from typing import Any

from infra.kafka.broker import default_state_file
from infra.process import ServiceHandle
from pipeline.config import Settings
from pipeline.config import load_settings as load_plain


def load_settings(**overrides: Any) -> Settings:
    """The environment, then ``overrides``; without ``SLUICE_BOOTSTRAP_SERVERS``, the local broker.

    When ``SLUICE_BOOTSTRAP_SERVERS`` is not set and ``sluice up`` started a local broker, its
    address is used.
    """
    settings = load_plain(**overrides)
    if (
        "bootstrap_servers" not in overrides
        and "bootstrap_servers" not in settings.model_fields_set
    ):
        local = local_broker_address()
        if local is not None:
            settings = settings.model_copy(update={"bootstrap_servers": local})
    return settings


def local_broker_address() -> str | None:
    """The address of the broker ``sluice up`` started, if it is still running."""
    handle = ServiceHandle.load(default_state_file())
    if handle is not None and handle.alive():
        return handle.address
    return None
