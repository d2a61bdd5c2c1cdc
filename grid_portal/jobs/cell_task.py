"""The node's side of a ``%%grid`` cell: the Dask task, and the child processes it runs.

:func:`run_cell_task` is the task. It runs in a worker thread (on a sandboxed node too: it is
*self-isolating*, see ``grid_portal.isolation``) and does not run the cell itself: a Python
thread cannot be stopped, so the cell runs in a child process (``cell_child.py``) that the task
kills when the job is cancelled or its ``--timeout`` runs out. The task relays the child's output
to the kernel while it runs and, for ``--bg`` cells, keeps the result at the portal (from a task
process, through its narrow channel to the worker: see :func:`_emitter`). Children come from a
fork server (:class:`_Zygote`) by way of :data:`POOL`, one forked ahead of need.
"""

from __future__ import annotations

import codecs
import contextlib
import json
import os
import pickle
import platform
import selectors
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from grid_portal import isolation
from grid_portal.jobs.cell_child import (
    FLUSH_INTERVAL,
    FRAME,
    IN_PARENT_GROUP,
    OWN_GROUP,
    OWN_SESSION,
    ZYGOTE_MSG,
    kill_tree,
    send_frame,
)
from grid_portal.jobs.cell_payload import CellFailed, stored_blob
from grid_portal.node.taskchild import loads_plain
from grid_portal.protocol import (  # noqa: F401 - names of the wire contract
    JOB_ANNOTATION,
    REPLICA_ANNOTATION,
    STREAM_ANNOTATION,
)

# -- tunables -----------------------------------------------------------------------------------
# What a --replicas copy returns, and so what the portal compares: the variables
# and the value as pickled data, and which names the cell deleted, did not set or kept back.
COMPARED_FIELDS = ("outputs", "deleted", "missing", "unsent", "has_value", "value")
FIRST_FLUSH = 0.15  # s a cell runs before its output starts streaming (quick cells send none)
POLL_INTERVAL = 0.05  # s between checks, on the node, for cancellation and the deadline
RELAY_ATTEMPTS = 20  # failed puts in a row (no queue yet, kernel gone) before streaming stops
EMIT_TIMEOUT = 10.0  # s a node waits for the portal to take a stream batch or a kept result
MAX_OUTPUT_CHARS = 8_000_000  # text kept per cell; more would swamp the notebook anyway
FORK_AHEAD_DELAY = 0.03  # s after a cell starts before the node forks the next cell's child
# The task annotation naming the job a --bg cell may keep its result for (the wire contract
# with grid_portal.client and node/taskproc.py).


@isolation.self_isolating
def run_cell_task(payload: bytes, request: dict[str, Any]) -> dict[str, Any]:
    """Run one cell (one --map value) on this node, in a child process; the Dask task.

    Returns the outcome dict; raises :class:`CellFailed` when the cell raised, timed out or its
    process died, so that Dask and the portal count the task as failed.

    It runs in a worker thread. On a sandboxed node the executor (grid_portal.node.taskproc)
    knows it as self-isolating and hands it a ``Confinement``: the child gets the task
    processes' nice value and memory limit, leads its own process group, and is registered so
    that the executor's suspend, move and kill reach it. Output and the kept result go out
    through the worker's own connection, only to the names in the task's annotations. Should
    it run inside a task process after all (an executor that does not know self-isolating
    tasks), they go through that process's narrow channel (``get_worker().grid_emit``), and the
    child stays in the task process's group for the executor's signals to reach it.
    """
    from distributed import get_worker
    from distributed.worker import thread_state

    try:
        worker: Any = get_worker()
    except ValueError:
        worker = None
    in_worker = worker is not None and _is_dask_worker(worker)
    emit = _emitter(worker, in_worker)
    key = getattr(thread_state, "key", None)

    def cancelled() -> bool:
        # The scheduler cancelled the task (grid.cancel, an interrupt, the kernel went away):
        # the worker's own state says so. Reading it from this thread is a plain dict lookup.
        if not in_worker or key is None:
            return False
        ts = worker.state.tasks.get(key)
        return ts is None or ts.state in ("cancelled", "released", "forgotten")

    channel = request.get("channel") if emit is not None else None
    keep = bool(request.get("keep"))
    if in_worker and key is not None:
        # Through the worker's own connection, only to the names the task came with in its
        # annotations, as a sandboxed task process's channel allows (node/taskproc.py).
        ts = worker.state.tasks.get(key)
        annotations = (ts.annotations or {}) if ts is not None else {}
        if channel is not None and channel != annotations.get(STREAM_ANNOTATION):
            channel = None
        if annotations.get(REPLICA_ANNOTATION):
            channel = None  # --replicas: copy 0 streams, the other copies' output is not shown
        keep = keep and request.get("job_id") == annotations.get(JOB_ANNOTATION)
    relay = _Relay(emit, channel, int(request.get("index", 0)))
    node = str(getattr(worker, "name", None) or platform.node())
    confinement = isolation.current() if in_worker else None
    if not in_worker:
        detach = IN_PARENT_GROUP
    else:
        detach = OWN_GROUP if confinement is not None else OWN_SESSION
    execution = _Execution(payload, request, node, relay, cancelled, detach, confinement)
    outcome = execution.run()
    outcome["streamed"] = channel is not None
    if request.get("compare") and not outcome.get("error") and not outcome.get("cancelled"):
        # --replicas: the portal compares copies of this result byte for byte, so
        # it holds only what the cell brings back as data; what it printed or displayed (which
        # may hold timings or object ids) goes to the kernel through the stream, ended by
        # an "end" event, and is not compared.
        execution.add({"k": "end"})
        relay.send_all(execution.events)
        return {k: outcome[k] for k in COMPARED_FIELDS if k in outcome}
    if isinstance(request.get("label"), str):  # a --map item's label, for a kernel reloading it
        outcome["label"] = request["label"]
    if keep and not outcome.get("cancelled"):
        outcome["kept"] = emit is not None and _keep_result(emit, request["job_id"], outcome)
    if outcome.get("error"):
        error = outcome["error"]
        raise CellFailed(f"{error.get('ename')}: {error.get('evalue')}", outcome)
    return outcome


def _is_dask_worker(worker: Any) -> bool:
    """The real Worker, not a sandboxed task process's view of it."""
    try:
        return worker.state is not None and worker.scheduler is not None
    except AttributeError:
        return False


Emit = Callable[[str, dict[str, Any]], Any]


def _emitter(worker: Any, in_worker: bool) -> Emit | None:
    """The task's way to the scheduler, for its output stream and its kept result: the
    worker's own connection when the task runs in the worker; the task process's channel to
    its worker when it runs sandboxed; None where there is neither (an older node)."""
    if in_worker:
        from distributed.utils import sync

        handlers = {"queue_put": "queue_put", "store_result": "grid_job_store_result"}

        def emit(kind: str, payload: dict[str, Any]) -> Any:
            handler = getattr(worker.scheduler, handlers[kind])
            return sync(worker.loop, handler, callback_timeout=EMIT_TIMEOUT, **payload)

        return emit
    return getattr(worker, "grid_emit", None) if worker is not None else None


def _keep_result(emit: Emit, job_id: str, outcome: dict[str, Any]) -> bool:
    """Store the result at the portal from the node itself, so a --bg cell's result is kept
    even when the kernel that sent it has gone (the portal accepts it from the node the job
    ran on). On refusal the kernel, if still there, stores it when the task completes."""
    data = stored_blob([outcome], None)
    try:
        reply = emit("store_result", {"job_id": job_id, "data": data})
    except Exception:  # noqa: BLE001 - a portal without the handler, a lost connection
        return False
    return isinstance(reply, dict) and "error" not in reply


class _Relay:
    """Sends batches of events to the kernel through the run's Queue (see CellRun). The kernel
    creates the queue only once the cell has run for STREAM_AFTER; a put before that fails
    (no such queue) and is tried again at the next flush, with everything not yet sent."""

    def __init__(self, emit: Emit | None, channel: str | None, index: int) -> None:
        self.emit = emit
        self.channel = channel
        self.index = index
        self.sent = 0  # events[:sent] are in the queue
        self.broken = channel is None or emit is None
        self.failures = 0

    def send_all(self, events: list[dict[str, Any]], attempts: int = 20) -> None:
        """Send what is left now, trying for a moment if the kernel's queue is not there yet."""
        for _ in range(attempts):
            self.send(events)
            if self.broken or self.sent >= len(events):
                return
            time.sleep(0.05)

    def send(self, events: list[dict[str, Any]]) -> None:
        if self.broken or self.sent >= len(events):
            return
        assert self.emit is not None
        batch = events[self.sent :]
        try:
            self.emit(
                "queue_put", {"name": self.channel, "data": {"i": self.index, "events": batch}}
            )
        except PermissionError:
            self.broken = True  # the node refuses: the result still has it all
            return
        except Exception:  # noqa: BLE001 - no queue (yet), or the kernel left
            self.failures += 1
            self.broken = self.failures >= RELAY_ATTEMPTS
            return
        self.failures = 0
        self.sent = len(events)


class _Execution:
    """The task's side of one run: feed the child, gather its events, enforce cancel/timeout."""

    def __init__(
        self,
        payload: bytes,
        request: dict[str, Any],
        node: str,
        relay: _Relay,
        cancelled: Callable[[], bool],
        detach: int = OWN_SESSION,
        confinement: isolation.Confinement | None = None,
    ) -> None:
        self.detach = detach
        self.confinement = confinement
        self.payload = payload
        self.request = request
        self.node = node
        self.relay = relay
        self.cancelled = cancelled
        self.events: list[dict[str, Any]] = []
        self.chars = 0
        self.dropped = 0
        self.add({"k": "started", "node": node})

    def add(self, event: dict[str, Any]) -> None:
        if event["k"] in ("stdout", "stderr"):
            text = event["t"]
            if self.chars + len(text) > MAX_OUTPUT_CHARS:
                self.dropped += len(text)
                return
            self.chars += len(text)
            last = self.events[-1] if self.events else None
            if (
                last is not None
                and last["k"] == event["k"]
                and last["seq"] >= self.relay.sent
                and len(last["t"]) < 65536
            ):
                last["t"] += text  # not yet sent: coalesce into one event
                return
        event["seq"] = len(self.events)
        self.events.append(event)

    def run(self) -> dict[str, Any]:
        started = time.time()
        timeout = self.request.get("timeout")
        deadline = time.monotonic() + float(timeout) if timeout else None
        confinement = self.confinement
        child = POOL.take(self.detach, confinement.nice if confinement is not None else 0)
        result: dict[str, Any] | None = None
        stop_reason: str | None = None
        try:
            alive = child.send(
                {
                    "payload": self.payload,
                    "map_value": self.request.get("map_value"),
                    "path": list(sys.path),
                    "memory_limit": confinement.memory_limit if confinement is not None else 0,
                    # The job's own HOME, TMPDIR and working directory (a sandboxed node).
                    "workdir": confinement.workdir if confinement is not None else None,
                }
            )
            if confinement is not None:
                # The node's pause, move and memory watch reach the child from now on. (Told
                # once the cell is on its way: taking its memory baseline costs a moment.)
                confinement.started(child.pid)
            begun = last_flush = time.monotonic()
            while result is None and alive:
                messages, alive = child.read(POLL_INTERVAL)
                for message in messages:
                    if message.get("k") == "result":
                        result = message
                    else:
                        self.add(message)
                if result is not None:
                    break
                if self.cancelled():
                    stop_reason = "cancelled"
                    break
                now = time.monotonic()
                if deadline is not None and now >= deadline:
                    stop_reason = "timeout"
                    break
                if now - begun >= FIRST_FLUSH and now - last_flush >= FLUSH_INTERVAL:
                    self.relay.send(self.events)
                    last_flush = now
        finally:
            if result is None:
                child.kill()
            for message in child.drain():
                if message.get("k") != "result":
                    self.add(message)
        elapsed = time.time() - started
        if self.dropped:
            self.add(
                {
                    "k": "stderr",
                    "t": f"\n[{self.dropped} characters of output were dropped: a cell "
                    f"keeps at most {MAX_OUTPUT_CHARS}]\n",
                }
            )
        if stop_reason == "cancelled":
            self.add({"k": "stopped", "node": self.node})
            self.relay.send(self.events)  # tells the waiting kernel the node is free
            return {"cancelled": True, "node": self.node, "events": self.events}
        outcome: dict[str, Any] = dict(result or {})
        outcome.pop("k", None)
        if stop_reason == "timeout":
            outcome["error"] = {
                "ename": "CellTimedOut",
                "evalue": f"the cell ran longer than its --timeout of {float(timeout):g} s on "
                f"node {self.node} and was stopped; the node is free again. Raise --timeout, "
                "or split the work",
                "timed_out": True,
            }
        elif result is None:
            outcome["error"] = {
                "ename": "CellProcessDied",
                "evalue": f"the cell's process on node {self.node} ended before the cell "
                f"finished ({child.describe_exit()})",
                "grid": True,
            }
        outcome.update(node=self.node, elapsed=elapsed, events=self.events)
        return outcome


# Children and the fork server run isolated (python -I: no user site, no PYTHON* variables, no
# current directory on sys.path); the worker's import path is their first argument.
_PATH_BOOT = (
    "import json, sys; "
    "sys.path[:0] = [p for p in json.loads(sys.argv.pop(1)) if p not in sys.path]; "
)
_CHILD_BOOT = _PATH_BOOT + (
    "from grid_portal.jobs.cell_child import _child_main; "
    "_child_main(int(sys.argv[1]), int(sys.argv[2]))"
)


class _FrameReader:
    def __init__(self) -> None:
        self.buffer = bytearray()

    def feed(self, data: bytes) -> list[Any]:
        self.buffer += data
        messages = []
        while len(self.buffer) >= FRAME.size:
            (size,) = FRAME.unpack_from(self.buffer)
            if len(self.buffer) < FRAME.size + size:
                break
            body = bytes(self.buffer[FRAME.size : FRAME.size + size])
            del self.buffer[: FRAME.size + size]
            # The cell's code runs in that child: what it sends is opened as plain data only
            # (values travel as pickled bytes, opened by the kernel), so a crafted message
            # cannot run code in the worker, which holds the node's key.
            try:
                messages.append(loads_plain(body))
            except pickle.UnpicklingError as exc:
                self.buffer.clear()
                messages.append(
                    {
                        "k": "result",
                        "error": {"ename": "PermissionError", "evalue": str(exc), "grid": True},
                    }
                )
                break
        return messages


class _Child:
    """A fresh Python process that runs exactly one cell.

    Its fd 0 carries the request (then stays open: EOF there tells the child the worker died),
    a private pipe carries framed messages back, and fds 1 and 2 are pipes too, so output that
    bypasses ``sys.stdout`` (C extensions, subprocesses) is relayed as well. The child leads
    its own process group, so killing the group takes whatever the cell started along.
    ``wait`` reaps it and returns its exit code; until then its pid, and so its group id,
    cannot be reused, which is what makes killing the group safe.
    """

    def __init__(
        self,
        pid: int,
        ctl: int,
        out: int,
        err: int,
        proto: int,
        wait: Callable[[], Any],
        detach: int = OWN_SESSION,
    ) -> None:
        self.pid, self.ctl, self.proto = pid, ctl, proto
        self.detach = detach
        self._wait = wait  # reaps the child; returns its exit code, or a callable giving it
        self._exit_code: Any = None
        self.reaped = False
        self.reader = _FrameReader()
        self.decoders = {
            name: codecs.getincrementaldecoder("utf-8")(errors="replace")
            for name in ("stdout", "stderr")
        }
        self.selector = selectors.DefaultSelector()
        self.selector.register(proto, selectors.EVENT_READ, "proto")
        self.selector.register(out, selectors.EVENT_READ, "stdout")
        self.selector.register(err, selectors.EVENT_READ, "stderr")
        self.fds = [ctl, out, err, proto]
        self.open = 3
        self.finished = False  # its result arrived

    def waiting(self) -> bool:
        """A child forked ahead is still there to take a cell (nothing, not even EOF, has come
        from it yet: EOF would mean it died, say with its task process)."""
        if self.open < 3 or not self.fds:
            return False
        import select

        readable, _, _ = select.select([self.proto], [], [], 0)
        return not readable

    def send(self, request: dict[str, Any]) -> bool:
        """Hand the child its cell; False if it died before taking it."""
        try:
            send_frame(self.ctl, request)
        except OSError:
            return False
        return True

    def read(self, timeout: float) -> tuple[list[dict[str, Any]], bool]:
        """Messages (and raw output as stream events) that arrived within ``timeout``."""
        messages: list[dict[str, Any]] = []
        if self.open == 0:
            return messages, False
        for key, _ in self.selector.select(timeout):
            source = key.data
            data = os.read(key.fd, 1 << 16)
            if not data:
                self.selector.unregister(key.fileobj)
                self.open -= 1
                continue
            if source == "proto":
                for message in self.reader.feed(data):
                    if message.get("k") == "batch":
                        messages.extend(message["events"])
                    else:
                        self.finished = self.finished or message.get("k") == "result"
                        messages.append(message)
            else:
                text = self.decoders[source].decode(data)
                if text:
                    messages.append({"k": source, "t": text})
        return messages, self.open > 0

    def drain(self, limit: float = 1.0) -> list[dict[str, Any]]:
        """What is left in the pipes, then close. After a result nothing more is waited for
        (the cell is over; waiting for the process to wind down would cost a millisecond or
        two per cell); after a kill, up to ``limit`` for the pipes to close."""
        messages: list[dict[str, Any]] = []
        deadline = time.monotonic() + limit
        while self.open:
            more, _ = self.read(0 if self.finished else 0.05)
            messages.extend(more)
            if (self.finished and not more) or time.monotonic() >= deadline:
                break
        self.close()
        return messages

    def kill(self) -> None:
        if not self.reaped:
            kill_tree(self.pid, self.detach != IN_PARENT_GROUP)

    def close(self) -> None:
        # Whatever the cell left running (a background process) goes too: a volunteer's
        # machine runs nothing of a cell after the cell ended.
        self.kill()
        with contextlib.suppress(Exception):
            self.selector.close()
        for fd in self.fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds = []
        if not self.reaped:
            self.reaped = True  # from here on the pid may be reused: no more killpg
            self._exit_code = self._wait()

    @property
    def returncode(self) -> int | None:
        code = self._exit_code
        return code() if callable(code) else code

    def describe_exit(self) -> str:
        code = self.returncode
        if code is None:
            return "its exit status is unknown"
        if code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = f"signal {-code}"
            hint = ", perhaps out of memory" if name == "SIGKILL" else ""
            return f"killed by {name}{hint}"
        return f"exit code {code}"


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("MPLBACKEND", "Agg")  # never a GUI window on a volunteer's screen
    return env


def _import_path() -> str:
    return json.dumps([p for p in sys.path if p and os.path.abspath(p) != os.getcwd()])


def _spawn_child(detach: int = OWN_SESSION) -> tuple[_Child, subprocess.Popen[bytes]]:
    """A child started from scratch (~150 ms of CPU: the interpreter's own start-up)."""
    ctl_r, ctl_w = os.pipe()
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    proto_r, proto_w = os.pipe()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-I", "-c", _CHILD_BOOT, _import_path(), str(proto_w), str(detach)],
            stdin=ctl_r,
            stdout=out_w,
            stderr=err_w,
            pass_fds=(proto_w,),
            start_new_session=detach == OWN_SESSION,
            env=_child_env(),
            **({"process_group": 0} if detach == OWN_GROUP else {}),
        )
    finally:
        for fd in (ctl_r, out_w, err_w, proto_w):
            os.close(fd)

    def wait() -> int | None:
        try:
            return proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            return None

    return _Child(proc.pid, ctl_w, out_r, err_r, proto_r, wait, detach), proc


_ZYGOTE_BOOT = _PATH_BOOT + (
    "from grid_portal.jobs.cell_child import _zygote_main; "
    "_zygote_main(int(sys.argv[1]), int(sys.argv[2]))"
)


class _Zygote:
    """A pre-started, single-threaded process that forks one child per cell.

    Starting Python costs ~150 ms of CPU here; a fork of this small, idle process costs a
    millisecond or two, so a cell's child is ready at once even when cells come back to back.
    Forking the worker itself would be unsafe (it runs threads); this process runs none.
    The pipes of each child are made here and handed over with SCM_RIGHTS.
    """

    def __init__(self, detach: int = OWN_SESSION, nice: int = 0) -> None:
        import socket

        self.detach = detach
        self.nice = nice
        mine, theirs = socket.socketpair()
        try:
            self.proc = subprocess.Popen(
                [
                    *(sys.executable, "-I", "-c", _ZYGOTE_BOOT, _import_path()),
                    *(str(theirs.fileno()), str(nice)),
                ],
                stdin=subprocess.DEVNULL,
                pass_fds=(theirs.fileno(),),
                start_new_session=detach == OWN_SESSION,
                env=_child_env(),
            )
        finally:
            theirs.close()
        self.sock = mine
        self.send_lock = threading.Lock()
        self.replies: dict[tuple[bytes, int], int] = {}
        self.cond = threading.Condition()
        self.seq = 0
        self.dead = False
        threading.Thread(target=self._read, name="grid-zygote", daemon=True).start()

    def alive(self) -> bool:
        return not self.dead and self.proc.poll() is None

    def _read(self) -> None:
        buffer = b""
        while True:
            try:
                data = self.sock.recv(4096)
            except OSError:
                data = b""
            if not data:
                break
            buffer += data
            while len(buffer) >= ZYGOTE_MSG.size:
                kind, a, b = ZYGOTE_MSG.unpack_from(buffer)
                buffer = buffer[ZYGOTE_MSG.size :]
                with self.cond:
                    self.replies[(kind, a)] = b
                    self.cond.notify_all()
        with self.cond:
            self.dead = True
            self.cond.notify_all()

    def _reply(self, key: tuple[bytes, int], timeout: float) -> int | None:
        deadline = time.monotonic() + timeout
        with self.cond:
            while key not in self.replies and not self.dead:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self.cond.wait(remaining)
            return self.replies.pop(key, None)

    def child(self) -> _Child:
        import socket

        ctl_r, ctl_w = os.pipe()
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        proto_r, proto_w = os.pipe()
        try:
            with self.send_lock:
                self.seq += 1
                seq = self.seq
                socket.send_fds(
                    self.sock,
                    [ZYGOTE_MSG.pack(b"F", seq, self.detach)],
                    [ctl_r, out_w, err_w, proto_w],
                )
        finally:
            for fd in (ctl_r, out_w, err_w, proto_w):
                os.close(fd)
        pid = self._reply((b"P", seq), 10.0)
        if pid is None:
            for fd in (ctl_w, out_r, err_r, proto_r):
                os.close(fd)
            self.dead = True
            raise OSError("the cell runner's fork server did not answer")
        return _Child(pid, ctl_w, out_r, err_r, proto_r, lambda: self._reap(pid), self.detach)

    def _reap(self, pid: int) -> Callable[[], int | None]:
        """Ask the server to reap ``pid``; the exit code is waited for only if asked for."""
        with contextlib.suppress(OSError), self.send_lock:
            self.sock.sendall(ZYGOTE_MSG.pack(b"W", pid, 0))
        return lambda: self._reply((b"X", pid), 5.0)


class _ChildPool:
    """Where children come from: the fork server where the OS has fork and fd passing (Linux,
    macOS); elsewhere a child started ahead of need, so a cell rarely waits for one."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.zygote: _Zygote | None = None
        self.forked: _Child | None = None  # forked ahead by the fork server, waiting for a cell
        self.spare: tuple[_Child, subprocess.Popen[bytes]] | None = None
        self._ahead: tuple[_Zygote, float] | None = None  # fork for this server after then
        self._ahead_due = threading.Condition(self.lock)
        self._forker_pid = 0  # the process whose forker thread runs
        import socket

        self.forking = hasattr(os, "fork") and hasattr(socket, "send_fds")

    def take(self, detach: int = OWN_SESSION, nice: int = 0) -> _Child:
        if self.forking:
            with self.lock:
                zygote = self.zygote
                if (
                    zygote is None
                    or not zygote.alive()
                    or (zygote.detach, zygote.nice) != (detach, nice)
                ):
                    if self.forked is not None:
                        self.forked.close()
                    zygote = _Zygote(detach, nice)
                    self.zygote, self.forked = zygote, None
                child, self.forked = self.forked, None
            try:
                if child is None or not child.waiting():
                    child = zygote.child()
                # Fork the next cell's child ahead of need, but not at once: the fork and the
                # new child's start-up would compete with this cell, and with the trip of its
                # result, for the CPU (a trivial cell took 1 ms longer on two busy cores).
                self._fork_ahead_soon(zygote)
                return child
            except OSError:
                pass  # a broken fork server: start this one from scratch, a new server next
        with self.lock:
            spare, self.spare = self.spare, None
        if spare is None or spare[1].poll() is not None or spare[0].detach != detach:
            if spare is not None:
                spare[0].close()
            spare = _spawn_child(detach)
        if not self.forking:
            threading.Thread(target=self._refill, name="grid-cell-spare", daemon=True).start()
        return spare[0]

    def _fork_ahead_soon(self, zygote: _Zygote) -> None:
        """Have the forker thread fork a child FORK_AHEAD_DELAY from now. One long-lived
        thread, not a timer per cell: starting a thread costs the cell's own path a little."""
        with self.lock:
            self._ahead = (zygote, time.monotonic() + FORK_AHEAD_DELAY)
            if self._forker_pid != os.getpid():  # none yet, or inherited by a fork
                self._forker_pid = os.getpid()
                thread = threading.Thread(target=self._forker, name="grid-cell-forker")
                thread.daemon = True
                thread.start()
            else:
                self._ahead_due.notify()

    def _forker(self) -> None:
        while True:
            with self.lock:
                while self._ahead is None:
                    self._ahead_due.wait()
                zygote, due = self._ahead
                wait = due - time.monotonic()
                if wait > 0:
                    self._ahead_due.wait(wait)  # then look again: a newer cell may have come
                    continue
                self._ahead = None
            self._fork_ahead(zygote)

    def _fork_ahead(self, zygote: _Zygote) -> None:
        try:
            child = zygote.child()
        except OSError:
            return
        with self.lock:
            if self.zygote is zygote and self.forked is None:
                self.forked, child = child, None
        if child is not None:
            child.close()

    def _refill(self) -> None:
        with self.lock:
            if self.spare is None or self.spare[1].poll() is not None:
                self.spare = _spawn_child()


POOL = _ChildPool()
