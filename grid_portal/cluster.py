"""``GridCluster``: the grid as a Dask cluster manager.

``Client(GridCluster())`` works as ``Client(LocalCluster())`` does: ``client.cluster`` is set,
the client is the default one (``x.compute()``, ``dask.persist``, ``progress``, joblib's dask
backend run on the grid), ``cluster.scale(n)``/``adapt()``/``client.wait_for_workers(n)`` are
there, and the cluster's HTML repr is a live-on-display view of the grid's capacity.

What differs from a cluster manager that starts workers: nobody here starts a worker. Nodes
are volunteers' machines that come and go; ``scale(n)`` means "I want n workers that fit my
request": it says at once what the grid has, and ``client.wait_for_workers(n, timeout)`` waits
until n nodes that fit are online (or says what the grid can give). It never raises.

**How ``Client(cluster)`` becomes a grid client.** The portal refuses graphs from a plain
``distributed.Client`` (zero trust: tasks must carry opaque payloads, ``grid_portal.daskclient``)
and a kernel must open what nodes send as data only (``grid_portal.safe_pickle``). A
``Client`` takes from a cluster object only its address, ``security`` and ``loop``
(``Client.__init__``/``_start`` in distributed/client.py); there is no hook that picks the
client's class. Dask's *client preload* is the one supported place where code runs on every
new client, after it connected and before the caller gets it back (``Client._start`` awaits
``preloads.start()``, then starts the task that reads the scheduler's stream). So
``GridCluster`` adds this module to ``distributed.client.preload``, and :func:`dask_setup`,
for a client whose ``cluster`` is a ``GridCluster`` (any other client is left alone), turns it
into a :class:`GridDaskClient` (``__class__`` swap: a subclass with methods only, no state of
its own), makes its requests and its stream reader open node data as data only, and attaches
the result checks that ``Grid`` attaches to its own client. Rejected alternatives: handing the
client a different ``scheduler_address`` (a local proxy that rewrites graphs) moves the
opaque-payload work into a second process and a second TLS hop for every message; and
monkeypatching ``Client.__init__`` would change every client in the process.

**No Dask dashboard.** The portal runs its scheduler without a dashboard (it would show
everyone's work), so ``dashboard_link`` is empty: Dask's JupyterLab extension, where
installed, shows no dashboard panes for this cluster. Your work: ``grid.jobs()``,
``grid-portal jobs`` and the Grid sidebar.
"""

from __future__ import annotations

import contextlib
import html
import logging
import math
import threading
import time
from typing import Any

import dask
from distributed.core import Status
from distributed.deploy.cluster import Cluster

from grid_portal.client import Grid
from grid_portal.daskclient import GridDaskClient
from grid_portal.errors import GridError, Unsatisfiable, UsageError
from grid_portal.model import Capacity, Node
from grid_portal.units import format_size, parse_size

PRELOAD = __name__  # this module: Dask imports it and calls dask_setup(client)


class NotEnoughNodes(Unsatisfiable, TimeoutError):
    """``wait_for_workers(n)`` ran out of time: fewer than n nodes that fit are online."""


class GridAdaptive:
    """What ``GridCluster.adapt()`` returns: the range asked for. The grid adapts by itself
    (volunteers join and leave, tasks queue until a node that fits is free); nothing polls."""

    def __init__(self, cluster: GridCluster, minimum: int, maximum: float) -> None:
        self.cluster, self.minimum, self.maximum = cluster, minimum, maximum

    def stop(self) -> None:
        if self.cluster._adaptive is self:
            self.cluster._adaptive = None

    def __repr__(self) -> str:
        return f"<GridAdaptive minimum={self.minimum} maximum={self.maximum}>"


class GridCluster(Cluster):
    """The grid as a Dask cluster: ``client = Client(GridCluster())``.

    ``address``: as for ``Grid`` (a connection file; by default the one ``Grid()`` finds, else
    the embedded portal). ``grid``: use this ``Grid`` instead (it is not closed with the
    cluster). ``cpus``, ``gpus``, ``memory``: the size of worker you want, which ``scale(n)``
    and ``wait_for_workers(n)`` count nodes against (a task that needs more asks for it as in
    Dask: ``client.submit(f, resources={"GPU": 1})``).
    """

    _supports_scaling = True

    def __init__(
        self,
        address: str | None = None,
        *,
        grid: Grid | None = None,
        cpus: float = 1,
        gpus: float = 0,
        memory: int | str | None = None,
        name: str | None = None,
        timeout: float = 20.0,
        start_embedded: bool = True,
        trust: Any = None,
        asynchronous: bool = False,
        quiet: bool = False,
    ) -> None:
        if asynchronous:
            raise UsageError(
                "GridCluster is synchronous; in async code use Grid(asynchronous=True) and "
                "grid.client (see docs/researcher.md, 'Dask users')"
            )
        self._owns_grid = grid is None
        self.grid = grid or Grid(
            address,
            timeout=timeout,
            start_embedded=start_embedded,
            trust=trust,
            set_as_default=False,  # the Client(cluster) made next is the default one
        )
        self.cpus = float(cpus)
        self.gpus = float(gpus)
        self.memory = parse_size(memory) if memory is not None else None
        self._requested: int | None = None
        self._nodes: list[Node] = []
        self._capacity = Capacity()
        self._seen = 0.0
        self._lock = threading.Lock()
        super().__init__(asynchronous=False, loop=self.grid.client.loop, quiet=quiet, name=name)
        _ensure_preload()
        self.status = Status.running
        with contextlib.suppress(GridError, OSError):
            self._refresh()

    # -- what Client(cluster) reads ------------------------------------------------------------
    @property
    def scheduler_address(self) -> str:
        return self.grid.connection.scheduler

    @property
    def security(self) -> Any:
        return self.grid.connection.security()

    @property
    def dashboard_link(self) -> str:
        return ""  # the portal's dashboard would show everyone's work; see the module doc

    # -- the grid, as seen now -----------------------------------------------------------------
    def _refresh(self, max_age: float = 2.0) -> None:
        """Ask the portal (from the caller's thread, never the event loop) for its nodes."""
        if self.called_from_running_loop or self.status == Status.closed:
            return
        with self._lock:
            if time.monotonic() - self._seen < max_age:
                return
            self._nodes = self.grid.nodes()
            self._capacity = self.grid.capacity()
            self._seen = time.monotonic()
        self.scheduler_info = {
            "type": "Scheduler",
            "address": self.scheduler_address,
            "workers": {
                n.address: {
                    "name": n.name,
                    "nthreads": n.offer.cpus,
                    "memory_limit": n.offer.memory,
                    "status": "running",
                }
                for n in self._nodes
                if n.online and n.address
            },
        }

    def fits(self, node: Node) -> bool:
        """Whether an online node offers a worker of the size asked for."""
        return (
            node.online
            and node.offer.cpus >= self.cpus
            and len(node.offer.gpus) >= self.gpus
            and (self.memory is None or node.offer.memory >= self.memory)
        )

    def fitting_nodes(self, refresh: bool = True) -> list[Node]:
        if refresh:
            self._refresh(max_age=0.5)
        return [n for n in self._nodes if self.fits(n)]

    def _request_text(self) -> str:
        parts = [f"{self.cpus:g} CPU{'s' if self.cpus != 1 else ''}"]
        if self.gpus:
            parts.append(f"{self.gpus:g} GPU{'s' if self.gpus != 1 else ''}")
        if self.memory:
            parts.append(f"{format_size(self.memory)} memory")
        return ", ".join(parts)

    def what_the_grid_gives(self, n: int) -> str:
        """One clear sentence: how many of the n workers asked for the grid has now."""
        fitting = self.fitting_nodes()
        online = sum(node.online for node in self._nodes)
        have = f"{len(fitting)} node{'s' if len(fitting) != 1 else ''}"
        if len(fitting) >= n:
            return (
                f"the grid has {have} that fit a worker of {self._request_text()} "
                f"({online} online): your tasks spread over them"
            )
        return (
            f"you asked for {n} workers of {self._request_text()}; the grid has {have} that "
            f"fit ({online} online, {self._capacity.cores_free:g} of "
            f"{self._capacity.cores_total} cores free). Grid Portal cannot start machines: "
            "volunteers lend them. Your tasks queue and run on the nodes there are; to wait "
            f"for more, client.wait_for_workers({n}, timeout=...)"
        )

    # -- Dask's cluster-manager verbs ----------------------------------------------------------
    def scale(self, n: int = 0, memory: Any = None, cores: Any = None) -> None:
        """Ask for ``n`` workers of the cluster's size; says what the grid can give now.
        Returns at once, as Dask's ``scale`` does; never raises."""
        try:
            n = max(0, int(n))
        except (TypeError, ValueError):
            self._log(f"scale({n!r}): n is a number of workers, such as scale(4)")
            return
        self._requested = n
        try:
            self._log(f"scale({n}): {self.what_the_grid_gives(n)}")
        except (GridError, OSError) as exc:
            self._log(f"scale({n}): the portal did not answer ({exc}); asked again on display")

    def adapt(  # type: ignore[override]
        self, minimum: int = 0, maximum: float = math.inf, **kwargs: Any
    ) -> GridAdaptive:
        """The grid adapts by itself: tasks queue until a node that fits is free, and use
        each node that joins. ``minimum`` is what ``wait_for_workers`` would wait for."""
        self._adaptive = GridAdaptive(self, int(minimum or 0), maximum)
        self._requested = int(minimum or 0) or None
        try:
            fitting = len(self.fitting_nodes())
        except (GridError, OSError):
            fitting = 0
        self._log(
            f"adapt(minimum={minimum}, maximum={maximum}): the grid adapts by itself; "
            f"{fitting} node{'s' if fitting != 1 else ''} now fit a worker of "
            f"{self._request_text()}"
        )
        return self._adaptive

    def wait_for_workers(self, n_workers: int, timeout: float | None = None) -> None:
        """Wait until ``n_workers`` online nodes fit a worker of the cluster's size; after
        ``timeout`` seconds raise NotEnoughNodes saying what the grid has."""
        if not isinstance(n_workers, int) or n_workers < 1:
            raise UsageError(f"n_workers must be a positive integer, not {n_workers!r}")
        deadline = None if timeout is None else time.monotonic() + float(timeout)
        while len(self.fitting_nodes()) < n_workers:
            if deadline is not None and time.monotonic() >= deadline:
                raise NotEnoughNodes(f"waited {timeout:g} s: {self.what_the_grid_gives(n_workers)}")
            time.sleep(0.5)

    # -- views -----------------------------------------------------------------------------
    def __repr__(self) -> str:
        online = sum(n.online for n in self._nodes)
        return (
            f"GridCluster({self.name!r}, {self.scheduler_address!r}, nodes={online}, "
            f"cores={self._capacity.cores_total}, "
            f"memory={format_size(self._capacity.memory_total)})"
        )

    def _widget(self) -> None:
        return None  # the HTML view below, fresh each time it is shown

    def _repr_html_(self, cluster_status: Any = None) -> str:
        from grid_portal.notebook.widgets import NODE_HEADERS, html_table, node_rows
        from grid_portal.render import capacity_text

        note = ""
        try:
            self._refresh()
        except (GridError, OSError) as exc:
            note = f"the portal did not answer: {exc}"
        fitting = len([n for n in self._nodes if self.fits(n)])
        wanted = ""
        if self._requested:
            wanted = f"; asked for {self._requested}"
        if self._adaptive is not None:
            wanted += f"; adaptive {self._adaptive.minimum} to {self._adaptive.maximum}"
        rows = [
            ("Portal", self.scheduler_address),
            ("Capacity", capacity_text(self._capacity)),
            ("Workers", f"{fitting} nodes fit a worker of {self._request_text()}{wanted}"),
            ("Dashboard", "none (it would show everyone's work): grid.jobs(), the sidebar"),
        ]
        head = "".join(
            f"<tr><td style='text-align:left'><b>{html.escape(k)}</b></td>"
            f"<td style='text-align:left'>{html.escape(v)}</td></tr>"
            for k, v in rows
        )
        nodes = html_table(
            f"{sum(n.online for n in self._nodes)} of {len(self._nodes)} nodes online",
            NODE_HEADERS,
            node_rows(self._nodes),
        )
        extra = f"<p style='opacity:.7'>{html.escape(note)}</p>" if note else ""
        return (
            f"<div><h3 style='margin-bottom:0'>GridCluster {html.escape(self.name)}</h3>"
            f"<table>{head}</table>{nodes}{extra}</div>"
        )

    # -- closing -------------------------------------------------------------------------------
    def close(self, timeout: float | None = None) -> None:
        if self.status == Status.closed:
            return
        self.status = Status.closed
        if self._owns_grid:
            self.grid.close()

    async def _close(self) -> None:
        self.status = Status.closed  # the grid itself is closed by close(), off the loop


# -- the client preload: Client(GridCluster()) becomes a grid client -----------------------------
def _ensure_preload() -> None:
    preloads = dask.config.get("distributed.client.preload", None) or []
    if isinstance(preloads, str):
        preloads = [preloads]
    if PRELOAD not in preloads:
        dask.config.set({"distributed.client.preload": [*preloads, PRELOAD]})
        # Dask logs three INFO lines per preload on every new client: noise in a notebook.
        logging.getLogger("distributed.preloading").setLevel(logging.WARNING)


def dask_setup(client: Any) -> None:
    """Dask calls this on every new ``distributed.Client`` once ``GridCluster`` was used; it
    acts only on a client made from a ``GridCluster``. Runs inside ``Client._start``, after
    the connection and before the task that reads the portal's stream starts, so that task
    inherits the data-only setting."""
    cluster = getattr(client, "cluster", None)
    if not isinstance(cluster, GridCluster):
        return
    from grid_portal import safe_pickle

    if not isinstance(client, GridDaskClient):
        client.__class__ = GridDaskClient  # tasks carry opaque payloads
    # Node data opens as data only: the client's requests (gather), and its stream.
    families = safe_pickle._data_client_kwargs()["deserializers"]
    client._deserializers = families
    client.rpc.deserializers = families
    if client.scheduler is not None:
        client.scheduler.deserializers = families
    safe_pickle._GUARDED.set(True)  # this task's context: the stream reader started next
    trust = cluster.grid.trust
    safe_pickle.attach(client, trust.all, lambda: trust.everyone)
    # No session_job here: the portal makes this connection's plain work its "dask" session
    # job (grid_portal/portal/sessions.py).


__all__ = ["GridCluster", "NotEnoughNodes", "dask_setup"]
