"""Tasks that put the user's code in a process of their own, and the limits they carry there.

A volunteer's executor (``grid_portal.node.taskproc``) runs each grid task in a task process,
so that pausing, moving, cancelling and memory limits reach it. A ``%%grid`` cell's task
(``grid_portal.jobs.cell_task.run_cell_task``) already runs the cell in a fresh child process of
its own, so a task process around it would be a second hop on every cell (about 1.3 ms of a
trivial cell's round trip here) and a second process per cell. Such a task is *self-isolating*:
the executor runs it in a worker thread instead and hands it a :class:`Confinement`, the
limits a task process would have had (nice value, memory) and a callback through which the
executor learns the child's pid, so that its pause, move, cancel and memory watch reach the
child exactly as they reach a task process.

Only functions registered here, by identity, are treated so; the registry is filled by the
modules that define them, when the worker imports them to run their tasks.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

_RUNNERS: set[Any] = set()
_local = threading.local()


def self_isolating(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Mark ``fn`` as a task function that runs the user's code in its own child process."""
    _RUNNERS.add(fn)
    return fn


def is_self_isolating(fn: Any) -> bool:
    try:
        return fn in _RUNNERS
    except TypeError:  # an unhashable callable
        return False


@dataclass(frozen=True)
class Confinement:
    """What a node asks of the process a self-isolating task starts."""

    nice: int  # run at this niceness (the owner's programs come first)
    memory_limit: int  # bytes the task may add (RLIMIT_DATA in the child); 0: no limit
    started: Callable[[int], None]  # tell the node the child's pid (it leads its own group)
    # The job's own HOME, TMPDIR and working directory on this node (node/taskproc.py), for
    # the child to enter before it runs the user's code: {"env": {...}, "cwd": path}.
    workdir: dict[str, Any] | None = None
    # Tell the node that child has ended, for a task that starts one after another (a cell
    # session's lease, jobs/cell_lease_task.py): the node stops watching and signalling it.
    ended: Callable[[int], None] | None = None


def current() -> Confinement | None:
    """The confinement of the task running in this thread, if the node set one."""
    return getattr(_local, "confinement", None)


@contextlib.contextmanager
def confined(confinement: Confinement) -> Iterator[None]:
    _local.confinement = confinement
    try:
        yield
    finally:
        _local.confinement = None
