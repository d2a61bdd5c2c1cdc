"""The portal's side of cell sessions: a kernel's cells forwarded to its lease task's node.

A lease is a Dask task (``grid_portal.jobs.cell_lease_task.run_cell_lease``) that a kernel
submits in its session job, annotated ``grid_cell_lease``; Dask places it, fair share and the
sidebar count its slot as used, and cancelling the session or losing the kernel releases it as
any task. Once its node says the lease is ready, the kernel sends each cell as one stream
message (``CELL_SEND_OP``) instead of a graph: this module checks that the lease was submitted
on that very connection, records the cell as a task of the cell's own job (so ``jobs``, the
sidebar, progress and cancel see it as before), and forwards it to the lease's node on the
scheduler's stream (``CELL_RUN_OP``). The node answers on its stream (``CELL_OUT_OP``); what it
says is accepted only from the node the cell was sent to and forwarded, unopened, to the
kernel that owns the lease. The portal never unpickles a cell or its result.

Anything that does not hold (no such lease, not the sender's, not ready, moved, ended) is
answered "lapsed": the kernel then sends the cell the usual way, as one Dask task.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from grid_portal.identity import Identity
from grid_portal.model import JobState
from grid_portal.protocol import (
    CELL_OUT_OP,
    CELL_RUN_OP,
    CELL_SEND_OP,
    CELL_STOP_OP,
    LEASE_ANNOTATION,
    MAX_REASON_LENGTH,
)

if TYPE_CHECKING:
    from distributed import Scheduler

    from grid_portal.portal.jobs import JobBook

logger = logging.getLogger("grid_portal.portal")


@dataclass
class _Lease:
    key: str
    client: str  # the Dask client (connection) that submitted it: the only one that may use it
    owner: str
    worker: str | None = None  # where it said it is ready
    node: str | None = None


@dataclass
class _Cell:
    lease: str
    worker: str
    client: str


class CellLeases:
    """Leases by task key, and the leased cells now running, by cell key."""

    def __init__(self, jobs: JobBook, identity_of_client: Callable[[str], Identity | None]):
        self.jobs = jobs
        self.identity_of_client = identity_of_client
        self.scheduler: Scheduler | None = None
        self.leases: dict[str, _Lease] = {}
        self.cells: dict[str, _Cell] = {}

    def install(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler
        scheduler.stream_handlers[CELL_SEND_OP] = self.handle_send
        scheduler.stream_handlers[CELL_OUT_OP] = self.handle_out

    # -- Dask events --------------------------------------------------------------------------
    def update_graph(self, client: str, annotations: dict[str, dict[Any, Any]]) -> None:
        marked = annotations.get(LEASE_ANNOTATION)
        if not marked:
            return
        identity = self.identity_of_client(client)
        owner = identity.name if identity is not None else "unknown"
        for key in marked:
            if isinstance(key, str) and key not in self.leases:
                self.leases[key] = _Lease(key, client, owner)

    def transition(self, key: Any, start: str, finish: str) -> None:
        lease = self.leases.get(key) if isinstance(key, str) else None
        if lease is None:
            return
        if start == "processing":
            # Ended, released, or moved to another node: its cells go the usual way.
            lease.worker = lease.node = None
            for cell, held in list(self.cells.items()):
                if held.lease == key:
                    del self.cells[cell]
                    self._to_client(held.client, {"lease": key, "cell": cell, "kind": "lapsed"})
        if finish in ("memory", "erred", "forgotten"):
            self.leases.pop(key, None)

    def stop(self, keys: Iterable[str]) -> None:
        """Stop these leased cells on their nodes (their job was cancelled)."""
        for key in keys:
            held = self.cells.get(key)
            if held is not None:
                self._to_worker(held.worker, {"op": CELL_STOP_OP, "lease": held.lease, "cell": key})

    # -- stream handlers ----------------------------------------------------------------------
    def handle_send(
        self,
        client: str = "",
        lease: Any = None,
        cell: Any = None,
        job: Any = None,
        name: Any = None,
        payload: Any = None,
        request: Any = None,
        **_: Any,
    ) -> None:
        """A kernel's cell for its lease (the client field is the connection's, guard.py)."""
        held = self.leases.get(lease) if isinstance(lease, str) else None
        if not isinstance(cell, str):
            return
        lapsed = {"lease": lease, "cell": cell, "kind": "lapsed"}
        if held is not None and held.client != client:
            logger.warning("a client of %s named another connection's lease", held.owner)
            held = None
        if (
            held is None
            or held.worker is None
            or not isinstance(job, str)
            or cell != f"grid-cell-{job}-0"
            or not isinstance(payload, bytes)
            or not isinstance(request, dict)
            or not self._runs_on(lease, held.worker)
        ):
            self._to_client(client, lapsed)
            return
        existing = self.jobs.jobs.get(job)
        if existing is not None and (
            existing.owner != held.owner or existing.state is JobState.CANCELLED
        ):
            self._to_client(client, lapsed)  # the usual way refuses it, and says why
            return
        message = {"op": CELL_RUN_OP, "lease": lease, "cell": cell}
        if not self._to_worker(held.worker, {**message, "payload": payload, "request": request}):
            self._to_client(client, lapsed)
            return
        # Recorded once on its way (one event-loop turn, before any answer can be read):
        # the cell is the task of its own job, as a cell sent the usual way is.
        self.cells[cell] = _Cell(lease, held.worker, client)
        self.jobs.ensure(
            job, owner=held.owner, name=name if isinstance(name, str) else None, kind="cell"
        )
        self.jobs.add_tasks(job, [cell])
        self.jobs.task_started(cell, held.node)

    def handle_out(
        self,
        worker: str = "",
        lease: Any = None,
        cell: Any = None,
        kind: Any = None,
        data: Any = None,
        state: Any = None,
        error: Any = None,
        **_: Any,
    ) -> None:
        """What a lease's node says: ready, a running cell's output, its outcome, or that the
        cell lapsed. Only from the node the cell (or the lease) was sent to."""
        if kind == "ready":
            held = self.leases.get(lease) if isinstance(lease, str) else None
            if held is not None and self._runs_on(lease, worker):
                assert self.scheduler is not None
                held.worker, held.node = worker, str(self.scheduler.workers[worker].name)
                self._to_client(held.client, {"lease": lease, "kind": "ready", "node": held.node})
            return
        running = self.cells.get(cell) if isinstance(cell, str) else None
        if running is None or running.worker != worker:
            return
        out: dict[str, Any] = {"lease": running.lease, "cell": cell, "kind": kind}
        if kind == "events" and isinstance(data, bytes):
            self._to_client(running.client, {**out, "data": data})
        elif kind == "lapsed":
            del self.cells[cell]
            self._to_client(running.client, out)
        elif kind == "result" and isinstance(data, bytes):
            del self.cells[cell]
            self._to_client(running.client, {**out, "data": data})
            if state != "cancelled":
                text = error[:MAX_REASON_LENGTH] if isinstance(error, str) else "the cell failed"
                self.jobs.task_finished(cell, ok=state == "ok", error=text)

    # -- sending --------------------------------------------------------------------------------
    def _runs_on(self, lease: str, worker: str) -> bool:
        assert self.scheduler is not None
        ts = self.scheduler.tasks.get(lease)
        return (
            ts is not None
            and ts.state == "processing"
            and ts.processing_on is not None
            and ts.processing_on.address == worker
        )

    def _to_client(self, client: str, message: dict[str, Any]) -> None:
        assert self.scheduler is not None
        stream = self.scheduler.client_comms.get(client)
        if stream is not None:
            stream.send({"op": CELL_OUT_OP, **message})

    def _to_worker(self, worker: str, message: dict[str, Any]) -> bool:
        assert self.scheduler is not None
        stream = self.scheduler.stream_comms.get(worker)
        if stream is None:
            return False
        stream.send(message)
        return True
