"""NodePlugin: runs inside the volunteer's Dask worker process.

- tells the portal what this machine is, once, in Dask's worker registration
  (``Worker.startup_information``), and how it is doing, in every heartbeat (``Worker.metrics``),
  including the volunteer's rules in force: ``"policy": {"state", "reason"}``, which the portal
  turns into the node's state (``paused``, ``draining``) and its reason (``owner busy``);
- applies what the agent decides (``apply_policy``, ``drain``): no new tasks while paused, running
  tasks suspended in their task processes, moved elsewhere past the suspend limit;
- ends the process of a task the scheduler cancelled;
- pushes the small result of a task annotated ``grid_push`` (a ``%%grid`` cell) to the portal
  with its completion, so that its client need not fetch it (``grid_portal.pushed``).
- keeps an idle volunteer cheap, since the machine is its owner's: heartbeats slow to the
  idle heartbeat interval once no task has been here for the idle-after time and speed back up
  when work arrives; telemetry is sampled every telemetry interval and a sample that changed
  (TELEMETRY_STEPS) is sent at once in an early heartbeat, so the sidebar stays live while
  nothing else is sent.

The agent reaches these methods over the worker process's private stdin/stdout
(``grid_portal.node.worker``), never over Dask comms: every certificate holder on the grid can
call a worker's comm handlers, and a researcher must not be able to resume a node its owner
paused. Only ``grid_node_status``, which changes nothing, is a comm handler.

It never imports portal code: the portal reads what this sends through Dask alone.
"""

from __future__ import annotations

import asyncio
import logging
import pickle
import time
from typing import TYPE_CHECKING, Any

from distributed.core import Status
from distributed.diagnostics.plugin import WorkerPlugin
from tornado.ioloop import PeriodicCallback

from grid_portal.node import cell_lease
from grid_portal.node.probe import TelemetrySampler
from grid_portal.pushed import PUSH_ANNOTATION, PUSH_FORWARDED, PUSH_LIMIT, PUSH_OP
from grid_portal.settings import given_or
from grid_portal.units import counted

if TYPE_CHECKING:
    from distributed import Worker

    from grid_portal.node.slotgate import SlotGate
    from grid_portal.node.taskproc import TaskProcessExecutor

logger = logging.getLogger("grid_portal.node")

# Must match the keys that grid_portal.portal.plugin reads. Duplicated on purpose: node code
# may not import portal code (docs/architecture.md, rules), and these strings are the wire
# contract.
STARTUP_KEY = "grid"
METRIC_KEY = "grid"

# Dask pauses a worker whose memory passes a share of its limit, and un-pauses it when the
# memory falls again, which would also undo the volunteer's pause. So the worker process turns
# Dask's own pausing off (distributed.worker.memory.pause: False) and this plugin does both, at
# the volunteer's share (grid-portal.volunteer.memory-pause).
RECONCILE_INTERVAL = 0.5  # seconds; IDLE_RECONCILE_INTERVAL while no task is here
IDLE_RECONCILE_INTERVAL = 2.0

# Idle cost: a volunteer's machine is its owner's, so an idle node must cost next to nothing.
# Dask asks for a heartbeat every 0.5 s on a small grid; an idle node sends one every
# grid-portal.volunteer.idle-heartbeat-interval instead, which must stay under a third of the
# portal's node timeout (portal/plugin.py declares a node silent after that). Work arriving (any
# task on this worker) brings Dask's own interval back at once. A node counts as idle after
# grid-portal.volunteer.idle-after without a task. The reconcile intervals above are not
# settings: they are how soon the node acts on its own state (a pause, a cancelled task).

# The policy state of a worker that may take no new task while its running ones go on (a
# lent worker using every slot its home portal leaves it, node/lending.py).
FULL = "full"

# A telemetry sample is "changed", and sent at once, when a figure moved by at least this much
# since the last one sent (percentage points; GPU temperature in degrees C); any change of
# running tasks, policy, network or the GPU list counts too.
TELEMETRY_STEPS = {
    "cpu_percent": 10.0,
    "grid_cpu_percent": 10.0,
    "memory_percent": 1.0,
    "utilization": 5.0,
    "temperature": 3.0,
}
GPU_MEMORY_STEP = 0.01  # GPU memory: a change of 1 % of the first reading (or 64 MiB)


class NodePlugin(WorkerPlugin):
    name = "grid-node"

    def __init__(
        self,
        info: dict[str, Any],
        gpus: list[int],
        telemetry_interval: float | None = None,  # seconds; None: the configured one
        executor: TaskProcessExecutor | None = None,
        memory_pause_fraction: float | None = None,  # None: the configured one; 0: never
        gate: SlotGate | None = None,
        idle_heartbeat_interval: float | None = None,  # seconds; None: the configured one
        idle_after: float | None = None,  # seconds; None: the configured one
    ):
        self.info = info  # {"capacity": ..., "offer": ..., "labels": ..., "sandbox": ...}
        self.gpus = list(gpus)
        self.telemetry_interval = given_or(telemetry_interval, "volunteer.telemetry-interval")
        self.executor = executor
        self.memory_pause_fraction = given_or(memory_pause_fraction, "volunteer.memory-pause")
        self.idle_heartbeat_interval = given_or(
            idle_heartbeat_interval, "volunteer.idle-heartbeat-interval"
        )
        self.idle_after = given_or(idle_after, "volunteer.idle-after")
        self.gate = gate  # counts what this portal received (tasks, core-seconds)
        self.network: dict[str, Any] | None = None
        self.state: str | None = None  # None (running), "paused" or "draining"
        self.reason: str | None = None
        self.memory_pressure = False
        self.worker: Worker | None = None
        self.sampler: TelemetrySampler | None = None
        self._reconcile_pc: PeriodicCallback | None = None
        self._moved = 0
        # Heartbeat pacing and telemetry on change: slow while idle, prompt when work comes.
        self._heartbeat_pc: PeriodicCallback | None = None
        self._dask_heartbeat: Any = None
        self._dask_interval_ms = 500.0  # what the scheduler last asked for
        self._in_heartbeat = False
        self._idle = False
        self._last_activity = time.monotonic()
        self._sent: dict[str, Any] | None = None  # the telemetry in the last heartbeat
        self._watch_pc: PeriodicCallback | None = None

    def setup(self, worker: Worker) -> None:
        self.worker = worker
        # The process list (to count the task processes' CPU) is read again at most every 10 s
        # while no task runs: listing costs about 1 ms on a desktop, more than all the rest.
        # (A little under the interval, so that the watch timer below always samples afresh.)
        self.sampler = TelemetrySampler(
            gpus=self.gpus, min_interval=0.9 * self.telemetry_interval, relist_interval=10.0
        )
        # Plugins are set up before the worker registers, so this reaches the portal with the
        # registration itself: the node is never listed without its capacity.
        worker.startup_information[STARTUP_KEY] = _static_info(self.info)
        worker.metrics[METRIC_KEY] = self.telemetry
        worker.handlers["grid_node_status"] = self.handle_status
        cell_lease.install_handlers(worker)  # kernels' cells, forwarded to their leases here
        if self.executor is not None:
            self.executor.attach(worker)
        self._reconcile_pc = PeriodicCallback(self.reconcile, RECONCILE_INTERVAL * 1000)
        self._reconcile_pc.start()
        # Dask's heartbeat timer stays Dask's (it stops and starts it around registration);
        # only what it calls is wrapped, to set the next interval after each heartbeat.
        pc = worker.periodic_callbacks.get("heartbeat")
        if pc is not None:
            self._heartbeat_pc, self._dask_heartbeat = pc, pc.callback
            self._dask_interval_ms = pc.callback_time
            pc.callback = self._paced_heartbeat
        self._watch_pc = PeriodicCallback(self.watch_telemetry, self.telemetry_interval * 1000)
        self._watch_pc.start()

    def teardown(self, worker: Worker) -> None:
        if self._reconcile_pc is not None:
            self._reconcile_pc.stop()
        if self._watch_pc is not None:
            self._watch_pc.stop()
        if self._heartbeat_pc is not None:
            self._heartbeat_pc.callback = self._dask_heartbeat
        if self.sampler is not None:
            self.sampler.close()

    # -- telemetry --------------------------------------------------------------------------
    def telemetry(self, worker: Worker) -> dict[str, Any]:
        """The grid's metric in a heartbeat (Worker.metrics): the latest sample."""
        self._sent = data = self._sample(worker)
        return data

    def _sample(self, worker: Worker) -> dict[str, Any]:
        assert self.sampler is not None
        sample = self.sampler.sample(running_tasks=len(worker.state.executing))
        data = _asdict(sample)
        data["policy"] = {"state": self.state, "reason": self.reason}
        if self.network is not None:  # re-measured by the agent now and then
            data["network"] = self.network
        if self.gate is not None:  # what this portal received (Telemetry's *_received)
            received = self._received()
            data["tasks_received"] = received["tasks"]
            data["core_seconds_received"] = received["core_seconds"]
        return data

    def _received(self) -> dict[str, Any]:
        assert self.gate is not None
        counts = self.gate.counts()
        return {"tasks": counts["tasks"], "core_seconds": counts["core_seconds"]}

    def watch_telemetry(self) -> None:
        """Sample now; if the sample changed from the one last sent, send it at once."""
        worker = self.worker
        if worker is None or worker.status not in (Status.running, Status.paused):
            return
        if telemetry_changed(self._sent, self._sample(worker)):
            self._report()

    # -- heartbeat pacing ---------------------------------------------------------------------
    def heartbeat_interval(self) -> float:
        """Seconds until the next heartbeat: Dask's while work is here or was lately, else at
        least the idle heartbeat interval."""
        dask_interval = self._dask_interval_ms / 1000
        if self._busy():
            self._last_activity = time.monotonic()
        self._idle = time.monotonic() - self._last_activity >= self.idle_after
        if self._reconcile_pc is not None:  # memory cannot grow much with no task here
            self._reconcile_pc.callback_time = 1000 * (
                IDLE_RECONCILE_INTERVAL if self._idle else RECONCILE_INTERVAL
            )
        return max(dask_interval, self.idle_heartbeat_interval) if self._idle else dask_interval

    def _busy(self) -> bool:
        worker = self.worker
        if worker is None:
            return False
        ws = worker.state
        return bool(
            ws.executing
            or ws.long_running
            or ws.ready
            or ws.constrained
            or ws.waiting
            or ws.in_flight_tasks
            or ws.missing_dep_flight
            or ws.fetch_count
        )

    async def _paced_heartbeat(self) -> None:
        pc = self._heartbeat_pc
        assert pc is not None
        self._in_heartbeat = True
        try:
            # Dask's heartbeat sets the timer to the interval the scheduler asks for (only when
            # the scheduler answered): start from its last request, and keep what it sets.
            pc.callback_time = self._dask_interval_ms
            await self._dask_heartbeat()
        finally:
            self._in_heartbeat = False
            self._dask_interval_ms = pc.callback_time
            pc.callback_time = 1000 * self.heartbeat_interval()

    def _work_arrived(self) -> None:
        """A task came: back to Dask's heartbeat interval now, not after a slow one."""
        self._last_activity = time.monotonic()
        if not self._idle:
            return
        self._idle = False
        worker = self.worker
        pc = self._heartbeat_pc
        if pc is None or worker is None:
            return
        pc.callback_time = self._dask_interval_ms
        if pc.is_running() and not self._in_heartbeat:
            pc.stop()  # restart: the next heartbeat comes one fast interval from now
            pc.start()
        # Dask sets find-missing's interval to the heartbeat's each time it runs. (Timers of
        # plain functions can be restarted here: they are never halfway through a run.)
        missing = worker.periodic_callbacks.get("find-missing")
        for timer, ms in (
            (missing, self._dask_interval_ms),
            (self._reconcile_pc, 1000 * RECONCILE_INTERVAL),
        ):
            if timer is not None and timer.is_running():
                timer.callback_time = ms
                timer.stop()
                timer.start()

    # -- control, from the agent ----------------------------------------------------------------
    def apply_policy(
        self, state: str | None, reason: str | None = None, move: bool = False
    ) -> dict[str, Any]:
        """Put the node in the state the agent decided: None (run) or "paused".

        Paused: no new tasks, running ones suspended; ``move`` hands them back to the scheduler
        to run elsewhere. ``FULL`` (a lent worker using every slot its home portal leaves it):
        no new tasks, running ones go on; it shows as paused. A draining node stays draining.
        """
        if self.state == "draining":
            # Leaving anyway: rather than keep the owner waiting, hand running tasks back.
            if state == "paused" and self.executor is not None:
                self.executor.evict()
            return self.status()
        if state == FULL:
            self.state, self.reason = "paused", reason or "every slot it may use is in use"
            if self.executor is not None and self.executor.resume():
                logger.info("resumed the suspended tasks")
            self.reconcile()  # paused in Dask first: nothing queued may start meanwhile
            given = self._give_back_queued()
            if given:
                logger.info(
                    "gave %s back to the portal: %s", counted(given, "queued task"), self.reason
                )
        elif state == "paused":
            self.state, self.reason = "paused", reason or "paused"
            if self.executor is not None:
                suspended = self.executor.suspend()
                if suspended:
                    logger.info("suspended %s: %s", counted(suspended, "running task"), self.reason)
                if move:
                    moved = self.executor.evict()
                    if moved:
                        self._moved += moved
                        logger.info("moved %s elsewhere: paused too long", counted(moved, "task"))
        else:
            self.state, self.reason = None, None
            if self.executor is not None and self.executor.resume():
                logger.info("resumed the suspended tasks")
        self.reconcile()
        self._report()
        return self.status()

    def _give_back_queued(self) -> int:
        """Hand the tasks queued in this worker (assigned, not started) back to the scheduler,
        which places them on a worker that can take them. Released here first, as Dask's
        ``reschedule`` message asks; a paused worker starts none of them meanwhile."""
        from distributed.worker_state_machine import FreeKeysEvent

        worker = self.worker
        if worker is None or worker.status != Status.paused:
            return 0
        keys = [ts.key for ts in (*worker.state.ready, *worker.state.constrained)]
        if not keys:
            return 0
        stimulus_id = f"grid-give-back-{time.time()}"
        worker.handle_stimulus(FreeKeysEvent(keys=keys, stimulus_id=stimulus_id))
        for key in keys:
            worker.batched_send({"op": "reschedule", "key": key, "stimulus_id": stimulus_id})
        return len(keys)

    def _report(self) -> None:
        """Send a heartbeat now, so the portal shows the new state and its reason at once."""
        worker = self.worker
        if worker is not None and worker.status in (Status.running, Status.paused):
            asyncio.ensure_future(self._early_heartbeat(worker))

    async def _early_heartbeat(self, worker: Worker) -> None:
        await worker.heartbeat()
        pc = self._heartbeat_pc
        if pc is not None and not self._in_heartbeat:
            # Dask set the timer to the scheduler's interval: keep our pace, and count the next
            # regular heartbeat from this one.
            self._dask_interval_ms = pc.callback_time
            pc.callback_time = 1000 * self.heartbeat_interval()
            if pc.is_running():
                pc.stop()
                pc.start()

    def pause(self, reason: str = "paused by the volunteer") -> dict[str, Any]:
        return self.apply_policy("paused", reason)

    def resume(self) -> dict[str, Any]:
        return self.apply_policy(None)

    async def drain(self, timeout: float = 300.0, reason: str = "draining") -> dict[str, Any]:
        """Finish what is running, take nothing new, then leave the grid gracefully.

        Tasks suspended by a pause cannot finish while the owner needs the machine: they are
        handed back to the scheduler at once rather than after the timeout.
        """
        worker = self.worker
        assert worker is not None
        was_paused = self.state == "paused"
        self.state, self.reason = "draining", reason
        self.reconcile()
        self._report()
        if self.executor is not None and was_paused:
            self.executor.evict(only_suspended=True)
            self.executor.resume()  # tasks that arrive from now on are handed back, not held
        deadline = time.monotonic() + timeout
        while worker.state.executing and time.monotonic() < deadline:
            await asyncio.sleep(0.1)  # polling the worker's own state; no event exists for it
        finished = not worker.state.executing
        # A task that just finished has its "task-finished" waiting in the batched stream; the
        # retirement below goes on another connection and could reach the scheduler first,
        # which would then run the task again elsewhere. Let the stream empty first.
        stream = worker.batched_stream
        while stream.buffer and not stream.closed() and time.monotonic() < deadline + 5:
            await asyncio.sleep(0.01)  # polling Dask's send buffer; it has no drained event
        await asyncio.sleep(stream.interval)  # the last batch's write
        logger.info("drained (running tasks finished: %s); leaving the grid", finished)
        # close_gracefully asks the scheduler to move our results elsewhere (retire_workers),
        # then closes the worker. Anything still running is rescheduled.
        asyncio.get_running_loop().create_task(worker.close_gracefully(reason=reason))
        return {**self.status(), "finished_running_tasks": finished}

    def reconcile(self) -> None:
        """Keep Dask's worker status in line with the rules and the memory use."""
        worker = self.worker
        if worker is None:
            return
        if self.memory_pause_fraction:
            limit = worker.memory_manager.memory_limit
            if limit:
                used = worker.monitor.get_process_memory()
                pressure = used > self.memory_pause_fraction * limit
                if pressure != self.memory_pressure:
                    logger.warning(
                        "worker memory %s %.0f%% of its limit",
                        "above" if pressure else "back below",
                        100 * self.memory_pause_fraction,
                    )
                self.memory_pressure = pressure
        want_paused = self.state in ("paused", "draining") or self.memory_pressure
        if want_paused and worker.status == Status.running:
            worker.status = Status.paused
        elif not want_paused and worker.status == Status.paused:
            worker.status = Status.running

    def transition(self, key: Any, start: str, finish: str, **kwargs: Any) -> None:
        if finish in _WORK_STATES:
            self._work_arrived()
            if start == "released" and self.executor is not None:
                self.executor.forget_cancel(key)  # sent again: an earlier cancel is over
        if finish == "memory" and start in ("executing", "long-running"):
            self._push_result(key)
            return
        # A task the scheduler no longer wants: end its process instead of letting it run on.
        # Dask reports the transition asked for (executing -> released); the task is then
        # left "cancelled", running on in its thread, unless we end it.
        if self.executor is None or start not in ("executing", "long-running"):
            return
        if finish in ("released", "cancelled"):
            ts = self.worker.state.tasks.get(key) if self.worker is not None else None
            if ts is None or ts.state == "cancelled":
                self.executor.cancel(key)

    def _push_result(self, key: Any) -> None:
        """Send a finished ``grid_push`` task's small result to the portal now. Worker plugins
        hear of a transition before Dask sends its ``task-finished`` for it, so on the shared
        stream this arrives first, and the client has the value when it learns the task ended.
        """
        worker = self.worker
        ts = worker.state.tasks.get(key) if worker is not None else None
        if ts is None or (ts.annotations or {}).get(PUSH_ANNOTATION) != PUSH_FORWARDED:
            return  # not a push task, or a portal that would not know the message
        if ts.nbytes is not None and ts.nbytes > PUSH_LIMIT:
            return  # Dask's own size estimate says it is large: it is gathered as usual
        try:
            data = pickle.dumps(worker.data[key], protocol=pickle.HIGHEST_PROTOCOL)
        except Exception:  # noqa: BLE001 - not picklable here or spilled away: gathered instead
            return
        if len(data) <= PUSH_LIMIT and worker.batched_stream is not None:
            worker.batched_stream.send({"op": PUSH_OP, "key": key, "data": data})

    def status(self) -> dict[str, Any]:
        worker = self.worker
        counts = self.executor.counts() if self.executor is not None else {}
        executing = 0 if worker is None else len(worker.state.executing)
        return {
            "state": self.state or ("running" if worker is None else _status_word(worker)),
            "reason": self.reason,
            "running_tasks": executing,
            "suspended_tasks": counts.get("suspended", 0),
            # Tasks inside a task process now (a task can be executing for Dask a moment
            # before it gets there, or while it waits out a pause).
            "in_process_tasks": counts.get("running", 0) + counts.get("suspended", 0),
            "moved_tasks": self._moved,
            "memory_pressure": self.memory_pressure,
            "address": None if worker is None else worker.address,
            "sandbox": self.info.get("sandbox"),
            "received": self._received() if self.gate is not None else None,
        }

    def handle_status(self, comm: Any = None) -> dict[str, Any]:
        return self.status()


# Task states on a worker that mean work is here (distributed.worker_state_machine).
_WORK_STATES = frozenset(
    {"waiting", "ready", "constrained", "executing", "long-running", "fetch", "flight"}
)


def telemetry_changed(sent: dict[str, Any] | None, new: dict[str, Any]) -> bool:
    """Whether ``new`` differs from ``sent`` enough to be worth a heartbeat of its own."""
    if sent is None:
        return True
    for key in ("running_tasks", "policy", "network"):
        if sent.get(key) != new.get(key):
            return True
    for key in ("cpu_percent", "grid_cpu_percent", "memory_percent"):
        if _moved(sent.get(key), new.get(key), TELEMETRY_STEPS[key]):
            return True
    old_gpus, new_gpus = sent.get("gpus") or [], new.get("gpus") or []
    if [g.get("index") for g in old_gpus] != [g.get("index") for g in new_gpus]:
        return True
    for a, b in zip(old_gpus, new_gpus, strict=True):
        for key in ("utilization", "temperature"):
            if _moved(a.get(key), b.get(key), TELEMETRY_STEPS[key]):
                return True
        step = max(64 * 2**20, GPU_MEMORY_STEP * (a.get("memory_used") or 0))
        if _moved(a.get("memory_used"), b.get("memory_used"), step):
            return True
    return False


def _moved(a: Any, b: Any, step: float) -> bool:
    if a is None or b is None:
        return a is not b
    return abs(float(b) - float(a)) >= step


def _status_word(worker: Worker) -> str:
    if worker.status == Status.paused:
        return "paused"
    return "running" if worker.status == Status.running else worker.status.name


def _static_info(info: dict[str, Any]) -> Any:
    """A callable for Worker.startup_information (it calls each value with the worker)."""

    def get(worker: Worker) -> dict[str, Any]:
        return info

    return get


def _asdict(obj: Any) -> Any:
    import dataclasses

    return dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else obj
