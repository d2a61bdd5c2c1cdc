"""The worker's task gate: a task starts only once the agent granted it a slot.

A volunteer that serves several portals runs one worker per portal, each with every lent core
as its Dask threads (a worker's thread count is fixed once it registered). So that they do not
run more tasks than the volunteer lends, each task waits in its executor thread for a grant from
the agent's arbiter (``grid_portal.node.shares``), which splits the cores by share among the
portals that have work. A worker serving its only portal runs its tasks at once (``open``), and
no message is sent before a task.

Either way the gate counts what this portal received (tasks, core-seconds: seconds a task held
one lent core), tells the agent of each task that ended, and the node plugin puts the counts in
its heartbeats. A task that secedes (waits on tasks it submitted) gives its slot back until it
rejoins, as it gives Dask its thread. Only task runs are gated: the executor also runs Dask's own offloaded work
(deserialising, in a sandboxed worker), which must never wait for a slot.
"""

from __future__ import annotations

import contextvars
import itertools
import threading
import time
from collections.abc import Callable
from typing import Any

from distributed.threadpoolexecutor import ThreadPoolExecutor

Emit = Callable[[dict[str, Any]], None]


def is_task_call(fn: Callable[..., Any], args: tuple[Any, ...]) -> bool:
    """Whether an executor call is a Dask task run: ``_run_task_simple(...)`` (any executor),
    or ``Context.run(_run_task, ...)`` (Dask's thread pools run tasks in a copied context)."""
    from distributed.worker import _run_task, _run_task_simple

    if fn is _run_task_simple:
        return True
    owner = getattr(fn, "__self__", None)
    return isinstance(owner, contextvars.Context) and bool(args) and args[0] is _run_task


class SlotGate:
    """Holds each task until the agent grants it a slot (when arbitrated); counts the work."""

    def __init__(self, emit: Emit, arbitrated: bool = False) -> None:
        self._emit = emit
        self._lock = threading.Lock()
        self._arbitrated = arbitrated
        self._waiting: dict[int, threading.Event] = {}
        self._tickets = itertools.count(1)
        self.tasks = 0
        self.core_seconds = 0.0
        self._local = threading.local()  # the slot the task in this thread holds, if any
        self._moved: set[int] = set()  # tickets sent back instead of granted

    # -- from the agent ----------------------------------------------------------------------
    def arbitrate(self, on: bool) -> None:
        """Ask for a slot before each task (on), or run tasks at once (off)."""
        with self._lock:
            self._arbitrated = on
            released = [] if on else list(self._waiting.values())
            if not on:
                self._waiting.clear()
        for event in released:
            event.set()

    def grant(self, ticket: int, move: bool = False) -> None:
        """Let the task waiting with ``ticket`` run; ``move``: send it back to the scheduler
        instead (a peer's task on a lent machine whose home portal's work has come)."""
        with self._lock:
            event = self._waiting.pop(ticket, None)
            if event is not None and move:
                self._moved.add(ticket)
        if event is not None:
            event.set()

    def open(self) -> None:
        """Let every waiting task go (the worker is closing: nothing may hang on a grant)."""
        self.arbitrate(False)

    # -- in an executor thread ---------------------------------------------------------------
    def run(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        self._local.held = self._acquire()
        if self._local.held is None:
            return _rescheduled()
        try:
            return fn(*args, **kwargs)
        finally:
            held, self._local.held = self._local.held, None  # the one since rejoin, if any
            if held is not None:
                self._release(*held)
            with self._lock:
                self.tasks += 1

    def secede(self) -> None:
        """The task in this thread waits on other tasks (Dask's ``secede()``): its slot goes
        back, or tasks it waits for could never get one."""
        held, self._local.held = getattr(self._local, "held", None), None
        if held is not None:
            self._release(*held)

    def rejoin(self) -> None:
        """The task in this thread is back from waiting: it asks for a slot again."""
        if getattr(self._local, "held", "none") is None:
            self._local.held = self._acquire()

    def _acquire(self) -> tuple[int, float] | None:
        """Wait for a slot (when arbitrated); returns (ticket, when it started), or None
        when the agent sent the task back instead."""
        ticket = next(self._tickets)
        event = None
        with self._lock:
            if self._arbitrated:
                event = self._waiting[ticket] = threading.Event()
        if event is not None:
            self._emit({"event": "want", "ticket": ticket})
            event.wait()
            with self._lock:
                if ticket in self._moved:
                    self._moved.discard(ticket)
                    return None
        return ticket, time.perf_counter()

    def _release(self, ticket: int, started: float) -> None:
        seconds = time.perf_counter() - started
        with self._lock:
            self.core_seconds += seconds
        self._emit({"event": "done", "ticket": ticket, "seconds": round(seconds, 6)})

    def counts(self) -> dict[str, Any]:
        with self._lock:
            return {
                "tasks": self.tasks,
                "core_seconds": round(self.core_seconds, 3),
                "waiting": len(self._waiting),
                "arbitrated": self._arbitrated,
            }


def _rescheduled() -> dict[str, Any]:
    """What Dask's task runner returns for a task that raised ``Reschedule``: the worker
    hands it back to its scheduler, which places it again (not a failure)."""
    from distributed import Reschedule
    from distributed.metrics import time as dask_time

    now = dask_time()
    # Dask's Worker.execute reads the thread of every result, a rescheduled one's too.
    return {
        "op": "task-erred",
        "actual_exception": Reschedule(),
        "start": now,
        "stop": now,
        "thread": threading.get_ident(),
    }


class GatedThreadPoolExecutor(ThreadPoolExecutor):
    """Dask's own thread pool (so a task keeps its worker context: ``get_worker``, ``secede``),
    with task runs passed through the gate. (Dask recognises a thread pool by this name.)"""

    def __init__(self, gate: SlotGate, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.gate = gate

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        if is_task_call(fn, args):
            return super().submit(self.gate.run, fn, *args, **kwargs)
        return super().submit(fn, *args, **kwargs)


__all__ = ["GatedThreadPoolExecutor", "SlotGate", "is_task_call"]
