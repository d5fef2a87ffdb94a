"""Expected failures as one line: what every ``sluice`` command prints instead of a traceback.

A broker that is not running, a wrong address, a missing model or file, a bad setting: each is
something the operator fixes, so the command says what went wrong in one ``error: …`` line on
stderr and exits non-zero (2: bad configuration; 3: something it needed failed). ``sluice
--verbose`` lets the exception through, traceback and all. Anything not listed here is a bug and
keeps its traceback.

:class:`SluiceGroup` does this for a whole typer app (``typer.Typer(cls=SluiceGroup)``): every
command below it, and every group below that, runs inside its ``invoke``.
"""

from __future__ import annotations

from typing import Any

import typer
from aiokafka.errors import KafkaConnectionError, KafkaError, KafkaTimeoutError
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape
from typer.core import TyperGroup

from infra.process import InfraError
from pipeline.errors import SluiceError
from sluice.settings import SettingError, load_settings

EXIT_CONFIG = 2
EXIT_FAILED = 3


def _object_store_errors() -> tuple[type[BaseException], ...]:
    """botocore's errors, where it is installed (it comes with aioboto3; a host that serves
    without object storage, such as the GPU bench host, may not have it)."""
    try:
        from botocore.exceptions import BotoCoreError, ClientError
    except ImportError:
        return ()
    return (BotoCoreError, ClientError)


OBJECT_STORE_ERRORS = _object_store_errors()

EXPECTED: tuple[type[BaseException], ...] = (
    KafkaError,
    SluiceError,
    InfraError,
    OSError,  # includes TimeoutError and ConnectionError
    ValidationError,
    *OBJECT_STORE_ERRORS,
)

err = Console(stderr=True)


def print_error(message: str) -> None:
    """One ``error: …`` line on stderr, never wrapped into two."""
    err.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True, highlight=False)


def fail(message: str, code: int = EXIT_CONFIG) -> typer.Exit:
    """Print ``message`` as the command's error line; raise the returned Exit."""
    print_error(message)
    return typer.Exit(code)


def describe(exc: BaseException, bootstrap: str | None = None) -> tuple[str, int]:
    """The one line an expected failure gets, and the exit code."""
    where = f" at {bootstrap}" if bootstrap else ""
    if isinstance(exc, ValidationError):
        return _settings_line(exc), EXIT_CONFIG
    if isinstance(exc, SettingError):
        return str(exc), EXIT_CONFIG
    if isinstance(exc, KafkaConnectionError):
        return (
            f"cannot reach the Kafka broker{where}: is it running, and is "
            "SLUICE_BOOTSTRAP_SERVERS right? (sluice up starts a local one)",
            EXIT_FAILED,
        )
    if isinstance(exc, KafkaTimeoutError):
        return f"the Kafka broker{where} did not answer in time: {_first_line(exc)}", EXIT_FAILED
    if isinstance(exc, KafkaError):
        return f"Kafka{where}: {_first_line(exc)}", EXIT_FAILED
    if isinstance(exc, OBJECT_STORE_ERRORS):
        return f"object storage: {_first_line(exc)}", EXIT_FAILED
    if isinstance(exc, OSError) and exc.strerror and exc.filename is not None:
        return f"{exc.strerror}: {exc.filename}", EXIT_FAILED
    return _first_line(exc), EXIT_FAILED


def _first_line(exc: BaseException) -> str:
    """The message's first line (an InfraError goes on with a log's tail) or the type's name."""
    text = str(exc).strip()
    if not text:
        return type(exc).__name__
    first, _, rest = text.partition("\n")
    return f"{first} (--verbose shows the rest)" if rest.strip() else first


def _settings_line(exc: ValidationError) -> str:
    if exc.title != "Settings":
        return f"invalid {exc.title}: {_problems(exc)}"
    return f"invalid setting: {_problems(exc, env=True)}"


def _problems(exc: ValidationError, env: bool = False) -> str:
    parts: list[str] = []
    for problem in exc.errors(include_url=False):
        loc = ".".join(str(part) for part in problem["loc"])
        if env and loc:
            loc = f"SLUICE_{loc.upper()}"
        parts.append(f"{loc}: {problem['msg']}" if loc else str(problem["msg"]))
    return "; ".join(parts)


def _bootstrap() -> str | None:
    """The broker address the command used, for the message (None if settings are broken)."""
    try:
        return load_settings().bootstrap_servers
    except (ValidationError, SettingError):
        return None


class SluiceGroup(TyperGroup):
    """A typer group whose commands answer expected failures with one line."""

    # ``Any``: typer types this with the click it vendors (typer._click), a private module.
    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except EXPECTED as exc:
            if _verbose(ctx):
                raise
            message, code = describe(exc, _bootstrap() if isinstance(exc, KafkaError) else None)
            raise fail(message, code) from exc


def _verbose(ctx: Any) -> bool:
    return bool(ctx.find_root().params.get("verbose"))
