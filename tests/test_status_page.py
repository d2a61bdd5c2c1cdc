"""The public status page, its exports, the contributions ledger and `grid-portal ledger`."""

from __future__ import annotations

import csv
import io
import json
import os
import ssl
import subprocess
import time
import urllib.request
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from browser import CHROMIUM, CHROMIUM_ARGS  # one place for the browser flags
from conftest import Portal, grid_portal_command, start_portal, start_volunteer, wait_for
from gridtasks import burn, fail

from grid_portal.benchmark import MAX_SCORE, MIN_SCORE, clamp_score, cpu_benchmark
from grid_portal.portal.contributions import (
    CREDIT_PER_CORE_HOUR,
    CREDIT_PER_GPU_HOUR,
    ContributionLedger,
    credit_for,
    public_rows,
    to_csv,
)
from grid_portal.portal.status_page import bar_chart, line_chart, render_html


# -- pure parts --------------------------------------------------------------------------------
def test_credit_weights_core_hours_by_benchmark_and_adds_gpu_hours() -> None:
    assert credit_for(3600, 0, None) == pytest.approx(CREDIT_PER_CORE_HOUR)
    assert credit_for(3600, 0, 2.0) == pytest.approx(2 * CREDIT_PER_CORE_HOUR)
    assert credit_for(1800, 3600, 1.0) == pytest.approx(
        0.5 * CREDIT_PER_CORE_HOUR + CREDIT_PER_GPU_HOUR
    )
    # A made-up score gains at most the clamp; nonsense counts as the reference machine.
    assert clamp_score(1e9) == MAX_SCORE and clamp_score(1e-9) == MIN_SCORE
    assert clamp_score("fast") == 1.0 and clamp_score(float("nan")) == 1.0
    assert clamp_score(None) == 1.0


def test_benchmark_is_short_and_positive() -> None:
    start = time.perf_counter()
    score = cpu_benchmark(0.05)
    assert 0 < score < 1000
    assert time.perf_counter() - start < 2.0


def test_ledger_keeps_tallies_per_volunteer_and_day_across_restarts(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite"
    day1 = 1_780_000_000.0
    ledger = ContributionLedger(path)
    ledger.seen("alice-pc", {"public": "yes", "site": "B12"}, {"cpu_benchmark": 2.0}, now=day1)
    ledger.seen("lab-7", {"site": "B12"}, {}, now=day1)
    ledger.record_task("alice-pc", 3600, 0, ok=True, now=day1)
    ledger.record_task("alice-pc", 1800, 0, ok=False, now=day1)  # hours count, no credit
    ledger.record_task("lab-7", 7200, 3600, ok=True, now=day1 + 86400)
    ledger.sample({"nodes_online": 2, "cores_total": 8, "cores_free": 3}, now=day1)
    ledger.flush()
    ledger.conn.close()

    again = ContributionLedger(path, clock=lambda: day1 + 86400)
    rows = {r["name"]: r for r in again.contributors()}
    assert rows["alice-pc"]["cpu_hours"] == pytest.approx(1.5)
    assert rows["alice-pc"]["tasks"] == 1 and rows["alice-pc"]["tasks_failed"] == 1
    assert rows["alice-pc"]["credit"] == pytest.approx(2.0 * CREDIT_PER_CORE_HOUR)
    assert rows["lab-7"]["gpu_hours"] == pytest.approx(1.0)
    assert rows["lab-7"]["benchmark"] == 1.0  # never reported one
    assert [r["name"] for r in again.contributors(since_day="2026-05-29")] == ["lab-7"]
    assert again.history(day1 - 1)[0]["cores_total"] == 8

    shown = {r["volunteer"]: r for r in public_rows(again.contributors())}
    assert "alice-pc" in shown  # chose public=yes
    assert "lab-7" not in shown and f"volunteer {rows['lab-7']['id']}" in shown
    assert "lab-7" in {r["volunteer"] for r in public_rows(again.contributors(), reveal=True)}


def test_csv_export_keeps_cells_text() -> None:
    rows = [
        {
            "id": 1,
            "name": "pc",
            "public": True,
            "site": "=HYPERLINK(1)",
            "cpu_hours": 1.0,
            "gpu_hours": 0.0,
            "tasks": 3,
            "tasks_failed": 0,
            "credit": 1.0,
            "benchmark": 1.0,
        }
    ]
    parsed = list(csv.DictReader(io.StringIO(to_csv(public_rows(rows)))))
    assert parsed[0]["volunteer"] == "pc" and parsed[0]["tasks"] == "3"
    assert parsed[0]["site"] == "'=HYPERLINK(1)"


def test_charts_are_svg_with_escaped_labels() -> None:
    now = 1_780_000_000.0
    svg = line_chart("cores <b>", [("a&b", "#000", [(now - 60, 1), (now, 4)])], now - 3600, now)
    root = ET.fromstring(svg)  # well-formed XML
    assert root.tag.endswith("svg") and "a&amp;b" in svg and "<b>" not in svg
    ET.fromstring(line_chart("empty", [("x", "#000", [])], now - 60, now))
    ET.fromstring(bar_chart("jobs", [("05-01", 0), ("05-02", 7)]))


def test_page_escapes_what_volunteers_chose() -> None:
    status: dict[str, Any] = {
        "generated": 1_780_000_000.0,
        "version": "0",
        "capacity": {"nodes_online": 1, "nodes_total": 1, "cores_total": 2, "cores_free": 2},
        "capacity_history": [],
        "nodes": {
            "by_site": [{"site": "<script>x</script>", "online": 1, "total": 1}],
            "named": [{"name": "<img>", "site": None, "state": "online", "cpus": 2, "gpus": 0}],
        },
        "jobs_per_day": [{"day": "2026-05-28", "jobs": 2, "failed": 0}],
        "contributions": [],
        "totals": {"volunteers": 0, "cpu_hours": 0, "gpu_hours": 0, "tasks": 0, "credit": 0},
    }
    page = render_html(status)
    assert "<script>" not in page and "&lt;script&gt;" in page and "<img>" not in page


# -- a real portal ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def busy_portal(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Portal]:
    """A portal whose one volunteer (public, at a site) ran some tasks, one of them failing."""
    tmp = tmp_path_factory.mktemp("status")
    portal = start_portal(tmp)
    try:
        start_volunteer(
            portal,
            tmp,
            "lab-pc-1",
            "--cpus",
            "1",
            "--memory",
            "1GB",
            "--label",
            "public=yes",
            "--label",
            "site=room-b12",
        )
        with portal.grid() as grid:
            assert grid.gather(grid.map(burn, [0.2, 0.2, 0.2])) == ["lab-pc-1"] * 3
            with pytest.raises(ValueError):
                grid.submit(fail, "on purpose").result()
        yield portal
    finally:
        portal.stop()


def _get(portal: Portal, path: str) -> tuple[int, dict[str, str], bytes]:
    ctx = ssl.create_default_context(cafile=str(portal.data_dir / "ca" / "ca.pem"))
    ctx.check_hostname = False
    with urllib.request.urlopen(portal.http + path, context=ctx, timeout=10) as response:
        return response.status, dict(response.headers), response.read()


def _volunteer_row(portal: Portal) -> dict[str, Any] | None:
    _, _, body = _get(portal, "/contributions.json")
    rows = json.loads(body)["contributions"]
    row = next((r for r in rows if r["volunteer"] == "lab-pc-1"), None)
    return row if row and row["tasks"] >= 3 and row["tasks_failed"] >= 1 else None


def test_status_json_shows_contributions_and_no_secrets(busy_portal: Portal) -> None:
    row = wait_for(lambda: _volunteer_row(busy_portal), timeout=30, what="the contribution")
    assert row["named"] and row["site"] == "room-b12"
    assert row["cpu_hours"] >= 0.6 / 3600 and row["credit"] > 0
    _, headers, body = _get(busy_portal, "/status.json")
    status = json.loads(body)
    assert status["capacity"]["nodes_online"] == 1
    assert status["capacity_history"] and status["capacity_history"][-1]["cores_total"] == 1
    sites = {s["site"]: s for s in status["nodes"]["by_site"]}
    assert sites["room-b12"]["total"] == 1
    assert [n["name"] for n in status["nodes"]["named"]] == ["lab-pc-1"]
    assert sum(d["jobs"] for d in status["jobs_per_day"]) >= 1
    text = body.decode()
    for secret in ("tls://", "BEGIN", "gpt_", "127.0.0.1", str(busy_portal.data_dir)):
        assert secret not in text, secret
    _, headers, body = _get(busy_portal, "/contributions.csv")
    assert headers["Content-Type"].startswith("text/csv")
    assert any(r["volunteer"] == "lab-pc-1" for r in csv.DictReader(io.StringIO(body.decode())))


def test_ledger_command_prints_the_same(busy_portal: Portal) -> None:
    wait_for(lambda: _volunteer_row(busy_portal), timeout=30, what="the contribution")

    def flushed() -> dict[str, Any] | None:
        out = subprocess.run(
            grid_portal_command("ledger", "--data-dir", str(busy_portal.data_dir), "--json"),
            capture_output=True,
            text=True,
            check=True,
        )
        report = json.loads(out.stdout)
        rows = [r for r in report["contributions"] if r["volunteer"] == "lab-pc-1"]
        return report if rows and rows[0]["tasks"] >= 3 else None

    report = wait_for(flushed, timeout=30, what="the ledger file to hold the contribution")
    _, _, body = _get(busy_portal, "/contributions.json")
    live = json.loads(body)["contributions"]
    assert report["contributions"][0]["tasks"] == live[0]["tasks"]
    assert report["capacity"]["nodes_total"] >= 0
    out = subprocess.run(
        grid_portal_command("ledger", "--data-dir", str(busy_portal.data_dir)),
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "COLUMNS": "160"},
    )
    assert "lab-pc-1" in out.stdout and "Contributions" in out.stdout
    missing = subprocess.run(
        grid_portal_command("ledger", "--data-dir", str(busy_portal.data_dir / "nope")),
        capture_output=True,
        text=True,
    )
    assert missing.returncode == 2 and "no ledger" in missing.stderr


def test_page_renders_in_chromium_without_console_errors(busy_portal: Portal) -> None:
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is not installed (apt-get install -y chromium)")
    playwright = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
    wait_for(lambda: _volunteer_row(busy_portal), timeout=30, what="the contribution")
    errors: list[str] = []
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(ignore_https_errors=True)  # the portal's own CA
            page = context.new_page()
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            requests: list[str] = []
            page.on("request", lambda r: requests.append(r.url))
            response = page.goto(busy_portal.http + "/status", wait_until="load")
            assert response is not None and response.status == 200
            assert page.title() == "Grid Portal status"
            row = page.locator("#contributions ~ table tr", has_text="lab-pc-1")
            assert row.count() == 1
            assert "room-b12" in row.inner_text()
            assert page.locator("svg.chart").count() == 2
            # Nothing is fetched from anywhere but the page itself (the network is closed).
            assert all(url.startswith(busy_portal.http) for url in requests), requests
        finally:
            browser.close()
    assert errors == []
