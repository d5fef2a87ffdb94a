"""``sluice doctor --html FILE``: the report as one self-contained page.

No scripts, no fonts, no links: the checks as a table and three plots drawn as inline SVG (lag
of each group over the doctor's readings, the last hour's dead letters by stage and reason, and
the memory of the last process that died, from its crash report). Every text is escaped.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from html import escape
from typing import Any

from sluice.doctor import DoctorReport

W, H, PAD = 560, 200, 40
COLORS = ("#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2")
VERDICT = {"ok": "#16a34a", "warn": "#ca8a04", "red": "#dc2626", "skip": "#6b7280"}

CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#111;background:#fff}
h1{font-size:20px;margin:0 0 4px} h2{font-size:16px;margin:24px 0 8px}
table{border-collapse:collapse;width:100%} td,th{padding:4px 8px;border-bottom:1px solid #e5e7eb;
text-align:left;vertical-align:top} .v{font-weight:700;color:#fff;border-radius:4px;
padding:1px 6px;font-size:12px} .fix{color:#0e7490} .plots{display:flex;flex-wrap:wrap;gap:16px}
figure{margin:0;border:1px solid #e5e7eb;border-radius:6px;padding:8px}
figcaption{font-weight:600;margin-bottom:4px} .muted{color:#6b7280}
"""


def render_html(report: DoctorReport, where: str = "") -> str:
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(report.generated_at))
    red = sum(1 for c in report.checks if c.verdict == "red")
    rows = "".join(
        f'<tr><td><span class="v" style="background:{VERDICT[c.verdict]}">'
        f"{c.verdict.upper()}</span></td><td>{escape(c.area)}</td><td>{escape(c.name)}</td>"
        f'<td>{escape(c.summary)}</td><td class="fix">{escape(c.fix)}</td></tr>'
        for c in report.checks
    )
    verdict = f"{red} red" if red else "healthy"
    plots = [
        ("Lag per consumer group", _lag_plot(report.lag_series)),
        ("Dead letters, last hour", _bars(report.dead_letters)),
        ("Memory before the last death", _memory_plot(report.memory_before_death)),
    ]
    figures = "".join(f"<figure><figcaption>{t}</figcaption>{svg}</figure>" for t, svg in plots)
    crashes = "".join(
        f"<tr><td>{escape(c['id'])}</td><td>{escape(c['cause'])}</td><td>{escape(c['stage'])}"
        f"</td><td>{escape(c['summary'])}</td></tr>"
        for c in report.crashes[:30]
    )
    crash_table = (
        f"<table><tr><th>id</th><th>cause</th><th>stage</th><th>what</th></tr>{crashes}</table>"
        if crashes
        else '<p class="muted">none in the last 24 h</p>'
    )
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        f"<title>sluice doctor: {verdict}</title><style>{CSS}</style></head><body>"
        f"<h1>sluice doctor: {verdict}</h1>"
        f'<div class="muted">{escape(where)} at {stamp}</div>'
        f'<h2>Checks</h2><table id="checks"><tr><th></th><th>area</th><th>check</th>'
        f"<th>what it saw</th><th>fix</th></tr>{rows}</table>"
        f'<h2>Plots</h2><div class="plots">{figures}</div>'
        f"<h2>Crash reports</h2>{crash_table}</body></html>"
    )


def _frame(inner: str, y_label: str) -> str:
    axes = (
        f'<line x1="{PAD}" y1="{H - PAD}" x2="{W - 10}" y2="{H - PAD}" stroke="#9ca3af"/>'
        f'<line x1="{PAD}" y1="10" x2="{PAD}" y2="{H - PAD}" stroke="#9ca3af"/>'
        f'<text x="4" y="20" font-size="11" fill="#6b7280">{escape(y_label)}</text>'
    )
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" '
        f'viewBox="0 0 {W} {H}" role="img">{axes}{inner}</svg>'
    )


def _empty(text: str) -> str:
    return _frame(
        f'<text x="{W / 2}" y="{H / 2}" text-anchor="middle" fill="#6b7280">{escape(text)}</text>',
        "",
    )


def _scale(
    values: Sequence[float], lo: float, hi: float, out_lo: float, out_hi: float
) -> list[float]:
    span = (hi - lo) or 1.0
    return [out_lo + (v - lo) / span * (out_hi - out_lo) for v in values]


def _lines(
    series: dict[str, list[tuple[float, float]]], y_label: str, top: float | None = None
) -> str:
    points = [p for s in series.values() for p in s]
    if not points:
        return _empty("no readings")
    t0, t1 = min(p[0] for p in points), max(p[0] for p in points)
    ymax = max(top or 0.0, *(p[1] for p in points)) or 1.0
    inner = [f'<text x="{PAD - 4}" y="16" font-size="11" text-anchor="end">{ymax:,.0f}</text>']
    for i, (name, pts) in enumerate(sorted(series.items())):
        xs = _scale([p[0] for p in pts], t0, t1 if t1 > t0 else t0 + 1, PAD, W - 10)
        ys = _scale([p[1] for p in pts], 0, ymax, H - PAD, 16)
        color = COLORS[i % len(COLORS)]
        path = " ".join(f"{x:.1f},{y:.1f}" for x, y in zip(xs, ys, strict=True))
        inner.append(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="2"/>')
        inner.extend(
            f'<circle cx="{x:.1f}" cy="{y:.1f}" r="2.5" fill="{color}"/>'
            for x, y in zip(xs, ys, strict=True)
        )
        inner.append(
            f'<text x="{PAD + 6 + 150 * i}" y="{H - 12}" font-size="11" '
            f'fill="{color}">{escape(name)}</text>'
        )
    inner.append(
        f'<text x="{W - 10}" y="{H - PAD + 14}" font-size="11" text-anchor="end" '
        f'fill="#6b7280">{t1 - t0:.0f} s</text>'
    )
    return _frame("".join(inner), y_label)


def _lag_plot(series: dict[str, list[tuple[float, int]]]) -> str:
    return _lines({g: [(t, float(v)) for t, v in pts] for g, pts in series.items()}, "records")


def _bars(counts: dict[str, int]) -> str:
    if not counts:
        return _empty("no dead letters")
    items = sorted(counts.items(), key=lambda kv: -kv[1])[:8]
    top = max(n for _, n in items)
    bar_h = (H - 20) / len(items)
    inner = []
    for i, (label, n) in enumerate(items):
        width = (W - 230) * n / top
        y = 10 + i * bar_h
        inner.append(
            f'<text x="200" y="{y + bar_h / 2 + 4:.1f}" font-size="12" text-anchor="end">'
            f"{escape(label)}</text>"
            f'<rect x="208" y="{y + 2:.1f}" width="{width:.1f}" height="{bar_h - 6:.1f}" '
            f'fill="#dc2626"/><text x="{212 + width:.1f}" y="{y + bar_h / 2 + 4:.1f}" '
            f'font-size="12">{n}</text>'
        )
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}">{"".join(inner)}</svg>'
    )


def _memory_plot(memory: dict[str, Any] | None) -> str:
    if not memory:
        return _empty("no memory history (no recent death under sluice scale)")
    points = [p for p in memory["points"] if len(p) >= 2 and p[1] is not None]
    rss = [(float(p[0]), float(p[1]) / 2**20) for p in points]
    limits = [(float(p[0]), float(p[2]) / 2**20) for p in points if len(p) > 2 and p[2]]
    series = {f"RSS of {memory['stage']} ({memory['cause']})": rss}
    if limits:
        series["limit"] = limits
    return _lines(series, "MiB")
