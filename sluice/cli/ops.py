"""Operator commands: ``sluice lag`` and ``sluice dashboard``.

    sluice lag                      # one reading: group, topic, partition, committed, end, lag
    sluice lag --watch              # a live table with the rate of change (Ctrl-C to stop)
    sluice lag --json -g sluice-compute
    sluice lag --serve --port 9308  # a Prometheus exporter (kafka_exporter metric names)
    sluice dashboard --scrape http://127.0.0.1:9400/metrics --scrape ...   # http://127.0.0.1:9410/

``register(app)`` adds both to the ``sluice`` app; ``python -m sluice.cli.ops`` runs them alone.
"""

from __future__ import annotations

import asyncio
import signal
import time
from typing import Annotated, Any

import orjson
import typer
from rich.console import Console
from rich.live import Live
from rich.table import Table

from pipeline.aio import run_async
from pipeline.config import Settings
from pipeline.logs import setup_logging
from sluice.cli.errors import SluiceGroup
from sluice.dashboard import DEFAULT_DASHBOARD_PORT, Dashboard
from sluice.lag import (
    DEFAULT_EXPORTER_PORT,
    GroupSelector,
    LagExporter,
    LagRates,
    LagReader,
    LagSnapshot,
)
from sluice.settings import load_settings

app = typer.Typer(
    cls=SluiceGroup, help="Lag and the live dashboard.", pretty_exceptions_show_locals=False
)
console = Console()
err = Console(stderr=True)

GroupOpt = Annotated[
    list[str] | None,
    typer.Option("--group", "-g", help="A consumer group (repeatable); default: sluice-*."),
]
AllGroupsOpt = Annotated[bool, typer.Option(help="Every consumer group on the cluster.")]


def lag_table(snapshot: LagSnapshot, rates: LagRates | None = None) -> Table:
    """The live table: one row per group/topic/partition, a total per group and topic."""
    partition_rates = rates.partition_rates() if rates else {}
    topic_rates = rates.topic_rates() if rates else {}
    when = time.strftime("%H:%M:%S", time.localtime(snapshot.taken_at))
    table = Table(title=f"consumer-group lag at {when}", title_justify="left")
    for name in ("group", "topic"):
        table.add_column(name, justify="left")
    for name in ("partition", "committed", "end", "lag", "rate/s"):
        table.add_column(name, justify="right")
    sums = snapshot.topic_sums()
    previous: tuple[str, str] | None = None
    for p in snapshot.partitions:
        if previous is not None and previous != (p.group, p.topic):
            _total_row(table, previous, sums, topic_rates)
        previous = (p.group, p.topic)
        table.add_row(
            p.group,
            p.topic,
            str(p.partition),
            "-" if p.committed is None else str(p.committed),
            str(p.end),
            _lag_cell(p.lag),
            _rate_cell(partition_rates.get(p.key)),
        )
    if previous is not None:
        _total_row(table, previous, sums, topic_rates)
    for group, info in sorted(snapshot.groups.items()):
        if not any(p.group == group for p in snapshot.partitions):
            table.add_row(group, f"[dim]no offsets ({info.state})[/]", "", "", "", "", "")
    return table


def _total_row(
    table: Table,
    key: tuple[str, str],
    sums: dict[tuple[str, str], int],
    rates: dict[tuple[str, str], float],
) -> None:
    table.add_row(
        f"[bold]{key[0]}[/]",
        f"[bold]{key[1]}[/]",
        "[bold]all[/]",
        "",
        "",
        f"[bold]{_lag_cell(sums.get(key))}[/]",
        _rate_cell(rates.get(key)),
        end_section=True,
    )


def _lag_cell(lag: int | None) -> str:
    """``-`` without a commit, as kafka-consumer-groups prints it."""
    if lag is None:
        return "-"
    return f"[yellow]{lag}[/]" if lag > 0 else str(lag)


def _rate_cell(rate: float | None) -> str:
    if rate is None:
        return "[dim]-[/]"
    if rate > 0.05:
        return f"[red]+{rate:.1f}[/]"
    if rate < -0.05:
        return f"[green]{rate:.1f}[/]"
    return "0.0"


def lag_json(snapshot: LagSnapshot) -> dict[str, Any]:
    sums = snapshot.group_sums()
    return {
        "taken_at": snapshot.taken_at,
        "groups": [
            {"group": g, "state": i.state, "members": i.members, "lag": sums.get(g, 0)}
            for g, i in sorted(snapshot.groups.items())
        ],
        "partitions": [
            {
                "group": p.group,
                "topic": p.topic,
                "partition": p.partition,
                "committed": p.committed,
                "end": p.end,
                "lag": p.lag,
            }
            for p in snapshot.partitions
        ],
    }


async def _read_once(settings: Settings, selector: GroupSelector) -> LagSnapshot:
    async with LagReader(settings, selector) as reader:
        return await reader.read()


async def _watch(
    settings: Settings, selector: GroupSelector, interval: float, window: float
) -> None:
    rates = LagRates(window)
    async with LagReader(settings, selector) as reader:
        snapshot = await reader.read()
        rates.add(snapshot)
        with Live(lag_table(snapshot, rates), console=console, auto_refresh=False) as live:
            while True:
                await asyncio.sleep(interval)
                snapshot = await reader.read()
                rates.add(snapshot)
                live.update(lag_table(snapshot, rates), refresh=True)


async def _until_signalled(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)


async def _serve_exporter(exporter: LagExporter, host: str, port: int, stop: asyncio.Event) -> None:
    await _until_signalled(stop)
    await exporter.start()
    try:
        server = await exporter.serve(host, port)
        console.print(f"lag exporter: http://{server.host}:{server.port}/metrics")
        await stop.wait()
    finally:
        await exporter.stop()


@app.command()
def lag(
    *,
    group: GroupOpt = None,
    all_groups: AllGroupsOpt = False,
    watch: Annotated[bool, typer.Option("--watch", "-w", help="Refresh until Ctrl-C.")] = False,
    interval: Annotated[float, typer.Option(help="Seconds between readings.")] = 1.0,
    window: Annotated[float, typer.Option(help="Seconds over which the rate is taken.")] = 30.0,
    json: Annotated[bool, typer.Option("--json", help="One reading as JSON.")] = False,
    serve: Annotated[
        bool, typer.Option(help="Run as a Prometheus exporter (kafka_exporter metric names).")
    ] = False,
    host: Annotated[str, typer.Option(help="Exporter address.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Exporter port.")] = DEFAULT_EXPORTER_PORT,
) -> None:
    """Lag per consumer group, topic and partition: log-end minus committed offset ("-" where
    nothing is committed yet, as kafka-consumer-groups prints it)."""
    settings = load_settings()
    selector = GroupSelector.for_settings(settings, group or [], all_groups)
    try:
        if serve:
            exporter = LagExporter(settings, selector, interval_s=interval, rate_window_s=window)
            run_async(_serve_exporter(exporter, host, port, asyncio.Event()))
        elif watch:
            run_async(_watch(settings, selector, interval, window))
        else:
            _print_once(run_async(_read_once(settings, selector)), json)
    except KeyboardInterrupt:
        return


def _print_once(snapshot: LagSnapshot, as_json: bool) -> None:
    if as_json:
        typer.echo(orjson.dumps(lag_json(snapshot)).decode())
    elif not snapshot.groups:
        err.print("no consumer groups match (see --group, --all-groups)")
    else:
        console.print(lag_table(snapshot))


@app.command()
def dashboard(
    *,
    scrape: Annotated[
        list[str] | None,
        typer.Option(
            help="A stage's /metrics URL (repeatable), e.g. http://127.0.0.1:9400/metrics"
        ),
    ] = None,
    group: GroupOpt = None,
    all_groups: AllGroupsOpt = False,
    host: Annotated[str, typer.Option(help="Address to serve on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port (0: a free one).")] = DEFAULT_DASHBOARD_PORT,
    interval: Annotated[float, typer.Option(help="Seconds between samples.")] = 1.0,
) -> None:
    """A live web page: lag per group and partition, throughput, dead letters, breakers, workers."""
    settings = load_settings()
    selector = GroupSelector.for_settings(settings, group or [], all_groups)
    # a short rate window: the page shows what lag does now, not over the last half minute
    exporter = LagExporter(settings, selector, interval_s=interval, rate_window_s=5 * interval)

    async def main() -> None:
        stop = asyncio.Event()
        await _until_signalled(stop)
        board = Dashboard(settings, exporter, scrape or [], interval_s=interval)
        await board.start(host, port)
        try:
            console.print(f"dashboard: http://{board.host}:{board.port}/")
            await stop.wait()
        finally:
            await board.stop()

    run_async(main())


def register(sluice: typer.Typer) -> None:
    """Add ``lag`` and ``dashboard`` to the ``sluice`` app."""
    sluice.command("lag")(lag)
    sluice.command("dashboard")(dashboard)


if __name__ == "__main__":
    setup_logging()
    app()
