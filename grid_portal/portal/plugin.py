"""PortalPlugin: the scheduler plugin that is the single source of truth about the grid.

It watches Dask's own events (workers joining and leaving, heartbeats carrying our telemetry)
and keeps the node registry. Clients never hold a copy of this state: they ask through the
scheduler handlers registered here (``grid_*``), over the same mutual-TLS comm as everything
else.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from distributed.core import Status
from distributed.diagnostics.plugin import SchedulerPlugin
from tornado.ioloop import PeriodicCallback

from grid_portal.model import NodeState
from grid_portal.portal.registry import NodeRegistry
from grid_portal.portal.security import peer_identity

if TYPE_CHECKING:
    from distributed import Scheduler
    from distributed.scheduler import WorkerState

logger = logging.getLogger("grid_portal.portal")

# What a worker sends once at registration (Worker.startup_information) and in each heartbeat
# (Worker.metrics). The node side fills these; see grid_portal/node/plugin.py.
STARTUP_KEY = "grid"
METRIC_KEY = "grid"


class PortalPlugin(SchedulerPlugin):
    name = "grid-portal"

    def __init__(self, telemetry_interval: float = 2.0, offline_retention: float = 3600.0):
        self.telemetry_interval = telemetry_interval
        self.registry = NodeRegistry(
            sample_interval=telemetry_interval, offline_retention=offline_retention
        )
        self.scheduler: Scheduler | None = None
        self._poll: PeriodicCallback | None = None

    # -- lifecycle --------------------------------------------------------------------------
    async def start(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler
        scheduler.handlers.update(
            {
                "grid_nodes": self.handle_nodes,
                "grid_node": self.handle_node,
                "grid_capacity": self.handle_capacity,
                "grid_changes": self.handle_changes,
                "grid_largest_offer": self.handle_largest_offer,
                "grid_whoami": self.handle_whoami,
            }
        )
        # Heartbeats have no plugin hook, so read the latest metrics on our own clock. Half the
        # telemetry interval keeps the registry at most one interval behind the volunteers.
        self._poll = PeriodicCallback(self.refresh, self.telemetry_interval * 1000 / 2)
        self._poll.start()
        for address in list(scheduler.workers):
            self.add_worker(scheduler, address)

    async def close(self) -> None:
        if self._poll is not None:
            self._poll.stop()

    # -- Dask events ------------------------------------------------------------------------
    def add_worker(self, scheduler: Scheduler, worker: str) -> None:
        ws = scheduler.workers.get(worker)
        if ws is None:
            return
        info = ws.extra.get(STARTUP_KEY) or {}
        name = str(ws.name)
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

    def remove_worker(self, scheduler: Scheduler, worker: str, **kwargs: Any) -> None:
        self.registry.leave(worker, reason="left the grid")
        logger.info("node at %s left", worker)

    # -- live telemetry -------------------------------------------------------------------
    def refresh(self) -> None:
        scheduler = self.scheduler
        if scheduler is None:
            return
        for address, ws in scheduler.workers.items():
            state, reason = node_state(ws)
            self.registry.update(
                address,
                state=state,
                reason=reason,
                telemetry=ws.metrics.get(METRIC_KEY),
                used_resources=dict(ws.used_resources),
            )
        self.registry.forget_stale()

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
        self, comm: Any = None, since: int = 0, timeout: float = 10.0
    ) -> dict[str, Any]:
        """Long poll: answer as soon as anything changed after version ``since``."""
        await self.registry.wait_for_change(since, min(float(timeout), 60.0))
        return self.registry.changes(since)

    def handle_largest_offer(self, comm: Any = None) -> dict[str, float]:
        return self.registry.largest_offer()

    def handle_whoami(self, comm: Any = None) -> dict[str, Any] | None:
        identity = peer_identity(comm) if comm is not None else None
        return None if identity is None else {"role": identity.role, "name": identity.name}


def node_state(ws: WorkerState) -> tuple[NodeState, str | None]:
    """A live worker's state as volunteers and researchers understand it."""
    metrics = ws.metrics.get(METRIC_KEY) or {}
    policy = metrics.get("policy") or {}
    if ws.status == Status.closing_gracefully or policy.get("state") == "draining":
        return NodeState.DRAINING, policy.get("reason") or "draining"
    if ws.status == Status.paused or policy.get("state") == "paused":
        return NodeState.PAUSED, policy.get("reason") or "paused: memory pressure"
    if ws.processing:
        return NodeState.BUSY, None
    return NodeState.ONLINE, None
