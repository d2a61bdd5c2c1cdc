"""``Grid``: the one client every front end (CLI, magics, widgets, REST, sidebar) goes through.

It wraps a ``distributed.Client`` connected over mutual TLS, and asks the portal's scheduler
plugin (the single source of truth) for nodes and capacity through its ``grid_*`` handlers.
It keeps no copy of grid state beyond a short-lived cache of the largest node's offer, used
only to refuse at once a request that no node could ever satisfy.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import dask
from distributed import Client, Future

from grid_portal import renewal
from grid_portal.connection import Connection
from grid_portal.daskclient import GridDaskClient
from grid_portal.errors import (
    ConnectionFailed,
    GridError,
    NotAllowed,
    Unsatisfiable,
    UsageError,
)
from grid_portal.jobs.cell_session import CellSession
from grid_portal.model import CPU, GPU, MEMORY, Capacity, Job, Node, Requirement, new_job_id
from grid_portal.portals import ENV_PORTALS
from grid_portal.protocol import RETRIES_ANNOTATION
from grid_portal.pushed import PushedResults
from grid_portal.safe_pickle import Trust
from grid_portal.units import counted, format_size, parse_size
from grid_portal.which_portal import find_connection

if TYPE_CHECKING:
    from grid_portal.federated import Federation

# The largest offer, used only to accept a request at once (a refusal always asks afresh):
# fresh for _OFFER_FRESH s; up to _OFFER_STALE s old it still serves while a background call
# renews it, so cells run seconds apart, as people run them, pay no round trip for it.
_OFFER_FRESH = 5.0
_OFFER_STALE = 60.0

# Waiting for a job: each long poll lasts up to _POLL s; once a job's futures ended, its record
# (finished by the portal in the same step) is waited for up to _SETTLE s more.
_POLL = 10.0
_SETTLE = 30.0
# A node version never reached: ``changes(since=NO_NODES, ...)`` then wakes for jobs only.
NO_NODES = 1 << 62


class Grid:
    """A connection to a Grid Portal.

    ``Grid()`` finds the portal by itself (see ``grid_portal.which_portal``): a connection file
    given as ``address`` or in ``GRID_PORTAL_ADDRESS``, the user's saved connection, a portal
    this user runs here, or else an embedded portal on loopback with one local volunteer, which
    it starts when none runs.

    ``Grid(portals=["school", "uni"])`` uses several portals at once (the names
    ``grid-portal login --as`` saved, connection files, ``"all"``, or a mapping of names to
    either; ``GRID_PORTAL_PORTALS`` gives the same when no ``address`` is passed):
    ``map`` spreads a sweep over them by free capacity, ``submit`` goes to a portal that has a
    node for it, ``nodes`` and ``capacity`` name each node's portal, and everything else is the
    first portal's (``grid_portal.federated``).
    """

    # Set only on a Grid over several portals (grid_portal.federated).
    _federation: Federation | None = None

    def __init__(
        self,
        address: str | None = None,
        *,
        timeout: float = 20.0,
        start_embedded: bool = True,
        asynchronous: bool = False,
        reconnect: float = 60.0,
        trust: Iterable[str] | str | None = None,
        set_as_default: bool = True,
        portals: str | Sequence[str] | Mapping[str, str] | None = None,
    ) -> None:
        if portals is None and address is None and not asynchronous:
            portals = os.environ.get(ENV_PORTALS) or None
        if portals is not None:
            self._use_portals(
                portals, address, timeout, asynchronous, reconnect, trust, set_as_default
            )
            return
        connection = find_connection(address)
        embedded = connection is None
        if connection is None:
            if not start_embedded:
                raise ConnectionFailed(
                    "no portal is configured: set GRID_PORTAL_ADDRESS to a connection file, "
                    "or run `grid-portal serve`"
                )
            from grid_portal.embedded import ensure_embedded_portal

            connection = ensure_embedded_portal(timeout=max(timeout, 60.0))
        self.connection: Connection = connection
        # Zero trust: the nodes whose results this kernel opens as code, not only as data.
        self.trust = _trust_for(trust, connection, embedded)
        self._largest: tuple[float, dict[str, float]] | None = None
        self._renewing = False  # a background call renews _largest
        # Plain submit() calls of this client form one interactive-session job.
        self._session_job = f"session-{uuid.uuid4().hex[:10]}"
        # After a portal restart, calls wait up to ``reconnect`` seconds for it to come
        # back (at the address the connection file then names) instead of failing at once.
        self._address = address
        self._timeout = timeout
        self._asynchronous = asynchronous
        # Like Client(cluster), the grid's client is the default Dask client, so
        # x.compute(), dask.persist, progress and joblib's dask backend run on the grid. An
        # asynchronous Grid (the Jupyter server's) never is: it serves many people.
        self._set_as_default = bool(set_as_default) and not asynchronous
        self.reconnect = reconnect
        self._closed = False
        self._reconnect_lock = threading.Lock()
        # Small results of grid_push tasks (%%grid cells) that arrive with their completion.
        self.pushed = PushedResults()
        # %%grid cells after the first go to a slot leased for this kernel (jobs/cell_session.py).
        self.cells = CellSession(self)
        try:
            self._client = self._new_client(connection, timeout)
        except (OSError, TimeoutError) as exc:
            raise ConnectionFailed(
                f"cannot connect to the portal at {connection.scheduler}: {exc}. Is it "
                "running? (`grid-portal serve`, or check GRID_PORTAL_ADDRESS)"
            ) from None
        if not asynchronous and renewal.due(connection):
            # A person's certificate is short-lived: renew it in the background while this
            # certificate still works (grid_portal/renewal.py).
            threading.Thread(target=renewal.renew_quietly, args=(self,), daemon=True).start()

    def _use_portals(
        self,
        portals: str | Sequence[str] | Mapping[str, str],
        address: str | None,
        timeout: float,
        asynchronous: bool,
        reconnect: float,
        trust: Iterable[str] | str | None,
        set_as_default: bool,
    ) -> None:
        """A Grid over several portals: one plain Grid per portal, connected at once; one that
        cannot be used gives a PortalWarning and the others are used."""
        from grid_portal import federated
        from grid_portal.errors import UsageError
        from grid_portal.portals import choose

        if address is not None or asynchronous:
            raise UsageError(
                "portals= goes with neither an address nor asynchronous=True: pass the "
                "portals' names (or connection files) alone"
            )

        def member(path: Any, first: bool) -> Grid:
            # Only the first portal's client may be Dask's default (x.compute() runs there); a
            # portal that went away is given up on after 10 s, so the others go on.
            return Grid(
                str(path),
                timeout=timeout,
                start_embedded=False,
                reconnect=min(reconnect, 10.0),
                trust=trust,
                set_as_default=set_as_default and first,
            )

        federation = federated.connect(choose(portals), member, stacklevel=5)
        # What concerns one portal (jobs, results, compute, cells) is the first reachable
        # portal's: this Grid shares that member's state, so those methods run unchanged.
        vars(self).update(vars(federation.primary))
        self._federation = federation

    @property
    def portals(self) -> dict[str, Grid]:
        """Each portal this Grid uses, by name, as a single-portal Grid (one for a plain Grid,
        under its connection's name)."""
        if self._federation is not None:
            return dict(self._federation.members)
        return {self.connection.name or "portal": self}

    def _new_client(self, connection: Connection, timeout: float) -> Client:
        with _data_only() as data_only:  # node data is opened as data only
            try:
                client = GridDaskClient(  # tasks carry opaque payloads
                    connection.scheduler,
                    security=connection.security(),
                    timeout=timeout,
                    asynchronous=self._asynchronous,
                    set_as_default=self._set_as_default,
                    **data_only,
                )
            except ImportError as exc:  # Dask raises a refused stream-start as ImportError
                if not str(exc).startswith("refused:"):
                    raise
                raise NotAllowed(
                    f"the portal at {connection.scheduler} refused this certificate "
                    f"({str(exc).removeprefix('refused: ')}); ask the portal's admin for a "
                    "new token and log in again (`grid-portal login`)"
                ) from None
        self.pushed.attach(client)
        self.cells.attach(client)
        _attach_data_only(client, self.trust)
        client.session_job = self._session_job  # its plain Dask work: this session's job
        return client

    # -- surviving a portal restart ------------------------------------------------------------
    @property
    def client(self) -> Client:
        """The ``distributed.Client``. Dask's own client reconnects by itself for ``timeout``
        seconds and then closes for good; a closed one is replaced here by a fresh connection
        (futures of the old one were cancelled by Dask when the connection was lost)."""
        client = self._client
        if self._closed or self._asynchronous or client.status not in ("closed", "closing"):
            return client
        return self._reconnect(time.monotonic() + self.reconnect)

    def _reconnect(self, deadline: float) -> Client:
        with self._reconnect_lock:
            if self._client.status not in ("closed", "closing"):
                return self._client  # another thread reconnected meanwhile
            pause = 0.2
            while True:
                try:
                    connection = find_connection(self._address) or self.connection
                    left = max(1.0, min(self._timeout, deadline - time.monotonic()))
                    client = self._new_client(connection, left)
                except NotAllowed:
                    raise  # revoked: asking again will not help
                except (OSError, TimeoutError, GridError) as exc:
                    if time.monotonic() + pause >= deadline:
                        raise self._lost(exc) from None
                    time.sleep(pause)  # waiting for the portal to come back, not for a result
                    pause = min(pause * 2, 2.0)
                    continue
                self.connection, self._client, self._largest = connection, client, None
                return client

    def _lost(self, exc: BaseException) -> ConnectionFailed:
        return ConnectionFailed(
            f"lost the connection to the portal at {self.connection.scheduler} and it did not "
            f"come back within {self.reconnect:g} s ({exc}). Is it running? "
            "(`grid-portal serve`, or check GRID_PORTAL_ADDRESS)"
        )

    # -- context management ---------------------------------------------------------------
    def close(self) -> None:
        """Close the connection to the portal (each portal's, over several); a Grid that was
        the process's default Dask client is no longer."""
        self._closed = True
        if self._federation is not None:
            self._federation.close()
            return
        self._client.close()
        if self._set_as_default:
            _forget_default_scheduler()

    def __enter__(self) -> Grid:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        if self._federation is not None:
            return f"<Grid portals: {', '.join(self._federation.members)}>"
        return f"<Grid {self.connection.scheduler}>"

    # -- talking to the portal plugin -----------------------------------------------------
    def _call(self, op: str, **kwargs: Any) -> Any:
        """Ask the portal plugin. A call cut by a lost connection (a portal restart) is made
        again once the portal is back, for up to ``reconnect`` seconds: every ``grid_*``
        handler is safe to repeat (creating, cancelling and storing are idempotent)."""
        if self._asynchronous:
            return self._client.sync(getattr(self._client.scheduler, op), **kwargs)
        deadline: float | None = None
        pause = 0.2
        while True:
            client = self.client
            try:
                return client.sync(getattr(client.scheduler, op), **kwargs)
            except GridError:
                raise  # the portal's answer (NotAllowed is also a PermissionError, an OSError)
            except (OSError, AttributeError) as exc:
                # AttributeError: Dask's client closed under us (client.scheduler is None).
                if isinstance(exc, AttributeError) and client.scheduler is not None:
                    raise
                if self._closed or self.reconnect <= 0:
                    raise
                deadline = deadline or time.monotonic() + self.reconnect
                if time.monotonic() + pause >= deadline:
                    raise self._lost(exc) from None
                time.sleep(pause)  # waiting for the portal to come back, not for a result
                pause = min(pause * 2, 2.0)

    def nodes(self, *, as_dict: bool = False) -> list[Any]:
        """Every node the portal knows, online ones and recently offline ones.

        Parameters
        ----------
        as_dict : bool
            Plain data as the portal sent it (for JSON faces) instead of ``Node`` records.

        Returns
        -------
        list of Node (or of dict)
            Over several portals, grouped by portal, each with its ``portal`` name.
        """
        if self._federation is not None:
            return self._federation.nodes(as_dict)
        data = self._call("grid_nodes")
        return list(data) if as_dict else [Node.from_dict(d) for d in data]

    def node(self, name: str, *, as_dict: bool = False) -> Any:
        """One node with its last 10 minutes of telemetry history.

        Parameters
        ----------
        name : str
            The node's name.
        as_dict : bool
            Plain data as the portal sent it instead of a ``Node``.

        Returns
        -------
        Node (or dict) or None
            None when no node has that name.
        """
        data = self._call("grid_node", name=name)
        if data is None or as_dict:
            return data
        return Node.from_dict(data)

    def capacity(self) -> Capacity:
        """Totals over the online nodes: cores, GPUs and memory, in all and free now.

        Returns
        -------
        Capacity
            Over several portals, the sum, with each portal's own under ``portals``.
        """
        if self._federation is not None:
            return self._federation.capacity()
        return Capacity.from_dict(self._call("grid_capacity"))

    def changes(self, since: int = 0, timeout: float = 10.0, jobs_since: int = 0) -> dict[str, Any]:
        """Long poll: what changed after the given versions (for live views).

        Parameters
        ----------
        since : int
            The node version last seen; ``NO_NODES`` to wait for jobs only.
        timeout : float
            Seconds the portal may wait for a change before it answers (at most 60).
        jobs_since : int
            The jobs version last seen; the caller's own jobs changed after it come back.

        Returns
        -------
        dict
            ``{"version", "nodes", "removed", "jobs_version", "jobs"}`` as plain data. A
            ``jobs_version`` lower than ``jobs_since`` means the portal restarted.
        """
        return self._call("grid_changes", since=since, jobs_since=jobs_since, timeout=timeout)

    def revoke(self, name: str) -> dict[str, Any]:
        """Disconnect a node now and refuse it from then on (the portal's admin only).

        Parameters
        ----------
        name : str
            The node's name, as ``nodes()`` lists it.

        Returns
        -------
        dict
            ``{"revoked": name, "disconnected": n}``: how many of its workers were cut off.

        Raises
        ------
        NotFound
            No node of that name is enrolled or connected.
        NotAllowed
            The caller is not the portal's admin.
        """
        return self._call("grid_revoke", name=name)

    def join_requests(self, everything: bool = False) -> list[dict[str, Any]]:
        """The admin's view of join requests (joining with no token).

        Parameters
        ----------
        everything : bool
            Decided and expired requests too, not only those waiting.

        Returns
        -------
        list of dict
            One record each: id, name, role, pairing code, address, times and state.
        """
        return list(self._call("grid_join_requests", everything=everything))

    def decide_join_request(self, request_id: str, approve: bool) -> dict[str, Any]:
        """The admin approves or denies a join request (after comparing its pairing code).

        Parameters
        ----------
        request_id : str
            The request's id, as ``join_requests()`` lists it.
        approve : bool
            True approves (the requester then receives its certificate), False denies.

        Returns
        -------
        dict
            The request's record after the decision.

        Raises
        ------
        UsageError
            No such request, or it was decided already or has expired.
        """
        return self._call("grid_join_decide", request_id=request_id, approve=approve)

    def dashboard_url(self) -> str | None:
        """The admin only: where the portal's Dask dashboard listens.

        Returns
        -------
        str or None
            Its loopback URL; None when the portal runs without one.
        """
        return (self._call("grid_dashboard") or {}).get("url")

    def whoami(self) -> dict[str, Any] | None:
        """Who the portal takes this connection for, read from its certificate.

        Returns
        -------
        dict or None
            ``{"role": ..., "name": ...}``; None when the portal cannot tell.
        """
        return self._call("grid_whoami")

    def send_to_portal(self, message: dict[str, Any]) -> None:
        """One message on this client's own stream to the portal, with no reply.

        Parameters
        ----------
        message : dict
            A stream message with its ``op`` (a cell for the cell session's lease,
            grid_portal.jobs.cell_session); the portal checks the op against
            ``protocol.py`` and drops what the caller may not send.
        """
        self.client._send_to_scheduler(message)

    # -- jobs -------------------------------------------------------------------------------
    @contextlib.contextmanager
    def job(
        self, name: str, kind: str = "task", job_id: str | None = None, session: bool = False
    ) -> Iterator[str]:
        """Everything submitted inside ``with grid.job("name") as job_id:`` is one job.

        Grouping rides on Dask task annotations, so it costs no extra round trip.

        Parameters
        ----------
        name : str
            The job's name, as ``jobs()`` and the sidebar show it.
        kind : str
            What it is: ``"task"``, ``"cell"``, ``"workflow"``, ``"graph"``.
        job_id : str, optional
            Join this job id (a new one when left out).
        session : bool
            The job is an open interactive session (more work may come).

        Yields
        ------
        str
            The job's id.
        """
        from grid_portal.jobs.graph import job_annotations  # lazy: the job format stays unloaded

        job_id = job_id or new_job_id()
        with dask.annotate(**job_annotations(job_id, name, kind, session=session)):
            yield job_id

    def jobs(self, everyone: bool = False) -> list[Job]:
        """This user's jobs, oldest first.

        Parameters
        ----------
        everyone : bool
            Everyone's jobs (the admin only).

        Returns
        -------
        list of Job
        """
        return [Job.from_dict(j) for j in self._call("grid_jobs", everyone=everyone)["jobs"]]

    def jobs_overview(self, everyone: bool = False) -> dict[str, Any]:
        """This user's jobs and how busy the others are, as plain data (for REST and the CLI).

        Parameters
        ----------
        everyone : bool
            Everyone's jobs (the admin only).

        Returns
        -------
        dict
            ``{"jobs": [...], "others": {"running": n, "queued": n}}``.
        """
        return self._call("grid_jobs", everyone=everyone)

    def get_job(self, job_id: str) -> Job | None:
        """One of this user's jobs.

        Parameters
        ----------
        job_id : str
            The job's id.

        Returns
        -------
        Job or None
            None when the portal has no such job (or it is someone else's).
        """
        data = self._call("grid_job", job_id=job_id)
        return None if data is None else Job.from_dict(data)

    def cancel(self, job_id: str, reason: str = "cancelled by its owner") -> Job:
        """Cancel a job: queued tasks are dropped, running ones are released.

        Parameters
        ----------
        job_id : str
            The job's id.
        reason : str
            Why, as the job's error says afterwards.

        Returns
        -------
        Job
            The job as cancelled.

        Raises
        ------
        NotFound
            No such job, or it is someone else's.
        """
        data = self._call("grid_job_cancel", job_id=job_id, reason=reason)
        return Job.from_dict(data["job"])

    def register_job(
        self, job_id: str, name: str, kind: str, spec: dict[str, Any] | None = None
    ) -> Job:
        """Create a job record up front (workflows keep their spec for resubmission).

        Parameters
        ----------
        job_id : str
            The new job's id.
        name : str
            Its name.
        kind : str
            What it is (``"workflow"``, ``"cell"``, ...).
        spec : dict, optional
            A workflow's spec as plain data: a restarted portal submits the job again.

        Returns
        -------
        Job
        """
        reply = self._call("grid_job_create", job_id=job_id, name=name, kind=kind, spec=spec)
        return Job.from_dict(reply)

    def store_result(self, job_id: str, data: bytes, ttl: float | None = None) -> None:
        """Keep ``data`` at the portal, retrievable after a kernel restart.

        Parameters
        ----------
        job_id : str
            The job it belongs to (the caller's own).
        data : bytes
            What to keep (at most the portal's limit for a kept result).
        ttl : float, optional
            Seconds to keep it; the portal's ``result-ttl`` when left out.
        """
        self._call("grid_job_store_result", job_id=job_id, data=data, ttl=ttl)

    def fetch_result(self, job_id: str) -> bytes | None:
        """What ``store_result`` kept for a job.

        Parameters
        ----------
        job_id : str
            The job's id.

        Returns
        -------
        bytes or None
            None when nothing is kept (never stored, or expired).
        """
        return self._call("grid_job_result", job_id=job_id)

    def trusts_job(self, job_id: str) -> bool:
        """Whether every node that ran the job (as the portal recorded it, not as the nodes
        say) is in ``self.trust``: then its results open as code and its output shows as is.

        Parameters
        ----------
        job_id : str
            The job's id.

        Returns
        -------
        bool
        """
        if not self.trust:
            return False
        if self.trust.everyone:
            return True
        job = self.get_job(job_id)
        return job is not None and self.trust.all(job.nodes)

    # -- running work -----------------------------------------------------------------------
    def requirement(
        self, cpus: float = 1, gpus: float = 0, memory: int | str | None = None
    ) -> Requirement:
        """What one task asks of its node, as a ``Requirement``.

        Parameters
        ----------
        cpus : float
            Cores.
        gpus : float
            GPUs.
        memory : int or str, optional
            Bytes, or a size such as ``"8GB"``.

        Returns
        -------
        Requirement
        """
        return Requirement(
            cpus=cpus, gpus=gpus, memory=parse_size(memory) if memory is not None else None
        )

    def check(self, requirement: Requirement) -> None:
        """Raise ``Unsatisfiable`` when no connected node could ever run this.

        Parameters
        ----------
        requirement : Requirement
            What one task asks for (``requirement()``).

        Raises
        ------
        Unsatisfiable
            With the largest offer, so each face can word its advice.
        """
        needs = requirement.resources()
        largest = self._largest_offer(refresh=False)
        if _fits(needs, largest):
            return
        largest = self._largest_offer(refresh=True)  # a node may have just joined
        if _fits(needs, largest):
            return
        raise Unsatisfiable(
            f"no node on the grid offers {_describe(needs)}; the largest offers "
            f"{_describe(largest)}. Ask for less, or pass wait=True to wait for such a node.",
            resources=needs,
            largest=largest,
        )

    def _largest_offer(self, refresh: bool) -> dict[str, float]:
        now = time.monotonic()
        cached = self._largest
        if cached is not None and not refresh:
            age = now - cached[0]
            if age <= _OFFER_FRESH:
                return cached[1]
            if age <= _OFFER_STALE and not self._asynchronous:
                if not self._renewing:
                    self._renewing = True
                    self.client.loop.add_callback(self._renew_largest_offer)
                return cached[1]
        self._largest = (now, self._call("grid_largest_offer"))
        return self._largest[1]

    async def _renew_largest_offer(self) -> None:
        try:
            offer = await self.client.scheduler.grid_largest_offer()
            self._largest = (time.monotonic(), offer)
        except Exception:  # noqa: BLE001 - the next check asks in the foreground
            self._largest = None
        finally:
            self._renewing = False

    def submit(
        self,
        fn: Callable[..., Any],
        *args: Any,
        cpus: float = 1,
        gpus: float = 0,
        memory: int | str | None = None,
        wait: bool = False,
        where: str | None = None,
        replicas: int = 1,
        **kwargs: Any,
    ) -> Future:
        """Run ``fn(*args, **kwargs)`` on a node that has the resources.

        Over several portals: to the one with the most free cores that has a node for it.

        Parameters
        ----------
        fn : callable
            What to run.
        *args, **kwargs
            Its arguments; Dask's own ``submit`` keywords (``retries``, ``key``, ...) pass on.
        cpus, gpus : float
            What one task needs of its node.
        memory : int or str, optional
            Bytes, or a size such as ``"8GB"``.
        wait : bool
            Wait for a node that could run it instead of refusing at once.
        where : str, optional
            A requirement expression (docs/requirements.md) the node must meet.
        replicas : int
            Run this many copies on different nodes; the portal compares them and the
            future's value is the agreed one (grid_portal.replication).

        Returns
        -------
        Future

        Raises
        ------
        Unsatisfiable
            No connected node could run it (unless ``wait``).
        """
        if self._federation is not None:
            options = dict(kwargs, cpus=cpus, gpus=gpus, memory=memory, wait=wait, where=where)
            return self._federation.submit(fn, args, dict(options, replicas=replicas))
        kwargs.setdefault("pure", False)
        copies = _replicas(replicas)

        def call(resources: dict[str, float]) -> Future:
            if copies > 1:
                calls = [(args, {})]
                return _replicated(self, fn, calls, replicas, resources, wait, where, kwargs)[0]
            return self.client.submit(fn, *args, resources=resources, **kwargs)

        return self._run(
            call,
            self.requirement(cpus, gpus, memory),
            wait,
            where,
            # Plain submit() calls of this client form one interactive-session job.
            {"name": "interactive session", "session": True, "job_id": self._session_job},
            kwargs.get("retries"),
        )

    def map(
        self,
        fn: Callable[..., Any],
        *iterables: Iterable[Any],
        cpus: float = 1,
        gpus: float = 0,
        memory: int | str | None = None,
        wait: bool = False,
        where: str | None = None,
        replicas: int = 1,
        batch: int | str | None = None,
        **kwargs: Any,
    ) -> list[Future]:
        """``fn`` over the items, one future per item, in their order, as one job.

        Over several portals the items go in chunks to the portals with free slots and move
        from a portal that loses its nodes (``grid_portal.federated``); the item futures
        (``federated.Item``) come back in order, each value once.

        Parameters
        ----------
        fn : callable
            What to run for each item.
        *iterables
            Its arguments, one iterable per positional argument.
        cpus, gpus, memory, wait, where, replicas
            As for ``submit``, per item.
        batch : int or str, optional
            ``"auto"`` (the default) runs a sweep of many items as batch tasks of about
            100 ms each, sized from the time the first items took on a node, and returns
            per-item futures (``grid_portal.batching.ItemFuture``: ``result``,
            ``exception``, ``done``, ``cancel``, ``key``, ``grid.gather``); a number fixes
            the items per batch; ``1`` sends one Dask task per item.
        **kwargs
            Dask's own ``map`` keywords.

        Returns
        -------
        list of Future
        """
        if self._federation is not None:
            options = dict(kwargs, cpus=cpus, gpus=gpus, memory=memory, wait=wait, where=where)
            return self._federation.map(fn, iterables, dict(options, replicas=replicas), batch)
        kwargs.setdefault("pure", False)
        iterables = tuple(it if isinstance(it, list | tuple) else list(it) for it in iterables)
        calls = list(zip(*iterables, strict=False))
        copies = _replicas(replicas)
        mode = _batch_mode(batch, calls, copies, kwargs)

        def call(resources: dict[str, float]) -> list[Any]:
            if mode is not None:
                return _batched(self, fn, calls, mode, resources, kwargs)
            if copies > 1:  # as submit's replicas, per item
                items = [(args, {}) for args in calls]
                return _replicated(self, fn, items, replicas, resources, wait, where, kwargs)
            return self.client.map(fn, *iterables, resources=resources, **kwargs)

        return self._run(
            call,
            self.requirement(cpus, gpus, memory),
            wait,
            where,
            {"name": f"map {_name_of(fn)}"},
            kwargs.get("retries"),
        )

    def compute(
        self,
        collection: Any,
        *,
        cpus: float = 1,
        gpus: float = 0,
        memory: int | str | None = None,
        wait: bool = False,
        where: str | None = None,
        **kwargs: Any,
    ) -> Any:
        """Run a Dask collection (array, dataframe, delayed) with every task's resources.

        Parameters
        ----------
        collection : Dask collection
            What to compute.
        cpus, gpus, memory, wait, where
            As for ``submit``, for every task of the graph.
        **kwargs
            Dask's own ``compute`` keywords.

        Returns
        -------
        Future or list of Future
            As ``distributed.Client.compute`` returns them.
        """
        return self._run(
            lambda resources: self.client.compute(collection, resources=resources, **kwargs),
            self.requirement(cpus, gpus, memory),
            wait,
            where,
            {"name": f"compute {_name_of(collection)}", "kind": "graph"},
            kwargs.get("retries"),
        )

    def _run(
        self,
        call: Callable[[dict[str, float]], Any],
        requirement: Requirement,
        wait: bool,
        where: str | None,
        job: dict[str, Any],
        retries: Any = None,
    ) -> Any:
        """What submit, map and compute share: refuse at once what no node could run (unless
        ``wait``), keep to the nodes that meet ``where``, count lost nodes against
        ``retries`` when given, and make the work a job of its own unless the caller is inside
        ``with grid.job(...)`` already."""
        if not wait:
            self.check(requirement)
        resources = requirement.resources()
        # `where`: only nodes that meet it; retries: the portal counts a lost node as a try
        with self._placed(where, requirement, wait), _retries_given(retries):
            if dask.get_annotations().get("grid_job"):
                return call(resources)
            with self.job(**job):
                return call(resources)

    def gather(self, futures: Any) -> Any:
        """The values of futures from this Grid (Dask's, a batched sweep's item futures, or
        a federated map's items).

        Parameters
        ----------
        futures : Future or collection of futures
            What ``submit``, ``map`` or ``compute`` returned.

        Returns
        -------
        object
            The values, in the same shape.
        """
        if self._federation is not None:
            return self._federation.gather(futures)
        if _holds_items(futures):  # a batched sweep's item futures (grid_portal.batching)
            from grid_portal.batching import gather_items

            return gather_items(self, futures)
        return self.client.gather(futures)

    # -- requirement expressions and workflows ------------------------------------------
    @contextlib.contextmanager
    def _placed(self, where: str | None, requirement: Requirement, wait: bool) -> Iterator[None]:
        """Tasks submitted inside run only on nodes that meet ``where``.

        A mistake in the expression raises ExpressionError (a UsageError naming it); when no
        connected node meets it, Unsatisfiable names the closest nodes and what they lack,
        unless ``wait`` (then the tasks wait for such a node to join).
        """
        if where is None:
            yield
            return
        from grid_portal.requirements import compile_requirement

        text = compile_requirement(where).text
        if not wait:
            resources = requirement.resources()
            self.require(text, resources, f"where {text!r} with {_describe(resources)}")
        with dask.annotate(grid_where=text):
            yield

    def run_workflow(
        self,
        spec: Any,
        wait: bool = False,
        overrides: Iterable[str] = (),
        *,
        wait_for_nodes: bool = False,
        progress: Callable[[Job], None] | None = None,
    ) -> Job:
        """Check and submit a workflow.

        Nothing is submitted when the spec has a problem or when no connected node could
        run a stage. Its outputs: ``grid_portal.jobs.workflow.workflow_outputs(grid, job.id)``.

        Parameters
        ----------
        spec : str, Path, dict or JobSpec
            A job file's path, YAML/JSON text, a dict or a parsed ``JobSpec``.
        wait : bool
            Return once the job finished.
        overrides : iterable of str
            ``key=value`` changes to the spec (``--set`` on the command line).
        wait_for_nodes : bool
            Submit even when no connected node could run a stage yet.
        progress : callable, optional
            Called with the Job as it changes, while ``wait``.

        Returns
        -------
        Job

        Raises
        ------
        SpecError
            Lists each problem of the spec.
        Unsatisfiable
            A stage no connected node could run (unless ``wait_for_nodes``).
        """
        from grid_portal.jobs.workflow import submit_workflow

        return submit_workflow(
            self, spec, overrides, wait=wait, wait_for_nodes=wait_for_nodes, progress=progress
        )

    # -- matching a requirement and waiting for nodes -----------------------------------------
    def match(
        self, where: str | None = None, resources: Mapping[str, float] | None = None
    ) -> dict[str, Any]:
        """Which connected nodes could run one task with this requirement and resources.

        Parameters
        ----------
        where : str, optional
            A requirement expression (docs/requirements.md); None matches any node.
        resources : mapping, optional
            One task's resources, as ``Requirement.resources()`` gives them.

        Returns
        -------
        dict
            ``{"matching": [names], "online": n, "closest": [{"name", "reasons"}]}``: the
            closest non-matching nodes come with one line per thing they lack.

        Raises
        ------
        ExpressionError
            A mistake in ``where`` (a UsageError naming it), found before anything is asked.
        """
        from grid_portal.requirements import compile_requirement

        text = compile_requirement(where).text if where else None
        return self._call("grid_match", where=text, resources=dict(resources or {}))

    def require(
        self,
        where: str | None,
        resources: Mapping[str, float] | None = None,
        asked: str | None = None,
    ) -> list[str]:
        """The connected nodes that meet ``where`` with ``resources``; Unsatisfiable if none.

        Parameters
        ----------
        where : str or None
            A requirement expression, or None for any node.
        resources : mapping, optional
            One task's resources.
        asked : str, optional
            How the default message names the request (``where '...' with 2 CPUs``).

        Returns
        -------
        list of str
            The names of the matching nodes (at least one).

        Raises
        ------
        Unsatisfiable
            No connected node meets it; its fields (``where``, ``resources``, ``online``,
            ``closest``) let a front end word its own advice.
        """
        from grid_portal.requirements import describe_refusal

        resources = dict(resources or {})
        report = self.match(where, resources)
        if report["matching"]:
            return list(report["matching"])
        if asked is None:
            asked = f"where {where!r}" if where else _describe(resources)
        raise Unsatisfiable(
            describe_refusal(asked, report),
            where=where,
            resources=resources,
            online=report.get("online"),
            closest=report.get("closest") or (),
        )

    def wait_for_nodes(
        self,
        count: int = 1,
        *,
        where: str | None = None,
        resources: Mapping[str, float] | None = None,
        timeout: float = 60.0,
    ) -> list[str]:
        """Wait until ``count`` connected nodes meet ``where`` with ``resources``.

        Parameters
        ----------
        count : int
            How many nodes must match.
        where : str, optional
            A requirement expression; None counts every online node.
        resources : mapping, optional
            One task's resources each node must offer.
        timeout : float
            Seconds to wait at most.

        Returns
        -------
        list of str
            The names of the matching nodes.

        Raises
        ------
        TimeoutError
            Fewer nodes matched when ``timeout`` ran out.
        """
        deadline = time.monotonic() + timeout
        since = 0
        while True:
            matching = list(self.match(where, resources)["matching"])
            left = deadline - time.monotonic()
            if len(matching) >= count:
                return matching
            if left <= 0:
                raise TimeoutError(
                    f"{len(matching)} of {counted(count, 'node')} matched within {timeout:g} s"
                )
            since = self.changes(since=since, timeout=min(10.0, max(0.1, left)))["version"]

    # -- waiting for a job ------------------------------------------------------------------
    def wait(
        self,
        job_id: str,
        *,
        futures: Iterable[Future] = (),
        progress: Callable[[Job], None] | None = None,
        timeout: float | None = None,
    ) -> Job | None:
        """Wait until the job ends, however often the portal restarts meanwhile.

        The portal's long poll (``changes``) wakes this as soon as one of the caller's jobs
        changes, so a finished job is seen at once; Ctrl-C (KeyboardInterrupt) stops the
        waiting, never the job.

        Parameters
        ----------
        job_id : str
            The job.
        futures : iterable of Future, optional
            The job's futures held by this client: waited for first (they end when the job's
            tasks end), then the job's record. When Dask cancelled them because the
            connection was lost, the portal restarted and ran the job again by itself
            (portal/recovery.py), so the record is waited for however long it takes.
            Otherwise the record, which the portal finishes in the same step, is waited for
            up to 30 s more.
        progress : callable, optional
            Called with the job's record every few seconds while it runs.
        timeout : float, optional
            Seconds to wait at most; None waits until the job ends.

        Returns
        -------
        Job or None
            The job's record: finished, unless ``timeout`` (or the 30 s after its futures
            ended) ran out first; None when the portal knows no such job of the caller's.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        futures = list(futures)
        if futures:
            self._wait_futures(job_id, futures, progress, deadline)
            lost = any(f.status == "cancelled" for f in futures)
            if not lost:
                settle = time.monotonic() + _SETTLE
                deadline = settle if deadline is None else min(deadline, settle)
        version = 0
        while True:
            job = self.get_job(job_id)
            if job is None or job.state.finished:
                return job
            if progress is not None:
                progress(job)
            left = _POLL if deadline is None else min(_POLL, deadline - time.monotonic())
            if left <= 0:
                return job
            reply = self.changes(since=NO_NODES, jobs_since=version, timeout=left)
            # A version lower than ours: the portal restarted (again) and counts from 0.
            version = reply["jobs_version"] if reply["jobs_version"] >= version else 0

    def _wait_futures(
        self,
        job_id: str,
        futures: list[Future],
        progress: Callable[[Job], None] | None,
        deadline: float | None,
    ) -> None:
        from distributed import CancelledError
        from distributed import wait as wait_futures

        while deadline is None or time.monotonic() < deadline:
            try:
                with self.client.as_current():
                    wait_futures(futures, timeout=2.0)
                return
            except TimeoutError:
                if progress is not None and (job := self.get_job(job_id)) is not None:
                    progress(job)
            except CancelledError:  # the job was cancelled (grid-portal cancel)
                return

    # -- a job's tasks, logs and held results -------------------------------------------------
    def job_tasks(self, job_id: str) -> dict[str, Any] | None:
        """A job with its per-stage progress and, for each task, where and when it ran.

        Parameters
        ----------
        job_id : str
            The job.

        Returns
        -------
        dict or None
            ``{"job", "stages", "tasks", "items"}`` as plain data; None when the portal
            knows no such job of the caller's. ``items`` is a pipeline's items (stages that
            map over another stage's items, ``map: {each: ...}``): for each, the stage it is
            in now, the node it runs on and its path through the stages.
        """
        return self._call("grid_job_tasks", job_id=job_id)

    def job_logs(
        self, job_id: str, stage: str | None = None, item: int | None = None
    ) -> list[dict[str, Any]] | None:
        """What a job's shell and script tasks printed.

        Parameters
        ----------
        job_id : str
            The job.
        stage : str, optional
            Only this stage's tasks.
        item : int, optional
            Only this map item's tasks.

        Returns
        -------
        list of dict or None
            One record per task (``stage``, ``item``, ``node``, ``state``, ``stdout``,
            ``stderr``); None when the portal knows no such job of the caller's.
        """
        reply = self._call("grid_job_logs", job_id=job_id, stage=stage, item=item)
        return None if reply is None else list(reply["tasks"])

    def held_keys(self, job_id: str) -> dict[str, list[Any]]:
        """The keys of the results the portal holds for a job (a workflow's kept outputs, a
        restarted cell's result), by stage; a map stage's in map order.

        Parameters
        ----------
        job_id : str
            The job.

        Returns
        -------
        dict
            Stage name to its Dask keys (``(name, i)`` tuples for a map stage).

        Raises
        ------
        NotFound
            Nothing is held for it (not a workflow, not yours, released, or expired).
        UsageError
            Its replicas are still being compared.
        """
        reply = self._call("grid_workflow_outputs", job_id=job_id)
        held = {stage: [_key(k) for k in keys] for stage, keys in reply["outputs"].items()}
        for keys in held.values():
            keys.sort(key=lambda k: k[1] if isinstance(k, tuple) else 0)
        return held

    def release_held(self, job_id: str) -> bool:
        """Let the portal drop the results it holds for a job (once they were fetched).

        Parameters
        ----------
        job_id : str
            The job.

        Returns
        -------
        bool
            Whether anything was held and is now let go.
        """
        return bool((self._call("grid_workflow_release", job_id=job_id) or {}).get("released"))

    def held_results(
        self, job_id: str, *, data_only: bool = False, timeout: float = 60.0
    ) -> dict[str, list[tuple[int | None, Any, BaseException | None]]]:
        """The results the portal holds for a finished job (a workflow's kept outputs).

        The items that succeeded come back even when others did not. They stay held
        (``release_held`` lets them go).

        Parameters
        ----------
        job_id : str
            The job's id.
        data_only : bool
            A value that is not plain data stays unopened (a ``safe_pickle.UntrustedData``,
            its bytes never read) whatever this Grid trusts, for a process that must never
            run what a node made (the Jupyter server).
        timeout : float
            Seconds to wait for the held values to arrive.

        Returns
        -------
        dict
            By stage, in map order: ``(item, value, None)`` each or, for an item that
            failed or was cancelled, ``(item, None, error)``; ``item`` is the map item (None
            for a stage of one task).

        Raises
        ------
        NotFound
            Nothing is held for it, as ``held_keys``.
        """
        from distributed import wait
        from distributed.client import FuturesCancelledError

        out: dict[str, list[tuple[int | None, Any, BaseException | None]]] = {}
        for stage, keys in self.held_keys(job_id).items():
            futures = self.futures_for(keys)
            # On this Grid's own client (Dask's wait uses the process's current one); a
            # cancelled item is an answer here, not an error.
            try:
                with self.client.as_current(), contextlib.suppress(FuturesCancelledError):
                    wait(futures, timeout=timeout)
            except TimeoutError:
                raise GridError(
                    f"the outputs of job {job_id} did not arrive within {timeout:.0f} s (a node "
                    "that held them may have left: they are being made again); try again"
                ) from None
            done = [f for f in futures if f.status == "finished"]
            values = iter(self.client.sync(self.client._gather, done, data_only=data_only))
            out[stage] = [
                (
                    k[1] if isinstance(k, tuple) else None,
                    *((next(values), None) if f.status == "finished" else (None, _error_of(f))),
                )
                for k, f in zip(keys, futures, strict=True)
            ]
        return out

    def futures_for(self, keys: Iterable[Any]) -> list[Future]:
        """Futures of this client for results the scheduler already holds, by key.

        Parameters
        ----------
        keys : iterable
            Dask keys, such as ``held_keys`` gives.

        Returns
        -------
        list of Future
            One per key; the scheduler reports their state to this client (as Dask's own
            ``get_dataset`` does for futures made from keys).
        """
        client = self.client
        futures = [Future(k, client) for k in keys]
        client._inform_scheduler_of_futures()
        return futures

    # -- fair share -------------------------------------------------------------------------
    def fairshare(self) -> dict[str, Any]:
        """Every user's usage, priority factor and quota (public to the grid's users).

        Returns
        -------
        dict
            The portal's report: ``half_life``, ``users`` (one record each), ``time``.
        """
        return self._call("grid_fairshare")

    def set_fairshare(
        self,
        *,
        half_life: float | None = None,
        user: str | None = None,
        quota: float | None = None,
        clear_quota: bool = False,
    ) -> dict[str, Any]:
        """Set the usage half-life or one user's quota (the admin and teachers only).

        Parameters
        ----------
        half_life : float, optional
            Seconds after which past usage counts half.
        user : str, optional
            Whose quota to set or clear.
        quota : float, optional
            The most cores ``user`` may hold at once.
        clear_quota : bool
            Remove ``user``'s quota.

        Returns
        -------
        dict
            The fair-share report after the change (as ``fairshare``).

        Raises
        ------
        NotAllowed
            The caller may not change fair share.
        UsageError
            A value out of range.
        """
        change: dict[str, Any] = {"clear_quota": clear_quota} if clear_quota else {}
        if half_life is not None:
            change["half_life"] = half_life
        if user is not None:
            change["user"] = user
        if quota is not None:
            change["quota"] = quota
        return self._call("grid_fairshare_set", **change)

    # -- this connection's certificate ----------------------------------------------------------
    def renew_certificate(self, csr: str) -> dict[str, Any]:
        """Have the portal sign a fresh certificate for this connection's person.

        Parameters
        ----------
        csr : str
            A PEM certificate signing request for a new key.

        Returns
        -------
        dict
            ``{"cert": PEM text}``.

        Raises
        ------
        NotAllowed
            The certificate was revoked, or its role is not renewed this way.
        """
        return self._call("grid_renew", csr=csr)


# -- what the kernel opens (grid_portal.safe_pickle) ----------------------------------------
@contextlib.contextmanager
def _data_only() -> Iterator[dict[str, Any]]:
    """Arguments for a ``distributed.Client`` made inside: its requests, and its own tasks
    (the stream from the portal), open what nodes send as data only."""
    from grid_portal import safe_pickle

    with safe_pickle.data_only():
        yield safe_pickle._data_client_kwargs()


def _attach_data_only(client: Client, trust: Trust) -> None:
    from grid_portal import safe_pickle

    safe_pickle.attach(client, trust.all, lambda: trust.everyone)


def _trust_for(trust: Iterable[str] | str | None, connection: Connection, embedded: bool) -> Trust:
    """``trust`` plus GRID_PORTAL_TRUST; on the embedded portal, also its one volunteer: this
    machine, lent by the researcher to themselves."""
    result = Trust(trust)
    if embedded or _is_embedded(connection):
        from grid_portal.node.agent import hostname

        result.add(f"{hostname()}-local")
    return result


def _is_embedded(connection: Connection) -> bool:
    from grid_portal.connection import embedded_connection_path

    path = embedded_connection_path()
    try:
        return path.exists() and Connection.load(path).scheduler == connection.scheduler
    except GridError:
        return False


@contextlib.contextmanager
def _retries_given(retries: Any) -> Iterator[None]:
    """Work submitted inside says how many retries it has (``retries=N``, 0 included): the
    portal then counts a lost node as one of its tries (grid_portal/portal/retries.py); work
    that says nothing keeps Dask's rule (run again elsewhere when a node is lost)."""
    if retries is None:
        yield
        return
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
        raise UsageError(f"retries={retries!r}: retries is a whole number, 0 or more")
    with dask.annotate(**{RETRIES_ANNOTATION: retries}):
        yield


def _error_of(future: Future) -> BaseException:
    """Why a finished future holds no value: its task's error (opened as data only by this
    client's handlers), or that it was cancelled."""
    if future.status == "cancelled":
        return GridError(f"cancelled before it finished ({future.key!r})")
    return future.exception()


def _replicas(replicas: Any) -> int:
    from grid_portal.replication import check_replicas

    return check_replicas(replicas)


def _replicated(grid: Grid, *args: Any) -> list[Future]:
    from grid_portal.replication import run_replicated

    return run_replicated(grid, *args)


def _batch_mode(batch: Any, calls: Any, replicas: int, kwargs: dict[str, Any]) -> Any:
    from grid_portal.batching import batch_mode

    return batch_mode(batch, calls, replicas, kwargs)


def _batched(grid: Grid, *args: Any) -> list[Any]:
    from grid_portal.batching import map_batched

    return map_batched(grid, *args)


def _holds_items(futures: Any) -> bool:
    from grid_portal.batching import holds_items

    return holds_items(futures)


def _key(value: Any) -> Any:
    """Dask keys come back from msgpack with tuples turned into lists."""
    return tuple(_key(v) for v in value) if isinstance(value, list) else value


def _name_of(obj: Any) -> str:
    name = getattr(obj, "__name__", None) or getattr(obj, "name", None) or type(obj).__name__
    return str(name)[:60]


def _fits(needs: dict[str, float], largest: dict[str, float]) -> bool:
    return all(largest.get(k, 0.0) >= v for k, v in needs.items())


def _describe(resources: dict[str, float]) -> str:
    parts = []
    cpus = resources.get(CPU)
    if cpus is not None:
        parts.append(f"{cpus:g} CPU{'s' if cpus != 1 else ''}")
    gpus = resources.get(GPU)
    if gpus is not None and (gpus or GPU in resources):
        parts.append(f"{gpus:g} GPU{'s' if gpus != 1 else ''}")
    memory = resources.get(MEMORY)
    if memory:
        parts.append(f"{format_size(memory)} memory")
    return ", ".join(parts) or "nothing"


def _forget_default_scheduler() -> None:
    """Once no Dask client is left, send ``x.compute()`` back to Dask's local schedulers.

    Each Dask client made the default sets ``scheduler="dask.distributed"`` and restores the
    value it found when it closes; a Grid that reconnected made a second client while the first
    still held the setting, so closing them in order restores "dask.distributed" with no client
    left, and the next local ``compute()`` fails with "no Client active"."""
    from distributed.client import _get_global_client

    if _get_global_client() is None and dask.config.get("scheduler", None) == "dask.distributed":
        dask.config.set(scheduler=None)
