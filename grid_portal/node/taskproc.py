"""TaskProcessExecutor: the worker's default executor, running each task in a task process.

Dask hands an executor that is not a ``ThreadPoolExecutor`` the call
``_run_task_simple(run_spec, data, scheduler_delay)`` (distributed.worker.Worker.execute). We
pickle that call, run it in one of our long-lived task processes (``taskchild``), and hand
Dask back the same result dictionary it would have computed in a thread: results, exceptions
and their tracebacks arrive unchanged. What a process buys over a thread:

- **suspension**: SIGSTOP / SIGCONT to the task's process group, while the worker itself keeps
  talking to the portal (a paused node stays listed as paused, not lost);
- **moving**: past the suspend limit, the task is ended and handed back to the scheduler
  (``Reschedule``) to run elsewhere;
- **memory limits**: each task is held to what it asked for (its ``MEMORY`` resource), else to
  what the node lends: RLIMIT_DATA inside, so allocations fail with a MemoryError, plus a
  watchdog here that ends a task whose resident memory passes the limit anyway (memory maps,
  processes the task started). The researcher gets a MemoryError that names the limit; the node
  stays up;
- **cancellation**: a cancelled task's process is ended at once instead of running on;
- **low priority**: task processes run at nice 10, so the volunteer's own programs come first.

A task process has no connection to the scheduler. While its task runs it may ask this executor
for exactly two things (``taskchild.TaskChannel``): put plain data into the Dask ``Queue`` named
by the task's ``grid_stream`` annotation (a ``%%grid`` cell's output stream), and keep a result
at the portal for the job named by its ``grid_job`` annotation (a ``--bg`` cell; the portal also
checks that the job ran on this node). The executor forwards those through the worker's own
scheduler connection (``worker.scheduler``) and refuses any other name or kind.

A fresh sandbox per job: every job (a task's ``grid_job`` annotation; a task without one is a
job of its own) gets a directory of its own under the worker's jobs directory, with ``home``,
``tmp`` and ``work`` in it: its tasks' HOME, TMPDIR and working directory. A task process
serves one job only: a spare process is bound to the job of its first task (``bind``) and never
runs another job's task, for a job could leave state in a long-lived process (modules it
patched, threads). A job's directory and its processes go when another job starts on a node
where it has nothing running, or after the job linger (grid-portal.volunteer.job-linger) without a task here; when no job runs
at all, the sandbox's shared writable places (``/tmp``, ``/dev/shm`` under bubblewrap) are
emptied too. So nothing a task writes survives into another job. (Jobs that run on the node at
the same time share the sandbox's user and those places while they both run.)

Task processes are cheap to make for this: each is a ``fork()`` of the worker's fork server
(``taskzygote``: started once, imports preloaded, runs no task itself, out of the tasks' reach),
a few milliseconds instead of a new interpreter's ~0.35 s of CPU; a job's process is still a new
process, never one that served another job. Retiring a job stays before the next job's code
runs (its processes are killed and seen gone through a pidfd, what it wrote is deleted), but a
directory it left empty is renamed aside and removed in the background (``_remove``).

Self-isolating tasks (``grid_portal.isolation``: a ``%%grid`` cell, which runs the cell in a
fresh child process of its own) run in a thread here instead, with a ``Confinement`` that
gives their child the task process's nice value and memory limit and registers it, so that
suspending, moving, cancelling and the memory watchdog reach it as they reach a task process:
one process and one hop fewer per cell.

Tasks that must run inside the worker itself run in a thread as Dask would: P2P shuffle and
rechunk steps (they use the worker's shuffle extension; they are distributed's own code) and
anything that is not a task (benchmarks). Coroutine tasks never reach an executor: Dask runs
them on the worker's event loop. All of these are still inside the sandbox (see sandbox.py).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import itertools
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import cloudpickle

from grid_portal.isolation import Confinement, confined, is_self_isolating
from grid_portal.node.slotgate import SlotGate, is_task_call
from grid_portal.node.taskchild import BOOT, PipeRefused, memory_error_text, recv_plain, send
from grid_portal.node.taskclient import delegated, seceded
from grid_portal.node.taskzygote import ForkedProcess, ForkServer, can_fork
from grid_portal.proctree import tree_rss
from grid_portal.protocol import (  # noqa: F401 - names of the wire contract
    ITEMS_ANNOTATION,
    JOB_ANNOTATION,
    STREAM_ANNOTATION,
)
from grid_portal.settings import given_or

if TYPE_CHECKING:
    from distributed import Worker

logger = logging.getLogger("grid_portal.node")

TASK_NICE = 10
# Not settings: how quickly a task over its memory is stopped is part of the limit's promise
# to the volunteer, and the timeout below is the node's own patience with its scheduler
# connection, not something a deployment would tune.
WATCHDOG_INTERVAL = 0.2  # seconds between memory checks while tasks run
MEMORY_RESOURCE = "MEMORY"  # grid_portal.model.MEMORY, the resource a task's memory= becomes
# Task annotations that name what a task may reach through its channel. The wire contract with
# the Grid client (grid_job) and jobs/cell.py (grid_stream); node code imports neither.
EMIT_TIMEOUT = 10.0  # s the executor waits for the scheduler to take a task's message
MAX_QUEUE_ITEM = 16 * 2**20  # characters/bytes in one queue item: it lives at the portal
MAX_CSR = 8192  # characters of a task's certificate request (taskclient.py)


@dataclass
class _Workspace:
    """One job's directory on this node: its tasks' HOME, TMPDIR and working directory."""

    job: Any
    path: str
    running: int = 0  # its tasks running now (task processes and cells)
    last: float = 0.0  # monotonic time its last task ended

    @property
    def info(self) -> dict[str, Any]:
        """What a task process or a cell's child is told to use (see taskchild.enter)."""
        return {
            "env": {
                "HOME": os.path.join(self.path, "home"),
                "TMPDIR": os.path.join(self.path, "tmp"),
            },
            "cwd": os.path.join(self.path, "work"),
        }


@dataclass
class _Child:
    """One task process and the task it runs, if any."""

    proc: subprocess.Popen[bytes] | ForkedProcess  # forked by the fork server, or spawned
    to_child: Any
    from_child: Any
    key: Any = None
    limit: int = 0
    base: int = 0  # resident memory when the task started: the limit counts what it adds
    fate: str | None = None  # why we ended it: "memory", "moved", "cancelled", "shutdown"
    stopped: bool = False
    workspace: _Workspace | None = None  # the one job it serves, once bound; None: a spare

    @property
    def pid(self) -> int:
        return self.proc.pid

    def signal(self, sig: int) -> None:
        if self.proc.returncode is not None or getattr(self.proc, "reaped", False):
            return  # ended and reaped: its pid may be another process's by now
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, sig)  # the task and whatever it started

    def rss(self) -> int:
        """Resident memory of the task process and its descendants."""
        return tree_rss(self.proc.pid)

    def close(self) -> None:
        for stream in (self.to_child, self.from_child):
            with contextlib.suppress(OSError):
                stream.close()


@dataclass
class _Confined:
    """A self-isolating task's own child (grid_portal.isolation), watched like a task process:
    it leads its own process group, so signals reach it and whatever it started."""

    key: Any
    limit: int
    pid: int = 0  # 0 until the task has started its child
    base: int = 0
    fate: str | None = None
    stopped: bool = False

    def signal(self, sig: int) -> None:
        if self.pid:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, sig)

    def rss(self) -> int:
        return tree_rss(self.pid) if self.pid else 0


@dataclass(frozen=True)
class _Grant:
    """What one running task may reach through its channel: names it came with."""

    job: str | None = None  # may keep this job's result at the portal
    stream: str | None = None  # may put into this Dask Queue
    items: int = 0  # a batch task of this many items may say how many of them raised

    def refusal(self, kind: Any, payload: Any) -> str | None:
        """Why this message may not go out; None if it may."""
        if not isinstance(payload, dict):
            return "a message's payload is a dict"
        if kind == "queue_put":
            if self.stream is None or payload.get("name") != self.stream:
                return "this task may only put into the queue it was given (grid_stream)"
            if _plain_size(payload.get("data")) > MAX_QUEUE_ITEM:
                return (
                    "a queue item is plain data (str, numbers, lists, dicts) of at most "
                    f"{MAX_QUEUE_ITEM} characters"
                )
            return None
        if kind == "store_result":
            if self.job is None or payload.get("job_id") != self.job:
                return "this task may only keep the result of its own job (grid_job)"
            if not isinstance(payload.get("data"), bytes):
                return "a result to keep is bytes"
            return None
        if kind == "failed_items":
            count = payload.get("count")
            if not self.items or type(count) is not int or not 0 <= count <= self.items:
                return "only a batch task says how many of its items raised (0 to its items)"
            return None
        if kind == "delegate":  # the portal decides whose job it is (portal/delegation.py)
            csr = payload.get("csr")
            ok = isinstance(csr, str) and 0 < len(csr) <= MAX_CSR
            return None if ok else "a credential is asked for with a certificate request"
        if kind in ("secede", "rejoin"):
            return None
        return f"unknown message kind {kind!r}"


def _plain_size(value: Any) -> int:
    """Size of plain (msgpack-able) data; more than MAX_QUEUE_ITEM for anything else. Walks at
    most a bounded number of items, so that no structure (one that holds itself, say) keeps
    this thread, and the task's slot, busy."""
    too_big = MAX_QUEUE_ITEM + 1
    total, budget = 0, 100_000
    todo = [(value, 0)]
    while todo:
        item, depth = todo.pop()
        budget -= 1
        if budget < 0 or depth > 32:
            return too_big
        if item is None or isinstance(item, (bool, int, float)):
            total += 8
        elif isinstance(item, (str, bytes)):
            total += len(item)
        elif isinstance(item, (list, tuple)):
            total += 8
            todo.extend((v, depth + 1) for v in item)
        elif isinstance(item, dict):
            total += 8
            for k, v in item.items():
                if not isinstance(k, str):
                    return too_big
                total += len(k)
                todo.append((v, depth + 1))
        else:
            return too_big
        if total > MAX_QUEUE_ITEM:
            return too_big
    return total


def _reply_problem(reply: Any) -> str | None:
    """Why a task process's final message is not the shape taskchild.plain_reply sends."""
    from grid_portal.payload import OpaqueResult

    if not (isinstance(reply, tuple) and len(reply) == 3 and reply[0] == "done"):
        return f"a message that is not a task's reply ({type(reply).__name__})"
    msg, growth = reply[1], reply[2]
    if not isinstance(msg, dict) or type(growth) is not int:
        return "a reply of the wrong shape"
    op = msg.get("op")
    if op != "value" and not all(type(msg.get(t)) in (int, float) for t in ("start", "stop")):
        return "a reply without its timings"
    if op == "task-finished":
        return None if type(msg.get("result")) is OpaqueResult else "a value that is not opaque"
    if op == "value":
        return None if type(msg.get("value")) is OpaqueResult else "a value that is not opaque"
    if op == "task-erred":
        texts = (msg.get("exception_text"), msg.get("traceback_text"))
        if not all(isinstance(t, str) for t in texts):
            return "an error without its text"
        if not all(
            msg.get(f) is None or type(msg.get(f)) is bytes for f in ("exception", "traceback")
        ):
            return "an error that is not bytes"
        return None
    return f"a reply of unknown kind {op!r}"


def _text_exception(text: str) -> BaseException:
    """What the worker itself knows of a task's exception: its text (the pickled exception is
    forwarded unopened). Dask's ``Reschedule`` is recognised by its text, as asking for it is
    all a task could do with it."""
    if text == "Reschedule()":
        from distributed import Reschedule

        return Reschedule()
    return Exception(text)


def _empty(path: str, device: int) -> None:
    """Delete what ``path`` holds on its own file system; never what is mounted below it (the
    scratch directory, when it lies under /tmp, is bound into the sandbox's /tmp)."""
    for entry in os.scandir(path):
        with contextlib.suppress(OSError):
            if entry.stat(follow_symlinks=False).st_dev != device:
                continue
            if entry.is_dir(follow_symlinks=False):
                _empty(entry.path, device)
                os.rmdir(entry.path)  # fails, as it should, above a mount
            else:
                os.unlink(entry.path)


def _holds_nothing(path: str) -> bool:
    """Whether a job's directory is still the empty skeleton it was made as."""
    try:
        with os.scandir(path) as entries:
            subs = [e for e in entries]
        if sorted(e.name for e in subs) != ["home", "tmp", "work"]:
            return False
        for entry in subs:
            if not entry.is_dir(follow_symlinks=False):
                return False
            with os.scandir(entry.path) as inside:
                if next(inside, None) is not None:
                    return False
    except OSError:
        return False
    return True


def _p2p_functions() -> frozenset[Any]:
    """Distributed's own P2P task functions, by identity (a pickle cannot forge identity)."""
    import importlib
    import inspect

    found = set()
    for name in ("_core", "_shuffle", "_rechunk", "_merge"):
        try:
            module = importlib.import_module(f"distributed.shuffle.{name}")
        except ImportError:
            continue
        for obj in vars(module).values():
            if inspect.isfunction(obj) and obj.__module__ == module.__name__:
                found.add(obj)
    return frozenset(found)


class TaskProcessExecutor(concurrent.futures.Executor):
    """Runs each Dask task in a task process; see the module docstring."""

    def __init__(
        self,
        slots: int,
        *,
        memory_limit: int | None,
        env: dict[str, str] | None = None,
        nice: int = TASK_NICE,
        cwd: str | None = None,
        jobs_dir: str | None = None,
        shared_places: tuple[str, ...] | list[str] = (),
        fork_server: bool = True,
        gate: SlotGate | None = None,
        job_linger: float | None = None,  # seconds; None: the configured one
    ) -> None:
        self.slots = max(1, int(slots))
        # Tasks wait here for the agent's grant when the volunteer serves several portals.
        self.gate = gate
        self.memory_limit = int(memory_limit) if memory_limit else None
        self.env = env
        self.nice = nice
        self.cwd = cwd
        # A directory per job under jobs_dir (None: no per-job sandbox, processes serve all).
        self.jobs_dir = jobs_dir
        self.shared_places = tuple(shared_places)  # emptied whenever no job runs here
        # Seconds without a running task before a job's directory and processes go.
        self.job_linger = given_or(job_linger, "volunteer.job-linger")
        self._jobs: dict[Any, _Workspace] = {}
        self._numbers = itertools.count(1)
        # Directories of ended jobs that held nothing but their empty skeleton, renamed out of
        # the way and removed in the background (see _remove); emptied before a new job starts.
        self._trash: list[str] = []
        # Held by a new job from its retiring of idle jobs until their directories are gone
        # (taken under self._lock, so a job that enters meanwhile waits: see _enter).
        self._trash_lock = threading.RLock()
        self.worker: Worker | None = None
        self._view: dict[str, Any] = {}
        # One thread per running task; a few more for work that runs in-process.
        self._threads = concurrent.futures.ThreadPoolExecutor(
            self.slots + 2, thread_name_prefix="grid-task"
        )
        # Tasks that seceded (Dask's secede() in the task: taskclient.py) wait on other tasks
        # in their thread here; each lends the pool one more thread until it rejoins or ends.
        self._seceded: set[Any] = set()
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)  # an idle task process became available
        self._idle: list[_Child] = []
        self._busy: dict[int, _Child] = {}
        # Keys the scheduler cancelled before their process was registered (the cancel can
        # arrive while a task is still starting): such a task must not start at all.
        self._cancelled_early: set[Any] = set()
        self._spawning = 0
        self._allowed = threading.Event()  # cleared while suspended
        self._allowed.set()
        self._moves = 0  # bumped by evict(): tasks waiting to start are handed back too
        self._shutdown = False
        self._p2p: frozenset[Any] | None = None
        # Task processes are forks of one fork server (taskzygote.py), started on first need.
        self._fork = fork_server and can_fork()
        self._server: ForkServer | None = None
        self._server_lock = threading.Lock()
        self._watchdog = threading.Thread(
            target=self._watch, name="grid-task-watchdog", daemon=True
        )
        self._watchdog.start()

    # -- set-up -------------------------------------------------------------------------------
    def attach(self, worker: Worker) -> None:
        """Called by the node plugin once the worker exists: start the task processes."""
        self.worker = worker
        self._view = {
            "name": worker.name,
            "address": worker.address,
            "id": worker.id,
            "nthreads": worker.state.nthreads,
            "memory_limit": worker.memory_manager.memory_limit,
            "resources": dict(worker.state.total_resources),
            "local_directory": worker.local_directory,
        }
        for _ in range(self.slots):
            self._threads.submit(self._prespawn)

    def _prespawn(self) -> None:
        with self._lock:
            spares = sum(c.workspace is None for c in self._idle) + self._spawning
            total = len(self._idle) + len(self._busy) + self._spawning
            if self._shutdown or (total >= self.slots and spares >= 1):
                return  # at least the slots' worth, and one spare for the next job
            self._spawning += 1
        child = None
        try:
            child = self._spawn()
        except Exception as exc:  # noqa: BLE001 - a task will try again, and report it
            logger.warning("could not start a task process: %s", exc)
        with self._cond:
            self._spawning -= 1
            if child is not None and not self._shutdown:
                self._idle.append(child)
                child = None
            self._cond.notify_all()
        if child is not None:
            self._end(child)

    def _spawn(self) -> _Child:
        """A new task process: a fork of the fork server (taskzygote.py), else a new
        interpreter; told the worker's view and its limits, and ready."""
        child = self._fork_child() if self._fork else None
        if child is None:
            child = self._start_child()
        return self._handshake(child)

    def _fork_child(self) -> _Child | None:
        """A fork of the fork server, started with the first; None if there is none."""
        try:
            with self._server_lock:
                server = self._server
                if server is None or not server.alive():
                    if self._shutdown:
                        return None
                    self._server = server = ForkServer(env=self.env, cwd=self.cwd)
            proc, to_w, from_r = server.fork()
        except OSError as exc:
            logger.warning("task processes' fork server: %s; starting one from scratch", exc)
            return None
        return _Child(proc, os.fdopen(to_w, "wb"), os.fdopen(from_r, "rb"))

    def _start_child(self) -> _Child:
        to_r, to_w = os.pipe()
        from_r, from_w = os.pipe()
        # Isolated (-I): no user site, no PYTHON* variables, no current directory on sys.path;
        # the worker's own import path comes on the command line.
        path = [p for p in sys.path if p and os.path.abspath(p) != os.getcwd()]
        # Its own process group, to suspend or end a task with whatever it started; but the
        # worker's session, so that it shares the worker's CPU share (Linux autogroups give
        # each session an equal share, whatever the nice values).
        group: dict[str, Any] = (
            {"process_group": 0} if sys.version_info >= (3, 11) else {"start_new_session": True}
        )
        try:
            proc = subprocess.Popen(
                [sys.executable, "-I", "-c", BOOT, json.dumps(path), str(to_r), str(from_w)],
                pass_fds=(to_r, from_w),
                stdin=subprocess.DEVNULL,
                env=self.env,
                cwd=self.cwd,
                **group,
            )
        finally:
            os.close(to_r)
            os.close(from_w)
        return _Child(proc, os.fdopen(to_w, "wb"), os.fdopen(from_r, "rb"))

    def _handshake(self, child: _Child) -> _Child:
        proc = child.proc
        try:
            send(
                child.to_child,
                {"view": self._view, "nice": self.nice, "max_memory": self.memory_limit},
            )
            ready = recv_plain(child.from_child)
        except (EOFError, OSError, PipeRefused) as exc:
            self._end(child)
            raise RuntimeError(f"a task process failed to start (exit code {proc.poll()})") from exc
        if ready[0] != "ready":
            self._end(child)
            raise RuntimeError(f"a task process answered {ready!r}")
        return child

    # -- the Executor interface ----------------------------------------------------------------
    def submit(
        self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any
    ) -> concurrent.futures.Future[Any]:
        if self._shutdown:
            raise RuntimeError("cannot run tasks after the executor was shut down")
        if self.gate is not None and is_task_call(fn, args):
            return self._threads.submit(self.gate.run, self._call, fn, args, kwargs)
        return self._threads.submit(self._call, fn, args, kwargs)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            self._shutdown = True
            children = [*self._idle, *self._busy.values()]
            self._idle.clear()
            for child in self._busy.values():
                child.fate = child.fate or "shutdown"
        for child in children:
            child.signal(signal.SIGKILL)
            child.signal(signal.SIGCONT)
        self._allowed.set()
        self._threads.shutdown(wait=wait, cancel_futures=cancel_futures)
        for child in children:
            # A self-isolating task's child is reaped by the thread that started it (signalled
            # above); only our own task processes have streams to close and an exit to wait for.
            if isinstance(child, _Child):
                self._end(child)
        with self._server_lock:
            server, self._server = self._server, None
        if server is not None:
            server.close()

    # -- control: suspend, resume, move, cancel ------------------------------------------------
    def suspend(self) -> int:
        """Stop running tasks where they are (SIGSTOP); start no new ones. Returns how many."""
        self._allowed.clear()
        with self._lock:
            busy = [c for c in self._busy.values() if not c.stopped]
            for child in busy:
                child.stopped = True
        for child in busy:
            child.signal(signal.SIGSTOP)
        return len(busy)

    def resume(self) -> int:
        """Let suspended tasks go on (SIGCONT). Returns how many."""
        with self._lock:
            stopped = [c for c in self._busy.values() if c.stopped]
            for child in stopped:
                child.stopped = False
        for child in stopped:
            child.signal(signal.SIGCONT)
        self._allowed.set()
        return len(stopped)

    def evict(self, only_suspended: bool = False) -> int:
        """End running tasks and hand them back to the scheduler, which runs them elsewhere."""
        with self._lock:
            self._moves += 1
            victims = [c for c in self._busy.values() if c.stopped or not only_suspended]
            for child in victims:
                child.fate = "moved"
        for child in victims:
            child.signal(signal.SIGKILL)
        return len(victims)

    def cancel(self, key: Any) -> bool:
        """End the process running ``key`` (the scheduler no longer wants its result)."""
        with self._lock:
            child = next((c for c in self._busy.values() if c.key == key), None)
            if child is None:
                self._cancelled_early.add(key)
                return False
            child.fate = "cancelled"
        child.signal(signal.SIGKILL)
        return True

    @property
    def suspended(self) -> bool:
        return not self._allowed.is_set()

    def counts(self) -> dict[str, int]:
        with self._lock:
            stopped = sum(c.stopped for c in self._busy.values())
            return {"running": len(self._busy) - stopped, "suspended": stopped}

    # -- running one call ---------------------------------------------------------------------
    def _call(self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        from distributed.worker import _run_task_simple

        if fn is not _run_task_simple or not args:
            return self._call_in_worker(fn, args, kwargs)
        if is_self_isolating(getattr(args[0], "func", None)):
            return self._call_confined(fn, args, kwargs)
        if self._in_worker(args[0]):
            return self._call_in_worker(fn, args, kwargs)
        task = args[0]
        key = getattr(task, "key", None)
        moves = self._moves
        if self._held_back(moves):
            return self._reschedule(task)
        limit = self._limit_for(key)
        grant = self._grant_for(key)
        payload = cloudpickle.dumps((fn, args, kwargs))
        workspace = self._enter(self._job_for(key))
        try:
            child = self._take_child(workspace)
        except BaseException:
            self._leave(workspace)
            raise
        child.key, child.limit, child.fate = key, limit, None
        child.base = child.rss() if limit else 0
        if not self._register(child):  # cancelled while it was starting: never run it
            child.key = None
            self._give_back(child)
            self._leave(workspace)
            return self._reschedule(task)
        started = time.time()
        try:
            send(child.to_child, ("run", key, limit, payload))
            del payload
            # Read with a restricted unpickler (taskchild.recv_plain): plain data and opaque
            # results only, so nothing a task writes into this pipe runs code here.
            reply = recv_plain(child.from_child)
            while isinstance(reply, tuple) and reply[:1] == ("emit",):  # its channel
                send(child.to_child, ("emitted", self._forward(key, grant, reply)))
                reply = recv_plain(child.from_child)
            problem = _reply_problem(reply)
        except (EOFError, OSError):
            return self._ended(child, task, started)
        except Exception as exc:  # noqa: BLE001 - PipeRefused, or a pickle that does not load
            problem = str(exc) if isinstance(exc, PipeRefused) else f"an unreadable message ({exc})"
        finally:
            with self._lock:
                self._busy.pop(child.pid, None)
            self._lend_thread(key, False)
            self._leave(workspace)
        if problem is not None:
            return self._refuse(child, problem, started)
        child.key = None
        msg, growth = reply[1], reply[2]
        if self.memory_limit and growth > self.memory_limit // 2:
            # Memory a task freed is not always given back to the system; a process that has
            # kept much of it is replaced, so that the next task gets its whole limit.
            self._end(child)
            self._refill()
        else:
            self._give_back(child)
        if msg.get("op") == "value":
            return msg["value"]
        return self._finish(msg)

    def _held_back(self, moves: int) -> bool:
        """Wait while the node is paused (a task that arrived as it paused); True when the
        task must go back to the scheduler instead: moved away, or the worker is closing."""
        while not self._allowed.wait(0.5):
            if self._shutdown or self._moves != moves:
                return True
        return self._moves != moves

    def _call_confined(
        self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        """A self-isolating task (a %%grid cell): in this thread, its child confined as a task
        process would be (grid_portal.isolation)."""
        task = args[0]
        key = getattr(task, "key", None)
        moves = self._moves
        if self._held_back(moves):
            return self._reschedule(task)
        record = _Confined(key=key, limit=self._limit_for(key))
        workspace = self._enter(self._job_for(key))

        def started(pid: int) -> None:
            base = tree_rss(pid) if record.limit else 0
            with self._lock:
                self._busy.pop(record.pid, None)  # the one before, if it did not say it ended
                record.pid, record.base = pid, base
                self._busy[pid] = record
                if self._moves != moves:  # moved away before its child started
                    record.fate = "moved"
                    record.signal(signal.SIGKILL)
                elif key in self._cancelled_early:  # cancelled before its child started
                    self._cancelled_early.discard(key)
                    record.fate = "cancelled"
                    record.signal(signal.SIGKILL)
                elif self.suspended:  # paused meanwhile: hold it at once, as _register does
                    record.stopped = True
                    record.signal(signal.SIGSTOP)

        def ended(pid: int) -> None:
            # Reaped, its pid may be reused: no pause, move or memory check may reach it.
            with self._lock:
                if record.pid == pid:
                    self._busy.pop(pid, None)
                    record.pid, record.base, record.stopped = 0, 0, False

        confinement = Confinement(
            nice=self.nice,
            memory_limit=record.limit,
            started=started,
            workdir=workspace.info if workspace is not None else None,
            ended=ended,
        )
        begun = time.time()
        try:
            with confined(confinement):
                msg = self._call_in_worker(fn, args, kwargs)
        finally:
            with self._lock:
                self._busy.pop(record.pid, None)
            self._leave(workspace)
        if record.fate in ("moved", "cancelled", "shutdown"):
            return self._reschedule(task)
        if record.fate == "memory":
            text = memory_error_text(key, record.limit, str(self._view.get("name")))
            return self._error(MemoryError(text), begun)
        return msg

    def _in_worker(self, task: Any) -> bool:
        """Whether this task must run inside the worker (Dask's own P2P steps)."""
        from dask._task_spec import Alias, DataNode

        if isinstance(task, (Alias, DataNode)):
            return True  # no code of anyone's: just a value or a reference to one
        if self._p2p is None:
            self._p2p = _p2p_functions()
        return self._uses(task, self._p2p, depth=0)

    def _uses(self, task: Any, functions: frozenset[Any], depth: int) -> bool:
        func = getattr(task, "func", None)
        try:
            if func in functions:
                return True
        except TypeError:  # unhashable callable
            return False
        from dask._task_spec import _execute_subgraph

        if func is _execute_subgraph and depth < 5:  # a fused chain: look inside
            inner = getattr(task, "args", ())
            graph = inner[0] if inner else None
            graph = getattr(graph, "value", graph)
            if isinstance(graph, dict):
                return any(self._uses(t, functions, depth + 1) for t in graph.values())
        return False

    def _call_in_worker(
        self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        from distributed.worker import _run_task, _run_task_simple

        worker = self.worker
        if fn is _run_task_simple and worker is not None and len(args) == 3:
            task, data, delay = args
            return _run_task(
                task,
                data,
                worker.execution_state,
                getattr(task, "key", None),
                worker.active_threads,
                worker.active_threads_lock,
                delay,
            )
        return fn(*args, **kwargs)

    def _grant_for(self, key: Any) -> _Grant:
        worker = self.worker
        ts = worker.state.tasks.get(key) if worker is not None else None
        annotations = (ts.annotations if ts is not None else None) or {}
        job, stream = annotations.get(JOB_ANNOTATION), annotations.get(STREAM_ANNOTATION)
        items = annotations.get(ITEMS_ANNOTATION)
        return _Grant(
            job=job if isinstance(job, str) else None,
            stream=stream if isinstance(stream, str) else None,
            items=items if type(items) is int and items > 0 else 0,
        )

    def _forward(self, key: Any, grant: _Grant, message: Any) -> dict[str, Any]:
        """One message from a running task, to the scheduler if its grant allows it."""
        import asyncio

        kind, payload = (message[1], message[2]) if len(message) == 3 else (None, None)
        problem = grant.refusal(kind, payload)
        worker = self.worker
        if problem is None and worker is None:
            problem = "the worker is not ready"
        if problem is not None:
            # Not the grant itself: a queue's name is what keeps its output private.
            logger.warning("refused a message from grid task %r: %s", key, problem)
            return {"ok": False, "refused": True, "error": problem}
        assert worker is not None and isinstance(payload, dict)
        if kind == "failed_items":  # the worker's own: it goes with the task's completion
            from grid_portal.batching import note_failed_items

            note_failed_items(worker, key, payload["count"])
            return {"ok": True, "reply": None}
        if kind in ("secede", "rejoin"):  # the task leaves its slot while it waits, or is back
            self._lend_thread(key, kind == "secede")
            if self.gate is not None and kind == "secede":  # its grant from the agent too
                self.gate.secede()
            elif self.gate is not None:
                self.gate.rejoin()
            if kind == "secede":
                seceded(worker, key, float(payload.get("duration") or 0.0))
            return {"ok": True, "reply": None}

        async def call() -> Any:
            scheduler = worker.scheduler  # the worker's pooled rpc, on its node certificate
            if kind == "queue_put":
                handler = scheduler.queue_put(name=payload["name"], data=payload.get("data"))
            elif kind == "delegate":
                return await delegated(worker, key, payload["csr"])
            else:
                handler = scheduler.grid_job_store_result(
                    job_id=payload["job_id"], data=payload["data"]
                )
            return await asyncio.wait_for(handler, EMIT_TIMEOUT)

        try:
            future = asyncio.run_coroutine_threadsafe(call(), worker.loop.asyncio_loop)
            reply = future.result(EMIT_TIMEOUT + 1)
        except Exception as exc:  # noqa: BLE001 - the task hears why; it goes on regardless
            return {"ok": False, "refused": False, "error": f"{type(exc).__name__}: {exc}"}
        return {"ok": True, "reply": reply}

    def _lend_thread(self, key: Any, lend: bool) -> None:
        """One more thread for the pool while task ``key`` waits seceded (one less after)."""
        with self._lock:
            if lend == (key in self._seceded):
                return
            if lend:
                self._seceded.add(key)
            else:
                self._seceded.discard(key)
            # concurrent.futures reads _max_workers each time it decides to start a thread.
            self._threads._max_workers += 1 if lend else -1  # type: ignore[attr-defined]

    def _limit_for(self, key: Any) -> int:
        limit = self.memory_limit or 0
        worker = self.worker
        ts = worker.state.tasks.get(key) if worker is not None else None
        asked = (ts.resource_restrictions or {}).get(MEMORY_RESOURCE) if ts is not None else None
        if asked:
            limit = min(limit, int(asked)) if limit else int(asked)
        return limit

    def _refill(self) -> None:
        """Start a task process in the background, for the next task."""
        with contextlib.suppress(RuntimeError):  # shutting down: no more processes
            if not self._shutdown:
                self._threads.submit(self._prespawn)

    def _take_child(self, workspace: _Workspace | None = None) -> _Child:
        """An idle task process of this job; else a spare (idle, or being started by the
        pre-start), bound to the job; else a new one. Never a process of another job."""
        dead: list[_Child] = []
        child = None
        with self._cond:
            while child is None:
                mine = [c for c in self._idle if c.workspace is workspace]
                spares = [c for c in self._idle if c.workspace is None]
                if mine or spares:
                    candidate = (mine or spares)[-1]
                    self._idle.remove(candidate)
                    if candidate.proc.poll() is None:
                        child = candidate
                    else:
                        dead.append(candidate)
                elif self._spawning:
                    self._cond.wait(30)
                else:
                    break
        for gone in dead:
            self._end(gone)
        child = child if child is not None else self._spawn()
        if workspace is not None and child.workspace is None:
            try:
                send(child.to_child, ("bind", workspace.info))
            except OSError:
                self._end(child)
                raise
            child.workspace = workspace
            self._refill()  # a spare for the next job
        return child

    # -- one sandbox per job ------------------------------------------------------------------
    def _job_for(self, key: Any) -> Any:
        """The job a task belongs to (its grid_job annotation); a task without one is a job of
        its own. None when this executor keeps no per-job sandboxes."""
        if self.jobs_dir is None:
            return None
        worker = self.worker
        ts = worker.state.tasks.get(key) if worker is not None else None
        job = ((ts.annotations if ts is not None else None) or {}).get(JOB_ANNOTATION)
        return ("job", job) if isinstance(job, str) else ("task", repr(key))

    def _enter(self, job: Any) -> _Workspace | None:
        """A task of ``job`` starts: its workspace, made now if it is the job's first task
        here. A job new to the node first retires the jobs with nothing running; when no job
        runs at all, the shared places are emptied as well."""
        if job is None or self.jobs_dir is None:
            return None
        with self._lock:
            workspace = self._jobs.get(job)
            new = workspace is None
            if workspace is None:
                gone = self._retire_idle_jobs(linger=0.0)
                digest = hashlib.sha256(repr(job).encode()).hexdigest()[:16]
                path = os.path.join(self.jobs_dir, f"{digest}-{next(self._numbers)}")
                for sub in ("", "home", "tmp", "work"):
                    os.makedirs(os.path.join(path, sub), mode=0o700, exist_ok=True)
                workspace = self._jobs[job] = _Workspace(job, path)
                self._trash_lock.acquire()  # no later job starts before these are removed
            else:
                gone = []
            workspace.running += 1
        if new:
            try:
                self._remove(gone, before_new_job=True)
            finally:
                self._trash_lock.release()
        return workspace

    def _leave(self, workspace: _Workspace | None) -> None:
        if workspace is not None:
            with self._lock:
                workspace.running -= 1
                workspace.last = time.monotonic()

    def _retire_idle_jobs(self, linger: float) -> list[str]:
        """With the lock held: end the processes of jobs with no task running (for ``linger``
        seconds at least) and forget them; empty the shared places when no job runs now.
        Returns the directories to remove (outside the lock)."""
        now = time.monotonic()
        idle = [w for w in self._jobs.values() if not w.running and now - w.last >= linger]
        if not idle:
            return []
        for workspace in idle:
            del self._jobs[workspace.job]
        ending = [c for c in self._idle if c.workspace in idle]
        self._idle = [c for c in self._idle if c not in ending]
        for child in ending:  # all at once; then each is waited for (see _end)
            child.signal(signal.SIGKILL)
            child.signal(signal.SIGCONT)
        for child in ending:  # before the shared places are emptied: it may have threads left
            self._end(child)
        if not any(w.running for w in self._jobs.values()):
            self._empty_shared_places()
        if ending:
            self._refill()
        return [w.path for w in idle]

    def _empty_shared_places(self) -> None:
        for place in self.shared_places:
            with contextlib.suppress(OSError):
                _empty(place, os.stat(place).st_dev)

    def _remove(self, paths: list[str], *, before_new_job: bool = False) -> None:
        """Remove ended jobs' directories. What a job wrote is deleted now, before any other
        job's code runs. Removing a directory costs milliseconds on some disks (several per
        job here), so a job's directory that holds only its empty skeleton (``home``, ``tmp``,
        ``work``: it wrote nothing) is renamed aside at once and removed in the background;
        whatever is still aside when a new job starts (a job could write into it meanwhile) is
        removed before that job runs (``before_new_job``)."""
        if before_new_job:
            self._empty_trash()
        aside = []
        for path in paths:
            if _holds_nothing(path):  # cheap: a few directory reads
                trash = os.path.join(os.path.dirname(path), f".ended-{next(self._numbers)}")
                try:
                    os.rename(path, trash)
                except OSError:
                    shutil.rmtree(path, ignore_errors=True)
                    continue
                aside.append(trash)
            else:
                shutil.rmtree(path, ignore_errors=True)
        if aside:
            with self._trash_lock:
                self._trash.extend(aside)
            with contextlib.suppress(RuntimeError):  # shutting down: the next start cleans up
                self._threads.submit(self._empty_trash)

    def _empty_trash(self) -> None:
        with self._trash_lock:
            while self._trash:
                shutil.rmtree(self._trash.pop(), ignore_errors=True)

    def forget_cancel(self, key: Any) -> None:
        """``key`` arrived again (resubmitted): a cancel noted before no longer applies."""
        with self._lock:
            self._cancelled_early.discard(key)

    def _register(self, child: _Child) -> bool:
        """Count ``child`` as running its task; False if that task was cancelled meanwhile."""
        with self._lock:
            if child.key in self._cancelled_early:
                self._cancelled_early.discard(child.key)
                return False
            self._busy[child.pid] = child
            if self.suspended:  # paused between our check and now: start it stopped
                child.stopped = True
                child.signal(signal.SIGSTOP)
        return True

    def _give_back(self, child: _Child) -> None:
        with self._cond:
            retired = child.workspace is not None and (
                self._jobs.get(child.workspace.job) is not child.workspace
            )
            if not self._shutdown and not retired and len(self._idle) < 2 * self.slots:
                self._idle.append(child)
                self._cond.notify()
                return
        self._end(child)

    def _end(self, child: _Child) -> None:
        child.signal(signal.SIGKILL)
        child.signal(signal.SIGCONT)
        child.close()
        # Until it has ended (a forked one: through its pidfd, not waiting for its exit code).
        wait = getattr(child.proc, "wait_gone", child.proc.wait)
        with contextlib.suppress(subprocess.TimeoutExpired):
            wait(5)

    def _ended(self, child: _Child, task: Any, started: float) -> dict[str, Any]:
        """The task process ended mid-task: say why, in Dask's terms."""
        self._end(child)
        self._refill()  # a fresh process for the next task
        if child.fate in ("moved", "cancelled", "shutdown"):
            return self._reschedule(task)
        if child.fate == "memory":
            text = memory_error_text(child.key, child.limit, str(self._view.get("name")))
            return self._error(MemoryError(text), started)
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.proc.wait(2)  # a forked one's exit code comes from its fork server
        code = child.proc.returncode
        how = f"signal {-code}" if code is not None and code < 0 else f"exit code {code}"
        return self._error(
            RuntimeError(f"the process running grid task {child.key!r} died ({how})"), started
        )

    def _error(self, exc: BaseException, started: float) -> dict[str, Any]:
        from distributed.core import error_message

        try:
            raise exc
        except BaseException as raised:  # noqa: BLE001 - to give error_message a traceback
            msg: dict[str, Any] = dict(error_message(raised))
        msg.update(
            op="task-erred",
            actual_exception=exc,
            start=started,
            stop=time.time(),
            thread=threading.get_ident(),
        )
        return msg

    def _reschedule(self, task: Any) -> dict[str, Any]:
        from distributed import Reschedule

        return self._error(Reschedule(), time.time())

    def _refuse(self, child: _Child, problem: str, started: float) -> dict[str, Any]:
        """A task process sent what the worker does not open: end it; the task errs."""
        key = child.key
        logger.warning("grid task %r: %s; its task process was ended", key, problem)
        with self._lock:
            child.fate = child.fate or "refused"
        self._end(child)
        self._refill()
        return self._error(
            PermissionError(
                f"grid task {key!r} sent its worker a message it does not open ({problem}): a "
                "task's value goes back as opaque bytes that only a downstream task or the "
                "researcher opens; its task process was ended"
            ),
            started,
        )

    def _finish(self, msg: dict[str, Any]) -> dict[str, Any]:
        """Dask's result dictionary from what the task process sent (see taskchild.plain_reply):
        the value stays an ``OpaqueResult``, whose size the worker measures itself; an
        exception stays pickled bytes, forwarded unopened (the researcher's kernel opens it as
        data, grid_portal.safe_pickle), and is known here only by its text."""
        from dask.sizeof import sizeof
        from distributed.protocol import to_serialize

        from grid_portal.payload import OpaqueResult

        msg["thread"] = threading.get_ident()
        if msg.get("op") == "task-finished":
            msg.update(nbytes=sizeof(msg["result"]), type=OpaqueResult)
            return msg
        text = str(msg.get("exception_text") or "task failed")
        msg["actual_exception"] = _text_exception(text)
        for field in ("exception", "traceback"):
            data = msg.get(field)
            msg[field] = to_serialize(data) if isinstance(data, bytes) else None
        if msg["exception"] is None:
            from distributed.protocol import pickle as dask_pickle

            msg["exception"] = to_serialize(dask_pickle.dumps(Exception(text)))
        return msg

    # -- the memory watchdog -------------------------------------------------------------------
    def _watch(self) -> None:
        while not self._shutdown:
            time.sleep(WATCHDOG_INTERVAL)
            if self._jobs:
                with self._lock:
                    gone = self._retire_idle_jobs(linger=self.job_linger)
                    if gone:  # a job that starts meanwhile waits for their removal
                        self._trash_lock.acquire()
                if gone:
                    try:
                        self._remove(gone)
                    finally:
                        self._trash_lock.release()
            with self._lock:
                busy = [c for c in self._busy.values() if c.limit and not c.stopped and not c.fate]
            for child in busy:
                if child.rss() - child.base > child.limit:
                    with self._lock:
                        if child.fate:
                            continue
                        child.fate = "memory"
                    logger.warning("grid task %r passed its memory limit; ending it", child.key)
                    child.signal(signal.SIGKILL)


__all__ = ["TaskProcessExecutor"]
