"""``sluice replay prompts``, ``sluice replay dlq`` and ``sluice restore``: recovery commands.

``register(app)`` adds them to the ``sluice`` app; ``python -m sluice.cli.replay`` runs them on
their own. Progress goes to stderr, summaries and restored conversations to stdout.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from types import TracebackType
from typing import Annotated, Any, Literal, TypeVar

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.progress import Progress as RichBar
from rich.table import Table

from pipeline.aio import run_async
from pipeline.config import Settings
from pipeline.logs import setup_logging
from pipeline.storage import open_store
from replay.archive import Window
from replay.common import ReplaySummary, parse_time
from sluice.cli.errors import SluiceGroup, fail
from sluice.settings import load_settings

T = TypeVar("T")

replay_app = typer.Typer(
    help="Re-drive work: archived prompts, or dead letters from a .DLT topic.",
    cls=SluiceGroup,
    no_args_is_help=True,
)
console = Console()
err = Console(stderr=True)


class RichProgress:
    """``replay.common.Progress`` as a rich progress bar on stderr."""

    def __init__(self, quiet: bool = False) -> None:
        self._bar = RichBar(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(),
            console=err,
            disable=quiet,
        )
        self._task: TaskID | None = None

    def __enter__(self) -> RichProgress:
        return self  # the bar starts with the first phase: a failed start prints nothing

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._task is None:  # never started; Progress.stop would still print a line
            return
        if exc is not None:  # the command ends in its error line, not in a half-full bar
            self._bar.live.transient = True
        self._bar.stop()

    def begin(self, phase: str, total: int | None) -> None:
        if self._task is not None:
            done = self._bar.tasks[-1].completed
            self._bar.update(self._task, total=done, completed=done)
        else:
            self._bar.start()
        self._task = self._bar.add_task(phase, total=total, status="")

    def advance(self, n: int = 1, **counts: int) -> None:
        if self._task is None:
            return
        status = ", ".join(f"{name} {value:,}" for name, value in counts.items())
        self._bar.update(self._task, advance=n, status=status)


def _run(work: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run one tool on the event loop; a bad argument it finds ends the command in one line.

    Kafka, storage and other expected failures reach ``SluiceGroup``, which does the same.
    """
    try:
        return run_async(work())
    except ValueError as exc:
        raise fail(str(exc) or type(exc).__name__) from exc


def _print_summary(summary: ReplaySummary) -> None:
    title = f"{summary.action}{' (dry run: nothing sent)' if summary.dry_run else ''}"
    table = Table(title=title, show_header=False, min_width=len(title) + 4)
    for name, value in summary.rows():
        table.add_row(name, value)
    console.print(table)


@replay_app.command("prompts")
def replay_prompts(
    *,
    from_url: Annotated[
        str | None, typer.Option("--from", help="Archive URL (default: SLUICE_ARCHIVE_URL).")
    ] = None,
    since: Annotated[
        str | None, typer.Option(help="From this time: ISO 8601, Unix s/ms, or e.g. 2h (ago).")
    ] = None,
    until: Annotated[str | None, typer.Option(help="Before this time (same forms).")] = None,
    partition: Annotated[
        list[int] | None, typer.Option(help="Only this partition (repeatable).")
    ] = None,
    from_offset: Annotated[
        int | None, typer.Option(help="From this offset (needs --partition).")
    ] = None,
    to_offset: Annotated[
        int | None, typer.Option(help="Before this offset (needs --partition).")
    ] = None,
    unanswered: Annotated[
        bool, typer.Option(help="Only prompts with no answer in the archive.")
    ] = False,
    check_topic: Annotated[
        bool, typer.Option(help="With --unanswered: also count answers on the answers topic.")
    ] = False,
    retry_errors: Annotated[
        bool, typer.Option(help="With --unanswered: an error answer does not count.")
    ] = False,
    topic: Annotated[
        str | None, typer.Option(help="Archived prompts topic (default: <prefix>prompts).")
    ] = None,
    to: Annotated[str | None, typer.Option(help="Publish to (default: <prefix>prompts).")] = None,
    rate: Annotated[float, typer.Option(help="At most this many a second (0: no limit).")] = 0,
    dry_run: Annotated[bool, typer.Option(help="Count what would be sent; send nothing.")] = False,
) -> None:
    """Re-publish archived prompts (original keys, headers and request ids)."""
    from replay.prompts import PromptReplayOptions
    from replay.prompts import replay_prompts as run_replay

    if (from_offset is not None or to_offset is not None) and not partition:
        raise fail("--from-offset/--to-offset need --partition")
    if (check_topic or retry_errors) and not unanswered:
        raise fail("--check-topic and --retry-errors go with --unanswered")
    try:
        window = Window.of(
            partition,
            from_offset,
            to_offset,
            parse_time(since) if since else None,
            parse_time(until) if until else None,
        )
    except ValueError as exc:
        raise fail(str(exc)) from exc
    settings = load_settings()
    options = PromptReplayOptions(
        window=window,
        unanswered=unanswered,
        check_topic=check_topic,
        retry_errors=retry_errors,
        source_topic=topic,
        target_topic=to,
        rate=rate,
        dry_run=dry_run,
    )

    async def work() -> ReplaySummary:
        store = open_store(settings, from_url)
        try:
            with RichProgress() as progress:
                return await run_replay(settings, store, options, progress)
        finally:
            await store.close()

    _print_summary(_run(work))


@replay_app.command("dlq")
def replay_dlq(
    dlt_topic: Annotated[
        str, typer.Argument(help="The dead-letter topic, e.g. sluice.prompts.DLT")
    ],
    *,
    reason: Annotated[
        list[str] | None, typer.Option(help="Only dead letters with this sluice-dlt-reason.")
    ] = None,
    to: Annotated[
        str | None, typer.Option(help="Send here instead of each record's original topic.")
    ] = None,
    group: Annotated[
        str | None,
        typer.Option(help="Consumer group keeping the position (default: <prefix>-replay-dlq)."),
    ] = None,
    max_attempts: Annotated[
        int, typer.Option(help="Leave records re-driven this often dead (0: no limit).")
    ] = 5,
    rate: Annotated[float, typer.Option(help="At most this many a second (0: no limit).")] = 0,
    dry_run: Annotated[
        bool, typer.Option(help="Count what would be sent; send and commit nothing.")
    ] = False,
) -> None:
    """Re-drive dead letters to their original topic, committing as it goes."""
    from replay.dlq import DlqReplayOptions
    from replay.dlq import replay_dlq as run_replay

    settings = load_settings()
    options = DlqReplayOptions(
        dlt_topic=dlt_topic,
        reasons=frozenset(reason or ()),
        target_topic=to,
        group_id=group,
        max_attempts=max_attempts,
        rate=rate,
        dry_run=dry_run,
    )

    async def work() -> ReplaySummary:
        with RichProgress() as progress:
            return await run_replay(settings, options, progress)

    _print_summary(_run(work))


def restore(
    conversation: Annotated[str, typer.Option(help="The conversation id.")],
    restore_from: Annotated[
        str | None,
        typer.Option("--restore-from", help="Archive URL (default: SLUICE_ARCHIVE_URL)."),
    ] = None,
    fmt: Annotated[
        Literal["jsonl", "markdown"], typer.Option("--format", help="jsonl | markdown")
    ] = "jsonl",
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write here instead of stdout.")
    ] = None,
) -> None:
    """A conversation's turns, in order, from the archive."""
    from replay.restore import restore_conversation, to_jsonl, to_markdown

    settings = load_settings()

    async def work() -> tuple[str, str]:
        from pipeline.admin import cluster_id_or_unknown

        cluster = await cluster_id_or_unknown(settings)  # id-less prompts derive theirs from it
        store = open_store(settings, restore_from)
        try:
            with RichProgress(quiet=output is None and not err.is_terminal) as progress:
                turns = await restore_conversation(
                    store, settings.topics, conversation, progress, cluster
                )
        finally:
            await store.close()
        if not turns:
            raise ValueError(f"no turns of conversation {conversation!r} in {store.url}")
        answered = sum(1 for t in turns if t.answer is not None)
        note = f"{len(turns)} turns of {conversation} ({answered} answered) from {store.url}"
        text = to_jsonl(turns) if fmt == "jsonl" else to_markdown(turns, conversation)
        return text, note

    text, note = _run(work)
    if output is None:
        sys.stdout.write(text)  # not through rich: the text is the conversation, verbatim
        sys.stdout.flush()
    else:
        output.write_text(text)
        note += f", written to {output}"
    err.print(note, highlight=False, markup=False)


def run_archiver_command(settings: Settings) -> None:
    """``sluice run archiver``: the archiver until SIGTERM/SIGINT."""
    from stages.archiver import run_archiver

    run_async(run_archiver(settings))


def register(app: typer.Typer) -> None:
    """Add ``replay prompts``, ``replay dlq`` and ``restore`` to the ``sluice`` app."""
    app.add_typer(replay_app, name="replay")
    app.command("restore")(restore)


def standalone() -> typer.Typer:
    """These commands as their own app (``python -m sluice.cli.replay``)."""
    app = typer.Typer(cls=SluiceGroup, no_args_is_help=True, pretty_exceptions_show_locals=False)

    @app.callback()
    def main(verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False) -> None:
        setup_logging(verbose)

    register(app)
    return app


if __name__ == "__main__":
    standalone()()
