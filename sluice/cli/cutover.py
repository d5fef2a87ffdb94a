"""``sluice cutover``: blue/green by consumer group (the steps are in ``sluice/cutover.py``).

    sluice cutover --from blue --to green \\
        --stop-cmd 'kill -TERM $(cat blue.pid)' \\
        --start-cmd 'SLUICE_GROUP_SUFFIX=green nohup sluice scale >green.log 2>&1 &'
    sluice cutover --from blue --to green --rollback ...   # green back to blue

``register(app)`` adds the command to the ``sluice`` app.
"""

from __future__ import annotations

import asyncio
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from pipeline.aio import run_async
from sluice.cutover import SERVING_STAGES, Cutover, CutoverError, Hook
from sluice.settings import load_settings

console = Console()
err = Console(stderr=True)


def shell_hook(command: str, what: str) -> Hook:
    """A hook that runs ``command`` in a shell; CutoverError when it exits non-zero."""

    async def run() -> None:
        proc = await asyncio.create_subprocess_shell(command)
        code = await proc.wait()
        if code != 0:
            raise CutoverError(f"the {what} command exited with {code}: {command}")

    return run


def cutover(
    *,
    source: Annotated[str, typer.Option("--from", help='Group suffix serving now ("": none).')],
    target: Annotated[str, typer.Option("--to", help="Group suffix to move to.")],
    stages: Annotated[
        list[str] | None,
        typer.Option("--stage", help=f"Stages to move (default: {', '.join(SERVING_STAGES)})."),
    ] = None,
    rollback: Annotated[
        bool, typer.Option(help="Move back: from --to to --from (after a cutover).")
    ] = False,
    stop_cmd: Annotated[
        str | None,
        typer.Option(help="Shell command that stops the deployment being left (SIGTERM)."),
    ] = None,
    start_cmd: Annotated[
        str | None, typer.Option(help="Shell command that starts the deployment moved to.")
    ] = None,
    timeout: Annotated[
        float, typer.Option(help="Seconds to wait for groups to empty or to join.")
    ] = 120.0,
) -> None:
    """Move the stages from one deployment's consumer groups to another's (blue/green).

    Checks the target groups, stops the source (--stop-cmd, or waits for you to), waits until
    its groups are empty, copies their committed offsets to the target groups, then starts the
    target (--start-cmd). Interrupted, it can be run again and finishes.
    """
    if rollback:
        source, target = target, source
    try:
        job = Cutover(
            load_settings(),
            source,
            target,
            stages or SERVING_STAGES,
            stop_source=shell_hook(stop_cmd, "stop") if stop_cmd else None,
            start_target=shell_hook(start_cmd, "start") if start_cmd else None,
            timeout_s=timeout,
            say=lambda line: console.print(escape(line), highlight=False),
        )
    except CutoverError as exc:  # bad arguments
        err.print(f"[bold red]error:[/] {escape(exc.message)}")
        raise typer.Exit(2) from exc
    try:
        results = run_async(job.run())
    except CutoverError as exc:
        err.print(f"[bold red]error:[/] {escape(exc.message)}")
        raise typer.Exit(1) from exc
    table = Table(title=f"cutover {source or '(none)'} -> {target or '(none)'}")
    for name in ("stage", "from group", "to group", "partitions", "action"):
        table.add_column(name)
    for r in results:
        table.add_row(r.stage, r.source, r.target, str(len(r.offsets)), r.action)
    console.print(table)
    if start_cmd is None:
        console.print(f"offsets are in place: start the stages with group suffix {target!r}")


def register(app: typer.Typer) -> None:
    """Add ``cutover`` to the ``sluice`` app."""
    app.command("cutover")(cutover)
