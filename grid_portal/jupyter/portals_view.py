"""``GET grid/api/portals``: every portal this user logged in to, with its nodes and counts.

A researcher who ran ``grid-portal login`` to several portals sees them in the sidebar grouped
by portal: each portal's nodes, its nodes online and free cores, and which one is the default
(the portal the server's own Grid, and so the rest of the sidebar, uses). The server's own
Grid stays on that one portal: jobs, the live feed and cells concern one portal, and a
second portal's nodes are only listed here.

The portals are read from the saved logins (``grid_portal.portals``), and each is reached
through a Grid of its own (``grid_portal.federated.connect``, as ``Grid(portals=...)`` does),
kept between requests and connected again when the saved logins change or a portal that
failed may be back. With fewer than two saved portals the answer lists none: the sidebar then
shows its one portal as before.

Thin: it reads the saved logins and calls the Grid client, nothing else.
"""

from __future__ import annotations

import contextlib
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jupyter_server.auth.decorator import authorized
from jupyter_server.utils import url_path_join
from tornado import web

from grid_portal.errors import GridError
from grid_portal.jupyter.handlers import GridHandler

if TYPE_CHECKING:
    from grid_portal.client import Grid
    from grid_portal.federated import Federation
    from grid_portal.jupyter.service import GridPortal

FRESH = 2.0  # seconds an answer serves every sidebar that asks (each poll is one per portal)
RETRY_AFTER = 15.0  # seconds before a portal that could not be used is tried again


class SavedPortals:
    """One Grid per saved portal, made on first use; blocking methods (run on a thread)."""

    def __init__(self, portal: GridPortal) -> None:
        self.portal = portal
        self._lock = threading.Lock()
        self._federation: Federation | None = None
        self._key: tuple[tuple[str, int], ...] = ()  # the saved logins it was made from
        self._connected_at = 0.0
        self._last_try = 0.0
        self._answer: tuple[float, str | None, dict[str, Any]] | None = None

    def overview(self, default_scheduler: str | None) -> dict[str, Any]:
        """``{"default": NAME, "portals": [...]}``; ``default_scheduler`` is the address of
        the portal the server's own Grid uses (None when it cannot be reached)."""
        with self._lock:
            now = time.monotonic()
            if (
                self._answer
                and now - self._answer[0] < FRESH
                and self._answer[1] == default_scheduler
            ):
                return self._answer[2]
            answer = self._overview(default_scheduler)
            self._answer = (time.monotonic(), default_scheduler, answer)
            return answer

    def close(self) -> None:
        with self._lock:
            self._drop()

    # -- inside the lock ----------------------------------------------------------------------
    def _overview(self, default_scheduler: str | None) -> dict[str, Any]:
        from grid_portal.connection import Connection
        from grid_portal.portals import saved

        kept = saved()
        schedulers: dict[str, str] = {}
        for name, path in kept.items():
            with contextlib.suppress(GridError, OSError):
                schedulers[name] = Connection.load(path).scheduler
        default = next((n for n, s in schedulers.items() if s == default_scheduler), None)
        if len(kept) < 2:
            self._drop()
            return {"default": default, "portals": []}
        federation = self._connected(kept)
        problems = dict(federation.problems) if federation else {}
        portals = []
        for name, path in kept.items():
            entry: dict[str, Any] = {
                "name": name,
                "default": name == default,
                "scheduler": schedulers.get(name),
                "capacity": None,
                "nodes": [],
                "problem": problems.get(name),
            }
            member = federation.members.get(name) if federation else None
            if member is not None:
                entry.update(self._member(name, path, member))
            elif entry["problem"] is None:
                entry["problem"] = f"portal {name!r} could not be used; it is tried again soon"
            portals.append(entry)
        return {"default": default, "portals": portals}

    def _member(self, name: str, path: Path, member: Grid) -> dict[str, Any]:
        """One portal's nodes and counts, or the problem that kept them from us."""
        from grid_portal.federated import diagnose

        try:
            if member.client.status != "running":  # Dask knows the portal went away
                raise OSError(f"the Dask client is {member.client.status}")
            nodes = member.nodes(as_dict=True)
            capacity = member.capacity().to_dict()
        except (GridError, OSError, TimeoutError) as exc:
            self._connected_at = 0.0  # connect again at the next request after RETRY_AFTER
            return {"problem": diagnose(name, path, exc)}
        return {"nodes": [{**n, "portal": name} for n in nodes], "capacity": capacity}

    def _connected(self, kept: dict[str, Path]) -> Federation | None:
        """The Grids to the saved portals, made again when the logins changed, or when a
        portal failed and RETRY_AFTER has passed (it may be back)."""
        from grid_portal import federated

        key = tuple((name, _mtime(path)) for name, path in kept.items())
        stale = self._federation is None or bool(self._federation.problems)
        stale = stale or self._connected_at == 0.0
        if key == self._key and not (stale and time.monotonic() - self._last_try > RETRY_AFTER):
            return self._federation
        self._drop()
        self._key, self._last_try = key, time.monotonic()
        timeout = self.portal.connect_timeout

        def member(path: Path, first: bool) -> Grid:
            from grid_portal.client import Grid

            # reconnect=0: a lost portal fails a call at once and is connected again later,
            # rather than holding a request for the whole reconnect time.
            return Grid(
                str(path), timeout=timeout, start_embedded=False, reconnect=0, set_as_default=False
            )

        try:
            self._federation = federated.connect(list(kept.items()), member)
        except GridError:
            self._federation = None
            return None
        self._connected_at = time.monotonic()
        return self._federation

    def _drop(self) -> None:
        federation, self._federation = self._federation, None
        self._key, self._answer = (), None
        if federation is not None:
            with contextlib.suppress(Exception):  # a portal that went away may fail to close
                federation.close()


def _mtime(path: Path) -> int:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return 0


def saved_portals(handler: GridHandler) -> SavedPortals:
    """The server's one ``SavedPortals``, closed with the server's Grid."""
    found = handler.settings.get("grid_portal_saved")
    if found is None:
        found = handler.settings["grid_portal_saved"] = SavedPortals(handler.portal)
        handler.portal.closers.append(found.close)
    return found


class PortalsHandler(GridHandler):
    @web.authenticated
    @authorized
    async def get(self) -> None:
        try:
            default = await self.portal.run(lambda grid: grid.connection.scheduler)
        except GridError:
            default = None  # the other portals are still worth listing
        view = saved_portals(self)
        self.write_json(await self.portal.offload(view.overview, default))


def portals_routes(api: str) -> list[tuple[str, type[web.RequestHandler]]]:
    return [(url_path_join(api, "portals"), PortalsHandler)]
