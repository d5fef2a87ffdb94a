"""``sluice send`` and ``sluice infer``: the producer client (``pipeline/client/``) as commands.

    sluice send "What is 2 + 3?"                  # prints the answer; exit 1 on an error answer
    sluice infer --file prompts.jsonl --batch-size 64 --out answers.jsonl
    sluice infer --file prompts.jsonl --out answers.jsonl --resume   # after a killed run

``infer`` reads one prompt a line: a JSON string (one user message) or a JSON object (an OpenAI
chat-completions request body, optionally with ``id`` / ``conversation_id``). It writes one line
per prompt, in input order, each as soon as it and the ones before it are answered (flushed, so
a killed run keeps what it wrote): ``{"index", "request_id", "status", "degraded",
"latency_s", "answer"}`` where ``answer`` is the ``chat.completion`` or the OpenAI error object
and ``status`` the HTTP status an OpenAI server would have used (504: no answer in time).
Neither the prompts nor the answers are held in memory beyond those in flight
(``sluice/cli/infer_files.py``). ``--resume`` keeps the lines already in ``--out`` and sends only
the other prompts. It exits 1 when a prompt got no answer within the timeout, 0 otherwise
(error answers are answers).
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from pipeline.aio import run_async
from pipeline.client import Prompt, Reply, SluiceClient, prepare
from pipeline.client.many import infer_each
from pipeline.config import Settings
from schemas.messages import ChatCompletion, encode
from sluice.cli.errors import SluiceGroup, fail
from sluice.cli.infer_files import (
    OrderedWriter,
    Tally,
    answer_line,
    iter_prompts,
    scan_prompts,
    written_indices,
)
from sluice.settings import load_settings

app = typer.Typer(
    cls=SluiceGroup,
    help="Send prompts through Sluice and get the answers.",
    no_args_is_help=True,
)
console = Console()
err = Console(stderr=True)


@app.command()
def send(
    text: Annotated[str, typer.Argument(help="The user message.")],
    *,
    system: Annotated[str | None, typer.Option(help="A system message before it.")] = None,
    max_tokens: Annotated[int | None, typer.Option(help="Completion token limit.")] = None,
    conversation_id: Annotated[str | None, typer.Option(help="Conversation (message key).")] = None,
    timeout_s: Annotated[
        float | None, typer.Option("--timeout", help="Seconds to wait for the answer.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the whole answer object.")] = False,
) -> None:
    """Send one prompt and print its answer (exit 1 on an error answer or a timeout)."""
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": text})
    body: dict[str, Any] = {"messages": messages}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    if conversation_id is not None:
        body["conversation_id"] = conversation_id
    settings = load_settings()
    reply = run_async(_send(settings, body, timeout_s))
    if as_json:
        console.print_json(encode(reply.answer).decode())
    answer = reply.answer
    if not isinstance(answer, ChatCompletion):
        raise fail(f"{reply.status} {answer.error.type}: {answer.error.message}", 1)
    if not as_json:
        console.print(answer.content, highlight=False, markup=False)


async def _send(settings: Settings, body: dict[str, Any], timeout_s: float | None) -> Reply:
    async with SluiceClient(settings, source="cli") as client:
        return await client.request(body, timeout_s=timeout_s)


@app.command()
def infer(
    file: Annotated[Path, typer.Option("--file", "-f", help="Prompts, one JSON a line.")],
    *,
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Answers JSONL ('-': standard output).")
    ] = Path("-"),
    batch_size: Annotated[int, typer.Option(min=1, help="Prompts published at a time.")] = 64,
    max_in_flight: Annotated[
        int | None, typer.Option(help="Unanswered prompts at most (default 8 x batch size).")
    ] = None,
    timeout_s: Annotated[
        float | None, typer.Option("--timeout", help="Seconds each prompt may wait.")
    ] = None,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume", help="Keep the lines already in --out and send only the other prompts."
        ),
    ] = False,
) -> None:
    """Send every prompt of a JSONL file; write each answer as it arrives, in input order."""
    to_stdout = str(out) == "-"
    if resume and to_stdout:
        raise fail("--resume needs --out FILE (the answers written so far)")
    try:
        total = scan_prompts(file)
        done = written_indices(out) if resume else set()
    except ValueError as exc:  # not JSON; a missing file is an OSError, for SluiceGroup
        raise fail(str(exc)) from exc
    done = {i for i in done if i < total}
    if resume:
        err.print(f"resuming: {len(done)} of {total} prompts already answered in {out}")
    settings = load_settings()
    t0 = time.monotonic()
    tally = Tally()
    with contextlib.ExitStack() as stack:
        handle = (
            sys.stdout.buffer
            if to_stdout
            else stack.enter_context(out.open("ab" if resume else "wb"))
        )
        writer = OrderedWriter(handle, done)

        def on_reply(index: int, reply: Reply) -> None:
            tally.add(reply)
            writer.put(index, answer_line(index, reply))

        prompts = iter_prompts(file, done)
        left = total - len(done)
        sending = _infer(
            settings,
            prompts,
            left,
            on_reply,
            batch_size=batch_size,
            max_in_flight=max_in_flight,
            timeout_s=timeout_s,
        )
        run_async(sending)
    err.print(summary(tally, time.monotonic() - t0))
    if tally.timed_out:
        raise typer.Exit(1)


async def _infer(
    settings: Settings,
    prompts: Iterator[tuple[int, Prompt]],
    total: int,
    on_reply: Callable[[int, Reply], None],
    *,
    batch_size: int,
    max_in_flight: int | None,
    timeout_s: float | None,
) -> None:
    columns = (
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    async with SluiceClient(settings, source="cli") as client:
        with Progress(*columns, console=err, transient=False) as progress:
            task = progress.add_task("answers", total=total)

            def advance(index: int, reply: Reply) -> None:
                on_reply(index, reply)
                progress.advance(task)

            await infer_each(
                client,
                ((i, prepare(p)) for i, p in prompts),
                advance,
                batch_size=batch_size,
                max_in_flight=max_in_flight,
                timeout_s=timeout_s,
            )


def summary(tally: Tally, elapsed: float) -> Table:
    table = Table(title=f"{tally.total} prompts in {elapsed:.1f}s", show_header=False)
    table.add_row("completions", str(tally.ok))
    table.add_row("error answers", str(tally.errors))
    table.add_row("no answer (timeout)", str(tally.timed_out))
    for q in (50, 90, 99):
        table.add_row(f"latency p{q}", f"{tally.percentile(q) * 1000:.0f} ms")
    if elapsed > 0:
        table.add_row("throughput", f"{tally.total / elapsed:.1f} prompts/s")
    return table


if __name__ == "__main__":
    app()
