"""The portal's public status page, and its exports: no login, no secrets, no JavaScript.

Served by the portal's HTTPS endpoint (``portal/http.py``) at ``/`` and ``/status``, with
``/status.json`` and ``/contributions.csv`` / ``/contributions.json``. It shows the grid's
capacity now and over the last day, nodes by site and state, jobs run per day, and what each
volunteer gave (``portal/contributions.py``).

What it never shows: addresses, certificates, users and their jobs, node labels other than
``site``, and a volunteer's name unless the volunteer chose ``--label public=yes``.

Plots are SVG drawn here, inline in the page: the networks the grid runs on are often closed,
so the page loads nothing from anywhere (its Content-Security-Policy forbids it).
"""

from __future__ import annotations

import html
import json
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

import tornado.web

from grid_portal import __version__
from grid_portal.portal.contributions import (
    SAMPLE_FIELDS,
    SITE_LABEL,
    ContributionsPlugin,
    is_public,
    public_rows,
    to_csv,
    totals_of,
)
from grid_portal.portal.peering import peers_html, public_peers
from grid_portal.units import format_size

if TYPE_CHECKING:
    from grid_portal.portal.plugin import PortalPlugin

DAY = 86400.0
JOB_DAYS = 14
NO_SITE = "(no site)"
STATES = ("online", "busy", "paused", "draining", "offline")
_CSP = (
    "default-src 'none'; style-src 'unsafe-inline'; img-src data:; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


# -- the data ------------------------------------------------------------------------------
def build_status(
    portal: PortalPlugin, contributions: ContributionsPlugin, now: float | None = None
) -> dict[str, Any]:
    """Everything the page shows, as plain data (also served as ``/status.json``)."""
    now = time.time() if now is None else now
    capacity = portal.registry.capacity()
    ledger = contributions.ledger
    history = ledger.history(now - DAY)
    # The live state as the last point, so a new portal's chart is not empty for a minute.
    history.append({"time": now, **{k: capacity.get(k, 0) or 0 for k in SAMPLE_FIELDS}})
    by_site: dict[str, dict[str, int]] = {}
    shown = []
    for record in portal.registry.nodes.values():
        site = str(record.labels.get(SITE_LABEL) or NO_SITE)
        counts = by_site.setdefault(site, dict.fromkeys(STATES, 0))
        state = record.state.value
        counts[state] = counts.get(state, 0) + 1
        if is_public(record.labels):
            shown.append(
                {
                    "name": record.name,
                    "site": record.labels.get(SITE_LABEL),
                    "state": state,
                    "cpus": record.offer.get("cpus", 0),
                    "gpus": len(record.offer.get("gpus") or []),
                }
            )
    rows = public_rows(ledger.contributors())
    return {
        "generated": now,
        "version": __version__,
        "capacity": capacity,
        "capacity_history": history,
        "nodes": {
            "by_site": [
                {"site": site, **counts, "total": sum(counts.values())}
                for site, counts in sorted(by_site.items())
            ],
            "named": sorted(shown, key=lambda n: n["name"]),
        },
        "jobs_per_day": ledger.jobs_per_day(JOB_DAYS, now),
        "contributions": rows,
        "totals": totals_of(rows),
        "peers": public_peers(getattr(portal, "ledger_path", None)),  # peer portals, each way
    }


# -- SVG -----------------------------------------------------------------------------------
def _nice_max(value: float) -> float:
    """A round axis maximum at or above ``value``."""
    if value <= 0:
        return 1.0
    step = 10 ** len(str(int(value))) / 10
    for m in (1, 2, 5, 10):
        if value <= m * step:
            return float(m * step)
    return float(value)


def _num(value: float) -> str:
    return f"{value:.0f}" if float(value).is_integer() else f"{value:.1f}"


def line_chart(
    title: str,
    series: Sequence[tuple[str, str, Sequence[tuple[float, float]]]],
    start: float,
    end: float,
    width: int = 640,
    height: int = 200,
) -> str:
    """An SVG line chart: ``series`` are (label, colour, [(time, value)]) over [start, end]."""
    left, right, top, bottom = 44, 12, 24, 28
    plot_w, plot_h = width - left - right, height - top - bottom
    values = [v for _, _, pts in series for _, v in pts]
    y_max = _nice_max(max(values, default=0.0))
    span = max(end - start, 1.0)

    def x(t: float) -> float:
        return left + (min(max(t, start), end) - start) / span * plot_w

    def y(v: float) -> float:
        return top + plot_h - v / y_max * plot_h

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" '
        f'role="img" aria-label="{html.escape(title)}" class="chart">',
        f"<title>{html.escape(title)}</title>",
    ]
    for frac in (0.0, 0.5, 1.0):
        yy = y(y_max * frac)
        parts.append(
            f'<line x1="{left}" x2="{width - right}" y1="{yy:.1f}" y2="{yy:.1f}" class="grid"/>'
            f'<text x="{left - 6}" y="{yy + 4:.1f}" text-anchor="end">{_num(y_max * frac)}</text>'
        )
    for i in range(5):  # time ticks every quarter of the span, in UTC
        t = start + span * i / 4
        label = datetime.fromtimestamp(t, timezone.utc).strftime("%H:%M")
        anchor = ("start", "middle", "middle", "middle", "end")[i]
        parts.append(f'<text x="{x(t):.1f}" y="{height - 8}" text-anchor="{anchor}">{label}</text>')
    if not values:
        parts.append(
            f'<text x="{width / 2:.0f}" y="{height / 2:.0f}" text-anchor="middle">no data yet</text>'
        )
    legend_x = left
    for label, colour, pts in series:
        if pts:
            coords = " ".join(f"{x(t):.1f},{y(v):.1f}" for t, v in pts)
            parts.append(
                f'<polyline points="{coords}" fill="none" stroke="{colour}" stroke-width="2"/>'
            )
            if len(pts) == 1:  # one sample draws no line: show it as a dot
                t, v = pts[0]
                parts.append(f'<circle cx="{x(t):.1f}" cy="{y(v):.1f}" r="3" fill="{colour}"/>')
        parts.append(
            f'<rect x="{legend_x}" y="6" width="10" height="10" fill="{colour}"/>'
            f'<text x="{legend_x + 14}" y="15">{html.escape(label)}</text>'
        )
        legend_x += 14 + 8 * len(label) + 16
    parts.append("</svg>")
    return "".join(parts)


def bar_chart(
    title: str, bars: Sequence[tuple[str, float]], width: int = 640, height: int = 180
) -> str:
    """An SVG bar chart of (label, value) pairs."""
    left, right, top, bottom = 44, 12, 16, 28
    plot_w, plot_h = width - left - right, height - top - bottom
    y_max = _nice_max(max((v for _, v in bars), default=0.0))
    slot = plot_w / max(len(bars), 1)
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" '
        f'role="img" aria-label="{html.escape(title)}" class="chart">',
        f"<title>{html.escape(title)}</title>",
    ]
    for frac in (0.0, 0.5, 1.0):
        yy = top + plot_h - frac * plot_h
        parts.append(
            f'<line x1="{left}" x2="{width - right}" y1="{yy:.1f}" y2="{yy:.1f}" class="grid"/>'
            f'<text x="{left - 6}" y="{yy + 4:.1f}" text-anchor="end">{_num(y_max * frac)}</text>'
        )
    for i, (label, value) in enumerate(bars):
        h = value / y_max * plot_h
        bx = left + i * slot + slot * 0.15
        parts.append(
            f'<rect x="{bx:.1f}" y="{top + plot_h - h:.1f}" width="{slot * 0.7:.1f}" '
            f'height="{h:.1f}" class="bar"><title>{html.escape(label)}: {_num(value)}</title></rect>'
        )
        if len(bars) <= 16 or i % 2 == 0:
            parts.append(
                f'<text x="{bx + slot * 0.35:.1f}" y="{height - 8}" text-anchor="middle">'
                f"{html.escape(label)}</text>"
            )
    parts.append("</svg>")
    return "".join(parts)


# -- HTML ----------------------------------------------------------------------------------
_STYLE = """
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:0 auto;max-width:960px;
padding:16px 20px;color:#1d2433;background:#fff}
h1{font-size:1.6em;margin:.2em 0}h2{font-size:1.15em;margin:1.6em 0 .4em}
.muted{color:#5b6475}.cards{display:flex;flex-wrap:wrap;gap:10px}
.card{border:1px solid #d8dde6;border-radius:8px;padding:8px 14px;min-width:120px}
.card b{display:block;font-size:1.4em}
table{border-collapse:collapse;width:100%}th,td{text-align:left;padding:4px 8px;
border-bottom:1px solid #e4e8ef}td.n,th.n{text-align:right;font-variant-numeric:tabular-nums}
.chart{width:100%;height:auto;font-size:11px;fill:#5b6475}.chart .grid{stroke:#e4e8ef}
.chart .bar{fill:#3b6fd8}a{color:#2b5bc4}
"""


def _fmt(value: float, digits: int = 2) -> str:
    """Hours and credit: small amounts (a class's first minutes) keep 3 significant digits."""
    if value == 0:
        return "0"
    if abs(value) < 1:
        return f"{value:.3g}"
    return f"{value:,.{digits}f}"


def render_html(status: dict[str, Any]) -> str:
    """The status page. Every value from the grid is escaped."""
    e = html.escape
    cap = status["capacity"]
    now = status["generated"]
    generated = datetime.fromtimestamp(now, timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    cards = [
        ("nodes online", f"{cap.get('nodes_online', 0)} / {cap.get('nodes_total', 0)}"),
        ("cores free", f"{_num(cap.get('cores_free', 0))} / {cap.get('cores_total', 0)}"),
        ("GPUs free", f"{_num(cap.get('gpus_free', 0))} / {cap.get('gpus_total', 0)}"),
        ("memory offered", format_size(cap.get("memory_total", 0) or 0)),
        ("tasks running", str(cap.get("tasks_running", 0))),
    ]
    history = status["capacity_history"]
    chart = line_chart(
        "Cores over the last day (UTC)",
        [
            ("cores online", "#3b6fd8", [(s["time"], s["cores_total"]) for s in history]),
            ("cores free", "#2e9e5b", [(s["time"], s["cores_free"]) for s in history]),
            ("tasks running", "#d8833b", [(s["time"], s["tasks_running"]) for s in history]),
        ],
        now - DAY,
        now,
    )
    jobs = status["jobs_per_day"]
    jobs_chart = bar_chart(
        f"Jobs finished per day, last {len(jobs)} days (UTC)",
        [(d["day"][5:], d["jobs"]) for d in jobs],
    )
    site_rows = (
        "".join(
            f"<tr><td>{e(s['site'])}</td>"
            + "".join(f'<td class="n">{s.get(state, 0)}</td>' for state in STATES)
            + f'<td class="n">{s["total"]}</td></tr>'
            for s in status["nodes"]["by_site"]
        )
        or f'<tr><td colspan="{len(STATES) + 2}" class="muted">no nodes yet</td></tr>'
    )
    named_rows = "".join(
        f"<tr><td>{e(n['name'])}</td><td>{e(n['site'] or '')}</td><td>{e(n['state'])}</td>"
        f'<td class="n">{n["cpus"]}</td><td class="n">{n["gpus"]}</td></tr>'
        for n in status["nodes"]["named"]
    )
    named = (
        "<h3>Volunteers who show their name</h3><table><tr><th>node</th><th>site</th>"
        '<th>state</th><th class="n">cores</th><th class="n">GPUs</th></tr>'
        f"{named_rows}</table>"
        if named_rows
        else ""
    )
    contrib_rows = (
        "".join(
            f"<tr><td>{e(c['volunteer'])}</td><td>{e(c['site'] or '')}</td>"
            f'<td class="n">{_fmt(c["cpu_hours"], 3)}</td><td class="n">{_fmt(c["gpu_hours"], 3)}</td>'
            f'<td class="n">{c["tasks"]:,}</td><td class="n">{_fmt(c["credit"], 3)}</td>'
            f'<td class="n">{c["benchmark"]:.2f}</td></tr>'
            for c in status["contributions"]
        )
        or '<tr><td colspan="7" class="muted">no work done yet</td></tr>'
    )
    totals = status["totals"]
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="refresh" content="60">
<link rel="icon" href="data:,">
<title>Grid Portal status</title><style>{_STYLE}</style></head>
<body>
<h1>Grid Portal status</h1>
<p class="muted">Updated {generated} (this page reloads every minute). Grid Portal {e(status["version"])}.
Data: <a href="status.json">status.json</a>, contributions as
<a href="contributions.csv">CSV</a> or <a href="contributions.json">JSON</a>.</p>
<h2>Capacity now</h2>
<div class="cards">{"".join(f"<div class='card'><b>{e(v)}</b>{e(k)}</div>" for k, v in cards)}</div>
<h2>Capacity over the last day</h2>
{chart}
<h2>Nodes by site</h2>
<table><tr><th>site</th>{"".join(f'<th class="n">{s}</th>' for s in STATES)}<th class="n">total</th></tr>
{site_rows}</table>
{named}
{peers_html(status.get("peers") or [])}
<h2>Jobs per day</h2>
{jobs_chart}
<h2 id="contributions">Contributions</h2>
<p class="muted">CPU-hours: compute time times the cores reserved. Credit: CPU-hours weighted by
each machine's speed in a short benchmark (1.00 = the reference machine), plus GPU-hours, as
BOINC does. Volunteers are named only if they chose to be (<code>--label public=yes</code>).</p>
<table><tr><th>volunteer</th><th>site</th><th class="n">CPU-hours</th><th class="n">GPU-hours</th>
<th class="n">tasks</th><th class="n">credit</th><th class="n">benchmark</th></tr>
{contrib_rows}
<tr><th>{totals["volunteers"]} volunteers</th><th></th><th class="n">{_fmt(totals["cpu_hours"], 3)}</th>
<th class="n">{_fmt(totals["gpu_hours"], 3)}</th><th class="n">{totals["tasks"]:,}</th>
<th class="n">{_fmt(totals["credit"], 3)}</th><th></th></tr></table>
</body></html>
"""


# -- handlers ------------------------------------------------------------------------------
class _PublicHandler(tornado.web.RequestHandler):
    def initialize(self, portal: PortalPlugin, contributions: ContributionsPlugin) -> None:
        self.portal = portal
        self.contributions = contributions

    def set_default_headers(self) -> None:
        self.set_header("Content-Security-Policy", _CSP)
        self.set_header("X-Content-Type-Options", "nosniff")
        self.set_header("Referrer-Policy", "no-referrer")
        self.set_header("Cache-Control", "no-store")

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        # Never a Python traceback to the network.
        self.set_header("Content-Type", "text/plain; charset=utf-8")
        self.finish(f"{status_code} {self._reason}\n")

    def status(self) -> dict[str, Any]:
        return build_status(self.portal, self.contributions)


class StatusPageHandler(_PublicHandler):
    def get(self) -> None:
        self.set_header("Content-Type", "text/html; charset=utf-8")
        self.finish(render_html(self.status()))


class StatusJsonHandler(_PublicHandler):
    def get(self) -> None:
        self.set_header("Content-Type", "application/json")
        self.set_header("Access-Control-Allow-Origin", "*")  # public data, for dashboards
        self.finish(json.dumps(self.status()))


class ContributionsExportHandler(_PublicHandler):
    def get(self, fmt: str) -> None:
        rows = public_rows(self.contributions.ledger.contributors())
        self.set_header("Access-Control-Allow-Origin", "*")
        if fmt == "csv":
            self.set_header("Content-Type", "text/csv; charset=utf-8")
            self.set_header("Content-Disposition", 'inline; filename="contributions.csv"')
            self.finish(to_csv(rows))
            return
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps({"contributions": rows, "totals": totals_of(rows)}))


def status_routes(portal: PortalPlugin, contributions: ContributionsPlugin) -> list[Any]:
    """Tornado rules for ``make_app`` (``PortalContext.extra_routes``)."""
    kwargs = {"portal": portal, "contributions": contributions}
    return [
        (r"/", StatusPageHandler, kwargs),
        (r"/status", StatusPageHandler, kwargs),
        (r"/status\.json", StatusJsonHandler, kwargs),
        (r"/contributions\.(csv|json)", ContributionsExportHandler, kwargs),
    ]
