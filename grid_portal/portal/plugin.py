"""PortalPlugin: the scheduler plugin that is the single source of truth about the grid.

It watches Dask's own events (workers joining and leaving, heartbeats carrying our telemetry)
and keeps the node registry. Clients never hold a copy of this state: they ask through the
scheduler handlers registered here (``grid_*``), over the same mutual-TLS comm as everything
else.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from distributed.core import Status
from distributed.diagnostics.plugin import SchedulerPlugin
from distributed.metrics import time as dask_time
from distributed.scheduler import heartbeat_interval
from tornado.ioloop import PeriodicCallback

from grid_portal.errors import NotAllowed, NotFound, UsageError
from grid_portal.guard import Gate, caller_identity, install
from grid_portal.identity import Identity
from grid_portal.model import JobState, NodeState
from grid_portal.portal import graph_guard, retries
from grid_portal.portal.access import Access
from grid_portal.portal.bandwidth import TransferCost
from grid_portal.portal.cell_lease import CellLeases
from grid_portal.portal.dashboard import DashboardAddress
from grid_portal.portal.delegation import confine, delegation_of
from grid_portal.portal.delegation import issue as issue_delegation
from grid_portal.portal.jobs import JobBook, spec_problem
from grid_portal.portal.join_requests import JoinRequestHandlers
from grid_portal.portal.ledger import EnrolmentBook
from grid_portal.portal.peering import PeerHandlers
from grid_portal.portal.recovery import Recovery
from grid_portal.portal.registry import NodeRegistry
from grid_portal.portal.reports import NodeReports
from grid_portal.portal.scheduling import Scheduling
from grid_portal.portal.sessions import DaskSessions
from grid_portal.protocol import (  # noqa: F401 - annotation names re-exported for portal code
    ADMIN,
    FAILED_ITEMS_METADATA,
    ITEMS_ANNOTATION,
    JOB_ANNOTATION,
    JOB_KIND_ANNOTATION,
    JOB_NAME_ANNOTATION,
    JOB_OPEN_ANNOTATION,
    JOB_OWNER_ANNOTATION,
    NODE,
    PERSON_CERT_DAYS,
    SCHEDULER_HANDLERS,
    SCHEDULER_STREAM_OPS,
    STAFF,
    SWEEP_ANNOTATION,
)
from grid_portal.pushed import PUSH_ANNOTATION, PUSH_FORWARDED, PUSH_LIMIT, PUSH_OP
from grid_portal.settings import given_or

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from distributed import Scheduler
    from distributed.scheduler import WorkerState

logger = logging.getLogger("grid_portal.portal")

# Who may see and cancel everyone's jobs, and name another owner for a job.
TRUSTED_ROLES = tuple(sorted(STAFF))

# What a worker sends once at registration (Worker.startup_information) and in each heartbeat
# (Worker.metrics). The node side fills these; see grid_portal/node/plugin.py.
STARTUP_KEY = "grid"
METRIC_KEY = "grid"


class PortalPlugin(SchedulerPlugin):
    name = "grid-portal"

    def __init__(
        self,
        telemetry_interval: float | None = None,
        offline_retention: float | None = None,
        ledger_path: Path | None = None,
        result_ttl: float | None = None,
        node_timeout: float | None = None,
    ):
        # Seconds; left out: the configured ones (grid-portal.portal.*, grid_portal/settings.py).
        telemetry_interval = given_or(telemetry_interval, "portal.telemetry-interval")
        self.telemetry_interval = telemetry_interval
        self.node_timeout = given_or(node_timeout, "portal.node-timeout")
        self._timing_out: set[str] = set()
        # What each live node's registry entry was last made from, so that a refresh skips the
        # nodes that sent nothing new (most of them, on an idle grid: it stays cheap).
        self._observed: dict[str, tuple[Any, ...]] = {}
        self._last_refresh = self._calm_since = dask_time()
        self.registry = NodeRegistry(
            sample_interval=telemetry_interval, offline_retention=offline_retention
        )
        # What nodes report is cleaned (types, ranges, sizes) before it is believed: a node is
        # a stranger's machine, and the sidebar and matching trust these numbers.
        self.reports = NodeReports(logger)
        self.jobs = JobBook(ledger_path, result_ttl=result_ttl)
        self.jobs.on_change = self.registry.notify
        # A restart must not lose work: jobs cut short by one are reopened now and resubmitted
        # once the scheduler listens (server.py), or marked interrupted with the reason.
        self.recovery = Recovery(self.jobs)
        self.enrolments = EnrolmentBook(ledger_path) if ledger_path is not None else None
        self.access = Access(self.jobs, self.enrolments)
        # Signs people's renewals: an async (csr, name, role) -> certificate PEM that asks the
        # enrolment process (portal/scheduler_process.py); this process never holds the CA.
        self.renewals: Callable[[str, str, str], Awaitable[str]] | None = None
        # Signs jobs' delegated credentials, the same way: (csr, name) -> certificate PEM.
        self.delegations: Callable[[str, str], Awaitable[str]] | None = None
        self._revocations: PeriodicCallback | None = None
        self.scheduler: Scheduler | None = None
        self._poll: PeriodicCallback | None = None
        self._client_identity: dict[str, Identity | None] = {}
        self._client_sessions: dict[str, set[str]] = {}
        # Workflows: placement, fair share, task records; see portal/scheduling.py.
        self.scheduling = Scheduling(self, ledger_path)
        self.ledger_path = ledger_path
        # Where Dask's dashboard listens, for the admin's proxy (`serve --dashboard`).
        self.dashboard = DashboardAddress()
        # Plain Dask work (no grid_job) is its client's session job, so it is listed, counted
        # and cancellable like any other.
        self.dask_sessions = DaskSessions(self.jobs)
        # Kernels' cell sessions: cells forwarded to a leased slot, no graph per cell.
        self.leases = CellLeases(self.jobs, self._identity_of_client)

    # -- lifecycle --------------------------------------------------------------------------
    async def start(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler
        # Gate worker registration on the TLS identity: only a node certificate may join, as
        # the name written in it, and not once revoked. (A plugin's add_worker hook runs too
        # late and without the comm, so wrap Dask's own handler instead.)
        handlers = scheduler.handlers
        raw = getattr(handlers, "raw", handlers.__getitem__)  # the unguarded handler
        self._register_worker = raw("register-worker")
        scheduler.handlers["register-worker"] = self.checked_register_worker
        scheduler.handlers.update(
            {
                "grid_nodes": self.handle_nodes,
                "grid_node": self.handle_node,
                "grid_capacity": self.handle_capacity,
                "grid_changes": self.handle_changes,
                "grid_largest_offer": self.handle_largest_offer,
                "grid_whoami": self.handle_whoami,
                "grid_renew": self.handle_renew,
                "grid_delegate": self.handle_delegate,
                "grid_revoke": self.handle_revoke,
                "grid_jobs": self.handle_jobs,
                "grid_job": self.handle_job,
                "grid_job_create": self.handle_job_create,
                "grid_job_cancel": self.handle_job_cancel,
                "grid_job_store_result": self.handle_job_store_result,
                "grid_job_result": self.handle_job_result,
            }
        )
        scheduler.handlers.update(self.scheduling.handlers())  # workflows
        # The admin answers join requests from the sidebar too, not only from a terminal.
        scheduler.handlers.update(JoinRequestHandlers(self.ledger_path).handlers())
        scheduler.handlers.update(self.dashboard.handlers())
        # Peering; a borrowing peer counts as one user of our fair share.
        peers = PeerHandlers(self.ledger_path, self.scheduling.fairshare)
        scheduler.handlers.update(peers.handlers())
        scheduler.stream_handlers[PUSH_OP] = self.forward_pushed_result
        self.leases.install(scheduler)
        # Heartbeats have no plugin hook, so read the latest metrics on our own clock. Half the
        # telemetry interval keeps the registry at most one interval behind the volunteers.
        self._poll = PeriodicCallback(self.refresh, self.telemetry_interval * 1000 / 2)
        self._poll.start()
        # Default deny (grid_portal/protocol.py): every call and stream message is checked
        # against the caller's role, then against what it owns (portal/access.py).
        self.access.attach(scheduler)
        self.gate = Gate(
            "portal",
            SCHEDULER_HANDLERS,
            SCHEDULER_STREAM_OPS,
            check_call=self.access.check_call,
            check_stream=self.access.check_stream,
            is_revoked=self.access.is_revoked,
            unlisted_to=ADMIN,
        )
        install(scheduler, self.gate)
        quiet_work_stealing(scheduler)  # idle grids pay nothing for it
        # A moved input prefers the node with more measured bandwidth to its sender. Dask has
        # no plugin hook for the transfer cost in its worker objective (work stealing asks the
        # same method), so the portal replaces that method, on this instance only.
        scheduler.get_comm_cost = TransferCost(scheduler, self.registry)  # type: ignore[method-assign]
        # A revoked identity's live connections go within a second (Access.sweep).
        self._revocations = PeriodicCallback(self._sweep_revoked, 1000)
        self._revocations.start()
        self.jobs.start_expiry()  # kept results past their ttl leave the ledger
        graph_guard.install(scheduler)  # a client's graph must never run code on the portal
        retries.install(scheduler)  # a lost node counts against the retries work was given
        for address in list(scheduler.workers):
            self.add_worker(scheduler, address)

    async def close(self) -> None:
        if self._poll is not None:
            self._poll.stop()
        if self._revocations is not None:
            self._revocations.stop()
        self.jobs.stop_expiry()
        self.jobs.flush()

    # -- jobs from task annotations ---------------------------------------------------------
    def _identity_of_client(self, client: str) -> Identity | None:
        if client not in self._client_identity:
            assert self.scheduler is not None
            stream = self.scheduler.client_comms.get(client)
            comm = getattr(stream, "comm", None)
            self._client_identity[client] = caller_identity(comm)
        return self._client_identity[client]

    async def _sweep_revoked(self) -> None:
        # One ledger read a second keeps the gate's copy of the revocations fresh, so no
        # request waits on it; a change drops the revoked identities' live connections.
        if self.scheduler is not None and self.access.refresh():
            await self.access.sweep(caller_identity)

    def update_graph(
        self,
        scheduler: Scheduler,
        *,
        client: str,
        keys: set[Any],
        tasks: list[Any],
        annotations: dict[str, dict[Any, Any]],
        **kwargs: Any,
    ) -> None:
        delegated = delegation_of(self._identity_of_client(client))
        if delegated is not None:  # a job's own client: everything it sends is that job's
            annotations = confine(scheduler, self.jobs, tasks, annotations, delegated)
        annotations = self.dask_sessions.annotate(scheduler, client, tasks, annotations)
        self.scheduling.update_graph(scheduler, client, tasks, annotations)  # workflows
        self.leases.update_graph(client, annotations)
        for key in annotations.get(PUSH_ANNOTATION, {}):
            ts = scheduler.tasks.get(key)
            if ts is not None:  # the node pushes only what this portal will forward
                ts.annotations[PUSH_ANNOTATION] = PUSH_FORWARDED
        job_of = annotations.get(JOB_ANNOTATION)
        if not job_of:
            return
        identity = self._identity_of_client(client)
        default_owner = identity.name if identity is not None else "unknown"
        if delegated is not None:
            default_owner = delegated.owner
        # Only the admin (the portal resubmitting after a restart) may name another owner.
        trusted = identity is not None and identity.role == ADMIN
        names = annotations.get(JOB_NAME_ANNOTATION, {})
        kinds = annotations.get(JOB_KIND_ANNOTATION, {})
        opens = annotations.get(JOB_OPEN_ANNOTATION, {})
        owners = annotations.get(JOB_OWNER_ANNOTATION, {})
        items = annotations.get(ITEMS_ANNOTATION)
        sweeps = annotations.get(SWEEP_ANNOTATION)
        by_job: dict[str, list[Any]] = {}
        for key, job_id in job_of.items():
            by_job.setdefault(str(job_id), []).append(key)
        for job_id, job_keys in by_job.items():
            first = job_keys[0]
            owner = owners.get(first) if trusted and owners.get(first) else default_owner
            existing = self.jobs.jobs.get(job_id)
            if existing is not None and existing.owner != owner:
                logger.warning(
                    "%s tried to add tasks to %s's job %s", owner, existing.owner, job_id
                )
                # Refused, not just left out of the job: run, such a task could store a
                # result under the other user's job from the node it ran on.
                scheduler.stimulus_cancel(
                    job_keys,
                    client=client,
                    force=True,
                    reason="grid-job-not-yours",
                    msg=f"job {job_id} belongs to another user",
                )
                continue
            record = self.jobs.ensure(
                job_id,
                owner=owner,
                name=names.get(first),
                kind=kinds.get(first, "task"),
                open=bool(opens.get(first, False)),
            )
            if record.open and delegated is None:  # a job's own client does not hold it open
                self._client_sessions.setdefault(client, set()).add(job_id)
            if record.state is JobState.CANCELLED:
                # Tasks that arrive after their job was cancelled are cancelled on arrival.
                scheduler.stimulus_cancel(
                    job_keys,
                    client=client,
                    force=True,
                    reason="grid-job-cancelled",
                    msg=record.error or "cancelled",
                )
                continue
            # A sweep's batch tasks count as their items (grid_portal.batching), so progress
            # is in the researcher's items, not in batches.
            coming = max((_count(sweeps.get(k)) for k in job_keys), default=0) if sweeps else 0
            self.jobs.add_tasks(job_id, job_keys, items, coming)
            # Tasks that were already done (the same key submitted again) count at once.
            for key in job_keys:
                ts = scheduler.tasks.get(key)
                if ts is not None and ts.state in ("memory", "erred"):
                    self.jobs.task_finished(key, ok=ts.state == "memory")

    def transition(
        self, key: Any, start: str, finish: str, *args: Any, stimulus_id: str = "", **kwargs: Any
    ) -> None:
        if self.scheduler is not None:  # workflows: fair share, task records, placement
            self.scheduling.transition(self.scheduler, key, start, finish, kwargs)
        self.leases.transition(key, start, finish)
        if key not in self.jobs.task_jobs:
            return
        if finish == "processing":
            ts = self.scheduler.tasks.get(key) if self.scheduler else None
            ws = ts.processing_on if ts is not None else None
            self.jobs.task_started(key, str(ws.name) if ws is not None else None)
        elif finish == "memory":
            # A batch task whose items raised says how many (grid_portal.batching).
            failed = (kwargs.get("metadata") or {}).get(FAILED_ITEMS_METADATA)
            self.jobs.task_finished(key, ok=True, failed_items=_count(failed))
        elif finish == "erred":
            ts = self.scheduler.tasks.get(key) if self.scheduler else None
            text = getattr(ts, "exception_text", None) or "the task failed"
            self.jobs.task_finished(key, ok=False, error=text)
        elif finish == "forgotten":
            self.jobs.task_forgotten(key)

    def forward_pushed_result(self, key: Any = None, data: Any = None, worker: str = "") -> None:
        """A node pushed a finished task's small result (``grid_portal.pushed``): hand it,
        unopened, to the clients that asked for that task, and to no one else. Only the node
        the task runs on may push it, only for a task annotated ``grid_push``, only small."""
        assert self.scheduler is not None
        ts = self.scheduler.tasks.get(key) if isinstance(key, str) else None
        if (
            ts is None
            or not isinstance(data, bytes)
            or len(data) > PUSH_LIMIT
            or ts.processing_on is None
            or ts.processing_on.address != worker
            or (ts.annotations or {}).get(PUSH_ANNOTATION) != PUSH_FORWARDED
        ):
            return
        for client in ts.who_wants or ():
            stream = self.scheduler.client_comms.get(client.client_key)
            if stream is not None:
                stream.send({"op": PUSH_OP, "key": key, "data": data})

    def remove_client(self, scheduler: Scheduler, client: str) -> None:
        self._client_identity.pop(client, None)
        self.access.forget_client(client)
        for job_id in self._client_sessions.pop(client, set()):
            self.jobs.close_session(job_id)

    # -- who may join -----------------------------------------------------------------------
    def refusal(self, identity: Identity | None, name: Any) -> str | None:
        """Why a worker presenting ``identity`` may not join as ``name``; None if it may."""
        if identity is None or identity.role != NODE:
            return "only enrolled volunteer nodes may join as workers"
        if str(name) != identity.name:
            return f"this certificate belongs to node {identity.name!r}, not {name!r}"
        if self.enrolments is not None and self.enrolments.is_revoked(
            identity.name, identity.serial_hex
        ):
            return f"node {identity.name!r} was revoked by the portal's admin"
        return None

    async def checked_register_worker(self, comm: Any, **msg: Any) -> None:
        reason = self.refusal(caller_identity(comm), msg.get("name"))
        if reason is not None:
            logger.warning("refused a worker from %s: %s", msg.get("address"), reason)
            await comm.write({"status": "error", "message": reason, "time": dask_time()})
            return
        await self._register_worker(comm, **msg)

    async def handle_revoke(self, comm: Any = None, name: str = "") -> dict[str, Any]:
        """Revoke a node: it is disconnected at once and cannot rejoin. Admins only
        (grid_portal/protocol.py)."""
        known = self.enrolments.revoke(name) if self.enrolments is not None else False
        assert self.scheduler is not None
        removed = []
        for address, ws in list(self.scheduler.workers.items()):
            if str(ws.name) == name:
                await self.scheduler.remove_worker(
                    address, stimulus_id=f"grid-revoke-{name}", close=True
                )
                removed.append(address)
        if not known and not removed:
            raise NotFound(f"no node named {name!r}: `grid-portal nodes` lists them")
        self.registry.leave_by_name(name, reason="revoked")
        return {"revoked": name, "disconnected": len(removed)}

    # -- Dask events ------------------------------------------------------------------------
    def add_worker(self, scheduler: Scheduler, worker: str) -> None:
        ws = scheduler.workers.get(worker)
        if ws is None:
            return
        name = str(ws.name)
        info = self.reports.startup(name, ws.extra.get(STARTUP_KEY))
        ws.extra[STARTUP_KEY] = info  # plugins after this one (contributions) read it too
        offer = info.get("offer") or {
            "cpus": ws.nthreads,
            "memory": ws.memory_limit,
            "gpus": [],
        }
        self.registry.join(
            name=name,
            address=worker,
            capacity=info.get("capacity") or {},
            offer=offer,
            labels=info.get("labels") or {},
            sandbox=info.get("sandbox"),
        )
        logger.info("node %s joined from %s", name, worker)
        self.scheduling.add_worker(scheduler, worker)  # waiting `where` tasks may now match

    def remove_worker(self, scheduler: Scheduler, worker: str, **kwargs: Any) -> None:
        self._observed.pop(worker, None)
        self.registry.leave(worker, reason="left the grid")
        self.scheduling.remove_worker(scheduler, worker)  # its replicas and placements
        self.access.forget_worker(worker)
        logger.info("node at %s left", worker)

    # -- live telemetry -------------------------------------------------------------------
    def refresh(self) -> None:
        scheduler = self.scheduler
        if scheduler is None:
            return
        now = dask_time()
        # Heartbeats slow down as a grid grows (Dask spaces them out); never call a node
        # silent before it has missed three of them.
        timeout = max(self.node_timeout, 3 * heartbeat_interval(len(scheduler.workers)))
        # When this very loop was held up (a huge graph arriving), heartbeats that
        # came meanwhile are still unread and every node would look silent: judge nodes only
        # once the loop has run freely for a heartbeat interval.
        if now - self._last_refresh > max(2.0, 2 * self.telemetry_interval):
            self._calm_since = now
        self._last_refresh = now
        calm = now - self._calm_since > heartbeat_interval(len(scheduler.workers)) + 1.0
        for address, ws in scheduler.workers.items():
            silent = now - ws.last_seen > timeout and address not in self._timing_out
            if silent and calm:
                self._drop_silent_worker(address, now - ws.last_seen)
            # Dask replaces ws.metrics at each heartbeat: the same object, the same status,
            # work and resources in use mean nothing new to clean, judge or record.
            observed = (ws.metrics, ws.status, bool(ws.processing), ws.used_resources)
            seen = self._observed.get(address)
            if seen is not None and seen[0] is observed[0] and seen[1:] == observed[1:]:
                continue
            self._observed[address] = (*observed[:3], dict(ws.used_resources))
            metrics = self.reports.metrics(str(ws.name), address, ws.metrics.get(METRIC_KEY))
            state, reason = node_state(ws, metrics)
            self.registry.update(
                address,
                state=state,
                reason=reason,
                telemetry=metrics,
                used_resources=dict(ws.used_resources),
            )
        self.registry.forget_stale()
        self.jobs.flush()

    def _drop_silent_worker(self, address: str, silent_for: float) -> None:
        """A node that stopped heartbeating (cable pulled, power cut) is removed now, so its
        tasks rerun elsewhere. Dask's own worker-ttl check would first try to restart it
        through its nanny, which is just as unreachable, and so take much longer."""
        assert self.scheduler is not None
        logger.warning("node at %s silent for %.0f s: declaring it offline", address, silent_for)
        self._timing_out.add(address)

        async def remove() -> None:
            try:
                await self.scheduler.remove_worker(
                    address, stimulus_id=f"grid-node-timeout-{dask_time()}", close=False
                )
            finally:
                self._timing_out.discard(address)

        asyncio.get_running_loop().create_task(remove())

    # -- handlers for the Grid client ------------------------------------------------------
    def handle_nodes(self, comm: Any = None, history: bool = False) -> list[dict[str, Any]]:
        self.refresh()
        return self.registry.list(history=history)

    def handle_node(self, comm: Any = None, name: str = "") -> dict[str, Any] | None:
        self.refresh()
        return self.registry.get(name)

    def handle_capacity(self, comm: Any = None) -> dict[str, Any]:
        self.refresh()
        return self.registry.capacity()

    async def handle_changes(
        self, comm: Any = None, since: int = 0, jobs_since: int = 0, timeout: float = 10.0
    ) -> dict[str, Any]:
        """Long poll: answer as soon as a node or one of the caller's jobs changed."""
        owner = self._owner_filter(comm)

        def changed() -> bool:
            if self.registry.version > since:
                return True
            return any(
                r.version > jobs_since and (owner is None or r.owner == owner)
                for r in self.jobs.jobs.values()
            )

        await self.registry.wait_until(changed, min(float(timeout), 60.0))
        self.refresh()
        self.jobs.flush()  # what anyone is told about a job is in the ledger (FLUSH_DELAY)
        result = self.registry.changes(since)
        result["jobs_version"] = self.jobs.version
        result["jobs"] = [
            j for j in self.jobs.changes(jobs_since) if owner is None or j["owner"] == owner
        ]
        return result

    def handle_largest_offer(self, comm: Any = None) -> dict[str, float]:
        return self.registry.largest_offer()

    def handle_whoami(self, comm: Any = None) -> dict[str, Any] | None:
        identity = caller_identity(comm)
        return None if identity is None else {"role": identity.role, "name": identity.name}

    async def handle_renew(self, comm: Any = None, csr: str = "") -> dict[str, Any]:
        """A fresh certificate for the caller's own name and role (grid_portal/renewal.py).
        A revoked caller is refused by the gate, and again by the enrolment process, which
        signs only after checking the ledger itself (the gate's copy of the revocations may be
        a second old) and records the new serial."""
        identity = self._caller(comm)
        if self.renewals is None or identity is None:
            raise NotAllowed("this portal does not renew certificates; log in again")
        if not isinstance(csr, str):
            raise UsageError("grid_renew takes a certificate request (PEM text)")
        cert = await self.renewals(csr, identity.name, identity.role)
        logger.info("renewed the certificate of %s %s", identity.role, identity.name)
        return {"cert": cert}

    async def handle_delegate(
        self, comm: Any = None, key: Any = None, csr: str = ""
    ) -> dict[str, Any]:
        """A delegated credential for the job of a task the calling node runs (its task
        called ``get_client()``): portal/delegation.py."""
        assert self.scheduler is not None
        identity = self._caller(comm)
        return await issue_delegation(
            self.scheduler, self.jobs, self.delegations, identity, key, csr
        )

    # -- job handlers -------------------------------------------------------------------------
    def _caller(self, comm: Any) -> Identity | None:
        return caller_identity(comm)

    def _owner_filter(self, comm: Any, everyone: bool = False) -> str | None:
        """None means 'all jobs' (trusted callers asking for everyone's); else a user name."""
        identity = self._caller(comm)
        if identity is None:
            return "" if comm is not None else None
        if everyone and identity.role in TRUSTED_ROLES:
            return None
        return identity.name

    def _may_see(self, comm: Any, owner: str) -> bool:
        identity = self._caller(comm)
        if comm is None:
            return True
        return identity is not None and (identity.name == owner or identity.role in TRUSTED_ROLES)

    def handle_jobs(self, comm: Any = None, everyone: bool = False) -> dict[str, Any]:
        self.jobs.flush()  # what anyone is told about a job is in the ledger (FLUSH_DELAY)
        owner = self._owner_filter(comm, everyone)
        identity = self._caller(comm)
        me = identity.name if identity is not None else ""
        return {"jobs": self.jobs.list(owner), "others": self.jobs.others(me)}

    def handle_job(self, comm: Any = None, job_id: str = "") -> dict[str, Any] | None:
        self.jobs.flush()  # what anyone is told about a job is in the ledger (FLUSH_DELAY)
        record = self.jobs.jobs.get(job_id)
        if record is None or not self._may_see(comm, record.owner):
            return None
        return record.to_dict()

    def handle_job_create(
        self,
        comm: Any = None,
        job_id: str = "",
        name: str = "",
        kind: str = "task",
        spec: dict[str, Any] | None = None,
        owner: str | None = None,
    ) -> dict[str, Any]:
        identity = self._caller(comm)
        me = identity.name if identity is not None else "unknown"
        if owner and identity is not None and identity.role == ADMIN:
            me = owner
        problem = spec_problem(spec)  # the ledger is no dumping ground
        if problem is not None:
            raise UsageError(f"the portal did not register job {job_id}: {problem}")
        return self.jobs.ensure(job_id, owner=me, name=name, kind=kind, spec=spec).to_dict()

    async def handle_job_cancel(
        self, comm: Any = None, job_id: str = "", reason: str = "cancelled"
    ) -> dict[str, Any]:
        record = self.jobs.jobs.get(job_id)
        if record is None or not self._may_see(comm, record.owner):
            raise NotFound(f"no job {job_id!r} that you may cancel; see grid.jobs()")
        keys = self.jobs.cancel(job_id, reason=reason)
        self.leases.stop(keys)  # leased cells stop on their nodes
        scheduler = self.scheduler
        assert scheduler is not None
        wanted = [k for k in keys if k in scheduler.tasks and scheduler.tasks[k].who_wants]
        if wanted:
            some_client = next(iter(scheduler.tasks[wanted[0]].who_wants)).client_key
            scheduler.stimulus_cancel(
                wanted, client=some_client, force=True, reason="grid-job-cancelled", msg=reason
            )
        return {"job": record.to_dict()}

    def handle_job_store_result(
        self, comm: Any = None, job_id: str = "", data: bytes = b"", ttl: float | None = None
    ) -> dict[str, Any]:
        record = self.jobs.jobs.get(job_id)
        if record is None or not (
            self._may_see(comm, record.owner) or self._ran_on_caller(comm, record.nodes)
        ):
            raise NotFound(f"no job {job_id!r} of yours to keep a result for")
        try:
            self.jobs.store_result(job_id, bytes(data), ttl)
        except ValueError as exc:
            raise UsageError(f"the portal did not keep the result of {job_id}: {exc}") from None
        return {"ok": True}

    def _ran_on_caller(self, comm: Any, nodes: list[str]) -> bool:
        """A node may keep the result of a job whose task it ran: a %%grid --bg cell stores
        its own result from the node, so it is kept even when its kernel has gone."""
        identity = self._caller(comm)
        return identity is not None and identity.role == "node" and identity.name in nodes

    def handle_job_result(self, comm: Any = None, job_id: str = "") -> bytes | None:
        record = self.jobs.jobs.get(job_id)
        if record is None or not self._may_see(comm, record.owner):
            return None
        return self.jobs.fetch_result(job_id)


def _count(value: Any) -> int:
    """A count a client annotated (items of a sweep), or 0 if it is not a count."""
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def quiet_work_stealing(scheduler: Scheduler) -> None:
    """Skip Dask's work-stealing pass when it could steal nothing.

    ``WorkStealing.balance`` runs every second and first computes every worker's occupancy,
    only then to return when no worker is idle or every worker is (an idle grid): an O(workers)
    pass for nothing, about a seventh of an idle portal's CPU with 200 nodes. This makes the
    same check first. Also slows Dask's idle checks (below). Idempotent; nothing happens to
    stealing without Dask's stealing extension."""
    stealing = scheduler.extensions.get("stealing")
    balance = getattr(stealing, "balance", None)
    if balance is None or getattr(balance, "grid_quiet", False):
        return

    def balance_when_it_can_steal() -> None:
        idle = len(scheduler.idle)
        if idle and idle != len(scheduler.workers):
            balance()

    balance_when_it_can_steal.grid_quiet = True  # type: ignore[attr-defined]
    stealing.balance = balance_when_it_can_steal  # what its timer calls, if started after us
    timer = scheduler.periodic_callbacks.get("stealing")
    if timer is not None:
        timer.callback = balance_when_it_can_steal
    # Dask's idle check (a pass over every worker) and no-workers check run every 0.25 s; the
    # portal sets neither timeout, and a second is precise enough for the idle time it reports.
    for name in ("idle-timeout", "no-workers-timeout"):
        if name in scheduler.periodic_callbacks:
            scheduler.periodic_callbacks[name].callback_time = 1000


def node_state(
    ws: WorkerState, metrics: dict[str, Any] | None = None
) -> tuple[NodeState, str | None]:
    """A live worker's state as volunteers and researchers understand it. ``metrics``: its
    last heartbeat's grid metrics, cleaned (grid_portal.portal.reports.clean_metrics)."""
    policy = (metrics or {}).get("policy") or {}
    if ws.status == Status.closing_gracefully or policy.get("state") == "draining":
        return NodeState.DRAINING, policy.get("reason") or "draining"
    if ws.status == Status.paused or policy.get("state") == "paused":
        return NodeState.PAUSED, policy.get("reason") or "paused: memory pressure"
    if ws.processing:
        return NodeState.BUSY, None
    return NodeState.ONLINE, None
