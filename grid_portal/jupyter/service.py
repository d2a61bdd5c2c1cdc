"""The Jupyter server's one connection to the grid, and the live event feed built on it.

``GridPortal`` is a traitlets ``Configurable`` parented to the server app (``c.GridPortal.*``)
and kept in ``web_app.settings["grid_portal"]``. It holds one ``Grid`` per server, created on
first use. Every ``Grid`` call blocks (it waits on Dask comms), so each runs on a small thread
pool of its own and is awaited from the event loop: nothing that waits on the portal runs on
the server's event loop, and a long poll never takes a thread the default executor needs.

``EventHub`` is the one background task per server that long-polls the portal for changes
(``grid_changes``) and fans them out as deltas to every connected websocket, so the cost of
live views does not grow with the number of open sidebars.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol, TypeVar

from traitlets import Float, Int, TraitError, Unicode, Union, default, validate
from traitlets.config import LoggingConfigurable

from grid_portal.errors import ConnectionFailed, GridError, UsageError
from grid_portal.units import format_size, parse_size

if TYPE_CHECKING:
    from grid_portal.client import Grid

T = TypeVar("T")

ENV_ADDRESS = "GRID_PORTAL_ADDRESS"  # same variable as grid_portal.connection (kept light here)


class GridPortal(LoggingConfigurable):
    """Where this Jupyter server finds its portal, and its one ``Grid`` to it."""

    address = Unicode(
        None,
        allow_none=True,
        config=True,
        help="""Connection file of the portal to use (what `grid-portal serve` or
        `grid-portal login` wrote). Default: GRID_PORTAL_ADDRESS; unset, a saved login or a
        portal this user runs, else the embedded portal on loopback, started on first use and
        stopped with this server.""",
    )

    @default("address")
    def _address_from_environment(self) -> str | None:
        # The environment is the trait's default, so `c.GridPortal.address` wins over it and
        # everything here reads one value (docs/configuration.md).
        return os.environ.get(ENV_ADDRESS) or None

    embedded_cpus = Int(
        None,
        allow_none=True,
        config=True,
        help="CPUs the embedded portal's local volunteer lends (default: all but one).",
    )
    embedded_memory = Union(
        [Int(), Unicode()],
        default_value=None,
        allow_none=True,
        config=True,
        help="Memory the embedded portal's local volunteer lends: bytes or a size such as "
        "'8GB' (default: half of this machine's).",
    )
    connect_timeout = Float(
        20.0, config=True, help="Seconds to wait for the portal when connecting."
    )
    call_timeout = Float(
        30.0,
        config=True,
        help="Seconds to wait for the portal's answer to one request before answering 503.",
    )
    events_interval = Float(
        0.25,
        config=True,
        help="Least seconds between two deltas on the events websocket: changes arriving "
        "faster are merged into one message.",
    )
    events_poll_timeout = Float(
        10.0, config=True, help="Seconds one long poll of the portal for changes may wait."
    )
    threads = Int(8, config=True, help="Threads that run blocking Grid calls.")

    @validate("embedded_memory")
    def _valid_memory(self, proposal: dict[str, Any]) -> int | str | None:
        import psutil  # the same measures as the volunteer's probe (node/probe.py)

        value = proposal["value"]
        if value is None:
            return value
        try:
            size = parse_size(value) if isinstance(value, str) else int(value)
        except UsageError as exc:
            raise TraitError(f"GridPortal.embedded_memory: {exc}") from None
        have = psutil.virtual_memory().total
        if not 0 < size <= have:
            raise TraitError(
                f"GridPortal.embedded_memory is {value!r}, but this machine has "
                f"{format_size(have)} of memory: lend more than 0 and at most that"
            )
        return value

    @validate("embedded_cpus")
    def _valid_cpus(self, proposal: dict[str, Any]) -> int | None:
        import psutil

        value = proposal["value"]
        have = psutil.cpu_count() or 1
        if value is not None and not 1 <= value <= have:
            raise TraitError(
                f"GridPortal.embedded_cpus is {value}, but this machine has {have} logical "
                f"CPUs: lend 1 to {have}"
            )
        return value

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._executor = ThreadPoolExecutor(self.threads, thread_name_prefix="grid-portal")
        self._grid: Grid | None = None
        self._user: str | None = None
        self._role = ""  # this server's role at the portal: client, admin (a teacher)...
        self._connecting: asyncio.Future[Grid] | None = None
        self._generation = 0  # bumped by reconnect(): a connect begun before it is stale
        self._closed = False
        self.embedded_pid: int | None = None  # set when this server started the embedded portal
        # A mistake in this server's GridPortal settings (extension.py): every call answers it.
        self.config_error: str | None = None
        # Grid.job() marks submissions with dask.annotate, which sets Dask's global config:
        # two threads submitting at once could tag each other's tasks. One at a time.
        self.submit_lock = threading.Lock()
        self.events = EventHub(self)
        # Blocking close steps of what handlers keep beside the Grid (the saved portals'
        # own Grids), run on close().
        self.closers: list[Callable[[], None]] = []

    # -- the connection -------------------------------------------------------------------
    def _connect(self) -> tuple[Grid, str, str]:
        """Blocking: resolve the portal (starting the embedded one if need be) and connect."""
        if self.config_error is not None:
            raise ConnectionFailed(
                f"{self.config_error}. Fix it in the Jupyter server's configuration "
                "(jupyter_server_config.py or the command line) and restart the server"
            )
        from grid_portal.client import Grid
        from grid_portal.connection import embedded_connection_path
        from grid_portal.which_portal import find_connection

        address = self.address or None
        found = find_connection(address)
        if found is None:
            from grid_portal.embedded import ensure_embedded_portal

            memory = parse_size(self.embedded_memory) if self.embedded_memory else None
            conn = ensure_embedded_portal(
                timeout=max(self.connect_timeout, 60.0), cpus=self.embedded_cpus, memory=memory
            )
            if _is_our_child(conn.pid):
                self.embedded_pid = conn.pid
                self.log.info("Grid Portal: started the embedded portal (pid %s)", conn.pid)
            address = str(embedded_connection_path())
        elif address is None and found.source:
            # The server's own Grid (jobs, the live feed, cells) is on one portal: named, the
            # connection found is not taken for GRID_PORTAL_PORTALS (several portals are for
            # kernels and scripts; the sidebar lists the others through GET portals).
            address = found.source
        # reconnect=0: a call cut by a lost portal fails at once instead of waiting for the
        # portal to come back. The event feed reconnects by itself (a fresh Grid, then a
        # snapshot), and meanwhile the sidebar shows the error rather than stale data as live.
        # Never the process's default Dask client: this server serves many people's requests.
        grid = Grid(
            address,
            timeout=self.connect_timeout,
            start_embedded=False,
            reconnect=0,
            set_as_default=False,
        )
        try:
            who = grid.whoami() or {}
        except BaseException:
            grid.close()
            raise
        user = str(who.get("name") or "")
        hub_user = os.environ.get("JUPYTERHUB_USER")
        if hub_user and hub_user != user:
            self.log.warning(
                "Grid Portal: this server's portal connection belongs to %r, not to the hub "
                "user %r; jobs are owned by %r",
                user,
                hub_user,
                user,
            )
        self.log.info("Grid Portal: connected to %s as %r", grid.connection.scheduler, user)
        return grid, user, str(who.get("role") or "")

    async def grid(self) -> Grid:
        """The server's Grid, connected on first use; concurrent first uses share one connect."""
        if self._closed:
            raise ConnectionFailed("the Jupyter server is shutting down")
        if self._grid is not None:
            return self._grid
        if self._connecting is None or self._connecting.done():
            self._connecting = asyncio.ensure_future(self._connect_in_thread())
            # A connect that every waiter gave up on must not warn "never retrieved".
            self._connecting.add_done_callback(lambda t: t.cancelled() or t.exception())
        return await asyncio.shield(self._connecting)

    async def _connect_in_thread(self) -> Grid:
        loop = asyncio.get_running_loop()
        generation = self._generation
        try:
            grid, user, role = await _in_daemon_thread(self._connect)
        except (OSError, TimeoutError) as exc:
            if isinstance(exc, GridError):
                raise
            raise ConnectionFailed(f"cannot connect to the portal: {exc}; is it running?") from None
        if self._closed:
            await loop.run_in_executor(None, _close_quietly, grid)
            raise ConnectionFailed("the Jupyter server is shutting down")
        if generation != self._generation:
            # reconnect() ran while this connect was under way (a join approved while the
            # embedded portal was still starting): this Grid is to the old portal.
            await loop.run_in_executor(None, _close_quietly, grid)
            return await self.grid()  # the connect reconnect() wants, begun or to begin
        self._grid, self._user, self._role = grid, user, role
        return grid

    async def user(self) -> str:
        """The name jobs are owned by: the name in this server's portal certificate."""
        await self.grid()
        return self._user or ""

    async def role(self) -> str:
        """This server's role at the portal (``admin`` for the portal's admin, ``teacher`` for
        a class's teachers, ``client`` for researchers and students)."""
        await self.grid()
        return self._role

    async def run(self, fn: Callable[[Grid], T], timeout: float | None = None) -> T:
        """``fn(grid)`` on the thread pool; portal failures become ``ConnectionFailed``."""
        grid = await self.grid()
        loop = asyncio.get_running_loop()
        try:
            return await asyncio.wait_for(
                loop.run_in_executor(self._executor, _while_connected, fn, grid),
                timeout or self.call_timeout,
            )
        except GridError:
            raise
        except TimeoutError:
            self._drop(grid)
            raise ConnectionFailed(
                f"the portal at {grid.connection.scheduler} did not answer within "
                f"{timeout or self.call_timeout:.0f} s; is it running?"
            ) from None
        except OSError as exc:  # Dask's CommClosedError is an OSError
            self._drop(grid)
            # The sidebar shows this as it is: Dask's own text ("in <TLS (closed)
            # ConnectionPool.grid_changes local=...>: Stream is closed") goes to the log only.
            self.log.info("Grid Portal: lost the portal: %s", exc)
            raise ConnectionFailed(
                f"lost the connection to the portal at {grid.connection.scheduler}; is it "
                "running? The grid reconnects by itself when it is back."
            ) from None

    async def offload(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on the thread pool, for blocking work that needs no portal."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def _drop(self, grid: Grid) -> None:
        """Forget a Grid whose portal went away: the next call connects afresh (the portal
        may be back at another address, as an embedded portal is after a restart)."""
        if self._grid is grid and not self._closed:
            self._grid = None
            self._executor.submit(_close_quietly, grid)

    async def reconnect(self) -> None:
        """Use the portal the configuration names now (a join request from the sidebar was
        approved and saved a connection): drop the Grid, and the live feed starts afresh."""
        grid, self._grid = self._grid, None
        self._user, self._role = None, ""
        self._generation += 1
        self._connecting = None  # a connect under way finds out it is stale, and connects anew
        if grid is not None:
            self._executor.submit(_close_quietly, grid)
        self.events.restart()

    async def close(self) -> None:
        """Stop the event feed, close the Grid, stop the embedded portal if we started it."""
        if self._closed:
            return
        self._closed = True
        await self.events.close()
        loop = asyncio.get_running_loop()
        grid, self._grid = self._grid, None
        if grid is not None:
            try:
                await asyncio.wait_for(loop.run_in_executor(None, _close_quietly, grid), 10)
            except TimeoutError:
                self.log.warning("Grid Portal: closing the portal connection timed out")
        for closer in self.closers:
            with contextlib.suppress(Exception):  # one that fails must not keep the rest open
                await asyncio.wait_for(loop.run_in_executor(None, closer), 10)
        if self.embedded_pid is not None and _embedded_pid() == self.embedded_pid:
            from grid_portal.embedded import stop_embedded_portal

            # Only the portal this server started: one a kernel or `grid-portal embedded
            # start` began (or a newer one) belongs to someone else.
            self.log.info("Grid Portal: stopping the embedded portal (pid %s)", self.embedded_pid)
            await loop.run_in_executor(None, stop_embedded_portal)
        self._executor.shutdown(wait=False, cancel_futures=True)


def _while_connected(fn: Callable[[Grid], T], grid: Grid) -> T:
    """``fn(grid)``, unless Dask already knows the portal is gone.

    Dask's client notices a lost scheduler at once (its status leaves "running" while it
    tries to reconnect), but a new request to a dead address retries its connect for the
    whole connect timeout. Failing here instead lets the sidebar say so within a poll.
    """
    status = grid.client.status
    if status != "running":
        raise OSError(f"the Dask client is {status}")
    return fn(grid)


def _in_daemon_thread(fn: Callable[[], T]) -> asyncio.Future[T]:
    """``fn()`` on a thread of its own that does not hold up the server's exit.

    Connecting to a portal that is down blocks for the whole connect timeout, and Python
    joins the threads of every ThreadPoolExecutor at exit: stopping Jupyter while the portal
    was unreachable hung for that long. A connect nobody waits for any more can be dropped.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(result: Any, error: BaseException | None) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    def target() -> None:
        try:
            outcome: tuple[Any, BaseException | None] = (fn(), None)
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting coroutine
            outcome = (None, exc)
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nobody waits
            loop.call_soon_threadsafe(settle, *outcome)

    threading.Thread(target=target, name="grid-portal-connect", daemon=True).start()
    return future


def _close_quietly(grid: Grid) -> None:
    # A connection to a portal that went away may fail to close; it is gone either way.
    with contextlib.suppress(Exception):
        grid.close()


def _embedded_pid() -> int | None:
    """The pid of the embedded portal that runs now, if one does."""
    from grid_portal.connection import Connection, embedded_connection_path, pid_alive

    try:
        pid = Connection.load(embedded_connection_path()).pid
    except GridError:
        return None
    return pid if pid_alive(pid) else None


def _is_our_child(pid: int | None) -> bool:
    if not pid:
        return False
    import psutil

    try:
        return psutil.Process(pid).ppid() == os.getpid()
    except psutil.Error:
        return False


# -- the live event feed --------------------------------------------------------------------


class Listener(Protocol):
    def send(self, text: str) -> None: ...


class EventHub:
    """One long poll of the portal per server, fanned out to every websocket as deltas.

    It mirrors what it has sent (each node as its JSON text, this user's jobs, capacity) at
    the version it has seen, so a late subscriber gets a snapshot that the next delta applies
    to exactly, and ``GET nodes`` is answered from the mirror while it is live instead of
    moving every node through Dask and JSON again (each node is encoded once per change, on
    the thread pool). The portal stays the source of truth: the mirror is at most one poll
    behind it, and after a portal restart (versions go backwards) or an outage it is rebuilt
    from scratch and every subscriber gets a fresh snapshot. The task runs only while a
    websocket listens or ``GET nodes`` was asked in the last ``REST_INTEREST`` seconds.
    """

    REST_INTEREST = 60.0

    def __init__(self, portal: GridPortal) -> None:
        self.portal = portal
        self.listeners: set[Listener] = set()
        self._task: asyncio.Task[None] | None = None
        self._interest_until = 0.0  # monotonic time until which REST readers want the mirror
        self._ready = False
        self._poll_started = 0.0
        self._version = 0
        self._jobs_version = 0
        self._nodes: dict[str, str] = {}  # name -> the node as JSON text
        # name -> its static capacity as JSON text, as last sent: a node's delta leaves its
        # capacity out while it stays the same (about half of each node's bytes).
        self._capacities: dict[str, str] = {}
        # GET nodes answers many readers between two changes: the joined, encoded body and
        # its ETag are made once per change, not per request (1 MB at 1,000 nodes).
        self._nodes_body: tuple[bytes, str] | None = None
        self._nodes_changes = 0  # bumped on every change: a body joined meanwhile is stale
        self._jobs: dict[str, Any] = {}
        self._capacity: dict[str, Any] = {}
        self._error: str | None = None
        self.messages_sent = 0  # counters, for the benchmark and the log
        self.bytes_sent = 0

    @property
    def log(self) -> Any:
        return self.portal.log

    def subscribe(self, listener: Listener) -> None:
        self.listeners.add(listener)
        if self._error is not None:
            self._send(listener, _dumps({"type": "error", "message": self._error}))
        elif self._ready:
            self._send(listener, self._snapshot())
        # else: the snapshot goes out as soon as the first sync completes
        self._ensure_running()

    def unsubscribe(self, listener: Listener) -> None:
        self.listeners.discard(listener)

    async def nodes_body(self) -> tuple[bytes, str] | None:
        """``{"nodes": [...]}`` from the mirror as UTF-8, with its ETag; or None when the
        mirror is not live (ask the portal). Either way this keeps the mirror alive for the
        next ``REST_INTEREST`` seconds.
        """
        self._interest_until = time.monotonic() + self.REST_INTEREST
        self._ensure_running()
        if not self._live():
            return None
        if self._nodes_body is None:
            changes = self._nodes_changes
            body = await self.portal.offload(_nodes_body, list(self._nodes.values()))
            if changes == self._nodes_changes:
                self._nodes_body = body  # unless the mirror changed meanwhile
            return body
        return self._nodes_body

    def _nodes_changed(self) -> None:
        self._nodes_body = None
        self._nodes_changes += 1

    def _set_nodes(self, nodes: dict[str, str]) -> None:
        self._nodes = nodes
        self._nodes_changed()

    def _live(self) -> bool:
        # A poll that hangs far past its own timeout means the portal went quiet: distrust
        # the mirror then, and let the caller ask (and fail) directly.
        overdue = time.monotonic() - self._poll_started > self.portal.events_poll_timeout + 5
        return self._ready and self._error is None and not overdue

    def _wanted(self) -> bool:
        return bool(self.listeners) or time.monotonic() < self._interest_until

    def _ensure_running(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self._run())

    def restart(self) -> None:
        """Rebuild the mirror from a new connection: every subscriber gets a new snapshot."""
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()  # a long poll of the old connection: its answer is of no use now
        self._ready, self._error = False, None
        if self._wanted():
            self._ensure_running()

    async def close(self) -> None:
        self.listeners.clear()
        self._interest_until = 0.0
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    # -- the loop -------------------------------------------------------------------------
    async def _run(self) -> None:
        backoff = 0.5
        while self._wanted():
            started = self._poll_started = time.monotonic()
            try:
                if self._ready:
                    await self._poll()
                else:
                    await self._sync()
                backoff = 0.5
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the feed must survive anything
                message = str(exc) if isinstance(exc, GridError) else "the grid feed failed"
                if not isinstance(exc, GridError):
                    self.log.exception("Grid Portal: the event feed failed")
                self._fail(message)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 10.0)
                continue
            # Merge bursts: at most one delta per events_interval.
            pause = self.portal.events_interval - (time.monotonic() - started)
            if pause > 0 and self._wanted():
                await asyncio.sleep(pause)
        # Nobody wants it: the mirror would go stale, so drop it and rebuild on next use.
        self._ready = False
        self._set_nodes({})
        self._capacities = {}
        self._jobs = {}

    async def _sync(self) -> None:
        """Rebuild the mirror from scratch and send every subscriber a snapshot."""
        user = await self.portal.user()

        def fetch(grid: Grid) -> tuple[dict[str, Any], list[_NodeTexts], Any, dict[str, Any]]:
            changes = grid.changes(since=0, jobs_since=0, timeout=0)
            # Jobs loaded from the ledger after a portal restart have no version yet; list them.
            overview = grid.jobs_overview()
            nodes = [_node_texts(n) for n in changes["nodes"]]
            return changes, nodes, overview["jobs"], grid.capacity().to_dict()

        changes, nodes, jobs, capacity = await self.portal.run(fetch)
        self._version = int(changes["version"])
        self._jobs_version = int(changes["jobs_version"])
        self._set_nodes({n.name: n.whole for n in nodes})
        self._capacities = {n.name: n.capacity for n in nodes}
        self._jobs = {j["id"]: j for j in jobs if j["owner"] == user}
        self._capacity = dict(capacity)
        self._ready, self._error = True, None
        self._broadcast(self._snapshot())

    async def _poll(self) -> None:
        """One long poll; broadcast what changed."""
        user = await self.portal.user()
        since, jobs_since = self._version, self._jobs_version
        wait = self.portal.events_poll_timeout

        def fetch(grid: Grid) -> tuple[dict[str, Any], list[_NodeTexts], dict[str, Any]]:
            changes = grid.changes(since=since, jobs_since=jobs_since, timeout=wait)
            nodes = [_node_texts(n) for n in changes["nodes"]]
            return changes, nodes, grid.capacity().to_dict()

        changes, nodes, capacity = await self.portal.run(
            fetch, timeout=wait + self.portal.call_timeout
        )
        version, jobs_version = int(changes["version"]), int(changes["jobs_version"])
        if version < since or jobs_version < jobs_since:
            self.log.info("Grid Portal: the portal restarted; resynchronising the event feed")
            self._ready = False
            return
        self._version, self._jobs_version = version, jobs_version
        removed = list(changes["removed"])
        if nodes or removed:
            parts = []
            for node in nodes:
                self._nodes[node.name] = node.whole
                # Every subscriber holds what was last sent (a snapshot, then every delta),
                # so an unchanged capacity need not travel again.
                same = self._capacities.get(node.name) == node.capacity
                parts.append(node.slim if same else node.whole)
                self._capacities[node.name] = node.capacity
            for name in removed:
                self._nodes.pop(name, None)
                self._capacities.pop(name, None)
            self._nodes_changed()
            self._broadcast(
                f'{{"type":"nodes","version":{version},'
                f'"nodes":[{",".join(parts)}],"removed":{_dumps(removed)}}}'
            )
        jobs = [j for j in changes["jobs"] if j["owner"] == user]
        if jobs:
            for job in jobs:
                self._jobs[job["id"]] = job
            self._broadcast(_dumps({"type": "jobs", "jobs": jobs, "removed": []}))
        capacity = dict(capacity)
        if capacity != self._capacity:
            self._capacity = capacity
            self._broadcast(_dumps({"type": "capacity", "capacity": capacity}))

    def _fail(self, message: str) -> None:
        self._ready = False
        if message != self._error:
            self._error = message
            self._broadcast(_dumps({"type": "error", "message": message}))

    # -- sending --------------------------------------------------------------------------
    def _snapshot(self) -> str:
        return (
            f'{{"type":"snapshot","version":{self._version},'
            f'"nodes":[{",".join(self._nodes.values())}],'
            f'"jobs":{_dumps(list(self._jobs.values()))},"capacity":{_dumps(self._capacity)}}}'
        )

    def _broadcast(self, text: str) -> None:
        for listener in list(self.listeners):
            self._send(listener, text)

    def _send(self, listener: Listener, text: str) -> None:
        try:
            listener.send(text)
        except Exception:  # noqa: BLE001 - a closed socket must not stop the others
            self.listeners.discard(listener)
            return
        self.messages_sent += 1
        self.bytes_sent += len(text)


class _NodeTexts(NamedTuple):
    """One node as JSON text: whole, without its capacity, and its capacity alone."""

    name: str
    whole: str
    slim: str
    capacity: str


def _node_texts(node: dict[str, Any]) -> _NodeTexts:
    slim = _dumps({k: v for k, v in node.items() if k != "capacity"})
    if "capacity" not in node:
        return _NodeTexts(node["name"], slim, slim, "")
    capacity = _dumps(node["capacity"])
    return _NodeTexts(node["name"], f'{slim[:-1]},"capacity":{capacity}}}', slim, capacity)


def _nodes_body(parts: list[str]) -> tuple[bytes, str]:
    body = ('{"nodes":[' + ",".join(parts) + "]}").encode()
    return body, f'"{hashlib.sha1(body, usedforsecurity=False).hexdigest()}"'


def _dumps(message: Any) -> str:
    return json.dumps(message, separators=(",", ":"))
