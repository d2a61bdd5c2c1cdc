"""The JupyterLab sidebar end to end: a real portal and volunteers, a real ``jupyter lab``
with our server extension and this checkout's build of the labextension, and a real headless
Chromium driving the page as a person would.

One portal (with volunteer ``alpha``), one JupyterLab server and one browser page serve the
whole module; the tests run in file order and each leaves the page usable for the next. The
page must log no console error that concerns the extension (``browser.CONSOLE_NOISE`` lists
the few unrelated messages that are ignored). Screenshots of the sidebar in the light and the
dark theme go to ``test-artifacts/`` (git-ignored).
"""

from __future__ import annotations

import os
import re
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from browser import (
    REPO,
    ConsoleLog,
    Lab,
    launch_chromium,
    open_sidebar,
    start_lab,
    why_no_browser_tests,
)
from conftest import Portal, portal_with, start_volunteer
from gridtasks import where_and_what

from grid_portal.model import JobState

_WHY_NOT = why_no_browser_tests()
if _WHY_NOT:
    print(f"SKIP: tests/test_sidebar_e2e.py: {_WHY_NOT}")
pytestmark = pytest.mark.skipif(bool(_WHY_NOT), reason=_WHY_NOT or "")

WAIT_MS = 30_000  # generous: the machine has 2 cores shared with other test runs
ARTIFACTS = REPO / "test-artifacts"
SIDEBAR = "#grid-portal\\:sidebar"


# -- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def jp_asyncio_loop() -> Iterator[None]:
    """Override pytest-jupyter's autouse event-loop fixture (the REST API tests load that
    plugin, and pytest then applies it to every later test): Playwright's sync API runs its
    own loop for this whole module, which that fixture would try to close after each test."""
    yield None


@pytest.fixture(autouse=True)
def jp_server_cleanup() -> Iterator[None]:
    """Likewise: this module runs its own `jupyter lab` process, not pytest-jupyter's server."""
    yield None


@pytest.fixture(scope="module")
def tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("sidebar-e2e")


@pytest.fixture(scope="module")
def grid(tmp: Path) -> Iterator[Portal]:
    with portal_with(tmp, ("alpha", "--cpus", "1", "--memory", "1GB")) as portal:
        yield portal


@pytest.fixture(scope="module")
def lab(grid: Portal, tmp: Path) -> Iterator[Lab]:
    server = start_lab(tmp / "lab", grid.connection_file)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def console() -> ConsoleLog:
    return ConsoleLog()


@pytest.fixture(scope="module")
def page(lab: Lab, console: ConsoleLog) -> Iterator[Any]:
    """JupyterLab open in Chromium, with the Grid sidebar shown and live."""
    from playwright.sync_api import expect

    expect.set_options(timeout=WAIT_MS)
    with launch_chromium() as browser:
        page = open_sidebar(browser, lab, console)  # the sidebar's tab, then the sidebar, live
        expect(page.locator(SIDEBAR)).to_be_visible()
        expect(page.locator(".gp-conn")).to_have_attribute("data-status", "open")
        expect(page.locator(".gp-conn")).to_have_text("live")
        yield page
        page.context.close()


@pytest.fixture(autouse=True)
def no_console_errors(page: Any, console: ConsoleLog, lab: Lab) -> Iterator[None]:
    """Each test fails if the page logged an error that concerns the extension."""
    since = len(console.errors)
    yield
    ours = console.ours(since)
    assert not ours, "browser console errors from the Grid extension:\n" + "\n".join(ours)


def node_row(page: Any, name: str) -> Any:
    return page.locator(f'.gp-node-row[data-node="{name}"]')


def run_from_palette(page: Any, label: str, until: Any) -> None:
    """Run a command from the command palette as a person would: Ctrl+Shift+C, type, Enter.

    JupyterLab's modal palette closes whenever any command runs, and JupyterLab runs some by
    itself (its help menu asks for the kernel each time the running sessions change), so a
    palette that closed under us is opened again, at most three times.
    """
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    from playwright.sync_api import expect

    palette = page.locator(".lm-CommandPalette-input")
    for _ in range(3):
        try:
            page.keyboard.press("Control+Shift+C")
            expect(palette).to_be_focused(timeout=5000)
            palette.fill(label, timeout=5000)
            active = page.locator(".lm-CommandPalette-item.lm-mod-active")
            expect(active).to_contain_text(label, timeout=5000)
            page.keyboard.press("Enter")
            expect(until).to_be_visible(timeout=10_000)
            return
        except (AssertionError, PlaywrightTimeout):
            continue
    raise AssertionError(f"could not run {label!r} from the command palette")


def total(page: Any, key: str) -> Any:
    return page.locator(f'.gp-totals .gp-total[data-total="{key}"] .gp-total-num')


# -- tests ------------------------------------------------------------------------------------


def test_a_volunteer_that_joins_is_listed_and_marked_offline_when_killed(
    page: Any, grid: Portal, tmp: Path
) -> None:
    from playwright.sync_api import expect

    expect(node_row(page, "alpha").locator(".gp-node-state")).to_have_text(
        re.compile("^(online|busy)$")
    )
    expect(total(page, "nodes")).to_have_text("1")

    # Joins after the page is open: only the websocket can bring it.
    beta = start_volunteer(grid, tmp, "beta", "--cpus", "1", "--memory", "1GB", wait=False)
    row = node_row(page, "beta")
    expect(row.locator(".gp-node-state")).to_have_text(re.compile("^(online|busy)$"))
    expect(row).to_contain_text("CPU")
    expect(total(page, "nodes")).to_have_text("2")
    expect(page.locator(".gp-node-count")).to_have_text("2 nodes")
    expect(page.locator(".gp-statusbar")).to_have_text("2 nodes, 0 jobs running")

    beta.kill()  # SIGKILL: the machine is gone without a word
    expect(row.locator(".gp-node-state")).to_have_text("offline")
    expect(row).to_have_attribute("data-state", "offline")
    expect(row.locator(".gp-node-lastseen")).to_contain_text("last seen")
    expect(total(page, "nodes")).to_have_text("1")
    expect(node_row(page, "alpha").locator(".gp-node-state")).to_have_text(
        re.compile("^(online|busy)$")
    )


def test_a_node_opens_in_detail_with_its_history_and_back(page: Any) -> None:
    from playwright.sync_api import expect

    node_row(page, "alpha").click()
    detail = page.locator(".gp-node-detail")
    expect(detail).to_be_visible()
    expect(page.locator(".gp-node-list")).to_be_hidden()
    expect(detail.locator(".gp-detail-name")).to_have_text("alpha")
    # The history came from GET grid/api/nodes/alpha: the sparklines have lines to draw.
    for series in ("cpu", "memory"):
        path = detail.locator(f'.gp-spark[data-series="{series}"] path')
        expect(path).to_have_attribute("d", re.compile(r"^M\s*[\d.]+"))
    expect(detail.locator(".gp-kv")).to_contain_text("1 core, 1.0 GB")  # what alpha offers
    ARTIFACTS.mkdir(exist_ok=True)
    page.locator(SIDEBAR).screenshot(path=str(ARTIFACTS / "sidebar-node-detail.png"))

    detail.locator(".gp-back").click()
    expect(detail).to_be_hidden()
    expect(node_row(page, "alpha")).to_be_visible()
    expect(node_row(page, "beta")).to_be_visible()


def test_a_jobs_progress_shows_and_cancel_stops_it(page: Any, grid: Portal) -> None:
    from playwright.sync_api import expect

    with grid.grid() as g:
        with g.job("e2e sweep") as job_id:
            futures = g.map(where_and_what, range(8), seconds=1.5)
        row = page.locator(f'.gp-job-row[data-job="{job_id}"]')
        expect(row.locator(".gp-job-name")).to_have_text("e2e sweep")
        expect(row).to_have_attribute("data-state", "running")
        # Progress moves: some tasks done, not all, and the bar is filled that far.
        expect(row.locator(".gp-job-count")).to_have_text(re.compile(r"^[1-7]/8$"))
        done_width = row.locator(".gp-progress-done").evaluate("e => e.style.width")
        assert done_width not in ("", "0%", "0.0%"), done_width
        expect(row.locator(".gp-job-time")).to_contain_text("running for")
        expect(row.locator(".gp-job-nodes")).to_have_text("on alpha")
        expect(page.locator(".gp-statusbar")).to_have_text("1 node, 1 job running")

        cancel = row.locator(".gp-job-cancel")
        expect(cancel).to_be_visible()
        cancel.click()
        expect(row).to_have_attribute("data-state", "cancelled")
        expect(row.locator(".gp-job-state")).to_have_text("cancelled")
        expect(cancel).to_be_hidden()
        expect(row.locator(".gp-job-time")).to_contain_text("cancelled after")
        job = g.get_job(job_id)
        assert job is not None and job.state is JobState.CANCELLED, job
        assert job.tasks_done < 8, job
        del futures


def test_the_admin_toggles_the_job_list_to_everyones(page: Any, grid: Portal) -> None:
    from playwright.sync_api import expect

    with grid.grid() as g:
        # Someone else's job, made through the admin connection on their behalf.
        g._call("grid_job_create", job_id="mallory-e2e", name="theirs", owner="mallory")
        try:
            row = page.locator('.gp-job-row[data-job="mallory-e2e"]')
            toggle = page.locator(".gp-everyone input")
            expect(toggle).to_be_visible()  # this Lab's certificate is the portal's admin
            expect(row).to_have_count(0)
            toggle.check()
            expect(page.locator(".gp-jobs-title")).to_have_text("Everyone’s jobs")
            expect(row.locator(".gp-job-name")).to_have_text("theirs (mallory)")
            expect(row.locator(".gp-job-cancel")).to_be_hidden()  # not the admin's to cancel
            toggle.uncheck()
            expect(page.locator(".gp-jobs-title")).to_have_text("My jobs")
            expect(row).to_have_count(0)
        finally:
            g.cancel("mallory-e2e")


def test_run_cell_on_grid_puts_the_output_in_the_notebook(page: Any) -> None:
    from playwright.sync_api import expect

    # A new notebook from the launcher, on the python3 kernel (which inherited
    # GRID_PORTAL_ADDRESS from the server's environment).
    page.locator('.jp-LauncherCard[data-category="Notebook"]').first.click()
    panel = page.locator(".jp-NotebookPanel").last
    expect(page.locator(".jp-StatusBar-Item", has_text="| Idle")).to_be_visible(timeout=60_000)
    # The command is in the notebook's toolbar too (the Grid icon).
    expect(panel.locator('.jp-Toolbar [data-command="grid-portal:run-cell"]')).to_be_visible()
    cell = panel.locator(".jp-CodeCell").first
    cell.locator(".cm-content").click()
    page.keyboard.type("print(6 * 7)")
    expect(cell.locator(".cm-content")).to_have_text("print(6 * 7)")

    dialog = page.locator(".jp-Dialog")
    run_from_palette(page, "Run Cell on Grid", until=dialog.locator(".gp-run-dialog"))
    expect(dialog.locator(".gp-run-dialog")).to_be_visible()
    expect(dialog.locator(".gp-run-cpus")).to_have_value("1")
    ARTIFACTS.mkdir(exist_ok=True)
    dialog.locator(".jp-Dialog-content").screenshot(path=str(ARTIFACTS / "run-cell-dialog.png"))
    dialog.locator(".jp-mod-accept").click()
    expect(dialog).to_have_count(0)

    # print's own output (the magic's status line, "done in ... on alpha", is another).
    answer = cell.locator(".jp-OutputArea-output").filter(has_text=re.compile(r"^\s*42\s*$"))
    expect(answer).to_have_count(1, timeout=60_000)
    expect(cell.locator(".cm-content")).to_contain_text("%%grid --cpus 1")
    expect(cell.locator(".cm-content")).to_contain_text("print(6 * 7)")
    # The cell was a job of this user's, so the sidebar lists it, finished.
    expect(page.locator('.gp-job-row[data-state="done"]')).to_have_count(1)


def test_the_sidebar_in_the_light_and_the_dark_theme(page: Any) -> None:
    from playwright.sync_api import expect

    ARTIFACTS.mkdir(exist_ok=True)
    sidebar = page.locator(SIDEBAR)
    body = page.locator("body")
    expect(body).to_have_attribute("data-jp-theme-light", "true")
    light = sidebar.evaluate("e => getComputedStyle(e).backgroundColor")
    sidebar.screenshot(path=str(ARTIFACTS / "sidebar-light.png"))

    page.evaluate(
        "() => window.jupyterapp.commands.execute("
        "'apputils:change-theme', {theme: 'JupyterLab Dark'})"
    )
    expect(body).to_have_attribute("data-jp-theme-name", "JupyterLab Dark")
    expect(body).to_have_attribute("data-jp-theme-light", "false")
    # The theme's stylesheet loads after the attribute changes: wait for our colours to follow.
    page.wait_for_function(
        "light => getComputedStyle(document.getElementById('grid-portal:sidebar'))"
        ".backgroundColor !== light",
        arg=light,
    )
    dark = sidebar.evaluate("e => getComputedStyle(e).backgroundColor")
    assert _luminance(dark) < 0.3 < _luminance(light), (light, dark)
    # Text stays readable: the node name is light on the dark background.
    name_colour = (
        node_row(page, "alpha").locator(".gp-node-name").evaluate("e => getComputedStyle(e).color")
    )
    assert _luminance(name_colour) > 0.6, name_colour
    sidebar.screenshot(path=str(ARTIFACTS / "sidebar-dark.png"))


def _luminance(css_colour: str) -> float:
    """0 (black) .. 1 (white) for an ``rgb(...)``/``rgba(...)`` colour."""
    r, g, b = (int(v) for v in re.findall(r"\d+", css_colour)[:3])
    return (0.2126 * r + 0.7152 * g + 0.0722 * b) / 255


def test_a_portal_that_goes_away_shows_a_banner_and_keeps_the_last_nodes(
    page: Any, grid: Portal
) -> None:
    """Runs last: it kills the module's portal."""
    from playwright.sync_api import expect

    os.killpg(grid.process.pid, signal.SIGKILL)
    grid.process.wait()
    banner = page.locator(".gp-error")
    expect(banner).to_be_visible(timeout=60_000)
    expect(banner.locator(".gp-error-text")).to_contain_text("portal")
    expect(page.locator(".gp-statusbar")).to_have_attribute("data-error", "true")
    expect(page.locator(".gp-statusbar")).to_have_text("Grid unreachable")
    # What was last known stays on screen, marked stale; the server retries by itself, so
    # there is no "Retry now" to press while the sidebar's own link to it is up.
    expect(node_row(page, "alpha")).to_be_visible()
    expect(page.locator(".gp-conn")).to_have_text("stale")
    expect(banner.locator(".gp-retry")).to_be_hidden()
    page.locator(SIDEBAR).screenshot(path=str(ARTIFACTS / "sidebar-unreachable.png"))
