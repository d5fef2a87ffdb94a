"""``sluice send`` and ``sluice infer``: the producer client (``pipeline/client/``) as commands.

    sluice send "What is 2 + 3?"                  # prints the answer; exit 1 on an error answer
    sluice infer --file prompts.jsonl --batch-size 64 --out answers.jsonl

``infer`` reads one prompt a line: a JSON string (one user message) or a JSON object (an OpenAI
chat-completions request body, optionally with ``id`` / ``conversation_id``). It writes one line
per prompt, in input order: ``{"index", "request_id", "status", "degraded", "latency_s",
"answer"}`` where ``answer`` is the ``chat.completion`` or the OpenAI error object and
``status`` the HTTP status an OpenAI server would have used (504: no answer in time). It exits
1 when a prompt got no answer within the timeout, 0 otherwise (error answers are answers).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Annotated, Any

import orjson
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
from pipeline.client import Prompt, Reply, SluiceClient
from pipeline.config import Settings
from schemas.messages import ChatCompletion, encode
from sluice.cli.errors import SluiceGroup, fail
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
) -> None:
    """Send every prompt of a JSONL file; write the answers in input order."""
    try:
        prompts = read_prompts(file)
    except ValueError as exc:  # not JSON; a missing file is an OSError, for SluiceGroup
        raise fail(str(exc)) from exc
    settings = load_settings()
    t0 = time.monotonic()
    replies = run_async(_infer(settings, prompts, batch_size, max_in_flight, timeout_s))
    elapsed = time.monotonic() - t0
    lines = b"".join(orjson.dumps(answer_line(i, r)) + b"\n" for i, r in enumerate(replies))
    if str(out) == "-":
        sys.stdout.buffer.write(lines)
        sys.stdout.flush()
    else:
        out.write_bytes(lines)
    err.print(summary(replies, elapsed))
    if any(r.timed_out for r in replies):
        raise typer.Exit(1)


async def _infer(
    settings: Settings,
    prompts: list[Prompt],
    batch_size: int,
    max_in_flight: int | None,
    timeout_s: float | None,
) -> list[Reply]:
    columns = (
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    async with SluiceClient(settings, source="cli") as client:
        with Progress(*columns, console=err, transient=False) as progress:
            task = progress.add_task("answers", total=len(prompts))
            return await client.infer(
                prompts,
                batch_size=batch_size,
                max_in_flight=max_in_flight,
                timeout_s=timeout_s,
                on_reply=lambda _i, _r: progress.advance(task),
            )


def read_prompts(path: Path) -> list[Prompt]:
    """One prompt a line (blank lines skipped): a JSON string or a JSON object."""
    prompts: list[Prompt] = []
    with path.open("rb") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                value = orjson.loads(line)
            except orjson.JSONDecodeError as exc:
                raise ValueError(f"{path}:{number}: not JSON ({exc.msg})") from exc
            if not isinstance(value, str | dict):
                raise ValueError(f"{path}:{number}: expected a JSON string or object")
            prompts.append(value)
    return prompts


def answer_line(index: int, reply: Reply) -> dict[str, Any]:
    return {
        "index": index,
        "request_id": reply.request_id,
        "status": reply.status,
        "degraded": reply.degraded,
        "latency_s": round(reply.latency_s, 4),
        "answer": orjson.Fragment(encode(reply.answer)),
    }


def _percentile(ordered: list[float], q: float) -> float:
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, round((len(ordered) - 1) * q / 100))]


def summary(replies: list[Reply], elapsed: float) -> Table:
    ok = sum(r.ok for r in replies)
    timed_out = sum(r.timed_out for r in replies)
    latencies = sorted(r.latency_s for r in replies if not r.timed_out)
    table = Table(title=f"{len(replies)} prompts in {elapsed:.1f}s", show_header=False)
    table.add_row("completions", str(ok))
    table.add_row("error answers", str(len(replies) - ok - timed_out))
    table.add_row("no answer (timeout)", str(timed_out))
    for q in (50, 90, 99):
        table.add_row(f"latency p{q}", f"{_percentile(latencies, q) * 1000:.0f} ms")
    if elapsed > 0:
        table.add_row("throughput", f"{len(replies) / elapsed:.1f} prompts/s")
    return table


if __name__ == "__main__":
    app()
