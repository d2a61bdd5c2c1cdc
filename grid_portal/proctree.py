"""A process's descendants and their memory, read cheaply from /proc.

psutil finds a process's children by reading the status of every process on the machine
(2.6 ms here with ~90 processes; more on a desktop with hundreds), which is too slow for
paths every task takes: starting a task (its memory baseline), ending a cell (what it left
running) and the memory watchdog. Linux lists each thread's children in
``/proc/PID/task/TID/children`` and a process's resident size in ``/proc/PID/statm``: a few
small reads. psutil remains the fallback where those files are missing (macOS, kernels built
without them).
"""

from __future__ import annotations

import contextlib
import os

try:
    # Imported here, not where it is used: a cell's child is forked from a process that has
    # imported this module, and loading the extension in each child cost 2 ms per cell.
    import resource
except ImportError:  # not POSIX
    resource = None  # type: ignore[assignment]

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_children_files: bool | None = None  # whether /proc/PID/task/TID/children exists here


def _have_children_files() -> bool:
    global _children_files
    if _children_files is None:
        me = os.getpid()
        _children_files = os.path.exists(f"/proc/{me}/task/{me}/children")
    return _children_files


def descendants(pid: int) -> list[int]:
    """The processes ``pid`` started, and theirs (not ``pid`` itself)."""
    if not _have_children_files():
        return _descendants_psutil(pid)
    found: list[int] = []
    todo = [pid]
    while todo:
        parent = todo.pop()
        try:
            threads = os.listdir(f"/proc/{parent}/task")
        except OSError:
            continue  # it has ended
        for tid in threads:
            try:
                with open(f"/proc/{parent}/task/{tid}/children", "rb") as f:
                    kids = [int(k) for k in f.read().split()]
            except (OSError, ValueError):
                continue
            found.extend(kids)
            todo.extend(kids)
    return found


def tree_rss(pid: int) -> int:
    """Resident memory, in bytes, of ``pid`` and all its descendants (0 if it has ended)."""
    if not _have_children_files():
        return _tree_rss_psutil(pid)
    total = 0
    for member in (pid, *descendants(pid)):
        try:
            with open(f"/proc/{member}/statm", "rb") as f:
                total += int(f.read().split()[1]) * _PAGE
        except (OSError, ValueError, IndexError):
            continue  # ended meanwhile
    return total


def data_size() -> int | None:
    """The process's data segment (VmData), which RLIMIT_DATA limits; None where unknown."""
    try:
        with open("/proc/self/status", "rb") as f:  # bytes: no codec to load in a new child
            for line in f:
                if line.startswith(b"VmData:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def set_data_limit(soft: int | None, hard: int | None = None) -> None:
    if resource is None:  # not POSIX
        return
    _, current_hard = resource.getrlimit(resource.RLIMIT_DATA)
    hard = current_hard if hard is None else hard
    soft = hard if soft is None else soft
    if hard != resource.RLIM_INFINITY:
        soft = min(soft, hard) if soft != resource.RLIM_INFINITY else hard
    # A limit we may not set here is left alone; the worker's watchdog still applies.
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_DATA, (soft, hard))


def limit_data(extra: int) -> None:
    """Let this process's data segment grow by at most ``extra`` bytes from now (soft limit:
    allocations past it fail with MemoryError; the node's watchdog covers the rest)."""
    now = data_size()
    if now is not None:
        set_data_limit(now + int(extra))


def _descendants_psutil(pid: int) -> list[int]:
    with contextlib.suppress(Exception):
        import psutil

        return [p.pid for p in psutil.Process(pid).children(recursive=True)]
    return []


def _tree_rss_psutil(pid: int) -> int:
    import psutil

    try:
        root = psutil.Process(pid)
        members = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0
    total = 0
    for member in members:
        with contextlib.suppress(psutil.Error):
            total += member.memory_info().rss
    return total
