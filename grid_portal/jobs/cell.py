"""Remote cell execution: run a notebook cell on a node as if it ran in the kernel.

A cell's code lives in modules by concern and by the place it runs:

- **the kernel** (any front end): ``cell_analysis`` reads the cell (what it reads, what it
  assigns, whether it ends in an expression); ``cell_payload`` packs its code and inputs;
  this module, :class:`CellRun`, submits it as a grid job, relays what the node streams back
  and cancels it; ``cell_result`` turns what came back into values and errors;
  ``cell_job`` follows a ``--bg`` cell's job after the cell returned;
- **a worker thread on the node**: ``cell_task.run_cell_task``, the Dask task, which runs the
  cell in a child process it can stop, relays its output and keeps ``--bg`` results (it shares
  only ``cell_payload`` with the kernel);
- **the child process**: ``cell_child``, which runs the cell in a fresh ``__main__`` and
  reports back; children are forked from a small fork server there.

Streaming uses a per-run Dask ``Queue`` (see :class:`CellRun`) so output reaches only the
kernel that ran the cell. No Dask import at module level (``jobs/`` stays cheap to import).
The names that front ends and tests import from here before the split are still here.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import pickle
import queue
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from grid_portal.errors import GridError, UntrustedResult, UsageError
from grid_portal.jobs.cell_analysis import (
    CellCode,
    CellSyntaxError,
    analyse_cell,
    choose_inputs,
    split_names,
)
from grid_portal.jobs.cell_payload import (
    MAX_CELL_BYTES,
    STORED_FORMAT,
    CellFailed,
    check_cell_size,
    load_stored,
    make_payload,
    one_line,
    pack_inputs,
    pack_value,
    stored_blob,
)
from grid_portal.jobs.cell_result import (
    CellResult,
    CellTimedOut,
    RemoteCellError,
    rebuild_error,
    unpack,
)
from grid_portal.jobs.cell_session import LeaseSpec
from grid_portal.protocol import HOLD_ANNOTATION, STAGE_ANNOTATION, STREAM_ANNOTATION
from grid_portal.pushed import PUSH_ANNOTATION

# Importable from here as before the split (the magic, tests and older callers use them).
__all__ = [
    "MAX_CELL_BYTES",
    "STORED_FORMAT",
    "CellCode",
    "CellFailed",
    "CellInterrupted",
    "CellResubmitted",
    "CellResult",
    "CellRun",
    "CellSyntaxError",
    "CellTimedOut",
    "NullSink",
    "RemoteCellError",
    "RunOptions",
    "Sink",
    "analyse_cell",
    "check_cell_size",
    "choose_inputs",
    "fetch_kept",
    "load_stored",
    "make_payload",
    "one_line",
    "pack_inputs",
    "pack_value",
    "rebuild_error",
    "replay",
    "split_names",
    "stored_blob",
    "unpack",
]

# -- tunables -----------------------------------------------------------------------------------
STREAM_AFTER = 0.05  # s the kernel waits before opening the stream channel (< FIRST_FLUSH)
REPLICA_OUTPUT_WAIT = 3.0  # s a --replicas cell waits for copy 0's output after its result
STOP_CONFIRM_TIMEOUT = 5.0  # s the kernel waits for the node to confirm a cancelled cell stopped
BIG_PAYLOAD = 1_000_000  # bytes; larger inputs are scattered once instead of sent per task
# A --bg cell's payload up to this size is kept with its job at the portal, which runs it again
# by itself if it restarts while the cell runs; a larger one is not resubmitted.
MAX_KEPT_PAYLOAD = 8 * 2**20


# ================================================================================================
# Errors the user sees
# ================================================================================================
class CellInterrupted(KeyboardInterrupt):
    """The user interrupted the kernel; the remote cell was cancelled. A KeyboardInterrupt so
    that "Run all" stops here, rendered as one line instead of a traceback of our code."""

    def _render_traceback_(self) -> list[str]:
        return [f"KeyboardInterrupt: {self}"]


class CellResubmitted(GridError):
    """The portal restarted while the cell ran and ran it again by itself (a --bg cell): its
    result will be kept at the portal as before, for ``%grid result ID``."""


# ================================================================================================
# Running a cell on the grid
# ================================================================================================
class Sink(Protocol):
    """Where a running cell's output goes (the notebook's output area, a widget, a terminal)."""

    def started(self, index: int, node: str) -> None: ...
    def stream(self, index: int, name: str, text: str) -> None: ...
    def display(self, index: int, data: dict[str, Any], metadata: dict[str, Any]) -> None: ...
    def finished(self, index: int, outcome: dict[str, Any] | None) -> None: ...
    def tick(self) -> None: ...


@dataclass
class RunOptions:
    name: str
    cpus: float = 1
    gpus: float = 0
    memory: int | None = None
    where: str | None = None  # --where: the portal places the cell, and re-matches as nodes join
    retries: int | None = None  # given (0 too): a lost node counts as a try
    timeout: float | None = None
    keep: bool = False  # --bg: the node keeps the result at the portal
    stream: bool = True
    replicas: int = 1  # --replicas: copies on different nodes, compared by the portal


class CellRun:
    """One submitted cell: one task, or one per ``--map`` value, all in one grid job.

    Streaming: each run gets a Dask ``Queue`` named with 128 random bits that only this kernel
    and the task know. The node puts batches of output into it and this kernel takes them out.
    Queue items go to exactly one reader and are dropped by the scheduler once read, and the
    scheduler has no way to list queue names. Not ``print``/Dask's "print" topic: every client
    receives those. Not ``log_event`` + ``subscribe_topic``: the scheduler keeps every event
    of every topic and hands them all to any client that calls ``get_events()``, so one user's
    output would be readable by all and would pile up at the portal for ever.
    Everything streamed is also in the task's result, so output is complete even if the
    stream is late or lost; quick cells (< FIRST_FLUSH) stream nothing at all, and this kernel
    creates the queue only once the cell has run STREAM_AFTER (no round trip for quick ones).
    The name also travels as the tasks' ``grid_stream`` annotation: a sandboxed node lets a
    task's process put into that queue and no other (grid_portal.node.taskproc).
    """

    def __init__(
        self,
        grid: Any,
        payload: bytes,
        options: RunOptions,
        map_values: list[bytes] | None = None,
        labels: list[str] | None = None,
        job_id: str | None = None,
    ) -> None:
        self.grid = grid
        self.payload = payload
        self.options = options
        self.map_values = map_values
        self.labels = labels
        self.count = len(map_values) if map_values is not None else 1
        self.job_id = job_id or uuid.uuid4().hex[:12]
        self.channel = f"grid-cell-{uuid.uuid4().hex}" if options.stream else None
        self.inbox: queue.Queue[tuple[Any, ...]] = queue.Queue()
        self.futures: list[Any] = []
        self.outcomes: list[dict[str, Any] | None] = [None] * self.count
        self.nodes: dict[int, str] = {}  # runs the stream said started, and where
        self._polled_nodes: set[str] = set()  # nodes the portal said run the job
        self.stopped: set[int] = set()
        self.submitted_at = 0.0
        self.finished_at: float | None = None
        self._shown = [-1] * self.count  # highest event seq delivered, per run
        self._pump: threading.Thread | None = None
        self._pump_due = options.stream  # start streaming once the cell is not instant
        self._queue: Any = None
        self._queue_ready = threading.Event()
        self._end_token = uuid.uuid4().hex
        self._closed = False
        self.cancelled = False
        self._pushed: set[int] = set()  # runs whose result the portal pushed (grid_portal.pushed)
        self.ended: set[int] = set()  # --replicas: runs whose copy 0 sent all its output
        self.leased: Any = None  # the lease's future while the cell runs in a leased slot

    # -- submit ---------------------------------------------------------------------------------
    def requests(self) -> list[dict[str, Any]]:
        base = {
            "job_id": self.job_id,
            "channel": self.channel,
            "timeout": self.options.timeout,
            "keep": self.options.keep and self.map_values is None,
        }
        if self.options.replicas > 1:
            base["compare"] = True  # the node returns only the data (cell_task.COMPARED_FIELDS)
        if self.map_values is None:
            return [{**base, "index": 0, "map_value": None}]
        # The label comes back in the outcome: a kernel that loads a kept sweep knows its items.
        labels = self.labels or [str(i) for i in range(self.count)]
        return [
            {**base, "index": i, "map_value": v, "label": labels[i]}
            for i, v in enumerate(self.map_values)
        ]

    def submit(self) -> CellRun:
        """Send the cell: to this kernel's leased slot when one is ready for it
        (``grid_portal.jobs.cell_session``), else the usual way, as Dask tasks."""
        session = getattr(self.grid, "cells", None)
        if session is not None and self._send_leased(session):
            return self
        self._submit_tasks()
        if session is not None:
            session.went_usual_way(self._lease_spec())
        return self

    def _lease_spec(self) -> LeaseSpec | None:
        """The lease this cell could use; None for cells that always go the usual way."""
        options = self.options
        if self.map_values is not None or options.keep or options.replicas > 1:
            return None
        if options.retries is not None:
            # --retries counts a lost node as a try at the portal (portal/retries.py), which
            # sees Dask tasks; a leased cell whose node is lost would just run again.
            return None
        return LeaseSpec(options.cpus, options.gpus, options.memory, options.where)

    def _send_leased(self, session: Any) -> bool:
        spec = self._lease_spec()
        if spec is None:
            return False
        check_cell_size({}, len(self.payload))
        request = {**self.requests()[0], "channel": None}
        key = f"grid-cell-{self.job_id}-0"
        self.submitted_at = time.monotonic()
        lease = session.lease
        if not session.send(
            spec, key, self.job_id, self.options.name, self.payload, request, self._on_leased
        ):
            return False
        self.leased = lease.future
        self._pump_due = False  # output comes with the lease's messages, not a queue
        return True

    def _on_leased(self, kind: str, data: Any) -> None:
        """In the client's event loop: what the leased cell's node sent (via the portal)."""
        if kind == "result" and isinstance(data, bytes):
            self._on_pushed(0, data)
        elif kind == "events" and isinstance(data, bytes):
            from grid_portal.safe_pickle import loads_data

            with contextlib.suppress(Exception):  # output only: the outcome has it all too
                events = loads_data(data)
                if isinstance(events, list):
                    self.inbox.put(("events", 0, [e for e in events if isinstance(e, dict)]))
        else:
            self.inbox.put(("lapsed", 0))

    def _lapsed(self) -> None:
        """The lease could not run the cell (it ended, moved, or was refused): send it the
        usual way now. Never shown to the user."""
        if self.leased is None or self.outcomes[0] is not None:
            return
        self.leased = None
        self._pump_due = self.options.stream
        self._submit_tasks()

    def _submit_tasks(self) -> CellRun:
        check_cell_size({}, len(self.payload) + sum(len(v) for v in self.map_values or ()))
        grid = self.grid
        payload: Any = self.payload
        if len(self.payload) > BIG_PAYLOAD and self.count > 1:
            # Large inputs travel once to the grid, not once per --map value.
            payload = grid.client.scatter(self.payload, hash=False)
        requests = self.requests()
        keys = [f"grid-cell-{self.job_id}-{i}" for i in range(self.count)]
        extra: dict[str, Any] = {}
        if self.options.retries is not None:
            extra["retries"] = int(self.options.retries)
        self.submitted_at = time.monotonic()
        resources = {
            "cpus": self.options.cpus,
            "gpus": self.options.gpus,
            "memory": self.options.memory,
            "where": self.options.where,
        }
        if self.options.replicas > 1:
            replicas = self.options.replicas
            if self.options.keep:
                raise UsageError(
                    "--replicas and --bg do not go together (yet): run it in the foreground"
                )
            resources["replicas"] = replicas
            # Copy 0's output, ended by an "end" event, comes through the stream: open it now.
            self._pump_due = self.channel is not None
        if self.options.keep and self.map_values is None and len(self.payload) <= MAX_KEPT_PAYLOAD:
            # Kept with the job: a portal that restarts while the cell runs runs it again.
            self.grid.register_job(
                self.job_id, self.options.name, "cell", spec={"cell": self.kept_spec(requests[0])}
            )
        import dask

        held: dict[str, Any] = {}
        if self.options.keep and self.map_values is not None:
            # A --bg sweep: the portal holds each item's result for its owner (as a workflow's
            # outputs), so a kernel that dies mid-sweep loses nothing (fetch_kept). The job
            # must be known before its tasks arrive for the portal to hold them.
            self.grid.register_job(self.job_id, self.options.name, "cell")
            held = {HOLD_ANNOTATION: True, STAGE_ANNOTATION: "cell"}

        from grid_portal.jobs.cell_task import run_cell_task  # the node's side

        for index, key in enumerate(keys):
            grid.pushed.expect(key, functools.partial(self._on_pushed, index))
        with (
            grid.job(self.options.name, kind="cell", job_id=self.job_id),
            _stream_to(self.channel),
            dask.annotate(**{PUSH_ANNOTATION: True}, **held),
        ):
            if self.map_values is None:
                future = grid.submit(
                    run_cell_task, payload, requests[0], key=keys[0], **resources, **extra
                )
                self.futures = [future]
            else:
                self.futures = grid.map(
                    run_cell_task, [payload] * self.count, requests, key=keys, **resources, **extra
                )
        if self.options.keep:
            from distributed import fire_and_forget

            fire_and_forget(self.futures)  # a --bg cell outlives the kernel that sent it
        loop = grid.client.loop
        for index, future in enumerate(self.futures):
            loop.add_callback(self._fetch, index, future)
        if self.options.replicas > 1 and self.channel is not None:
            self._start_pump()
        return self

    def _on_pushed(self, index: int, data: bytes) -> None:
        """In the client's event loop: the node pushed this run's result with its completion
        (``grid_portal.pushed``), ahead of Dask's word that the task finished."""
        self._pushed.add(index)
        self.inbox.put(("pushed", index, data))

    async def _fetch(self, index: int, future: Any) -> None:
        """In the client's event loop: wait for one run to end and, unless its result was
        pushed already, fetch its outcome there, then hand both to the waiting thread.
        (``add_done_callback`` runs its callback in a thread of Dask's own, and
        ``future.result()`` then goes back through the loop: two thread switches more per
        cell.) A run that failed or was cancelled comes without its outcome; the waiting
        thread asks."""
        import asyncio

        value = None
        try:
            state = getattr(future, "_state", None)
            if state is not None:
                await state.wait()  # a pushed result arrives before Dask says "finished"
            if index not in self._pushed:
                got = await self.grid.client.gather([future], asynchronous=True)
                value = got[0]
        except (Exception, asyncio.CancelledError):  # noqa: BLE001 - the future tells why
            pass
        finally:
            self.inbox.put(("done", index, future, value))

    def kept_spec(self, request: dict[str, Any]) -> dict[str, Any]:
        """What the portal keeps to run this --bg cell again (``jobs.graph.resubmit_kept_cell``).
        The payload stays opaque bytes there: the portal never unpickles it."""
        options = self.options
        return {
            "payload": base64.b64encode(self.payload).decode("ascii"),
            "request": {**request, "channel": None},
            "options": {
                "cpus": options.cpus,
                "gpus": options.gpus,
                "memory": options.memory,
                "where": options.where,
                "retries": options.retries,
                "timeout": options.timeout,
            },
        }

    # -- the stream channel ------------------------------------------------------------------
    def _start_pump(self) -> None:
        self._pump_due = False
        if self._pump is not None or self.channel is None or self._closed:
            return
        self._pump = threading.Thread(target=self._pump_loop, name="grid-cell-stream", daemon=True)
        self._pump.start()

    def _pump_loop(self) -> None:
        from distributed import Queue

        try:
            self._queue = Queue(self.channel, client=self.grid.client)
        except Exception:  # noqa: BLE001 - no stream: the result still carries all output
            return
        finally:
            self._queue_ready.set()
        try:
            while True:
                item = self._queue.get()
                if not isinstance(item, dict) or item.get("end") == self._end_token:
                    break
                self.inbox.put(("events", int(item.get("i", 0)), item.get("events") or []))
        except Exception:  # noqa: BLE001 - the client closed under us
            pass
        finally:
            with contextlib.suppress(Exception):
                self._queue.close()

    def close(self) -> None:
        """Stop the stream pump, off the caller's thread: the result is already here."""
        if self._closed:
            return
        self._closed = True
        for index in range(self.count):
            self.grid.pushed.forget(f"grid-cell-{self.job_id}-{index}")
        if self._pump is None:
            return
        threading.Thread(target=self._end_pump, name="grid-cell-close", daemon=True).start()

    def _end_pump(self) -> None:
        self._queue_ready.wait(30)
        if self._queue is None:
            return
        with contextlib.suppress(Exception):
            self._queue.put({"end": self._end_token})

    # -- waiting --------------------------------------------------------------------------------
    def done(self) -> bool:
        return all(o is not None for o in self.outcomes)

    def wait(
        self, sink: Sink, tick: float = 0.25, status_every: float | None = None
    ) -> list[dict[str, Any]]:
        """Relay output to ``sink`` until every run finished; return their outcomes.

        Runs in the kernel's main thread, so a KeyboardInterrupt arrives here (call
        :meth:`cancel` then). Raises GridError when the grid could not run the cell at all;
        the cell's own exception is in the outcome (see :func:`unpack`). With
        ``status_every``, a node that streams nothing (a sandboxed one) is still named: the
        portal's job record is asked that often which nodes run the job.
        """
        polled = 0.0
        while not self.done():
            if self._pump_due and time.monotonic() - self.submitted_at >= STREAM_AFTER:
                self._start_pump()
            try:
                item = self.inbox.get(timeout=STREAM_AFTER if self._pump_due else tick)
            except queue.Empty:
                now = time.monotonic()
                if self.leased is not None and self.leased.done() and not self._pushed:
                    self._lapsed()  # the lease ended with no word of this cell (a lost node)
                if status_every is not None and not self.nodes and now - polled >= status_every:
                    polled = now
                    self._poll_nodes(sink)
                sink.tick()
                continue
            self._handle(item, sink)
            failed = next(
                (i for i, o in enumerate(self.outcomes) if o is not None and o.get("error")),
                None,
            )
            if failed is not None and self.count > 1 and not self.done():
                self._drop_others()  # like a loop, a sweep stops at its first error
                break
        if self.options.replicas > 1 and self._pump is not None:
            self._await_output(sink)
        self.finished_at = time.monotonic()
        self.close()
        return [o for o in self.outcomes if o is not None]

    def _await_output(self, sink: Sink, limit: float = REPLICA_OUTPUT_WAIT) -> None:
        """--replicas: the agreed result holds no output; copy 0's comes through the stream,
        ended by an "end" event. Relay it for a moment more if it is not all here yet."""
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            pending = [
                i
                for i, o in enumerate(self.outcomes)
                if o is not None and not o.get("error") and not o.get("cancelled")
                if i not in self.ended
            ]
            if not pending:
                return
            try:
                item = self.inbox.get(timeout=0.05)
            except queue.Empty:
                continue
            if item[0] == "events":
                self._deliver(item[1], item[2], sink)

    def _poll_nodes(self, sink: Sink) -> None:
        try:
            job = self.grid.get_job(self.job_id)
        except Exception:  # noqa: BLE001 - only a status line depends on it
            return
        if job is not None and job.state.value == "running":
            for node in job.nodes:
                if node not in self._polled_nodes:
                    self._polled_nodes.add(node)
                    sink.started(0, node)

    def _handle(self, item: tuple[Any, ...], sink: Sink) -> None:
        kind, index = item[0], item[1]
        if kind == "lapsed":
            self._lapsed()
            return
        if kind == "events":
            self._deliver(index, item[2], sink)
            return
        if kind == "pushed":
            if self.outcomes[index] is None:
                self._finish(index, self._open_pushed(item[2]), sink)
            return
        future = item[2]
        outcome = self._outcome_of(index, future, item[3] if len(item) > 3 else None)
        if outcome is not None:
            self._finish(index, outcome, sink)

    def _open_pushed(self, data: bytes) -> dict[str, Any]:
        """A pushed outcome, as data only: the node pickled it (``grid_portal.pushed``)."""
        from grid_portal.safe_pickle import loads_data

        try:
            outcome = loads_data(data)
        except UntrustedResult:
            if not self.grid.trusts_job(self.job_id):
                raise
            outcome = pickle.loads(data)
        if not isinstance(outcome, dict):
            raise GridError(f"job {self.job_id}: its node sent back something that is not a result")
        return outcome

    def _finish(self, index: int, outcome: dict[str, Any], sink: Sink) -> None:
        self._deliver(index, outcome.get("events") or [], sink)
        self.outcomes[index] = outcome
        sink.finished(index, outcome)

    def _outcome_of(
        self, index: int, future: Any, fetched: dict[str, Any] | None = None
    ) -> dict[str, Any] | None:
        if self.outcomes[index] is not None:
            return None
        status = future.status
        if status == "finished":
            outcome = fetched if fetched is not None else future.result()
            if not isinstance(outcome, dict):  # a node answering with something else
                raise GridError(
                    f"job {self.job_id}: its node sent back something that is not a result"
                )
            return outcome
        if status == "cancelled":
            if self.cancelled:
                return {"cancelled": True, "events": []}
            try:
                job = self.grid.get_job(self.job_id)
            except Exception:  # noqa: BLE001 - the connection itself closed
                raise GridError(
                    f"the connection to the portal closed while job {self.job_id} ran"
                ) from None
            if job is not None and (not job.state.finished or job.state.value == "done"):
                # Dask cancels futures when the connection to the portal is lost; the job
                # still running (or already done, when the rerun was quicker than this
                # kernel's reconnection) means the restarted portal submitted it again.
                raise CellResubmitted(
                    f"the portal restarted while job {self.job_id} ran and ran it again; "
                    f"`%grid result {self.job_id}` fetches its result when it is done"
                )
            reason = (job.error if job is not None else None) or "cancelled"
            raise GridError(f"job {self.job_id} was cancelled on the grid: {reason}")
        exc = future.exception()
        if isinstance(exc, CellFailed):
            return exc.outcome
        raise GridError(f"the grid could not run the cell (job {self.job_id}): {one_line(exc)}")

    def _deliver(self, index: int, events: list[dict[str, Any]], sink: Sink) -> None:
        for event in sorted(events, key=lambda e: e.get("seq", 0)):
            seq = int(event.get("seq", 0))
            if seq <= self._shown[index]:
                continue  # already streamed
            self._shown[index] = seq
            kind = event.get("k")
            if kind == "started":
                self.nodes[index] = str(event.get("node"))
                sink.started(index, self.nodes[index])
            elif kind == "stopped":
                self.stopped.add(index)
            elif kind == "end":
                self.ended.add(index)
            elif kind in ("stdout", "stderr"):
                sink.stream(index, kind, event.get("t", ""))
            elif kind == "display":
                sink.display(index, dict(event.get("d") or {}), dict(event.get("m") or {}))

    def _drop_others(self) -> None:
        unfinished = [f for i, f in enumerate(self.futures) if self.outcomes[i] is None]
        with contextlib.suppress(Exception):
            self.grid.client.cancel(unfinished, force=True)
        for i, outcome in enumerate(self.outcomes):
            if outcome is None:
                self.outcomes[i] = {"cancelled": True, "events": []}

    # -- cancelling -----------------------------------------------------------------------------
    def cancel(self, reason: str, confirm: float = STOP_CONFIRM_TIMEOUT) -> str:
        """Cancel the job at the portal (queued tasks dropped, running ones killed on their
        node); wait a little for the nodes to confirm. Returns a sentence for the user."""
        self.cancelled = True
        with contextlib.suppress(GridError):
            self.grid.cancel(self.job_id, reason=reason)
        running = {i for i in self.nodes if self.outcomes[i] is None}
        deadline = time.monotonic() + confirm
        with contextlib.suppress(KeyboardInterrupt):  # a second Ctrl-C: stop waiting
            while running - self.stopped and time.monotonic() < deadline:
                try:
                    item = self.inbox.get(timeout=0.1)
                except queue.Empty:
                    continue
                if item[0] == "events":
                    self._deliver(item[1], item[2], NullSink())
                elif item[0] == "done":
                    running.discard(item[1])
        self.close()
        nodes = sorted({self.nodes[i] for i in self.nodes})
        if not nodes:
            try:
                job = self.grid.get_job(self.job_id)
            except Exception:  # noqa: BLE001
                job = None
            if job is not None and job.nodes:
                # A node that streams nothing (sandboxed): its executor ends the task.
                return f"cancelled job {self.job_id}, which ran on {', '.join(job.nodes)}"
            return f"cancelled job {self.job_id} before it started"
        confirmed = not (running - self.stopped)
        where = ", ".join(nodes)
        if confirmed:
            return f"cancelled job {self.job_id}: stopped on {where}, which is free again"
        return f"cancelled job {self.job_id}; {where} is stopping it"


def fetch_kept(grid: Any, job_id: str) -> bytes | None:
    """A --bg cell's kept result: from the ledger, else (a cell the portal ran again after a
    restart, on a node that could not keep it) from the task result the portal holds, which
    is then kept in the ledger and let go. None when there is neither."""
    data = grid.fetch_result(job_id)
    if data is not None:
        return data
    try:
        held = grid.held_keys(job_id)
    except GridError:  # NotFound: nothing held; UsageError: replicas still compared
        return None
    keys = sorted((k for ks in held.values() for k in ks), key=_run_index)
    if not keys:
        return None
    futures = grid.futures_for(keys)
    outcomes = []
    for future in futures:
        try:
            outcomes.append(future.result())
        except CellFailed as exc:  # the cell's own error: its outcome says what happened
            outcomes.append(exc.outcome)
    # A --bg sweep's items carry their labels (CellRun.requests); a single cell's none.
    labels = [str(o["label"]) for o in outcomes if isinstance(o, dict) and "label" in o]
    data = stored_blob(outcomes, labels if len(labels) == len(outcomes) else None)
    grid.store_result(job_id, data)
    grid.release_held(job_id)
    return data


def _run_index(key: Any) -> int:
    """Which run of its cell a task is: the ``i`` of its key ``grid-cell-<job>-<i>``."""
    tail = str(key).rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else 0


def _stream_to(channel: str | None) -> Any:
    """Name the run's stream queue in its tasks' annotations: a sandboxed node lets a task put
    into that queue and no other (grid_portal.node.taskproc)."""
    if channel is None:
        return contextlib.nullcontext()
    import dask

    return dask.annotate(**{STREAM_ANNOTATION: channel})


class NullSink:
    """A sink that shows nothing (output is still in the outcomes)."""

    def started(self, index: int, node: str) -> None:
        pass

    def stream(self, index: int, name: str, text: str) -> None:
        pass

    def display(self, index: int, data: dict[str, Any], metadata: dict[str, Any]) -> None:
        pass

    def finished(self, index: int, outcome: dict[str, Any] | None) -> None:
        pass

    def tick(self) -> None:
        pass


def replay(outcomes: Sequence[dict[str, Any]], sink: Sink) -> None:
    """Show the output a finished cell produced (``%grid result`` of a kept result)."""
    for index, outcome in enumerate(outcomes):
        for event in sorted(outcome.get("events") or [], key=lambda e: e.get("seq", 0)):
            kind = event.get("k")
            if kind in ("stdout", "stderr"):
                sink.stream(index, kind, event.get("t", ""))
            elif kind == "display":
                sink.display(index, dict(event.get("d") or {}), dict(event.get("m") or {}))
