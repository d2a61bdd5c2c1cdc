"""A volunteer's worker and its cell-session leases: where the portal's leased cells arrive.

The portal forwards a kernel's cell to the worker whose lease task holds the kernel's slot,
on the scheduler's own stream (``CELL_RUN_OP``; ``CELL_STOP_OP`` to stop it). The handlers
below, installed by the ``NodePlugin`` when the worker starts, hand the cell to the lease
task's thread (``grid_portal.jobs.cell_lease_task``), which runs it; what it sends back goes on
the worker's stream to the scheduler (``CELL_OUT_OP``). The protocol's gate lets only the
portal's scheduler send these ops: a worker still answers nobody else.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field
from typing import Any

from grid_portal.protocol import CELL_OUT_OP, CELL_RUN_OP, CELL_STOP_OP


@dataclass
class Lease:
    """One running lease task: the cells waiting for it and the ones the portal stopped."""

    key: str
    inbox: queue.Queue[dict[str, Any]] = field(default_factory=queue.Queue)
    stopped: set[str] = field(default_factory=set)
    closed: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)

    def close(self) -> list[dict[str, Any]]:
        """Take no more cells; returns those that came too late (they go the usual way)."""
        with self.lock:
            self.closed = True
        with _LOCK:
            LEASES.pop(self.key, None)
        late = []
        while True:
            try:
                late.append(self.inbox.get_nowait())
            except queue.Empty:
                return late


LEASES: dict[str, Lease] = {}  # running lease tasks on this worker, by task key
_LOCK = threading.Lock()


def open_lease(key: str) -> Lease:
    lease = Lease(key)
    with _LOCK:
        LEASES[key] = lease
    return lease


def send(worker: Any, message: dict[str, Any]) -> None:
    """``CELL_OUT_OP`` on the worker's own stream to the scheduler, from any thread (the
    stream is the event loop's)."""

    def on_loop() -> None:
        stream = worker.batched_stream
        if stream is not None:
            stream.send({"op": CELL_OUT_OP, **message})

    worker.loop.add_callback(on_loop)


def install_handlers(worker: Any) -> None:
    """The worker's handlers for the cells the portal forwards to its leases."""

    def run(lease: Any = None, cell: Any = None, payload: Any = None, request: Any = None) -> None:
        if not isinstance(cell, str):
            return
        held = LEASES.get(lease) if isinstance(lease, str) else None
        if held is not None and isinstance(payload, bytes) and isinstance(request, dict):
            with held.lock:
                if not held.closed:
                    held.inbox.put({"cell": cell, "payload": payload, "request": request})
                    return
        send(worker, {"lease": lease, "cell": cell, "kind": "lapsed"})

    def stop(lease: Any = None, cell: Any = None) -> None:
        held = LEASES.get(lease) if isinstance(lease, str) else None
        if held is not None and isinstance(cell, str):
            held.stopped.add(cell)

    worker.stream_handlers[CELL_RUN_OP] = run
    worker.stream_handlers[CELL_STOP_OP] = stop
