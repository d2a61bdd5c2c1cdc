"""Issue 18 point 4 in the sidebar: a dashboard for your own work, and the portal's full Dask
dashboard for its admin only. Real processes throughout: a portal run with ``--dashboard``
(Dask's dashboard on loopback), a volunteer, a researcher's and the admin's ``jupyter lab``,
headless Chromium; refusals are checked over real HTTP.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from browser import (  # noqa: F401 - browser_fixture, jp_*: fixtures pytest finds here
    REPO,
    WAIT_MS,
    ConsoleLog,
    Lab,
    browser_fixture,
    http,
    jp_asyncio_loop,
    jp_server_cleanup,
    launch_chromium,
    start_lab,
    why_no_browser_tests,
)
from conftest import Portal, researcher_connection, start_portal, start_volunteer
from gridtasks import two_stage_pipeline, where_and_what

_WHY_NOT = why_no_browser_tests()
if _WHY_NOT:
    print(f"SKIP: tests/test_sidebar_taskstream.py: {_WHY_NOT}", file=sys.stderr)
pytestmark = [pytest.mark.skipif(bool(_WHY_NOT), reason=_WHY_NOT or ""), pytest.mark.timeout(300)]

try:
    import bokeh  # noqa: F401 - Dask's dashboard needs it

    _NO_BOKEH = None
except ImportError:
    _NO_BOKEH = "bokeh is not installed, so the portal runs Dask's info pages but no dashboard"

ARTIFACTS = REPO / "test-artifacts"
SIDEBAR = "#grid-portal\\:sidebar"


@pytest.fixture(scope="module")
def tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("sidebar-taskstream")


@pytest.fixture(scope="module")
def grid(tmp: Path) -> Iterator[Portal]:
    portal = start_portal(tmp, "--dashboard", "--no-announce")
    try:
        start_volunteer(portal, tmp, "alpha", "--cpus", "2", "--memory", "1GB")
        yield portal
    finally:
        portal.stop()


@pytest.fixture(scope="module")
def rita(grid: Portal, tmp: Path) -> str:
    return researcher_connection(grid, tmp, "rita")


@pytest.fixture(scope="module")
def rita_lab(rita: str, tmp: Path) -> Iterator[Lab]:
    server = start_lab(tmp / "rita-lab", rita)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def admin_lab(grid: Portal, tmp: Path) -> Iterator[Lab]:
    server = start_lab(tmp / "admin-lab", grid.connection_file)
    yield server
    server.stop()


def fetch(lab: Lab, path: str, token: bool = True) -> tuple[int, str]:
    return http(lab, "GET", path, token)


def test_the_sidebar_shows_a_running_jobs_task_stream(
    browser: Any, rita: str, rita_lab: Lab, grid: Portal
) -> None:
    from playwright.sync_api import expect

    from grid_portal import Grid

    console = ConsoleLog()
    page = browser.new_context(viewport={"width": 1280, "height": 900}).new_page()
    console.attach(page)
    page.goto(rita_lab.url)
    page.locator('li[data-id="grid-portal:sidebar"]').click(timeout=90_000)
    expect(page.locator(".gp-conn")).to_have_text("live")
    with Grid(rita, start_embedded=False) as g:
        with g.job("stream demo") as job_id:
            futures = g.map(where_and_what, range(8), seconds=2.0)
        row = page.locator(f'.gp-job-row[data-job="{job_id}"]')
        expect(row).to_have_attribute("data-state", "running")
        row.locator(".gp-job-name").click()
        detail = page.locator(f'.gp-job-detail[data-job="{job_id}"]')
        expect(detail).to_be_visible()
        expect(page.locator(".gp-job-list")).to_be_hidden()
        # While it runs: a lane for the node, bars of running tasks, progress for the stage.
        expect(detail.locator('.gp-ts-lane[data-node="alpha"][data-slot="0"]')).to_be_visible()
        expect(detail.locator('rect.gp-ts-bar[data-state="running"]').first).to_be_attached()
        stage = detail.locator(".gp-stage-row")
        expect(stage).to_have_count(1)
        expect(stage.locator(".gp-stage-count")).to_contain_text(re.compile(r"\d/8 done"))
        ARTIFACTS.mkdir(exist_ok=True)
        page.locator(SIDEBAR).screenshot(path=str(ARTIFACTS / "sidebar-task-stream.png"))
        assert g.gather(futures)
        # Done: every task is a finished bar on alpha, the stage full.
        expect(detail).to_have_attribute("data-state", "done")
        expect(detail.locator('rect.gp-ts-bar[data-state="done"]')).to_have_count(8)
        # Side by side as they ran: alpha lends 2 cores, so its 8 tasks fill 2 rows or more.
        assert detail.locator('.gp-ts-lane[data-node="alpha"]').count() >= 2
        expect(stage.locator(".gp-stage-count")).to_have_text("8/8 done")
        page.locator(SIDEBAR).screenshot(path=str(ARTIFACTS / "sidebar-task-stream-done.png"))
        detail.locator(".gp-job-back").click()
        expect(page.locator(".gp-job-list")).to_be_visible()
    errors = console.ours()
    assert not errors, "browser console errors from the Grid extension:\n" + "\n".join(errors)


def test_the_sidebar_shows_which_stage_each_pipeline_item_is_in_and_where(
    browser: Any, rita: str, rita_lab: Lab
) -> None:
    from playwright.sync_api import expect

    from grid_portal import Grid

    console = ConsoleLog()
    page = browser.new_context(viewport={"width": 1280, "height": 900}).new_page()
    console.attach(page)
    # A fresh layout: the workspace saved with the sidebar open would make the click close it.
    page.goto(f"{rita_lab.url}&reset")
    page.locator('li[data-id="grid-portal:sidebar"]').click(timeout=90_000)
    expect(page.locator(SIDEBAR)).to_be_visible()
    expect(page.locator(".gp-conn")).to_have_text("live")
    with Grid(rita, start_embedded=False) as g:
        job = g.run_workflow(two_stage_pipeline("pipeline demo", items=4, seconds=1.5))
        page.locator(f'.gp-job-row[data-job="{job.id}"] .gp-job-name').click()
        detail = page.locator(f'.gp-job-detail[data-job="{job.id}"]')
        items = detail.locator(".gp-item-row")
        # While it runs: an item in a stage on alpha, the others waiting or done.
        running = detail.locator('.gp-item-row[data-state="running"][data-node="alpha"]')
        expect(running.first).to_be_visible()
        expect(running.first.locator(".gp-item-where")).to_contain_text(
            re.compile(r"^(decode|encode) on alpha$")
        )
        expect(items).to_have_count(4)
        page.locator(SIDEBAR).screenshot(path=str(ARTIFACTS / "sidebar-pipeline-items.png"))
        # Done: every item through its last stage, on alpha.
        expect(detail).to_have_attribute("data-state", "done", timeout=60_000)
        done = detail.locator('.gp-item-row[data-stage="encode"][data-state="done"]')
        expect(done).to_have_count(4)
        expect(items.first).to_have_attribute("title", "decode@alpha → encode@alpha")
    errors = console.ours()
    assert not errors, "browser console errors from the Grid extension:\n" + "\n".join(errors)


def test_a_researcher_cannot_load_anothers_task_stream_or_the_dashboard(
    grid: Portal, rita_lab: Lab, tmp: Path
) -> None:
    from grid_portal import Grid

    bob = researcher_connection(grid, tmp, "bob")
    with Grid(bob, start_embedded=False) as g, g.job("bob's own") as job_id:
        assert g.gather(g.map(where_and_what, range(2)))
    status, body = fetch(rita_lab, f"grid/api/jobs/{job_id}/tasks")
    assert status == 404, body
    assert "no job" in json.loads(body)["message"]
    status, body = fetch(rita_lab, "grid/api/jobs/no-such-job/tasks")
    assert status == 404, body
    for path in (
        "grid/dashboard/",
        "grid/dashboard/status",
        "grid/dashboard/info/main/workers.html",
    ):
        status, body = fetch(rita_lab, path)
        assert status == 403, (path, body)
        assert "only the portal's admin" in json.loads(body)["message"]


def test_the_admin_gets_the_portals_dask_dashboard_through_jupyter(
    grid: Portal, admin_lab: Lab, browser: Any
) -> None:
    # Without the Jupyter server's login: nothing.
    status, _ = fetch(admin_lab, "grid/dashboard/info/main/workers.html", token=False)
    assert status == 403
    # Dask's own pages, through the proxy: the grid's workers.
    status, body = fetch(admin_lab, "grid/dashboard/info/main/workers.html")
    assert status == 200, body
    assert "alpha" in body
    if _NO_BOKEH:
        print(f"dashboard page not checked: {_NO_BOKEH}", file=sys.stderr)
        return
    from playwright.sync_api import expect

    # The dashboard itself, in a browser: bokeh's page and its websocket, both relayed.
    page = browser.new_context(viewport={"width": 1280, "height": 900}).new_page()
    page.goto(f"{admin_lab.base}grid/dashboard/status?token={admin_lab.token}")
    expect(page.locator("canvas").first).to_be_attached(timeout=60_000)
    page.screenshot(path=str(ARTIFACTS / "admin-dask-dashboard.png"))


def test_the_portals_dashboard_listens_on_loopback_only(grid: Portal) -> None:
    with grid.grid() as g:
        url = g.dashboard_url()
    assert url is not None and url.startswith("http://127.0.0.1:"), url
