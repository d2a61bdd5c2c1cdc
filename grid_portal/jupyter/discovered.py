"""``GET grid/api/discovered``: Grid Portals on this server's LAN.

Browsers cannot do multicast DNS, so the Jupyter server browses for them
(``grid_portal.discovery``) and the sidebar shows what it found. Only while no portal is
configured for this server (no ``c.GridPortal.address``, ``GRID_PORTAL_ADDRESS``, saved login,
JupyterHub class portal or portal run by this user): a server that has its portal sends no
multicast at all. Each record was checked the way the CLI checks it (the enrolment endpoint's
CA must hash to the announced fingerprint); ``verified: false`` ones are listed with their
``problem`` and a ``message`` that says what to do instead, and must not be offered for
joining. Finding nothing, or a network where multicast DNS cannot be used, is an answer
too (an empty list and a ``message`` with the way to type the portal's address), never an
error: the sidebar polls this.

Answers are cached for ``CACHE_SECONDS`` and one browse at a time runs, so a sidebar polling
every few seconds costs one browse per period, not one per poll.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import time
from typing import TYPE_CHECKING, Any

from jupyter_server.auth.decorator import authorized
from tornado import web

from grid_portal.jupyter.handlers import GridHandler

if TYPE_CHECKING:
    from grid_portal.discovery import DiscoveredPortal

log = logging.getLogger("grid_portal.jupyter")
CACHE_SECONDS = 15.0
BROWSE_SECONDS = 2.0


def portal_configured(address: str | None) -> bool:
    """Whether this server has a portal of its own (the embedded one does not count).
    ``address`` is ``GridPortal.address``, whose default is GRID_PORTAL_ADDRESS."""
    from grid_portal.connection import (
        CONNECTION_FILE,
        default_data_dir,
        pid_alive,
        user_connection_path,
    )

    if address or os.environ.get("JUPYTERHUB_USER"):
        return True
    if user_connection_path().exists():
        return True
    local = default_data_dir() / CONNECTION_FILE
    if local.exists():
        try:
            from grid_portal.connection import Connection

            return pid_alive(Connection.load(local).pid)
        except Exception:  # noqa: BLE001 - an unreadable file configures nothing
            return False
    return False


class _Cache:
    def __init__(self) -> None:
        self.at = 0.0
        self.body: dict[str, Any] | None = None
        self.found: dict[str, DiscoveredPortal] = {}  # by id, for joining
        self.lock = asyncio.Lock()


def portal_id(portal: DiscoveredPortal) -> str:
    """A short id for a path (instance names hold spaces and dots), the same on every browse."""
    text = f"{portal.instance}|{portal.url}"
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def cache_of(settings: dict[str, Any]) -> _Cache:
    return settings.setdefault("grid_portal_discovered", _Cache())


def untrusted_message(portal: DiscoveredPortal) -> str:
    """What the sidebar says of a portal that failed its check: the problem, and the way in."""
    from grid_portal.discovery import TYPE_THE_URL_IN_JUPYTER

    return (
        f"Not trusted: the portal announced as {portal.name!r} at {portal.address}: "
        f"{portal.problem or 'not checked'}. Nothing was sent to it. To join the portal "
        f"you meant, {TYPE_THE_URL_IN_JUPYTER}."
    )


async def _browse() -> tuple[list[DiscoveredPortal], str | None]:
    """The portals that answered, or none and why: never an exception (the sidebar polls)."""
    from grid_portal.discovery import (
        TYPE_THE_URL_IN_JUPYTER,
        browse,
        lan_addresses,
        nothing_found_message,
    )

    interfaces = await asyncio.to_thread(lan_addresses)
    if not interfaces:
        return [], (
            "This Jupyter server's machine has no network but loopback (a container, or "
            "no LAN), so no portal can announce itself to it; "
            f"{TYPE_THE_URL_IN_JUPYTER}."
        )
    try:
        portals = await browse(BROWSE_SECONDS, interfaces)
    except Exception as exc:  # noqa: BLE001 - zeroconf could not use multicast here; say so
        log.warning("Grid Portal: browsing the LAN for portals failed: %s", exc)
        return [], (
            f"Multicast DNS cannot be used on this network ({exc}), so portals cannot be "
            f"found here; {TYPE_THE_URL_IN_JUPYTER}."
        )
    if not portals:
        return [], nothing_found_message(BROWSE_SECONDS, TYPE_THE_URL_IN_JUPYTER) + "."
    return portals, None


async def discovered_body(cache: _Cache, refresh: bool = False) -> dict[str, Any]:
    from grid_portal.discovery import check_all

    async with cache.lock:
        if cache.body is not None and not refresh and time.monotonic() - cache.at < CACHE_SECONDS:
            return cache.body
        portals, message = await _browse()
        await asyncio.to_thread(check_all, portals)
        cache.found = {portal_id(p): p for p in portals}
        cache.body = {
            "configured": False,
            "portals": [
                {
                    **p.to_dict(),
                    "id": i,
                    "message": None if p.verified else untrusted_message(p),
                }
                for i, p in cache.found.items()
            ],
            "message": message,
            "searched_at": time.time(),
        }
        cache.at = time.monotonic()
        return cache.body


class DiscoveredHandler(GridHandler):
    @web.authenticated
    @authorized
    async def get(self) -> None:
        portal = self.portal
        if portal_configured(portal.address):
            self.write_json({"configured": True, "portals": [], "message": None})
            return
        cache = cache_of(self.settings)
        refresh = self.get_argument("refresh", "false").lower() in ("1", "true", "yes")
        self.write_json(await discovered_body(cache, refresh))
