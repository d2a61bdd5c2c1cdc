"""Plain data shared by every part: nodes, capacity, jobs.

No Dask imports here (docs/architecture.md, rules): these records cross process boundaries as plain dicts
(``to_dict`` / ``from_dict``), through Dask comms, REST responses and the ledger alike.
"""

from __future__ import annotations

import dataclasses
import enum
import uuid
from dataclasses import dataclass, field
from typing import Any

# Dask worker resources that a volunteer advertises and that tasks ask for.
CPU = "CPU"
MEMORY = "MEMORY"
GPU = "GPU"


class NodeState(str, enum.Enum):
    ONLINE = "online"  # connected, idle
    BUSY = "busy"  # connected, running grid tasks
    PAUSED = "paused"  # connected, takes no new work (a volunteer rule or the owner said so)
    DRAINING = "draining"  # finishing its work, then leaving
    OFFLINE = "offline"  # gone; listed for a while with the time it was last seen


class JobState(str, enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"
    INTERRUPTED = "interrupted"

    @property
    def finished(self) -> bool:
        return self in (JobState.DONE, JobState.FAILED, JobState.CANCELLED, JobState.INTERRUPTED)


@dataclass
class GpuInfo:
    index: int
    name: str
    memory_total: int  # bytes
    capability: str | None = None  # CUDA compute capability, "8.0"
    driver: str | None = None
    uuid: str | None = None


@dataclass
class NetworkInfo:
    bandwidth: float | None = None  # bytes per second, node <-> portal
    rtt: float | None = None  # seconds, node <-> portal
    measured_at: float | None = None


@dataclass
class StaticCapacity:
    """What a machine is: detected once by the probe (and refreshed rarely)."""

    cpu_model: str = ""
    cores_physical: int | None = None
    cores_logical: int = 1
    cpu_freq_mhz: float | None = None
    memory_total: int = 0
    disk_free: int | None = None
    os: str = ""
    os_release: str = ""
    arch: str = ""
    python: str = ""
    gpus: list[GpuInfo] = field(default_factory=list)
    network: NetworkInfo = field(default_factory=NetworkInfo)
    packages: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StaticCapacity:
        data = dict(data)
        gpus = [GpuInfo(**g) for g in data.pop("gpus", [])]
        network = NetworkInfo(**data.pop("network", {}) or {})
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(gpus=gpus, network=network, **{k: v for k, v in data.items() if k in known})


@dataclass
class Offer:
    """What a volunteer lends to the grid (its Dask worker resources)."""

    cpus: int
    memory: int  # bytes
    gpus: list[int] = field(default_factory=list)  # device indices

    def resources(self) -> dict[str, float]:
        return {CPU: float(self.cpus), MEMORY: float(self.memory), GPU: float(len(self.gpus))}


@dataclass
class GpuTelemetry:
    index: int
    utilization: float | None = None  # percent
    memory_used: int | None = None  # bytes
    temperature: float | None = None


@dataclass
class Telemetry:
    """A live sample, carried in Dask's worker heartbeat."""

    time: float
    cpu_percent: float  # the whole machine
    grid_cpu_percent: float  # the grid's own processes (worker and its children)
    memory_used: int
    memory_percent: float
    running_tasks: int = 0
    gpus: list[GpuTelemetry] = field(default_factory=list)
    # What this portal received from the node since its worker started (a volunteer may serve
    # several portals, docs/federation.md): tasks run and core-seconds they held.
    tasks_received: int = 0
    core_seconds_received: float = 0.0

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Telemetry:
        data = dict(data)
        gpus = [GpuTelemetry(**g) for g in data.pop("gpus", [])]
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(gpus=gpus, **{k: v for k, v in data.items() if k in known})


@dataclass
class Node:
    """One volunteer machine as the portal's registry sees it."""

    name: str
    state: NodeState
    capacity: StaticCapacity
    offer: Offer
    labels: dict[str, str] = field(default_factory=dict)
    address: str | None = None
    reason: str | None = None  # why paused / draining / offline
    telemetry: Telemetry | None = None
    joined: float | None = None
    last_seen: float | None = None
    sandbox: str | None = None
    cpus_in_use: float = 0.0
    gpus_in_use: float = 0.0
    history: list[Telemetry] = field(default_factory=list)
    # The portal that lists it, when one Grid uses several (grid_portal.federated); a
    # portal's own records carry none.
    portal: str | None = None

    @property
    def online(self) -> bool:
        return self.state is not NodeState.OFFLINE

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["state"] = self.state.value
        if self.portal is None:
            del data["portal"]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Node:
        data = dict(data)
        telemetry = data.pop("telemetry", None)
        history = data.pop("history", []) or []
        offer = data.pop("offer")
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(
            state=NodeState(data.pop("state")),
            capacity=StaticCapacity.from_dict(data.pop("capacity")),
            offer=Offer(**offer),
            telemetry=Telemetry.from_dict(telemetry) if telemetry else None,
            history=[Telemetry.from_dict(t) for t in history],
            **{k: v for k, v in data.items() if k in known},
        )


@dataclass
class Capacity:
    """Totals over the online nodes."""

    nodes_online: int = 0
    nodes_total: int = 0
    cores_total: int = 0
    cores_free: float = 0
    gpus_total: int = 0
    gpus_free: float = 0
    memory_total: int = 0
    memory_free: int = 0
    tasks_running: int = 0
    # Each portal's own totals, when one Grid uses several (grid_portal.federated).
    portals: dict[str, Capacity] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        if not self.portals:
            del data["portals"]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Capacity:
        known = {f.name for f in dataclasses.fields(cls)}
        fields = {k: v for k, v in data.items() if k in known and k != "portals"}
        portals = {name: cls.from_dict(p) for name, p in (data.get("portals") or {}).items()}
        return cls(portals=portals, **fields)

    @classmethod
    def total(cls, parts: dict[str, Capacity]) -> Capacity:
        """The sum of several portals' totals, keeping each under ``portals``."""
        total = cls(portals=dict(parts))
        for part in parts.values():
            for f in dataclasses.fields(cls):
                if f.name != "portals":
                    setattr(total, f.name, getattr(total, f.name) + getattr(part, f.name))
        return total


@dataclass
class Requirement:
    """What a piece of work needs from a node."""

    cpus: float = 1
    gpus: float = 0
    memory: int | None = None  # bytes
    where: str | None = None  # a requirement expression (grid_portal.requirements.matching)

    def resources(self) -> dict[str, float]:
        res: dict[str, float] = {}
        if self.cpus:
            res[CPU] = float(self.cpus)
        if self.gpus:
            res[GPU] = float(self.gpus)
        if self.memory:
            res[MEMORY] = float(self.memory)
        return res


@dataclass
class Job:
    """A unit of work a person submitted: a %%grid cell, a workflow, a Dask graph, a map."""

    id: str
    name: str
    owner: str
    kind: str  # "cell" | "workflow" | "graph" | "task" | "dask" (a Dask client's session)
    state: JobState
    submitted: float
    started: float | None = None
    finished: float | None = None
    tasks_total: int = 0
    tasks_done: int = 0
    tasks_failed: int = 0
    nodes: list[str] = field(default_factory=list)
    error: str | None = None
    has_result: bool = False
    # Replicas: one line per copy of a replicated task that the majority outvoted (its node
    # returned another result; its credit withheld).
    outvoted: list[str] = field(default_factory=list)

    @property
    def elapsed(self) -> float | None:
        import time

        if self.started is None:
            return None
        return (self.finished or time.time()) - self.started

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["state"] = self.state.value
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Job:
        data = dict(data)
        known = {f.name for f in dataclasses.fields(cls)}
        state = JobState(data.pop("state"))
        data["nodes"] = list(data.get("nodes") or [])  # msgpack hands lists back as tuples
        data["outvoted"] = list(data.get("outvoted") or [])
        return cls(state=state, **{k: v for k, v in data.items() if k in known})


def new_job_id() -> str:
    """A fresh job id: 12 hex digits, made by whoever submits (client or workflow)."""
    return uuid.uuid4().hex[:12]
