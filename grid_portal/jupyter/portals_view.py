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
from grid_portal.jupyter.service import _close_quietly

if TYPE_CHECKING:
    from grid_portal.client import Grid
    from grid_portal.jupyter.service import GridPortal

FRESH = 2.0  # seconds an answer serves every sidebar that asks (each poll is one per portal)
RETRY_AFTER = 30.0  # seconds before a portal that could not be used is tried again


class SavedPortals:
    """One Grid per saved portal, made on first use; blocking methods (run on a thread)."""

    def __init__(self, portal: GridPortal) -> None:
        self.portal = portal
        self._lock = threading.Lock()
        self._members: dict[str, Grid] = {}  # name -> its Grid, while it can be used
        self._problems: dict[str, str] = {}  # name -> why it cannot be used now
        self._mtimes: dict[str, int] = {}  # name -> its saved login's mtime when connected
        self._tried: dict[str, float] = {}  # name -> when it was last connected (monotonic)
        self._answer: tuple[float, Any, dict[str, Any]] | None = None  # (when, key, answer)
        self._connecting: set[str] = set()  # names a connecting thread works on now
        self._closed = False

    def overview(self, default_scheduler: str | None) -> dict[str, Any]:
        """``{"default": NAME, "portals": [...]}``; ``default_scheduler`` is the address of
        the portal the server's own Grid uses (None when it cannot be reached)."""
        from grid_portal.portals import saved

        kept = saved()
        # A new login, or one logged out of, shows at once: it is part of what is cached.
        key = (default_scheduler, tuple((name, _mtime(path)) for name, path in kept.items()))
        with self._lock:
            answer = self._answer
            if answer and time.monotonic() - answer[0] < FRESH and answer[1] == key:
                return answer[2]
            fresh = self._overview(default_scheduler, kept)
            self._answer = (time.monotonic(), key, fresh)
            return fresh

    def close(self) -> None:
        with self._lock:
            self._closed = True
            for name in list(self._members):
                self._forget(name)

    # -- inside the lock ----------------------------------------------------------------------
    def _overview(self, default_scheduler: str | None, kept: dict[str, Path]) -> dict[str, Any]:
        from grid_portal.connection import Connection

        schedulers: dict[str, str] = {}
        for name, path in kept.items():
            with contextlib.suppress(GridError, OSError):
                schedulers[name] = Connection.load(path).scheduler
        default = next((n for n, s in schedulers.items() if s == default_scheduler), None)
        if len(kept) < 2:
            for name in list(self._members):
                self._forget(name)
            return {"default": default, "portals": []}
        self._connect(kept)
        portals = []
        for name, path in kept.items():
            entry: dict[str, Any] = {
                "name": name,
                "default": name == default,
                "scheduler": schedulers.get(name),
                "capacity": None,
                "nodes": [],
                "problem": self._problems.get(name),
                "connecting": name in self._connecting,
            }
            if name in self._members:
                entry.update(self._ask(name, path))
            portals.append(entry)
        return {"default": default, "portals": portals}

    def _ask(self, name: str, path: Path) -> dict[str, Any]:
        """One portal's nodes and counts, or the problem that kept them from us."""
        from grid_portal.federated import diagnose

        member = self._members[name]
        try:
            if member.client.status != "running":  # Dask knows the portal went away
                raise OSError(f"the Dask client is {member.client.status}")
            nodes = member.nodes(as_dict=True)
            capacity = member.capacity().to_dict()
        except (GridError, OSError, TimeoutError) as exc:
            problem = diagnose(name, path, exc)
            self._forget(name)  # connected again after RETRY_AFTER
            self._problems[name] = problem
            return {"problem": problem}
        return {"nodes": [{**n, "portal": name} for n in nodes], "capacity": capacity}

    def _connect(self, kept: dict[str, Path]) -> None:
        """Start connecting the saved portals not connected yet (new logins at once, one that
        failed after RETRY_AFTER: it may be back), on a thread of its own so that no request
        waits for a portal that does not answer; forget those logged out of or in again."""
        for name in set(self._members) | set(self._problems) | set(self._tried):
            if name not in kept or self._mtimes.get(name) != _mtime(kept[name]):
                self._forget(name)
                self._problems.pop(name, None)
                self._tried.pop(name, None)
        if self._connecting or self._closed:
            return  # one batch at a time; the next request starts the rest
        now = time.monotonic()
        due = [
            (name, path)
            for name, path in kept.items()
            if name not in self._members
            and now - self._tried.get(name, -RETRY_AFTER) >= RETRY_AFTER
        ]
        for name, path in due:
            self._tried[name], self._mtimes[name] = now, _mtime(path)
        if due:
            self._connecting = {name for name, _ in due}
            threading.Thread(
                target=self._connect_batch, args=(due,), name="grid-portal-portals", daemon=True
            ).start()

    def _connect_batch(self, due: list[tuple[str, Path]]) -> None:
        """On its own thread: connect ``due`` at once, then keep what came of it."""
        from grid_portal import federated

        timeout = self.portal.connect_timeout

        def member(path: Path, first: bool) -> Grid:
            from grid_portal.client import Grid

            # reconnect=0: a lost portal fails a call at once and is connected again later,
            # rather than holding a request for the whole reconnect time.
            return Grid(
                str(path), timeout=timeout, start_embedded=False, reconnect=0, set_as_default=False
            )

        members: dict[str, Grid] = {}
        problems: dict[str, str] = {}
        try:
            connected = federated.connect(due, member)
            members, problems = connected.members, connected.problems
        except GridError as exc:  # none of them could be used: each one's line is on it
            problems = dict(getattr(exc, "problems", {}))
        except Exception as exc:  # noqa: BLE001 - a thread's failure must reach the answer
            problems = {name: f"portal {name!r} cannot be used: {exc}" for name, _ in due}
        with self._lock:
            self._connecting = set()
            self._answer = None
            for name, path in due:
                grid = members.get(name)
                if self._closed or self._mtimes.get(name) != _mtime(path):
                    if grid is not None:  # closed, or logged in again meanwhile: not this one
                        _close_quietly(grid)
                elif grid is not None:
                    self._members[name] = grid
                    self._problems.pop(name, None)
                else:
                    self._problems[name] = problems.get(name) or f"portal {name!r} cannot be used"

    def _forget(self, name: str) -> None:
        grid = self._members.pop(name, None)
        self._answer = None
        if grid is not None:
            _close_quietly(grid)


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
