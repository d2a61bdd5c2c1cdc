"""Transfer cost from the nodes' measured bandwidth, for Dask's choice of node.

When a task's input must move (no node allowed to run it holds the input), Dask picks, among
the allowed nodes, the one where the task would start soonest: queued work plus the time to
fetch the inputs (``Scheduler.worker_objective``). That time is ``Scheduler.get_comm_cost``:
bytes to fetch divided by one bandwidth estimate for the whole cluster, so a node on a slow
link looks as good as one on a fast link. Work stealing asks the same method what moving a
task would cost.

Each volunteer measures its bandwidth to the portal (``node/agent.py``, ``measure_network``,
re-measured every ``network-refresh``) and the portal keeps it in the node registry. Nodes
measure nothing between themselves, so a pair's bandwidth is estimated as the smaller of the
two nodes' measurements (a transfer is no faster than its slower end). ``TransferCost`` is
``get_comm_cost`` with that estimate: for each input the receiving node lacks, its bytes over
the best pair between a node that holds it and the receiver. A node with no measurement yet
counts as the other end; with neither measured, Dask's own estimate is used.

Dask has no plugin hook for its worker objective; the portal plugin sets an instance of this
class as the scheduler's ``get_comm_cost`` (``PortalPlugin.start``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from distributed import Scheduler
    from distributed.scheduler import TaskState, WorkerState

    from grid_portal.portal.registry import NodeRegistry


class TransferCost:
    """``Scheduler.get_comm_cost`` with per-pair bandwidth from the registry."""

    def __init__(self, scheduler: Scheduler, registry: NodeRegistry) -> None:
        self.scheduler = scheduler
        self.registry = registry

    def __call__(self, ts: TaskState, ws: WorkerState) -> float:
        """Estimated seconds to bring ``ts``'s inputs that ``ws`` lacks to ``ws``."""
        cost = 0.0
        for dts in ts.dependencies or ():
            if dts in ws.has_what:
                continue
            nbytes = dts.get_nbytes()
            if nbytes:
                cost += nbytes / self.best_link(dts.who_has or (), ws)
        return cost

    def best_link(self, senders: Iterable[WorkerState], receiver: WorkerState) -> float:
        """Bytes per second from the best of ``senders`` to ``receiver``."""
        to = self.measured(receiver.address)
        best = 0.0
        for sender in senders:
            known = [b for b in (self.measured(sender.address), to) if b]
            best = max(best, min(known) if known else self.scheduler.bandwidth)
        return best or to or self.scheduler.bandwidth

    def measured(self, address: str) -> float | None:
        """The node's last measured bandwidth to the portal, if any (bytes/s)."""
        record = self.registry.by_address(address)
        network: Any = record.capacity.get("network") if record is not None else None
        bandwidth = network.get("bandwidth") if isinstance(network, dict) else None
        return float(bandwidth) if isinstance(bandwidth, (int, float)) and bandwidth > 0 else None
