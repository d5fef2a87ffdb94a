"""``sluice doctor``: the installation's checks as a terminal report, JSON or an HTML page, and
``sluice doctor --crash ID``: one crash report in full."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console, Group
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table

from pipeline.aio import run_async
from pipeline.observability.crash_content import crash_dir
from sluice.crashes import CrashFile, find_report
from sluice.doctor import DoctorOptions, DoctorReport, run_doctor
from sluice.settings import load_settings

console = Console()
err = Console(stderr=True)
STYLE = {"ok": "green", "warn": "yellow", "red": "bold red", "skip": "dim"}


def doctor(
    *,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    html: Annotated[
        Path | None, typer.Option(help="Also write one self-contained HTML page with plots.")
    ] = None,
    crash: Annotated[
        str | None, typer.Option(help="Show one crash report in full (its id or a prefix).")
    ] = None,
    scrape: Annotated[
        list[str] | None,
        typer.Option(
            help="A stage's /metrics URL to check (repeatable; sluice scale's "
            "workers are found without it)."
        ),
    ] = None,
    workers: Annotated[int, typer.Option(help="Workers per stage you plan.")] = 1,
    samples: Annotated[int, typer.Option(help="Lag readings (stuck partitions, plot).")] = 3,
    interval: Annotated[float, typer.Option(help="Seconds between lag readings.")] = 2.0,
) -> None:
    """Check the machine, broker, topics, consumer groups, dead letters, running stages and
    crash reports; exit 1 when anything is red."""
    settings = load_settings()
    if crash is not None:
        found = find_report(crash_dir(settings), crash)
        if found is None:
            err.print(
                f"[bold red]error:[/] no crash report {escape(crash)!s} in {crash_dir(settings)}"
            )
            raise typer.Exit(2)
        show_crash(found, as_json)
        return
    options = DoctorOptions(
        scrape=tuple(scrape or ()), workers=workers, samples=samples, interval_s=interval
    )
    if as_json:
        report = run_async(run_doctor(settings, options))
    else:
        with console.status("checking the machine, the broker and the stages"):
            report = run_async(run_doctor(settings, options))
    if html is not None:
        from sluice.doctor_html import render_html

        html.write_text(render_html(report, settings.bootstrap_servers))
    if as_json:
        print(report.to_json())
    else:
        print_report(report, html)
    if report.red:
        raise typer.Exit(1)


def print_report(report: DoctorReport, html: Path | None = None) -> None:
    table = Table(title="sluice doctor", title_justify="left", expand=True)
    table.add_column("", width=4)
    table.add_column("area", style="bold", no_wrap=True)
    table.add_column("check", no_wrap=True)
    table.add_column("what it saw", ratio=3)
    table.add_column("fix", ratio=2, style="cyan")
    for c in report.checks:
        style = STYLE[c.verdict]
        table.add_row(
            f"[{style}]{c.verdict.upper()}[/]",
            c.area,
            escape(c.name),
            escape(c.summary),
            escape(c.fix),
        )
    console.print(table)
    counts = {v: sum(1 for c in report.checks if c.verdict == v) for v in STYLE}
    line = ", ".join(f"[{STYLE[v]}]{n} {v}[/]" for v, n in counts.items() if n)
    console.print(f"{line}" + (f"; HTML report in {html}" if html else ""))


def show_crash(found: CrashFile, as_json: bool) -> None:
    if found.report is None:
        err.print(f"[bold red]unreadable:[/] {found.path}: {escape(found.problem or '')}")
        raise typer.Exit(1)
    r = found.report
    if as_json:
        print(json.dumps(r, indent=2))
        return
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["time"]))
    head = Table.grid(padding=(0, 2))
    for key, value in [
        ("cause", f"[bold red]{r['cause']}[/]"),
        ("stage", f"{r['stage']} (pid {r.get('pid')}, written by {r.get('written_by')})"),
        ("time", f"{when}; up {r.get('uptime_s') or '?'} s"),
        ("what", escape(found.summary)),
        ("file", str(found.path)),
    ]:
        head.add_row(f"[bold]{key}[/]", value)
    parts: list[Any] = [head]
    parts.extend(_memory(r))
    parts.extend(_inflight(r))
    for title, lines in _texts(r):
        parts.append(Panel("\n".join(escape(x) for x in lines), title=title, expand=True))
    console.print(Panel(Group(*parts), title=f"crash report {r['id']}"))


def _memory(r: dict[str, Any]) -> list[Any]:
    mem = r.get("memory") or {}
    if not isinstance(mem, dict):
        return []
    table = Table(title="memory", title_justify="left")
    for col in ("rss", "peak rss", "limit", "oom kills", "open fds"):
        table.add_column(col, justify="right")
    events = mem.get("cgroup_events") or {}
    exit_ = r.get("exit") or {}
    table.add_row(
        _mib(mem.get("rss_bytes")),
        _mib(mem.get("peak_rss_bytes")),
        f"{_mib(mem.get('limit_bytes'))} {mem.get('limit_source') or ''}",
        str(events.get("oom_kill", exit_.get("oom_kills", "-"))),
        str(r.get("open_fds", "-")),
    )
    out: list[Any] = [table]
    for g in r.get("gpus") or []:
        if "memory_used_bytes" in g:
            out.append(
                f"GPU {g['index']} {g['name']}: {_mib(g['memory_used_bytes'])} of "
                f"{_mib(g['memory_total_bytes'])} used"
            )
    return out


def _inflight(r: dict[str, Any]) -> list[Any]:
    entries = r.get("inflight")
    if not isinstance(entries, list) or not entries:
        return []
    table = Table(title=f"in flight ({len(entries)})", title_justify="left")
    for col in ("request", "state", "prompt tok", "output tok", "sampling", "age s"):
        table.add_column(col)
    for e in entries[:50]:
        sampling = " ".join(f"{k}={v}" for k, v in (e.get("sampling") or {}).items())
        table.add_row(
            str(e.get("request_id")),
            str(e.get("state") or ""),
            str(e.get("prompt_tokens")),
            str(e.get("output_tokens") or 0),
            sampling,
            str(e.get("age_s") or ""),
        )
    return [table]


def _texts(r: dict[str, Any]) -> list[tuple[str, list[str]]]:
    out: list[tuple[str, list[str]]] = []
    error = r.get("error") or {}
    if error.get("traceback"):
        out.append(("error", error["traceback"]))
    if r.get("exit"):
        out.append(("exit", [f"{k}: {v}" for k, v in r["exit"].items()]))
    if r.get("faulthandler"):
        out.append(("faulthandler", r["faulthandler"]))
    threads = r.get("threads")
    if isinstance(threads, list):
        for t in threads:
            out.append((f"thread {t.get('name')}", t.get("stack", [])[-12:]))
    if r.get("last_scrape"):
        out.append(("last /metrics scrape", (r["last_scrape"].get("lines") or [])[:40]))
    if r.get("log_tail"):
        out.append(("last log lines", r["log_tail"][-40:]))
    return out


def _mib(n: Any) -> str:
    return f"{n / 2**20:,.0f} MiB" if isinstance(n, int | float) else "-"


def register(app: typer.Typer) -> None:
    app.command("doctor")(doctor)
