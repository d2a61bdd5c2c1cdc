"""``get_client()``, ``secede()`` and ``rejoin()`` inside a grid task, in its task process.

A grid task runs in a task process (``grid_portal.node.taskchild``), not in the Dask worker,
and its node's certificate may never act as a Dask client. Dask's own functions find what they
need through duck-typed objects, which the task process provides:

- ``distributed.get_client()`` calls ``get_worker()._get_client()``: the task process's worker
  view answers with `task_client`, a Dask client for this task's job. Its key pair is made here,
  in memory; the worker asks the portal for a delegated credential (``grid_delegate``: only the
  node that runs a task of the job gets one, role ``delegate``, named for the job's owner and
  job; portal/delegation.py) and hands back the certificate. The client is a ``GridDaskClient``
  (its tasks are opaque payloads too, in the same job, owned by the researcher), and what it
  gathers is opened here, as this process opens its task's inputs.
- ``distributed.secede()`` takes this thread out of ``thread_state.executor`` (`TaskPool`) and
  tells ``worker.loop`` (`WorkerLoop`) about Dask's ``SecedeEvent``: the worker, asked over the
  task's channel, frees the task's slot for other tasks (its sub-tasks among them).
- ``distributed.rejoin()`` submits to the same pool: the worker is told the task is back.

No Dask function is replaced. The worker's half (`delegated`, `seceded`) is called by the
task processes' executor (``grid_portal.node.taskproc``) when a task asks.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterator
from typing import Any

_clients: dict[str, Any] = {}  # this process serves one job: its one delegated client
_lock = threading.Lock()


def task_client(view: Any, timeout: Any = None) -> Any:
    """The task's own Dask client (see the module docstring), made on first use."""
    with _lock:
        client = _clients.get("job")
        if client is not None and client.status not in ("closed", "closing"):
            return client
        client = _clients["job"] = _connect(view, timeout)
        return client


def _connect(view: Any, timeout: Any) -> Any:
    from distributed import Security

    from grid_portal.keys import make_key_and_csr
    from grid_portal.node.worker import _keep_out_of_reach

    key_pem, csr = make_key_and_csr("task")
    # Other jobs' tasks on this node run as the same user: from now on they can neither read
    # this process's memory nor its memory files (/proc/PID/mem, fd/), as for the worker.
    _keep_out_of_reach()
    granted = view.grid_emit("delegate", {"csr": csr})
    paths = _in_memory({"ca": granted["ca"], "cert": granted["cert"], "key": key_pem})
    security = Security(
        tls_ca_file=paths["ca"],
        tls_client_cert=paths["cert"],
        tls_client_key=paths["key"],
        require_encryption=True,
    )
    return _client_class()(
        granted["scheduler"],
        security=security,
        set_as_default=False,
        timeout=timeout if timeout is not None else 30,
        direct_to_workers=False,  # through the portal: a task reaches no worker directly
    )


def _in_memory(pems: dict[str, str]) -> dict[str, str]:
    """PEM text -> ``/proc/self/fd/N`` paths of memory files: the task's key is never written
    to the sandbox's disk, where the job's other processes could read it."""
    paths = {}
    for name, text in pems.items():
        fd = os.memfd_create(f"grid-task-{name}")
        os.write(fd, text.encode())
        paths[name] = f"/proc/self/fd/{fd}"
    return paths


def _client_class() -> type:
    """A job's own client inside one of its tasks: results come back opened, as the task's
    inputs are (their bytes are the job's own tasks' values). Made on first use: importing
    Dask's client costs half a second."""
    from grid_portal.daskclient import GridDaskClient
    from grid_portal.payload import opened

    class TaskDaskClient(GridDaskClient):
        # Dask hands these the task's worker (get_worker()) to read and write its data in
        # place; a task process holds none, so everything goes through the portal.
        async def _gather(self, futures: Any, *args: Any, **kwargs: Any) -> Any:
            kwargs["local_worker"] = None
            return _open_all(await super()._gather(futures, *args, **kwargs), opened)

        async def _scatter(self, data: Any, *args: Any, **kwargs: Any) -> Any:
            kwargs["local_worker"] = None
            return await super()._scatter(data, *args, **kwargs)

        # Keys of its own (Dask names pure tasks by their inputs): a task of the same name
        # that another job submitted stays that job's, out of this credential's reach.
        def submit(self, func: Any, *args: Any, **kwargs: Any) -> Any:
            kwargs.setdefault("pure", False)
            return super().submit(func, *args, **kwargs)

        def map(self, func: Any, *iterables: Any, **kwargs: Any) -> Any:
            kwargs.setdefault("pure", False)
            return super().map(func, *iterables, **kwargs)

    return TaskDaskClient


def _open_all(value: Any, opened: Any) -> Any:
    kind = type(value)
    if kind in (list, tuple, set):
        return kind(_open_all(v, opened) for v in value)
    if kind is dict:
        return {k: _open_all(v, opened) for k, v in value.items()}
    return opened(value)


# -- secede and rejoin ------------------------------------------------------------------------
@contextlib.contextmanager
def task_thread(view: Any, key: Any) -> Iterator[None]:
    """What Dask's ``secede()`` and ``rejoin()`` read in a task's thread: its key and start
    (Dask's thread state) and its pool (the thread pool's own thread state)."""
    from distributed import threadpoolexecutor
    from distributed.utils import set_thread_state

    pool_state = threadpoolexecutor.thread_state
    pool_state.executor, pool_state.proceed = TaskPool(view), True
    try:
        with set_thread_state(key=key, start_time=time.time()):
            yield
    finally:
        del pool_state.executor


class TaskPool:
    """What ``thread_state.executor`` is for a task in its task process: Dask's ``secede``
    removes the thread from ``_threads``; Dask's ``rejoin`` submits to it and waits."""

    def __init__(self, view: Any) -> None:
        self.view = view
        self._threads = {threading.current_thread()}
        self._rejoin_lock = threading.Lock()
        self._rejoin_list: list[tuple[threading.Thread, threading.Event]] = []

    def _adjust_thread_count(self) -> None:
        """Nothing to start here: the worker runs the next task in a process of its own."""

    def submit(self, fn: Any, *args: Any, **kwargs: Any) -> None:
        self.view.grid_emit("rejoin", {})
        with self._rejoin_lock:
            waiting, self._rejoin_list = self._rejoin_list, []
        for thread, event in waiting:
            self._threads.add(thread)
            event.set()


class WorkerLoop:
    """What ``get_worker().loop`` is in a task process: Dask's ``secede`` hands it the worker's
    ``SecedeEvent``, which goes to the real worker over the task's channel."""

    def __init__(self, view: Any) -> None:
        self.view = view

    def add_callback(self, callback: Any, event: Any = None, *args: Any) -> None:
        duration = getattr(event, "compute_duration", None)
        self.view.grid_emit("secede", {"duration": float(duration or 0.0)})


def handle_stimulus(*events: Any) -> None:
    """Stands for the worker's method in a task process (WorkerLoop forwards the event)."""


# -- the worker's half (grid_portal.node.taskproc forwards a task's messages here) -------------
async def delegated(worker: Any, key: Any, csr: str) -> dict[str, str]:
    """A delegated credential for the job of ``key``, which this worker runs: asked of the
    portal on the worker's own connection (the portal checks that this node runs the task),
    with what the task needs to connect (the portal's CA certificate and address)."""
    reply = await worker.scheduler.grid_delegate(key=key, csr=csr)
    with open(worker.security.tls_ca_file, encoding="utf-8") as ca:
        return {"cert": reply["cert"], "ca": ca.read(), "scheduler": worker.scheduler.address}


def seceded(worker: Any, key: Any, duration: float) -> None:
    """Dask's SecedeEvent for a task that waits on other tasks: its slot is free meanwhile."""
    from distributed.metrics import time
    from distributed.worker_state_machine import SecedeEvent

    event = SecedeEvent(key=key, compute_duration=duration, stimulus_id=f"grid-secede-{time()}")
    worker.loop.add_callback(worker.handle_stimulus, event)


__all__ = [
    "TaskPool",
    "WorkerLoop",
    "delegated",
    "handle_stimulus",
    "seceded",
    "task_client",
    "task_thread",
]
