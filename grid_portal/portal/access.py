"""The portal's own checks behind the protocol's roles: ownership, binding, revocation.

`grid_portal.guard` refuses what a role may never do; this module decides the calls a role
may make only about its own things:

- keys: a key is owned by the identities (role, name) whose clients asked for it, and by the
  owner of the job it belongs to; teachers and the admin own everything;
- bound names: a ``worker`` or ``address`` in a node's call is that node's own worker, a
  ``client`` in a person's call is one of that person's own client connections, and a client
  id, once registered, is never taken over by another identity;
- a task's outcome (``task-finished``, ``task-erred``...) comes only from the worker that runs it;
- a %%grid cell's Dask Queue is read by the identity that made it and fed by it or by a node
  that runs a task streaming to it;
- revoked certificates: refused on every call, and live connections dropped (`sweep`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from distributed.metrics import time as dask_time

from grid_portal.identity import Identity
from grid_portal.portal.delegation import delegation_of, ended
from grid_portal.protocol import NODE, STAFF, STREAM_ANNOTATION

if TYPE_CHECKING:
    from distributed import Scheduler

    from grid_portal.portal.jobs import JobBook
    from grid_portal.portal.ledger import EnrolmentBook

logger = logging.getLogger("grid_portal.portal.access")

# Topics Dask's Client prints in the kernel (distributed.print / warn): a node must not be able
# to write into researchers' notebooks.
PRINTED_TOPICS = frozenset({"print", "warn"})
# How often revocations made elsewhere (the CLI on the portal's machine) are read back.
REVOCATION_REFRESH = 1.0


def person(identity: Identity) -> tuple[str, str]:
    """An identity as ownership sees it: role and name, not the serial (a renewed
    certificate is the same person)."""
    return identity.role, identity.name


class Access:
    """Ownership, binding and revocation for one portal's scheduler."""

    def __init__(self, jobs: JobBook, enrolments: EnrolmentBook | None) -> None:
        self.scheduler: Scheduler | None = None
        self.jobs = jobs
        self.enrolments = enrolments
        self.client_owner: dict[str, tuple[str, str]] = {}  # client id -> (role, name)
        self.queue_owner: dict[str, tuple[str, str]] = {}
        self.revoked: set[tuple[str, str]] = set()
        self._refreshed = 0.0
        # Replicas the scheduler itself asked a worker to copy (Dask's active memory manager,
        # e.g. moving a leaving node's results): that worker's "I copied it" is expected.
        self.replicas_asked: dict[str, set[Any]] = {}

    def attach(self, scheduler: Scheduler) -> None:
        """Serve ``scheduler``; note the replicas it asks workers to acquire."""
        self.scheduler = scheduler
        ask = scheduler.request_acquire_replicas

        def request_acquire_replicas(addr: str, keys: Any, *, stimulus_id: str) -> None:
            keys = list(keys)
            self.replicas_asked.setdefault(addr, set()).update(keys)
            ask(addr, keys, stimulus_id=stimulus_id)

        scheduler.request_acquire_replicas = request_acquire_replicas  # type: ignore[method-assign]

    def forget_worker(self, address: str) -> None:
        """A worker left: what it was asked to copy is void. A later worker at the same address
        (a node that reconnects) must not be believed for copies asked of its predecessor."""
        self.replicas_asked.pop(address, None)

    # -- revocation -------------------------------------------------------------------------
    def refresh(self) -> bool:
        """Read the revocations back from the ledger (the portal does once a second, off the
        request path); whether they changed since the last read."""
        if self.enrolments is None:
            return False
        self._refreshed = dask_time()
        revoked = self.enrolments.revoked()
        changed, self.revoked = revoked != self.revoked, revoked
        return changed or self._delegates_spent()

    def _delegates_spent(self) -> bool:
        """Whether a connected delegate's job has ended (its connections are to be dropped)."""
        for role, name in self.client_owner.values():
            delegated = delegation_of(Identity(role, name, 0))
            if delegated is not None and ended(self.jobs, delegated, self.revoked):
                return True
        return False

    def is_revoked(self, identity: Identity) -> bool:
        delegated = delegation_of(identity)
        if delegated is not None:  # a job's credential lives only as long as the job runs
            return ended(self.jobs, delegated, self.revoked)
        if self.enrolments is None:
            return False
        if dask_time() - self._refreshed > 3 * REVOCATION_REFRESH:
            self.refresh()  # nothing refreshes on a schedule (no event loop): read it here
        return person(identity) in self.revoked

    async def sweep(self, identity_of_comm: Any) -> list[str]:
        """Drop every live connection of a revoked identity; what was dropped."""
        scheduler = self.scheduler
        if scheduler is None or self.enrolments is None:
            return []
        dropped = []
        for client, stream in list(scheduler.client_comms.items()):
            identity = identity_of_comm(getattr(stream, "comm", None))
            if identity is not None and self.is_revoked(identity):
                logger.warning("closing the connection of revoked %s %s", *person(identity))
                dropped.append(client)
                scheduler.remove_client(client, stimulus_id=f"grid-revoked-{dask_time()}")
                comm = getattr(stream, "comm", None)
                if comm is not None:
                    comm.abort()
        for address, ws in list(scheduler.workers.items()):
            if self.is_revoked(Identity(NODE, str(ws.name), 0)):
                dropped.append(address)
                await scheduler.remove_worker(
                    address, stimulus_id=f"grid-revoked-{dask_time()}", close=True
                )
        return dropped

    # -- ownership ----------------------------------------------------------------------------
    def owns(self, identity: Identity, key: Any) -> bool:
        delegated = delegation_of(identity)
        if delegated is not None:  # only its own job's keys, whoever asked for them
            return self.jobs.task_jobs.get(key) == delegated.job_id
        if identity.role in STAFF:
            return True
        assert self.scheduler is not None
        ts = self.scheduler.tasks.get(key)
        if ts is None:
            return False
        me = person(identity)
        for cs in ts.who_wants or ():
            if self.client_owner.get(cs.client_key) == me:
                return True
        job_id = self.jobs.task_jobs.get(key)
        record = self.jobs.jobs.get(job_id) if job_id is not None else None
        return record is not None and identity.role != NODE and record.owner == identity.name

    def _not_owned(self, identity: Identity, keys: Iterable[Any]) -> list[Any]:
        return [k for k in keys if not self.owns(identity, k)]

    def _worker_is_callers(self, identity: Identity, address: Any) -> bool:
        assert self.scheduler is not None
        ws = self.scheduler.workers.get(address) if isinstance(address, str) else None
        return ws is None or str(ws.name) == identity.name

    def _client_is_callers(self, identity: Identity, client: Any) -> bool:
        owner = self.client_owner.get(client) if isinstance(client, str) else None
        return owner is None or owner == person(identity)

    def _streams_to(self, identity: Identity, queue: Any) -> bool:
        """Does the node ``identity`` run a task whose output goes to ``queue``?"""
        assert self.scheduler is not None
        for ws in self.scheduler.workers.values():
            if str(ws.name) != identity.name:
                continue
            for ts in ws.processing:
                if (ts.annotations or {}).get(STREAM_ANNOTATION) == queue:
                    return True
        return False

    def _narrow_to_fetched(self, identity: Identity, msg: dict[str, Any], worker: Any) -> None:
        """Keep only the keys ``worker`` had a reason to fetch: inputs of a task it runs, or
        replicas the scheduler asked it to acquire.

        A worker says "add-keys" after it copied a task's input from another node. Taken at
        its word, a node could claim to hold any result, and the scheduler would send other
        nodes to fetch it from there: its own bytes in place of someone else's result. Keys
        it had no reason to fetch are dropped (Dask then simply does not count that copy).
        """
        if identity.role != NODE:
            return None
        assert self.scheduler is not None
        ws = self.scheduler.workers.get(worker) if isinstance(worker, str) else None
        keys = msg.get("keys") or ()
        if isinstance(keys, (str, bytes)):
            keys = [keys]
        if ws is None:
            if isinstance(worker, str):
                self.replicas_asked.pop(worker, None)
            msg["keys"] = []
            return None
        asked = self.replicas_asked.get(worker, set())
        wanted = set(asked)
        for ts in ws.processing:
            wanted.update(dep.key for dep in ts.dependencies)
        msg["keys"] = [k for k in keys if k in wanted]
        asked.difference_update(msg["keys"])
        if not asked:
            self.replicas_asked.pop(worker, None)
        return None

    # -- the gate's hooks -----------------------------------------------------------------
    def check_call(self, identity: Identity, op: str, msg: dict[str, Any]) -> str | None:
        if op == "register-client":
            client = msg.get("client")
            if not self._client_is_callers(identity, client):
                return "that client id is another identity's connection"
            self.client_owner[str(client)] = person(identity)
            return None
        if op in ("heartbeat_worker", "unregister"):
            if not self._worker_is_callers(identity, msg.get("address")):
                return "a node speaks only for its own worker"
            return None
        if op == "retire_workers" and identity.role == NODE:
            workers = msg.get("workers")
            if msg.get("names") is not None or not isinstance(workers, (list, tuple)):
                return "a node retires only its own worker, by address"
            if not workers or not all(self._worker_is_callers(identity, w) for w in workers):
                return "a node retires only its own worker"
            return None
        if op == "add_keys":
            if not self._worker_is_callers(identity, msg.get("worker")):
                return "a node speaks only for its own worker"
            return self._narrow_to_fetched(identity, msg, msg.get("worker"))
        if op == "who_has" and identity.role == NODE:
            return None  # a worker finding the inputs of its task (Worker.find_missing)
        if op in ("gather", "who_has", "retry"):
            keys = msg.get("keys") or ()
            if isinstance(keys, (str, bytes)):
                keys = [keys]
            others = self._not_owned(identity, keys)
            if others:
                return f"{len(others)} of these keys are not yours"
            return None
        if op == "scatter":
            if not self._client_is_callers(identity, msg.get("client")):
                return "that client id is another identity's connection"
            assert self.scheduler is not None
            data = msg.get("data") or {}
            taken = [k for k in data if k in self.scheduler.tasks and not self.owns(identity, k)]
            return f"{len(taken)} of these keys are not yours" if taken else None
        if op.startswith("queue_"):
            return self._check_queue(identity, op, msg)
        return None

    def _check_queue(self, identity: Identity, op: str, msg: dict[str, Any]) -> str | None:
        name = msg.get("name")
        owner = self.queue_owner.get(name) if isinstance(name, str) else None
        if identity.role == NODE:
            if op == "queue_put" and owner is not None and self._streams_to(identity, name):
                return None
            return "a node may only feed the stream of a task it runs"
        me = person(identity)
        if op == "queue_create":
            if owner is not None and owner != me:
                return "that queue is another identity's"
            self.queue_owner[str(name)] = me
            if not self._client_is_callers(identity, msg.get("client")):
                return "that client id is another identity's connection"
            return None
        if owner != me and identity.role not in STAFF:
            return "that queue is not yours"
        if op == "queue_release":
            self.queue_owner.pop(str(name), None)
        return None

    def check_stream(
        self, identity: Identity, op: str, msg: dict[str, Any], extra: dict[str, Any]
    ) -> str | None:
        assert self.scheduler is not None
        if op in ("cancel-keys", "client-desires-keys"):
            keys = list(msg.get("keys") or ())
            mine = [k for k in keys if self.owns(identity, k)]
            if not mine:
                return "none of these keys is yours" if keys else None
            msg["keys"] = mine
            return None
        if op == "report-key":
            return None if self.owns(identity, msg.get("key")) else "that key is not yours"
        if op in ("task-finished", "task-erred", "long-running", "reschedule"):
            ts = self.scheduler.tasks.get(msg.get("key"))
            worker = extra.get("worker")
            if ts is None or ts.state not in ("processing", "memory"):
                return None  # Dask frees what it no longer wants
            if ts.state == "processing":
                on = ts.processing_on
                return None if on is not None and on.address == worker else "not this node's task"
            holders = {ws.address for ws in ts.who_has or ()}
            return None if worker in holders else "not this node's task"
        if op == "add-keys":
            return self._narrow_to_fetched(identity, msg, extra.get("worker"))
        if op in ("queue_release", "queue-future-release"):
            return self._check_queue(identity, op, msg)
        if op == "log-event":
            topic = msg.get("topic")
            topics = topic if isinstance(topic, (list, tuple)) else [topic]
            if any(t in PRINTED_TOPICS for t in topics):
                return "nodes do not print in researchers' kernels"
        return None

    def forget_client(self, client: str) -> None:
        self.client_owner.pop(client, None)
