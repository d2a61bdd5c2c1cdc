"""Issue 20, point 1: the sidebar's "This machine", per portal what the volunteer running on
the Jupyter server's machine received (what `grid-portal volunteer status` prints).

Real processes: two portals, one volunteer agent serving both with shares 2 and 1, a real
``jupyter lab`` of the same user asked over real HTTP (``GET grid/api/volunteer``), and the
sidebar in Chromium. The module's own XDG_RUNTIME_DIR holds the volunteer's control socket, so
the volunteers of other modules are not this machine's here.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from browser import (  # noqa: F401 - browser_fixture, jp_*: fixtures pytest finds here
    REPO,
    ConsoleLog,
    Lab,
    browser_fixture,
    conforms,
    http,
    jp_asyncio_loop,
    jp_server_cleanup,
    open_sidebar,
    start_lab,
    why_no_browser_tests,
)
from conftest import Portal, Volunteer, start_portal, start_volunteer, wait_for

ARTIFACTS = REPO / "test-artifacts"
SIDEBAR = "#grid-portal\\:sidebar"
NAME = "machvol"

pytestmark = pytest.mark.timeout(300)


@dataclass
class World:
    a: Portal
    b: Portal
    lab: Lab
    tmp: Path

    def label(self, portal: Portal) -> str:
        """How the volunteer names a portal: its host and port."""
        return portal.http.removeprefix("https://").rstrip("/")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    """Two portals and a Jupyter server (its own portal is A), no volunteer yet."""
    tmp = tmp_path_factory.mktemp("machine")
    runtime = tmp / "rt"
    runtime.mkdir(mode=0o700)
    with pytest.MonkeyPatch.context() as env:
        env.setenv("XDG_RUNTIME_DIR", str(runtime))  # the volunteer's and the server's
        a = start_portal(tmp / "a")
        b = start_portal(tmp / "b")
        try:
            lab = start_lab(tmp / "lab", a.connection_file, "--GridPortal.connect_timeout=5")
            try:
                yield World(a, b, lab, tmp)
            finally:
                lab.stop()
        finally:
            a.stop()  # and the volunteer, with A's volunteers
            b.stop()


@pytest.fixture(scope="module")
def volunteer(world: World) -> Volunteer:
    """One agent serving A with share 2 and B with share 1, one task run on each."""
    from gridtasks import burn

    further = ["--portal", world.b.http, "--token", world.b.token(), "--share", "1"]
    agent = start_volunteer(world.a, world.tmp, NAME, "--share", "2", *further, "--cpus", "1")
    for portal in (world.a, world.b):
        with portal.grid() as grid:
            wait_for(
                lambda grid=grid: any(n.name == NAME and n.online for n in grid.nodes()),
                timeout=60,
                what=f"the volunteer to join {portal.http}",
            )
            assert grid.submit(burn, 0.1).result(timeout=60) == NAME
    return agent


def machine(lab: Lab) -> dict[str, Any]:
    status, body = http(lab, "GET", "grid/api/volunteer")
    assert status == 200, body
    answer = json.loads(body)
    conforms("/volunteer", answer)
    return answer


def test_with_no_volunteer_running_the_answer_says_how_to_start_one(world: World) -> None:
    answer = machine(world.lab)
    assert answer["running"] is False and answer["volunteers"] == []
    assert "grid-portal volunteer PORTAL_URL --token" in answer["hint"]


def test_rest_answers_each_portal_with_what_it_received(world: World, volunteer: Volunteer) -> None:
    def received() -> dict[str, Any] | None:
        answer = machine(world.lab)
        portals = {p["portal"]: p for p in answer.get("portals") or []}
        done = [portals.get(world.label(p), {}).get("tasks") for p in (world.a, world.b)]
        return answer if all(done) else None

    answer = wait_for(received, timeout=30, what="both portals' tasks in GET volunteer")
    assert answer["running"] is True and answer["name"] == NAME
    assert [v["name"] for v in answer["volunteers"]] == [NAME]
    assert answer["state"] == "running" and answer["problem"] is None
    portals = {p["portal"]: p for p in answer["portals"]}
    a, b = portals[world.label(world.a)], portals[world.label(world.b)]
    assert (a["share"], a["share_percent"]) == (2, 66.7)
    assert (b["share"], b["share_percent"]) == (1, 33.3)
    for p in (a, b):
        assert p["state"] == "running" and p["lent_by"] is None and p["problem"] is None
        assert p["tasks"] == 1 and p["core_seconds"] > 0
        assert p["running_tasks"] == 0
        # What the sidebar needs, nothing more: no URL, scheduler, address, node name.
        assert set(p) == {
            "portal",
            "state",
            "share",
            "share_percent",
            "lent_by",
            "tasks",
            "core_seconds",
            "running_tasks",
            "problem",
        }
    # No secrets and no paths: not the state dir (its keys), not the control socket's dir.
    text = json.dumps(answer)
    assert str(world.tmp) not in text and "pem" not in text and "gpt_" not in text, text


def test_without_authentication_it_is_refused(world: World) -> None:
    status, body = http(world.lab, "GET", "grid/api/volunteer", token=False)
    assert status == 403, body
    assert NAME not in body


_WHY_NO_BROWSER = why_no_browser_tests()
if _WHY_NO_BROWSER:
    print(f"SKIP: the browser test of {__name__}: {_WHY_NO_BROWSER}", file=sys.stderr)


@pytest.mark.skipif(bool(_WHY_NO_BROWSER), reason=_WHY_NO_BROWSER or "")
def test_the_sidebar_shows_this_machine_per_portal(
    browser: Any, world: World, volunteer: Volunteer
) -> None:
    from playwright.sync_api import expect

    console = ConsoleLog()
    page = open_sidebar(browser, world.lab, console)
    section = page.locator(".gp-machine")
    expect(section).to_be_visible(timeout=60_000)
    expect(section.locator(".gp-machine-title")).to_have_text("This machine")
    group = section.locator(f'.gp-machine-volunteer[data-volunteer="{NAME}"]')
    expect(group.locator(".gp-machine-state")).to_have_text("running")
    a = group.locator(f'.gp-machine-portal[data-portal="{world.label(world.a)}"]')
    b = group.locator(f'.gp-machine-portal[data-portal="{world.label(world.b)}"]')
    expect(a.locator(".gp-machine-portal-name")).to_have_text(world.label(world.a))
    expect(a.locator(".gp-machine-share")).to_have_text("share 2 (67%)")
    expect(b.locator(".gp-machine-share")).to_have_text("share 1 (33%)")
    for row in (a, b):
        expect(row).to_have_attribute("data-state", "running")
        expect(row.locator(".gp-machine-received")).to_contain_text("received 1 task, ")
    # Collapsible: a click on its title folds it, another unfolds it.
    section.locator(".gp-machine-title").click()
    expect(a).to_be_hidden()
    section.locator(".gp-machine-title").click()
    expect(a).to_be_visible()
    # The rest of the sidebar is portal A's as before: its volunteer is this machine too.
    expect(page.locator(".gp-conn")).to_have_text("live", timeout=60_000)
    expect(page.locator(f'.gp-node-row[data-node="{NAME}"]')).to_be_visible()
    ARTIFACTS.mkdir(exist_ok=True)
    page.locator(SIDEBAR).screenshot(path=str(ARTIFACTS / "sidebar-this-machine.png"))
    assert console.ours() == []
    page.context.close()
