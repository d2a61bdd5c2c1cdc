"""A kernel's cell session: one leased slot on a node for the kernel's ``%%grid`` cells.

A cell sent the usual way is a Dask graph: the portal reads it with its restricted unpickler,
runs Dask's state machine and the plugins, sends the task to a node, and the node's result
comes back. For a quick cell that path is most of the time it takes. So after a kernel's first
cell (sent the usual way) the session asks for a *lease*: one Dask task of the kernel's
session job (``grid_portal.jobs.cell_lease_task.run_cell_lease``), placed by the portal like
any other on a node with the cell's resources and ``where``. Once its node says it is ready,
each further cell with the same resources and ``where`` goes to it as one stream message (the
portal checks that the lease is this connection's, records the cell in its job, forwards it to
the node); its output and outcome come back the way pushed results do and are opened here as
data only (``CellRun._open_pushed``). Variables travel exactly as before: every cell carries
its inputs and runs in a fresh child on the node.

Cells with ``--map``, ``--bg`` or ``--replicas``, or with other resources or another
``where``, go the usual way, and the lease is given back first (they may need its slot). A
lease ends by itself after ``idle`` seconds without a cell, when the kernel goes (Dask releases
its task), or when its volunteer pauses or drains; a cell that finds it gone is answered
"lapsed" and sent the usual way, so a lapsed lease is never the user's problem.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from grid_portal.protocol import CELL_OUT_OP, CELL_SEND_OP, LEASE_ANNOTATION

# -- tunables -----------------------------------------------------------------------------------
LEASE_IDLE = 60.0  # s a lease waits for the next cell before it gives its slot back
IDLE_ENV = "GRID_PORTAL_CELL_LEASE_IDLE"  # seconds; 0 turns cell sessions off

Receiver = Callable[[str, Any], None]  # (kind, data) in the client's event loop


def idle_setting() -> float:
    """The lease's idle time: GRID_PORTAL_CELL_LEASE_IDLE if set (0: no leases)."""
    text = os.environ.get(IDLE_ENV, "").strip()
    if not text:
        return LEASE_IDLE
    try:
        return max(0.0, float(text))
    except ValueError:
        return LEASE_IDLE


@dataclass(frozen=True)
class LeaseSpec:
    """What a lease was placed for; a cell may use it only if it asks for the same."""

    cpus: float
    gpus: float
    memory: int | None
    where: str | None


@dataclass
class _Lease:
    key: str
    spec: LeaseSpec
    future: Any
    ready: bool = False
    node: str | None = None
    lapsed: bool = False  # it answered a cell "lapsed": give it back, ask for a new one
    ended: str | None = None  # why its task ended ("idle", "released", ...), once it has


class CellSession:
    """The kernel's side: at most one lease, and the leased cells waiting for their outcome."""

    def __init__(self, grid: Any, idle: float | None = None) -> None:
        self.grid = grid
        self.idle = idle_setting() if idle is None else idle
        self.lease: _Lease | None = None
        self._waiting: dict[str, Receiver] = {}
        self._lock = threading.Lock()
        self.leases_taken = 0  # how many leases this session asked for (tests, benchmarks)
        self.cells_sent = 0  # how many cells went to a lease

    def attach(self, client: Any) -> bool:
        """Receive what the portal forwards from leases, on the client's stream (as
        ``grid_portal.pushed`` does: Dask has no public hook for messages of our own)."""
        handlers = getattr(client, "_stream_handlers", None)
        if not isinstance(handlers, dict):
            return False
        handlers[CELL_OUT_OP] = self._receive
        return True

    # -- the cells ------------------------------------------------------------------------------
    def send(
        self,
        spec: LeaseSpec,
        cell: str,
        job: str,
        name: str,
        payload: bytes,
        request: dict[str, Any],
        receiver: Receiver,
    ) -> bool:
        """Send the cell to the lease if one is ready for ``spec``; False: send it the usual
        way (then call :meth:`went_usual_way`)."""
        lease = self.lease
        if lease is None or not lease.ready or lease.spec != spec or lease.future.done():
            return False
        with self._lock:
            self._waiting[cell] = receiver
        self.cells_sent += 1
        self.grid.send_to_portal(
            {
                "op": CELL_SEND_OP,
                "lease": lease.key,
                "cell": cell,
                "job": job,
                "name": name,
                "payload": payload,
                "request": request,
            }
        )
        # The client's event-loop thread writes it, once it holds the GIL: hand it over now
        # rather than when this thread next blocks (measured: 0.7-0.9 ms of a trivial cell).
        time.sleep(0)
        return True

    def went_usual_way(self, spec: LeaseSpec | None) -> None:
        """A cell was just sent the usual way. ``spec``: it could have used a lease of that
        kind (ask for one, for the cells after it); None: it could not (give any lease back:
        a sweep or a job in the background may need its slot)."""
        lease = self.lease
        if spec is None or (lease is not None and (lease.spec != spec or lease.lapsed)):
            self.release()
            lease = None
        if spec is None or self.idle <= 0:
            return
        if lease is not None and not lease.future.done():
            return  # asked for already; not ready yet
        self._ask(spec)

    def _ask(self, spec: LeaseSpec) -> None:
        import dask

        from grid_portal.jobs.cell_lease_task import run_cell_lease  # the node's side

        key = f"grid-lease-{uuid.uuid4().hex}"
        try:
            with dask.annotate(**{LEASE_ANNOTATION: True}):
                future = self.grid.submit(
                    run_cell_lease,
                    {"idle": self.idle},
                    cpus=spec.cpus,
                    gpus=spec.gpus,
                    memory=spec.memory,
                    where=spec.where,
                    key=key,
                    pure=False,
                )
        except Exception:  # noqa: BLE001 - no lease: cells go the usual way, as before
            self.lease = None
            return
        self.leases_taken += 1
        self.lease = _Lease(key, spec, future)
        future.add_done_callback(functools.partial(_ended, self.lease))

    def release(self) -> None:
        """Give the lease back now (its task is cancelled; the node ends it at once)."""
        lease, self.lease = self.lease, None
        if lease is not None:
            with contextlib.suppress(Exception):
                lease.future.cancel()

    # -- from the portal, in the client's event loop ------------------------------------------
    def _receive(
        self,
        lease: Any = None,
        cell: Any = None,
        kind: Any = None,
        data: Any = None,
        node: Any = None,
        **_: Any,
    ) -> None:
        if kind == "ready":
            held = self.lease
            if held is not None and held.key == lease:
                held.ready, held.node = True, node if isinstance(node, str) else None
            return
        if not isinstance(cell, str):
            return
        with self._lock:
            if kind in ("result", "lapsed"):
                receiver = self._waiting.pop(cell, None)
            else:
                receiver = self._waiting.get(cell)
        if kind == "lapsed":
            held = self.lease
            if held is not None and held.key == lease:
                # Gone or refused. Released from the kernel's thread (a Dask client call
                # here, in its event loop, would wait on itself); the next cell asks anew.
                held.ready, held.lapsed = False, True
        if receiver is not None and kind in ("events", "result", "lapsed"):
            receiver(kind, data)


def _ended(lease: _Lease, future: Any) -> None:
    """The lease's task ended (in a thread of Dask's): note why, and let its result go at
    once. Kept, a result the node holds would be computed again elsewhere when that node
    leaves (a drain): a lease nobody uses, holding a slot for its idle time."""
    try:
        reply = future.result(timeout=10)
        lease.ended = str(reply.get("ended")) if isinstance(reply, dict) else "ended"
    except Exception:  # noqa: BLE001 - cancelled, or its node was lost
        lease.ended = "lost"
    lease.ready = False
    future.release()
