"""The node registry: every volunteer the portal knows, its capacity, live telemetry and state.

This is plain data with no Dask import, so it can be tested and benchmarked (10,000 simulated
nodes) on its own. The scheduler plugin (``portal/plugin.py``) feeds it from Dask's worker
events and heartbeats; clients read it through the plugin's handlers.

Every change bumps a global version number and stamps the changed node with it, so a client
that last saw version ``v`` can ask for exactly what changed since (deltas, not snapshots).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from grid_portal.model import CPU, GPU, MEMORY, NodeState
from grid_portal.portal.peering import site_labels
from grid_portal.settings import given_or

# Not a setting: the sidebar's sparklines are drawn and labelled for this window, and it bounds
# the memory a node's history takes at the portal.
HISTORY_SECONDS = 600.0  # sparklines show the last 10 minutes


@dataclass
class NodeRecord:
    """The registry's mutable view of one node; ``to_dict`` gives the public ``Node`` shape."""

    name: str
    capacity: dict[str, Any]
    offer: dict[str, Any]
    labels: dict[str, str] = field(default_factory=dict)
    address: str | None = None
    state: NodeState = NodeState.ONLINE
    reason: str | None = None
    telemetry: dict[str, Any] | None = None
    joined: float = field(default_factory=time.time)
    last_seen: float = field(default_factory=time.time)
    sandbox: str | None = None
    cpus_in_use: float = 0.0
    gpus_in_use: float = 0.0
    version: int = 0
    history: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=300))

    def to_dict(self, history: bool = False) -> dict[str, Any]:
        return {
            "name": self.name,
            "state": self.state.value,
            "reason": self.reason,
            "address": self.address,
            "capacity": self.capacity,
            "offer": self.offer,
            "labels": self.labels,
            "telemetry": self.telemetry,
            "joined": self.joined,
            "last_seen": self.last_seen,
            "sandbox": self.sandbox,
            "cpus_in_use": self.cpus_in_use,
            "gpus_in_use": self.gpus_in_use,
            "history": list(self.history) if history else [],
        }


class NodeRegistry:
    """All nodes by name, with change tracking for live views."""

    def __init__(
        self,
        sample_interval: float | None = None,
        offline_retention: float | None = None,
    ) -> None:
        # One history point per telemetry interval; an offline node stays listed this long.
        # Left out: the configured ones (grid-portal.portal.*, grid_portal/settings.py).
        sample_interval = given_or(sample_interval, "portal.telemetry-interval")
        self.sample_interval = sample_interval
        self.offline_retention = given_or(offline_retention, "portal.offline-retention")
        self.nodes: dict[str, NodeRecord] = {}
        self.version = 0
        self.removed: dict[str, int] = {}  # name -> version at which it was forgotten
        self._names_by_address: dict[str, str] = {}  # O(1) lookups for each heartbeat
        self._changed = asyncio.Event() if _has_loop() else None
        history_len = max(1, int(HISTORY_SECONDS / max(sample_interval, 0.1)))
        self._history_len = history_len

    # -- changes --------------------------------------------------------------------------
    def _touch(self, record: NodeRecord) -> None:
        self.version += 1
        record.version = self.version
        self._notify()

    def notify(self) -> None:
        """Wake long polls; also called by the job book when a job changes."""
        self._notify()

    async def wait_until(self, condition: Any, timeout: float) -> None:
        """Return once ``condition()`` holds (checked on every change), or after ``timeout``."""
        if self._changed is None:
            self._changed = asyncio.Event()
        deadline = time.monotonic() + timeout
        while not condition():
            self._changed.clear()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except asyncio.TimeoutError:
                return

    def _notify(self) -> None:
        if self._changed is None and _has_loop():
            self._changed = asyncio.Event()
        if self._changed is not None:
            self._changed.set()

    # -- events from the scheduler ---------------------------------------------------------
    def join(
        self,
        name: str,
        address: str,
        capacity: dict[str, Any],
        offer: dict[str, Any],
        labels: dict[str, str] | None = None,
        sandbox: str | None = None,
        now: float | None = None,
    ) -> NodeRecord:
        now = time.time() if now is None else now
        record = self.nodes.get(name)
        if record is None:
            record = NodeRecord(name=name, capacity=capacity, offer=offer, joined=now)
            record.history = deque(maxlen=self._history_len)
            self.nodes[name] = record
        record.capacity = capacity
        record.offer = offer
        record.labels = site_labels(name, dict(labels or {}))  # a lent node's site is its peer
        if record.address:
            self._names_by_address.pop(record.address, None)
        record.address = address
        self._names_by_address[address] = name
        record.sandbox = sandbox
        record.state = NodeState.ONLINE
        record.reason = None
        record.joined = now
        record.last_seen = now
        record.telemetry = None
        self.removed.pop(name, None)
        self._touch(record)
        return record

    def leave(self, address: str, reason: str | None = None, now: float | None = None) -> None:
        record = self.by_address(address)
        if record is None:
            return
        record.state = NodeState.OFFLINE
        record.reason = reason
        self._names_by_address.pop(address, None)
        record.address = None
        record.last_seen = time.time() if now is None else now
        record.cpus_in_use = record.gpus_in_use = 0.0
        self._touch(record)

    def leave_by_name(self, name: str, reason: str | None = None) -> None:
        record = self.nodes.get(name)
        if record is not None and record.address:
            self.leave(record.address, reason=reason)
        elif record is not None:
            record.reason = reason
            self._touch(record)

    def update(
        self,
        address: str,
        *,
        state: NodeState,
        reason: str | None,
        telemetry: dict[str, Any] | None,
        used_resources: dict[str, float],
        now: float | None = None,
    ) -> bool:
        """Apply one observation of a live node; returns whether anything visible changed."""
        record = self.by_address(address)
        if record is None:
            return False
        now = time.time() if now is None else now
        record.last_seen = now
        changed = False
        if state is not record.state or reason != record.reason:
            record.state, record.reason = state, reason
            changed = True
        cpus = float(used_resources.get(CPU, 0.0))
        gpus = float(used_resources.get(GPU, 0.0))
        if cpus != record.cpus_in_use or gpus != record.gpus_in_use:
            record.cpus_in_use, record.gpus_in_use = cpus, gpus
            changed = True
        if (
            telemetry
            and telemetry.get("network")
            and telemetry["network"] != (record.capacity.get("network"))
        ):
            # The volunteer re-measured its link to the portal (see node/agent.py).
            record.capacity = {**record.capacity, "network": telemetry["network"]}
            changed = True
        if telemetry and telemetry != record.telemetry:
            previous = record.telemetry
            record.telemetry = telemetry
            if (
                not record.history
                or telemetry.get("time", now) - record.history[-1].get("time", 0)
                >= self.sample_interval * 0.9
            ):
                record.history.append(telemetry)
            changed = changed or previous is None or previous.get("time") != telemetry.get("time")
        if changed:
            self._touch(record)
        return changed

    def forget_stale(self, now: float | None = None) -> list[str]:
        """Drop offline nodes last seen longer ago than the retention time."""
        now = time.time() if now is None else now
        stale = [
            name
            for name, r in self.nodes.items()
            if r.state is NodeState.OFFLINE and now - r.last_seen > self.offline_retention
        ]
        for name in stale:
            del self.nodes[name]
            self.version += 1
            self.removed[name] = self.version
        if stale:
            self._notify()
        return stale

    # -- queries --------------------------------------------------------------------------
    def by_address(self, address: str) -> NodeRecord | None:
        name = self._names_by_address.get(address)
        return self.nodes.get(name) if name is not None else None

    def list(self, history: bool = False) -> list[dict[str, Any]]:
        return [r.to_dict(history=history) for r in self.nodes.values()]

    def get(self, name: str) -> dict[str, Any] | None:
        record = self.nodes.get(name)
        return record.to_dict(history=True) if record else None

    def changes(self, since: int) -> dict[str, Any]:
        """What changed after version ``since``: nodes to upsert and names to drop."""
        return {
            "version": self.version,
            "nodes": [r.to_dict() for r in self.nodes.values() if r.version > since],
            "removed": [name for name, v in self.removed.items() if v > since],
        }

    def capacity(self) -> dict[str, Any]:
        online = [r for r in self.nodes.values() if r.state is not NodeState.OFFLINE]
        takes_work = [r for r in online if r.state in (NodeState.ONLINE, NodeState.BUSY)]
        cores_total = sum(int(r.offer.get("cpus", 0)) for r in online)
        gpus_total = sum(len(r.offer.get("gpus", [])) for r in online)
        memory_total = sum(int(r.offer.get("memory", 0)) for r in online)
        cores_free = sum(max(0.0, r.offer.get("cpus", 0) - r.cpus_in_use) for r in takes_work)
        gpus_free = sum(max(0.0, len(r.offer.get("gpus", [])) - r.gpus_in_use) for r in takes_work)
        memory_free = 0
        for r in takes_work:
            used = (r.telemetry or {}).get("grid_memory_used", 0) or 0
            memory_free += max(0, int(r.offer.get("memory", 0)) - int(used))
        running = sum(int((r.telemetry or {}).get("running_tasks", 0) or 0) for r in online)
        return {
            "nodes_online": len(online),
            "nodes_total": len(self.nodes),
            "cores_total": cores_total,
            "cores_free": cores_free,
            "gpus_total": gpus_total,
            "gpus_free": gpus_free,
            "memory_total": memory_total,
            "memory_free": memory_free,
            "tasks_running": running,
        }

    def largest_offer(self) -> dict[str, float]:
        """The most any single connected node offers, per resource (for 'could this ever run')."""
        best = {CPU: 0.0, GPU: 0.0, MEMORY: 0.0}
        for r in self.nodes.values():
            if r.state is NodeState.OFFLINE:
                continue
            best[CPU] = max(best[CPU], float(r.offer.get("cpus", 0)))
            best[GPU] = max(best[GPU], float(len(r.offer.get("gpus", []))))
            best[MEMORY] = max(best[MEMORY], float(r.offer.get("memory", 0)))
        return best


def _has_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True
