"""NodePlugin: runs inside the volunteer's Dask worker process.

- tells the portal what this machine is, once, in Dask's worker registration
  (``Worker.startup_information``), and how it is doing, in every heartbeat (``Worker.metrics``);
- gives the agent a few worker handlers to pause, resume and drain the node.

It never imports portal code: the portal reads what this sends through Dask alone.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

from distributed.core import Status
from distributed.diagnostics.plugin import WorkerPlugin

from grid_portal.node.probe import TelemetrySampler

if TYPE_CHECKING:
    from distributed import Worker

logger = logging.getLogger("grid_portal.node")

# Must match the keys that grid_portal.portal.plugin reads. Duplicated on purpose: node code
# may not import portal code (DESIGN.md), and these strings are the wire contract.
STARTUP_KEY = "grid"
METRIC_KEY = "grid"


class NodePlugin(WorkerPlugin):
    name = "grid-node"

    def __init__(self, info: dict[str, Any], gpus: list[int], telemetry_interval: float = 2.0):
        self.info = info  # {"capacity": ..., "offer": ..., "labels": ..., "sandbox": ...}
        self.gpus = list(gpus)
        self.telemetry_interval = telemetry_interval
        self.state: str | None = None  # None (running), "paused" or "draining"
        self.reason: str | None = None
        self.worker: Worker | None = None
        self.sampler: TelemetrySampler | None = None

    def setup(self, worker: Worker) -> None:
        self.worker = worker
        self.sampler = TelemetrySampler(gpus=self.gpus, min_interval=self.telemetry_interval)
        # Plugins are set up before the worker registers, so this reaches the portal with the
        # registration itself: the node is never listed without its capacity.
        worker.startup_information[STARTUP_KEY] = _static_info(self.info)
        worker.metrics[METRIC_KEY] = self.telemetry
        worker.handlers.update(
            {
                "grid_pause": self.pause,
                "grid_resume": self.resume,
                "grid_drain": self.drain,
                "grid_node_status": self.status,
            }
        )

    # -- telemetry --------------------------------------------------------------------------
    def telemetry(self, worker: Worker) -> dict[str, Any]:
        assert self.sampler is not None
        sample = self.sampler.sample(running_tasks=len(worker.state.executing))
        data = _asdict(sample)
        data["policy"] = {"state": self.state, "reason": self.reason}
        return data

    # -- control ----------------------------------------------------------------------------
    def pause(self, reason: str = "paused by the volunteer") -> dict[str, Any]:
        """Take no new tasks. Running tasks go on (issue 7 adds suspending them)."""
        assert self.worker is not None
        self.state, self.reason = "paused", reason
        if self.worker.status == Status.running:
            self.worker.status = Status.paused
        return self.status()

    def resume(self) -> dict[str, Any]:
        assert self.worker is not None
        if self.state == "draining":
            return self.status()
        self.state, self.reason = None, None
        if self.worker.status == Status.paused:
            self.worker.status = Status.running
        return self.status()

    async def drain(self, timeout: float = 300.0, reason: str = "draining") -> dict[str, Any]:
        """Finish what is running, take nothing new, then leave the grid gracefully."""
        worker = self.worker
        assert worker is not None
        self.state, self.reason = "draining", reason
        if worker.status == Status.running:
            worker.status = Status.paused
        deadline = time.monotonic() + timeout
        while worker.state.executing and time.monotonic() < deadline:
            await asyncio.sleep(0.1)  # polling the worker's own state; no event exists for it
        finished = not worker.state.executing
        logger.info("drained (running tasks finished: %s); leaving the grid", finished)
        # close_gracefully asks the scheduler to move our results elsewhere (retire_workers),
        # then closes the worker and its nanny. Anything still running is rescheduled.
        asyncio.get_running_loop().create_task(worker.close_gracefully(reason=reason))
        return {**self.status(), "finished_running_tasks": finished}

    def status(self) -> dict[str, Any]:
        worker = self.worker
        return {
            "state": self.state or ("running" if worker is None else worker.status.name),
            "reason": self.reason,
            "running_tasks": 0 if worker is None else len(worker.state.executing),
            "address": None if worker is None else worker.address,
        }


def _static_info(info: dict[str, Any]) -> Any:
    """A callable for Worker.startup_information (it calls each value with the worker)."""

    def get(worker: Worker) -> dict[str, Any]:
        return info

    return get


def _asdict(obj: Any) -> Any:
    import dataclasses

    return dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else obj
