"""The task processes' fork server: each job's task process is a fork of it, not a new Python.

Starting a task process from scratch (``python -I`` plus the imports every task needs:
distributed, dask, cloudpickle) costs about 0.35 s of CPU here; since a task process serves one
job only (``taskproc``), that was paid once per job, on a volunteer's two cores, beside the work
being measured. The fork server is started once per worker, as ``python -I -c BOOT PATH FD``,
imports all of that once and then only forks: a task process is a ``fork()`` of it, ready in a
few milliseconds, exec-free, and then bound to its job's workspace as before (taskchild.main).

What keeps jobs apart holds as before:

- the server never runs a task, nor anything a task sends: it reads only fixed-size requests
  from the worker (``F``: fork one with these two pipe ends; ``W``: reap this pid), so every
  task process starts from the same clean state, whatever earlier jobs did in theirs;
- it is non-dumpable (``PR_SET_DUMPABLE`` 0): other processes of the sandbox's user (running
  tasks) can neither ptrace it nor write its memory through ``/proc/PID/mem``, so no job can
  plant anything in the process later jobs are forked from. Its children are made dumpable
  again, as a freshly started interpreter would be;
- each child leads its own process group (both sides call ``setpgid``, so the worker's signals
  reach it from the start) in the worker's session, closes the server's socket, and gets
  Python's default signal handling back; ``random`` reseeds itself at fork (and NumPy's
  global generator is reseeded, should the server ever hold one).

What forked processes do share, unlike spawned ones: the server's memory layout (ASLR) and its
``str`` hash seed. Neither is a way into another job's process (a job has no channel to it; two
jobs running at once share the sandbox's user anyway), and neither carries anything of a job.

The server reports each child's exit (``D``, found with ``waitid(WNOWAIT)``) but reaps it only
when the worker asks (``W``), as ``Popen.wait`` would: a pid the worker may still signal is never
reused before the worker knows it ended. It exits when the worker's end of its socket closes;
its children notice a new parent within a second (taskchild._watch_parent) and exit too.

The worker's side is :class:`ForkServer`; ``fork()`` returns a :class:`ForkedProcess`, which
answers ``pid``, ``poll()``, ``wait()`` and ``returncode`` as the ``subprocess.Popen`` of a
spawned task process would.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from typing import Any

# Requests and reports on the server's socket (SOCK_SEQPACKET: one message each):
# worker -> server: F(seq, 0) + two fds (the child's read and write pipe ends); W(pid, 0)
# server -> worker: P(seq, pid) forked; D(pid, exit code) ended (not yet reaped)
MSG = struct.Struct("!cqq")
BOOT = (
    "import json, sys; sys.path[:0] = [p for p in json.loads(sys.argv[1]) if p not in sys.path]; "
    "from grid_portal.node.taskzygote import serve; serve(int(sys.argv[2]))"
)
# Not a setting: the fork server is this worker's own child on this machine; a fork that takes
# a minute means the server is wedged, and waiting longer would only stall the task.
FORK_TIMEOUT = 60.0  # s to wait for a fork (the first waits for the server's own imports)


def _set_dumpable(on: bool) -> None:
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(4, int(on), 0, 0, 0)  # PR_SET_DUMPABLE
    except (OSError, AttributeError):
        pass


# What ``ps`` shows for a forked task process (as for one started from scratch, it names
# taskchild: volunteers, and the tests' probes, know a task process by it).
CHILD_TITLE = "python -I -m grid_portal.node.taskchild (forked)"


def _set_cmdline(title: str) -> None:
    """Rewrite this process's command line as ``ps`` and /proc/PID/cmdline show it (Linux):
    the argument area, written over in place, NUL-padded (sys.argv is a copy, unchanged)."""
    try:
        with open("/proc/self/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        start, end = int(fields[45]), int(fields[46])  # arg_start, arg_end: stat fields 48, 49
        import ctypes

        data = title.encode()[: end - start - 1]
        ctypes.memmove(start, data + b"\0" * (end - start - len(data)), end - start)
    except (OSError, ValueError, IndexError):
        pass


def _exit_code(result: Any) -> int:
    """os.waitid's answer as Popen.returncode: the exit status, or -signal."""
    if result.si_code == os.CLD_EXITED:
        return int(result.si_status)
    return -int(result.si_status)


# -- the server ------------------------------------------------------------------------------------
def serve(sock_fd: int) -> None:
    """The fork server's loop. Single-threaded on Python's side (forking it is safe)."""
    import gc
    import select

    # What every task needs, loaded once; every task process is a copy.
    import cloudpickle  # noqa: F401
    import distributed.core  # noqa: F401
    import distributed.worker  # noqa: F401

    import grid_portal.node.taskchild as taskchild
    import grid_portal.payload  # noqa: F401

    _set_dumpable(False)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    gc.collect()
    gc.freeze()  # children do not copy pages just to walk these objects
    sock = socket.socket(fileno=sock_fd)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    running: set[int] = set()  # forked, not known to have ended
    ended: set[int] = set()  # ended and reported, not reaped yet
    reap_when_ended: set[int] = set()  # the worker saw it go (pidfd) before we did

    def report(kind: bytes, a: int, b: int) -> None:
        with contextlib.suppress(OSError):
            sock.send(MSG.pack(kind, a, b))

    while True:
        readable, _, _ = select.select([sock, wake_r], [], [])
        if wake_r in readable:
            with contextlib.suppress(BlockingIOError):
                os.read(wake_r, 512)
        if sock in readable:
            try:
                data, fds, _, _ = socket.recv_fds(sock, MSG.size, 2)
            except OSError:
                data, fds = b"", []
            if not data:
                break  # the worker is gone
            if len(data) == MSG.size:
                kind, a, _b = MSG.unpack(data)
                if kind == b"F" and len(fds) == 2:
                    pid = os.fork()
                    if pid == 0:
                        _child(fds, (sock.fileno(), wake_r, wake_w), taskchild.main)
                    with contextlib.suppress(OSError):
                        os.setpgid(pid, pid)  # the worker may signal its group at once
                    running.add(pid)
                    report(b"P", a, pid)
                    fds_to_close, fds = fds, []
                    for fd in fds_to_close:
                        os.close(fd)
                elif kind == b"W" and a in ended:
                    with contextlib.suppress(ChildProcessError):
                        os.waitpid(a, 0)
                    ended.discard(a)
                elif kind == b"W" and a in running:
                    reap_when_ended.add(a)
            for fd in fds:
                os.close(fd)
        for pid in list(running):
            try:
                result = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                result, code = None, -signal.SIGKILL
                running.discard(pid)
                report(b"D", pid, code)
                continue
            if result is not None:
                running.discard(pid)
                report(b"D", pid, _exit_code(result))
                if pid in reap_when_ended:
                    reap_when_ended.discard(pid)
                    with contextlib.suppress(ChildProcessError):
                        os.waitpid(pid, 0)
                else:
                    ended.add(pid)
    os._exit(0)


def _child(fds: list[int], closing: tuple[int, ...], main: Any) -> None:
    """In a freshly forked task process: drop the server's ends, become a task process."""
    code = 1
    try:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        for fd in closing:
            with contextlib.suppress(OSError):
                os.close(fd)
        with contextlib.suppress(OSError):
            os.setpgid(0, 0)
        _set_dumpable(True)
        _set_cmdline(CHILD_TITLE)
        # Random streams of its own: Python's random reseeds itself at fork; NumPy's global
        # one would be the server's (if the server had loaded it), the same in every job.
        np_random = sys.modules.get("numpy.random")
        if np_random is not None:
            with contextlib.suppress(Exception):
                np_random.seed()
        main([str(fds[0]), str(fds[1])])
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:  # noqa: BLE001 - as an interpreter would: say why, exit 1
        import traceback

        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(code)


# -- the worker's side -----------------------------------------------------------------------------
class ForkedProcess:
    """A task process forked by the server, seen as a ``subprocess.Popen``; plus
    :meth:`wait_gone`, which waits for the process to end through a pidfd, without waiting
    for the server's report of its exit code."""

    def __init__(self, server: ForkServer, pid: int) -> None:
        self.server = server
        self.pid = pid
        self.returncode: int | None = None
        self.reaped = False  # the server was told to reap it: its pid is no longer ours
        self.pidfd: int | None = None
        with contextlib.suppress(AttributeError, OSError):
            self.pidfd = os.pidfd_open(pid)  # readable once it has ended

    def poll(self) -> int | None:
        if self.returncode is not None:
            self._reap()
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self.server.cond:
            while self.returncode is None:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise subprocess.TimeoutExpired(f"task process {self.pid}", timeout or 0)
                self.server.cond.wait(remaining)
        self._reap()
        return self.returncode

    def wait_gone(self, timeout: float | None = None) -> None:
        """Wait until the process has ended (its exit code may come a moment later)."""
        if self.returncode is None and self.pidfd is not None and not self.reaped:
            import select

            ready, _, _ = select.select([self.pidfd], [], [], timeout)
            if not ready:
                raise subprocess.TimeoutExpired(f"task process {self.pid}", timeout or 0)
            self._reap()
        else:
            self.wait(timeout)

    def _reap(self) -> None:
        if not self.reaped:
            self.reaped = True
            self.server.reap(self.pid)
        if self.pidfd is not None:
            with contextlib.suppress(OSError):
                os.close(self.pidfd)
            self.pidfd = None


class ForkServer:
    """The worker's handle on its task processes' fork server (see the module docstring)."""

    def __init__(self, env: dict[str, str] | None = None, cwd: str | None = None) -> None:
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        path = [p for p in sys.path if p and os.path.abspath(p) != os.getcwd()]
        # Its own process group (its children make their own) in the worker's session, so
        # task processes keep sharing the worker's CPU share (Linux autogroups).
        group: dict[str, Any] = (
            {"process_group": 0} if sys.version_info >= (3, 11) else {"start_new_session": True}
        )
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-I", "-c", BOOT, json.dumps(path), str(theirs.fileno())],
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=cwd,
                **group,
            )
        finally:
            theirs.close()
        self.sock = mine
        self.lock = threading.Lock()  # one request at a time on the socket
        self.cond = threading.Condition()
        self.seq = 0
        self.forked: dict[int, ForkedProcess] = {}  # seq -> process, until fork() takes it
        self.children: dict[int, ForkedProcess] = {}  # pid -> process, until it ends
        self.dead = False
        self._reader = threading.Thread(target=self._read, name="grid-task-zygote", daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return not self.dead and self.proc.poll() is None

    def fork(self) -> tuple[ForkedProcess, int, int]:
        """A new task process: (its process, the worker's write fd to it, read fd from it)."""
        to_r, to_w = os.pipe()
        from_r, from_w = os.pipe()
        try:
            with self.lock:
                if self.dead:
                    raise OSError("the task processes' fork server has ended")
                self.seq += 1
                seq = self.seq
                socket.send_fds(self.sock, [MSG.pack(b"F", seq, 0)], [to_r, from_w])
        except OSError:
            for fd in (to_w, from_r):
                os.close(fd)
            raise
        finally:
            os.close(to_r)
            os.close(from_w)
        deadline = time.monotonic() + FORK_TIMEOUT
        with self.cond:
            while seq not in self.forked and not self.dead:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self.cond.wait(remaining)
            proc = self.forked.pop(seq, None)
        if proc is None:
            os.close(to_w)
            os.close(from_r)
            self.close()
            raise OSError("the task processes' fork server did not answer")
        return proc, to_w, from_r

    def reap(self, pid: int) -> None:
        with contextlib.suppress(OSError), self.lock:
            if not self.dead:
                self.sock.send(MSG.pack(b"W", pid, 0))

    def _read(self) -> None:
        while True:
            try:
                data = self.sock.recv(MSG.size)
            except OSError:
                data = b""
            if len(data) != MSG.size:
                break
            kind, a, b = MSG.unpack(data)
            with self.cond:
                if kind == b"P":
                    proc = self.forked[a] = self.children[b] = ForkedProcess(self, b)
                elif kind == b"D":
                    proc = self.children.pop(a, None)
                    if proc is not None:
                        proc.returncode = b
                self.cond.notify_all()
        # The server is gone: its children follow it within a second; end them now.
        with self.cond:
            self.dead = True
            orphans = list(self.children.values())
            self.children.clear()
            for proc in orphans:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.returncode = -signal.SIGKILL
                proc.reaped = True  # reparented: not ours to reap
            self.cond.notify_all()

    def close(self) -> None:
        """End the server (its children follow it); waits briefly for it to go."""
        with self.lock:
            self.dead = True
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)
        if self.proc.poll() is None:
            self.proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(5)
        self.sock.close()


def can_fork() -> bool:
    return hasattr(os, "fork") and hasattr(socket, "send_fds") and hasattr(os, "waitid")


__all__ = ["ForkServer", "ForkedProcess", "can_fork"]
