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
from pipeline.errors import SluiceError


class SettingError(SluiceError):
    """A setting the command cannot work with, named by its environment variable."""

    fatal = True
    reason = "settings"


def load_settings(**overrides: Any) -> Settings:
    """The environment, then ``overrides``; without ``SLUICE_BOOTSTRAP_SERVERS``, the local broker.

    When ``SLUICE_BOOTSTRAP_SERVERS`` is not set and ``sluice up`` started a local broker, its
    address is used. Raises SettingError for a broker address or a TLS file that cannot work.
    """
    settings = load_plain(**overrides)
    if (
        "bootstrap_servers" not in overrides
        and "bootstrap_servers" not in settings.model_fields_set
    ):
        local = local_broker_address()
        if local is not None:
            settings = settings.model_copy(update={"bootstrap_servers": local})
    check_settings(settings)
    return settings


def check_settings(settings: Settings) -> None:
    """What the settings model lets through but no client could use: say so up front."""
    for address in settings.bootstrap_servers.split(","):
        host, sep, port = address.strip().rpartition(":")
        if sep and not (port.isdigit() and 0 < int(port) < 65536):
            raise SettingError(
                f"SLUICE_BOOTSTRAP_SERVERS: {address.strip()!r} is not HOST:PORT "
                "(a comma-separated list of them)"
            )
        if sep and not host:
            raise SettingError(f"SLUICE_BOOTSTRAP_SERVERS: {address.strip()!r} names no host")
    for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
        path = getattr(settings, name)
        if path is not None and not path.is_file():
            raise SettingError(f"SLUICE_{name.upper()}: no file at {path}")


def local_broker_address() -> str | None:
    """The address of the broker ``sluice up`` started, if it is still running."""
    handle = ServiceHandle.load(default_state_file())
    if handle is not None and handle.alive():
        return handle.address
    return None
