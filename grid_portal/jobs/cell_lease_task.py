"""The node's side of a cell session: the lease task that holds a slot for one kernel's cells.

A kernel's first ``%%grid`` cell goes the usual way (one Dask task); beside it the kernel
submits :func:`run_cell_lease`, a real Dask task of its session job that the portal places like
any other (resources, ``where``, fair share). While it runs, the kernel's next cells come to it
as single stream messages: the portal forwards each (``CELL_RUN_OP``) on the scheduler's own
stream to this worker, whose handler, registered here, hands it to the lease task's thread. The
cell then runs exactly as a cell task's does (``cell_task._Execution``: a fresh child per cell
from the same fork server, the same confinement, timeout and output limits), and its output and
outcome go back on the worker's stream (``CELL_OUT_OP``), which the portal forwards, unopened,
to the kernel that owns the lease.

The lease ends (the task returns and its slot is free) when no cell came for its idle time,
when the scheduler no longer wants it (the kernel died or let it go), or when the node stops
taking work (the volunteer paused or drained it, or memory is short: the worker is no longer
``running``). A cell that reaches a lease that has ended, or whose child a pause moved away,
is answered "lapsed": the kernel then sends it the usual way. Workers still answer only the
scheduler: nothing here opens a connection or listens.
"""

from __future__ import annotations

import dataclasses
import pickle
import platform
import queue
import time
from typing import Any

from grid_portal import isolation
from grid_portal.jobs.cell_child import OWN_GROUP, OWN_SESSION
from grid_portal.jobs.cell_task import FIRST_FLUSH, _Execution, _is_dask_worker
from grid_portal.node.cell_lease import Lease, open_lease, send

# -- tunables -----------------------------------------------------------------------------------
IDLE_LIMITS = (1.0, 3600.0)  # s: the idle time a kernel may ask for is kept within these
WATCH_INTERVAL = 0.1  # s between checks of the node's state while the lease waits for a cell
FLUSH_EVERY = 0.1  # s between batches of a running cell's output


@isolation.self_isolating
def run_cell_lease(request: dict[str, Any]) -> dict[str, Any]:
    """The lease task: wait for the kernel's cells and run each; return when the lease ends.

    ``request``: ``{"idle": seconds}``, how long the lease waits for a cell before it gives
    its slot back. Returns ``{"ended": reason, "cells": n}``.
    """
    from distributed import get_worker
    from distributed.core import Status
    from distributed.worker import thread_state

    try:
        worker: Any = get_worker()
    except ValueError:
        return {"ended": "not on a worker", "cells": 0}
    key = getattr(thread_state, "key", None)
    if not _is_dask_worker(worker) or not isinstance(key, str):
        return {"ended": "not on a worker", "cells": 0}
    idle = min(max(float(request.get("idle") or 60.0), IDLE_LIMITS[0]), IDLE_LIMITS[1])
    lease = open_lease(key)  # the worker's handlers (node/cell_lease.py) now hand it cells

    def wanted() -> bool:
        ts = worker.state.tasks.get(key)
        return ts is not None and ts.state not in ("cancelled", "released", "forgotten")

    def taking_work() -> bool:
        # The node plugin pauses the worker for the volunteer's pause or drain and for memory
        # pressure: the slot goes back to its owner now, not after the idle time.
        return worker.status == Status.running

    node = str(getattr(worker, "name", None) or platform.node())
    send(worker, {"lease": key, "kind": "ready"})
    cells = 0
    last = time.monotonic()
    reason = "idle"
    try:
        while True:
            try:
                item = lease.inbox.get(timeout=WATCH_INTERVAL)
            except queue.Empty:
                if not wanted():
                    reason = "released"
                    break
                if not taking_work():
                    reason = "the node stopped taking work"
                    break
                if time.monotonic() - last >= idle:
                    break
                continue
            if not wanted() or not taking_work():
                send(worker, {"lease": key, "cell": item["cell"], "kind": "lapsed"})
                reason = "released" if not wanted() else "the node stopped taking work"
                break
            cells += 1
            _run_one(worker, lease, node, item, wanted, taking_work)
            last = time.monotonic()
    finally:
        for item in lease.close():  # cells that came as it ended go the usual way
            send(worker, {"lease": key, "cell": item["cell"], "kind": "lapsed"})
    return {"ended": reason, "cells": cells}


class _LeaseRelay:
    """A running leased cell's output, in batches, to its kernel (``cell_task._Relay``'s
    part, through the worker's stream and the portal instead of a Dask queue)."""

    def __init__(self, worker: Any, lease: str, cell: str) -> None:
        self.worker, self.lease, self.cell = worker, lease, cell
        self.sent = 0
        self.started = time.monotonic()
        self.last = 0.0

    def send(self, events: list[dict[str, Any]]) -> None:
        now = time.monotonic()
        if self.sent >= len(events):
            return
        stopped = events[-1].get("k") == "stopped"  # the kernel waits to hear the node is free
        if not stopped and (now - self.started < FIRST_FLUSH or now - self.last < FLUSH_EVERY):
            return
        batch = pickle.dumps(events[self.sent :], protocol=pickle.HIGHEST_PROTOCOL)
        send(self.worker, {"lease": self.lease, "cell": self.cell, "kind": "events", "data": batch})
        self.sent, self.last = len(events), now


def _run_one(
    worker: Any,
    lease: Lease,
    node: str,
    item: dict[str, Any],
    wanted: Any,
    taking_work: Any,
) -> None:
    cell = item["cell"]
    request = dict(item["request"], channel=None, keep=False)
    relay = _LeaseRelay(worker, lease.key, cell)
    confinement = isolation.current()
    detach = OWN_GROUP if confinement is not None else OWN_SESSION
    children: list[int] = []
    if confinement is not None:
        # One child per cell, registered with the node while it runs and let go after.
        register = confinement.started

        def started(pid: int) -> None:
            children.append(pid)
            register(pid)

        confinement = dataclasses.replace(confinement, started=started)

    def cancelled() -> bool:
        return cell in lease.stopped or not wanted()

    execution = _Execution(item["payload"], request, node, relay, cancelled, detach, confinement)
    outcome = execution.run()
    if confinement is not None and confinement.ended is not None:
        for pid in children:
            confinement.ended(pid)
    lease.stopped.discard(cell)
    error = outcome.get("error") or {}
    if error.get("ename") == "CellProcessDied" and not taking_work():
        # A pause that lasted moved the node's work away and killed the child: the cell
        # runs again elsewhere, as a moved cell task would.
        send(worker, {"lease": lease.key, "cell": cell, "kind": "lapsed"})
        return
    outcome["streamed"] = True
    try:
        data = pickle.dumps(outcome, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception:  # noqa: BLE001 - a value that cannot travel: the usual way says why
        send(worker, {"lease": lease.key, "cell": cell, "kind": "lapsed"})
        return
    message = {"lease": lease.key, "cell": cell, "kind": "result", "data": data, "state": "ok"}
    if outcome.get("cancelled"):
        message["state"] = "cancelled"
    elif error:
        message.update(state="failed", error=f"{error.get('ename')}: {error.get('evalue')}")
    send(worker, message)
