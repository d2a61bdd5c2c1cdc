"""The sidebar over several portals: a researcher logged in to two portals sees each portal's
nodes grouped under it, with its counts, and which one is the default.

Two real portals, each with a real volunteer (test_federation_researcher's fixture), the
researcher logged in to both with the real CLI; a real ``jupyter lab`` whose own portal is
the second, asked over real HTTP and shown in Chromium.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from browser import (  # noqa: F401 - browser_fixture, jp_*: fixtures pytest finds here
    REPO,
    ConsoleLog,
    Lab,
    browser_fixture,
    conforms,
    free_port,
    http,
    jp_asyncio_loop,
    jp_server_cleanup,
    open_sidebar,
    start_lab,
    why_no_browser_tests,
)
from conftest import wait_for
from test_federation_researcher import two_portals  # noqa: F401 - the fixture

ARTIFACTS = REPO / "test-artifacts"
SIDEBAR = "#grid-portal\\:sidebar"
OURS = ("fed-a", "fed-b")  # other modules of the session may have saved portals of their own

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def lab(two_portals: dict[str, Any]) -> Iterator[Lab]:  # noqa: F811 - the imported fixture
    """JupyterLab whose own portal is fed-b (the last login, as a plain Grid() would use)."""
    from grid_portal.portals import saved

    server = start_lab(
        two_portals["tmp"] / "lab", str(saved()["fed-b"]), "--GridPortal.connect_timeout=5"
    )
    yield server
    server.stop()


def portals(lab: Lab) -> dict[str, Any]:
    status, body = http(lab, "GET", "grid/api/portals")
    assert status == 200, body
    return json.loads(body)


def both_online(lab: Lab) -> dict[str, Any] | None:
    answer = portals(lab)
    by_name = {p["name"]: p for p in answer["portals"]}
    if all((by_name[n]["capacity"] or {}).get("nodes_online") == 1 for n in OURS):
        return answer
    return None


def test_rest_lists_each_portal_with_its_nodes_and_the_default(lab: Lab) -> None:
    answer = wait_for(lambda: both_online(lab), timeout=60, what="both portals' volunteers")
    conforms("/portals", answer)
    assert answer["default"] == "fed-b"
    by_name = {p["name"]: p for p in answer["portals"]}
    for name in OURS:
        group = by_name[name]
        assert group["default"] == (name == "fed-b")
        assert group["problem"] is None
        online = [n["name"] for n in group["nodes"] if n["state"] != "offline"]
        assert online == [f"{name}-vol"]  # each portal's own volunteer, under its portal
        assert {n["portal"] for n in group["nodes"]} == {name}
        assert group["capacity"]["cores_total"] == 1
    # The rest of the API stays on the default portal, as before.
    status, body = http(lab, "GET", "grid/api/nodes")
    assert status == 200
    listed = [n["name"] for n in json.loads(body)["nodes"] if n["state"] != "offline"]
    assert listed == ["fed-b-vol"]


_WHY_NO_BROWSER = why_no_browser_tests()
if _WHY_NO_BROWSER:
    print(f"SKIP: the browser test of {__name__}: {_WHY_NO_BROWSER}", file=sys.stderr)


@pytest.mark.skipif(bool(_WHY_NO_BROWSER), reason=_WHY_NO_BROWSER or "")
def test_the_sidebar_groups_nodes_by_portal(browser: Any, lab: Lab) -> None:
    from playwright.sync_api import expect

    console = ConsoleLog()
    page = open_sidebar(browser, lab, console)

    section = page.locator(".gp-portals")
    expect(section).to_be_visible(timeout=60_000)
    a = section.locator('.gp-portal-group[data-portal="fed-a"]')
    b = section.locator('.gp-portal-group[data-portal="fed-b"]')
    expect(a).to_have_attribute("data-default", "false")
    expect(b).to_have_attribute("data-default", "true")
    expect(b.locator(".gp-portal-default")).to_have_text("default")
    expect(a.locator(".gp-portal-default")).to_have_count(0)
    expect(a.locator('.gp-portal-node[data-node="fed-a-vol"]')).to_be_visible(timeout=60_000)
    expect(b.locator('.gp-portal-node[data-node="fed-b-vol"]')).to_be_visible(timeout=60_000)
    expect(a.locator(".gp-portal-node")).to_have_count(1)
    expect(a.locator(".gp-portal-nodes")).to_have_text("1 of 1 node online")
    expect(a.locator(".gp-portal-cores")).to_contain_text("free of 1")
    expect(b.locator(".gp-portal-nodes")).to_have_text("1 of 1 node online")
    # The main node list is still the default portal's, and the section says so.
    expect(section.locator(".gp-portals-note")).to_have_text(
        "The totals, nodes and jobs below are fed-b's."
    )
    expect(page.locator('.gp-node-row[data-node="fed-b-vol"]')).to_be_visible()
    expect(page.locator('.gp-node-row[data-node="fed-a-vol"]')).to_have_count(0)
    ARTIFACTS.mkdir(exist_ok=True)
    page.locator(SIDEBAR).screenshot(path=str(ARTIFACTS / "sidebar-portals.png"))
    assert console.ours() == []
    page.context.close()


def test_a_saved_portal_that_cannot_be_reached_is_listed_with_its_problem(
    lab: Lab,
    two_portals: dict[str, Any],  # noqa: F811 - the imported fixture
) -> None:
    """Last: it saves a third portal, at an address where nothing listens, and removes it."""
    from grid_portal.connection import Connection
    from grid_portal.portals import save, saved

    kept = Connection.load(saved()["fed-a"])
    gone = dataclasses.replace(kept, scheduler=f"tls://127.0.0.1:{free_port()}")
    path: Path = save(gone, "fed-gone")
    try:
        # No request waits for it (the server connects in the background, for up to its
        # connect timeout of 5 s here): at first it is listed as connecting.
        started = time.monotonic()
        first = {p["name"]: p for p in portals(lab)["portals"]}
        assert time.monotonic() - started < 3
        assert first["fed-gone"]["connecting"] is True and first["fed-gone"]["nodes"] == []

        def listed() -> dict[str, Any] | None:
            answer = portals(lab)
            by_name = {p["name"]: p for p in answer["portals"]}
            gone = by_name.get("fed-gone") or {}
            return by_name if gone.get("problem") and both_online(lab) else None

        by_name = wait_for(listed, timeout=90, what="the unreachable portal to be listed")
        problem = by_name["fed-gone"]["problem"]
        # One line for that portal, as a Grid over several portals warns (what to do included).
        assert problem.startswith("portal 'fed-gone' (tls://127.0.0.1:"), problem
        assert "cannot be reached" in problem and "is it running?" in problem, problem
        assert "none of the portals" not in problem, problem
        assert by_name["fed-gone"]["capacity"] is None and by_name["fed-gone"]["nodes"] == []
        assert by_name["fed-gone"]["connecting"] is False
        assert all(by_name[n]["problem"] is None for n in OURS)  # the others answer
    finally:
        path.unlink()
