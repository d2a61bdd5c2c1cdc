"""Issue 19 in the sidebar: a portal found on the LAN, joined with a click and a pairing code
that the portal's admin approves in their own sidebar. Real processes throughout: a portal
that announces itself (DNS-SD), two ``jupyter lab`` servers, one headless Chromium.

The network: a network namespace joined to this one by a veth pair stands for a researcher's
laptop on the portal's LAN (tests/netns.py). The portal serves on this side's end of the pair
and announces there only; the researcher's JupyterLab runs in the namespace with no portal
configured, so it browses for portals (browsers cannot do mDNS) and listens on its end of the
pair, where Chromium reaches it. The admin's JupyterLab runs here, connected to the portal as
its admin. Skipped, saying why, without root or Chromium.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Iterator
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
    open_sidebar,
    start_lab,
    why_no_browser_tests,
)
from conftest import Portal, researcher_connection, start_portal, wait_for
from lan_impostor import NAME as IMPOSTOR
from lan_impostor import impostor_command
from netns import GuestHost, guest_host, why_namespaces_unavailable

_WHY_NOT = why_no_browser_tests() or why_namespaces_unavailable()
if _WHY_NOT:
    print(f"SKIP: tests/test_sidebar_lan.py: {_WHY_NOT}", file=sys.stderr)
pytestmark = [
    pytest.mark.skipif(bool(_WHY_NOT), reason=_WHY_NOT or ""),
    pytest.mark.timeout(300),
]

ARTIFACTS = REPO / "test-artifacts"
SIDEBAR = "#grid-portal\\:sidebar"
PORTAL_NAME = "Physics Lab Portal"


@pytest.fixture(scope="module")
def tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("sidebar-lan")


@pytest.fixture(scope="module")
def lan() -> Iterator[GuestHost]:
    with guest_host() as host:
        yield host


@pytest.fixture(scope="module")
def portal(lan: GuestHost, tmp: Path) -> Iterator[Portal]:
    grid = start_portal(tmp / "portal", "--announce-name", PORTAL_NAME, host=lan.host_ip)
    yield grid
    grid.stop()


@pytest.fixture(scope="module")
def impostor(lan: GuestHost, portal: Portal, tmp: Path) -> Iterator[None]:
    """A second announcer on the LAN, claiming the portal's endpoint under another CA."""
    log = tmp / "impostor.log"
    port = portal.info["http"].rsplit(":", 1)[1]
    with open(log, "wb") as out:
        process = subprocess.Popen(
            impostor_command(lan.host_ip, port), stdout=out, stderr=subprocess.STDOUT
        )
    try:
        wait_for(lambda: "announced" in log.read_text(), timeout=20, what="the impostor")
        yield
    finally:
        process.kill()
        process.wait()


@pytest.fixture(scope="module")
def admin_lab(portal: Portal, tmp: Path) -> Iterator[Lab]:
    server = start_lab(tmp / "admin-lab", portal.connection_file)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def guest_lab(lan: GuestHost, portal: Portal, tmp: Path) -> Iterator[Lab]:
    """The researcher's JupyterLab, on the other machine, with no portal configured."""
    server = start_lab(tmp / "guest-lab", None, host=lan.guest_ip, prefix=lan.prefix)
    yield server
    server.stop()


def call(lab: Lab, method: str, *path: str) -> tuple[int, Any]:
    """A REST call over real HTTP with the server's token: (status, JSON body)."""
    status, body = http(lab, method, f"grid/api/{'/'.join(path)}")
    return status, json.loads(body or "null")


def test_a_researcher_joins_a_lan_portal_that_the_admin_approves_in_the_sidebar(
    browser: Any, portal: Portal, admin_lab: Lab, guest_lab: Lab, lan: GuestHost, impostor: None
) -> None:
    from playwright.sync_api import expect

    console = ConsoleLog()
    # The researcher's sidebar lists the portal found on the LAN, its CA checked.
    guest = open_sidebar(browser, guest_lab, console)
    row = guest.locator(f'.gp-lan-portal[data-portal="{PORTAL_NAME}"]')
    expect(row).to_be_visible(timeout=60_000)
    expect(row.locator(".gp-lan-ca")).to_have_attribute("data-verified", "true")
    expect(row.locator(".gp-lan-url")).to_have_text(portal.info["http"])
    expect(row.locator(".gp-lan-nodes")).to_contain_text("nodes online")
    expect(row.locator(".gp-lan-problem")).to_have_count(0)
    # The impostor is listed as not trusted, cannot be joined, and the sidebar says why and
    # how to type the portal's address instead.
    fake = guest.locator(f'.gp-lan-portal[data-portal="{IMPOSTOR}"]')
    expect(fake).to_be_visible(timeout=60_000)
    expect(fake.locator(".gp-lan-ca")).to_have_attribute("data-verified", "false")
    expect(fake.locator(".gp-lan-join")).to_be_disabled()
    problem = fake.locator(".gp-lan-problem")
    expect(problem).to_contain_text("does not match the fingerprint it announces")
    expect(problem).to_contain_text("grid-portal login https://PORTAL:8788")
    ARTIFACTS.mkdir(exist_ok=True)
    guest.locator(SIDEBAR).screenshot(path=str(ARTIFACTS / "sidebar-on-this-network.png"))

    # Join: the pairing code is shown while the admin's answer is awaited.
    row.locator(".gp-lan-join").click()
    status = guest.locator('.gp-lan-status[data-state="pending"]')
    expect(status).to_be_visible()
    code = guest.locator(".gp-lan-code").inner_text().strip()
    assert len(code.replace(" ", "")) == 6, code
    expect(guest.locator(".gp-lan-progress")).to_be_visible()
    guest.locator(SIDEBAR).screenshot(path=str(ARTIFACTS / "sidebar-join-pending.png"))

    # The admin's sidebar lists the request with the same code, and approves it.
    admin = open_sidebar(browser, admin_lab, console)
    request = admin.locator(".gp-request-row").filter(has_text=code)
    expect(request).to_be_visible(timeout=60_000)
    expect(request.locator(".gp-request-code")).to_have_text(code)
    admin.locator(SIDEBAR).screenshot(path=str(ARTIFACTS / "sidebar-join-requests.png"))
    request.locator(".gp-request-approve").click()
    expect(request).to_have_count(0)

    # The researcher is enrolled, and their server switched to the portal by itself.
    expect(guest.locator('.gp-lan-status[data-state="connected"]')).to_be_visible(timeout=60_000)
    expect(guest.locator(".gp-lan-list")).to_be_hidden()
    expect(guest.locator(".gp-conn")).to_have_text("live", timeout=60_000)

    def connected() -> dict[str, Any] | None:
        status, body = call(guest_lab, "GET", "whoami")
        assert status in (200, 503), body  # 503: still connecting
        return body if status == 200 and body.get("role") == "client" else None

    try:
        who = wait_for(connected, timeout=60, what="the researcher's server on the portal")
    except AssertionError as exc:
        last = call(guest_lab, "GET", "whoami")
        raise AssertionError(f"{exc}; whoami: {last}\n{guest_lab.output()[-4000:]}") from None
    with portal.grid() as grid:
        enrolled = {r["enrolled_name"] for r in grid.join_requests(everything=True)}
    assert who["user"] in enrolled
    errors = console.ours()
    assert not errors, "browser console errors from the Grid extension:\n" + "\n".join(errors)


def test_only_the_admin_may_list_or_answer_join_requests(
    portal: Portal, admin_lab: Lab, tmp: Path
) -> None:
    researcher = start_lab(
        tmp / "rita-lab", researcher_connection(portal, tmp, "rita"), host="127.0.0.1"
    )
    try:
        status, body = call(researcher, "GET", "requests")
        assert status == 403, body
        assert "only the portal's admin" in body["message"]
        status, body = call(researcher, "POST", "requests", "abc123", "approve")
        assert status == 403, body
    finally:
        researcher.stop()
    status, body = call(admin_lab, "POST", "requests", "nosuch", "approve")
    assert status == 404, body
    assert "no join request" in body["message"]
    # A server with a portal browses nothing and joins nothing.
    status, body = call(admin_lab, "GET", "discovered")
    assert (status, body["configured"]) == (200, True)
    status, body = call(admin_lab, "POST", "discovered", "0123456789ab", "join")
    assert status == 409, body
    status, body = call(admin_lab, "GET", "discovered", "join")
    assert (status, body) == (200, {"join": None})


def test_openapi_lists_every_route() -> None:
    """Every REST route the server extension serves is in the OpenAPI document."""
    import re

    from grid_portal.jupyter.handlers import handlers
    from grid_portal.jupyter.openapi import openapi_document

    documented = {re.sub(r"\{[^}]+\}", "{}", p) for p in openapi_document()["paths"]}
    served = set()
    for rule, _ in handlers("/"):
        path = re.sub(r"\(\[\^/\]\+\)|\(\.\+\)", "{}", rule.removeprefix("/grid/api"))
        if not rule.startswith("/grid/api/") or path == "/events":  # events: under x-events
            continue
        either = re.search(r"\(([a-z|]+)\)", path)  # (approve|deny): one path per word
        words = either.group(1).split("|") if either else []
        served |= {path.replace(either.group(0), w) for w in words} if either else {path}
    assert served <= documented, f"not in the OpenAPI document: {sorted(served - documented)}"


def join_from_jupyter(portal: Portal, name: str, answer: Callable[[str], None]) -> Any:
    """The Jupyter server's join request (what the sidebar shows comes from it), sent to
    ``portal`` as ``name``; ``answer(request_id)`` is the admin's part. The JoinStatus once
    the request is no longer pending (or after 60 s)."""
    import asyncio
    import concurrent.futures
    import time
    from urllib.parse import urlsplit

    from grid_portal.discovery import DiscoveredPortal
    from grid_portal.enrolment import fingerprint
    from grid_portal.jupyter.joins import PENDING, LanJoins
    from grid_portal.jupyter.service import GridPortal

    ca = (portal.data_dir / "ca" / "ca.pem").read_text()
    where = urlsplit(portal.info["http"])
    found = DiscoveredPortal(
        instance=f"{PORTAL_NAME}._gridportal._tcp.local.",
        name=PORTAL_NAME,
        addresses=[str(where.hostname)],
        port=int(where.port or 0),
        ca_fingerprint=fingerprint(ca),
    )

    async def scenario() -> Any:
        joins = LanJoins(GridPortal())
        status = await joins.start(found, name)
        assert status.state == PENDING and status.code, status
        await asyncio.to_thread(answer, str(status.request))
        deadline = time.monotonic() + 60
        while status.state == PENDING and time.monotonic() < deadline:
            await asyncio.sleep(0.2)  # the server's poll of the portal answers within 0.5 s
        return status

    # A loop of its own, on a thread of its own: Playwright's sync API holds this thread's.
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, scenario()).result(timeout=120)


def test_a_denied_join_request_says_so_and_how_to_type_the_url(portal: Portal) -> None:
    """What the sidebar shows after a denial comes from the server's join, as here: refused,
    with the way in by typing the URL (and nothing enrolled)."""
    from grid_portal.jupyter.joins import REFUSED

    def deny(request_id: str) -> None:
        with portal.grid() as grid:
            grid.decide_join_request(request_id, approve=False)

    status = join_from_jupyter(portal, "dora", deny)
    assert status.state == REFUSED, status
    said = status.message or ""
    assert "denied" in said and "grid-portal login https://" in said, said
    assert "restart JupyterLab" in said  # worded for JupyterLab, not for a volunteer's shell
    with portal.grid() as grid:
        decided = {r["id"]: r for r in grid.join_requests(everything=True)}
    assert decided[status.request]["state"] == "denied"
    assert decided[status.request]["enrolled_name"] is None


def test_an_expired_join_request_says_so_and_how_to_type_the_url(
    tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A request the admin leaves unanswered expires: refused, with the way in by URL."""
    from grid_portal.jupyter.joins import REFUSED

    monkeypatch.setenv("DASK_GRID_PORTAL__PORTAL__JOIN_REQUEST_TTL", "3s")
    short = start_portal(tmp / "short-ttl", "--no-announce")
    try:
        status = join_from_jupyter(short, "erin", lambda request_id: None)
        assert status.state == REFUSED, status
        said = status.message or ""
        assert "expired" in said and "grid-portal login https://" in said, said
        with short.grid() as grid:
            (record,) = grid.join_requests(everything=True)
        assert (record["state"], record["enrolled_name"]) == ("expired", None)
    finally:
        short.stop()
