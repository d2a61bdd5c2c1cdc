"""Adaptive batching for sweeps of many small items.

Every Dask task costs a few hundred microseconds at the scheduler and a trip through a node's
task process, so a sweep of 10,000 tiny items run one task per item is held to Dask's task
rate (a few hundred to about a thousand items per second here), not to the nodes' speed.
``Grid.map(fn, items)`` therefore groups items into batch tasks, each running about
``TARGET_SECONDS`` of work, and hands back one future-like :class:`ItemFuture` per item:

1. **probe**: the first ``PROBE_ITEMS`` items go as tasks of one item each, before ``map``
   returns. The node times each item it runs (the time of ``fn`` alone, without the task's
   start) and reports it with the item's result;
2. **size**: once the first probe is back (a thread waits for it, so ``map`` returns at once
   and a node's slow first start costs nothing but that wait), a batch size that makes a
   batch run about ``TARGET_SECONDS``, from the fastest probe item, but at most so large
   that every CPU slot of the grid still gets ``TASKS_PER_SLOT`` batches (work balanced over
   the nodes); items of 100 ms or more go one per task, as Dask would send them;
3. **the rest** go as batch tasks (``run_batch``): each runs its items in a loop inside one
   task and keeps each item's result, or its exception with the node's traceback text, apart.

Per item, as before: ``result()``, ``exception()``, ``done()``, ``cancel()``, ``key``,
``grid.gather(futures)`` (in input order; the first failing item raises its own exception)
and :func:`as_completed`. One failing item fails only itself. Cancelling a sweep
(``grid.cancel(job_id)``, :meth:`Sweep.cancel`, or every item of a batch) cancels its batch
tasks, and a node ends a cancelled task's process at once.

Progress per item: a batch task carries the ``grid_items`` annotation (how many items it
holds), and the probes carry ``grid_sweep_items`` (how many items are still to come), so the
portal's job counts items, knows the sweep's total from its first task and does not call the
job done between the probe and the rest (``grid_portal.portal.jobs``). An item that raised
inside a batch that finished counts as failed: the batch task says how many of its items raised
(``note_failed_items``: Dask's task metadata, sent with its completion; the portal never opens
the results themselves), and the job ends failed; the error is the item's own in the kernel.

What comes back from a node is plain data (floats, strings, bytes): each item's value is
pickled on its own on the node and opened here as data only (``grid_portal.safe_pickle``),
or with plain pickle when the node that ran its batch is trusted, so one item that carries
something else fails only itself. This module is imported in task processes on nodes: no
``distributed`` import at module level.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import pickle
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from grid_portal.errors import RemoteError, UntrustedResult, UsageError
from grid_portal.model import CPU
from grid_portal.protocol import FAILED_ITEMS_METADATA

TARGET_SECONDS = 0.1  # how long one batch task should run
PROBE_ITEMS = 2  # items sent as tasks of their own to time the function
TASKS_PER_SLOT = 2  # batches per CPU slot at least, so that nodes share the work evenly
MAX_BATCH_ITEMS = 10_000
AUTO_MIN_ITEMS = 32  # batch="auto" batches sweeps of at least this many items
# ``Grid.map`` keywords that are Dask's and go to the tasks, not to the function.
TASK_KEYWORDS = frozenset(
    {"retries", "priority", "workers", "allow_other_workers", "fifo_timeout", "resources"}
)
# Keywords with which batching does not go: the caller names keys or wants Dask's own map.
UNBATCHED_KEYWORDS = frozenset({"key", "actor", "actors"})


# -- the node's side --------------------------------------------------------------------------
def run_batch(calls: Sequence[tuple[Any, ...]], fn: bytes, kwargs: dict[str, Any]) -> list[Any]:
    """Run ``fn(*args, **kwargs)`` for each ``args`` of ``calls``, in this task, one by one.

    Returns one entry per item, plain data only: ``(seconds, value_bytes)`` for a result,
    ``(seconds, None, exception_bytes_or_None, type_name, message, traceback_text)`` for an
    exception. ``seconds`` is the time ``fn`` took for that item.
    """
    func = pickle.loads(fn)  # noqa: S301 - the researcher's own function, in its task
    out: list[Any] = []
    clock = time.perf_counter
    for args in calls:
        started = clock()
        try:
            value = func(*args, **kwargs)
            if hasattr(value, "__await__") and not isinstance(value, type):
                value = _run_awaitable(value)
            seconds = clock() - started
            out.append((seconds, _dumps(value)))
        except Exception as exc:  # noqa: BLE001 - the item's own error, kept for it
            seconds = clock() - started
            out.append((seconds, None, *_error_entry(exc)))
    _say_failed(sum(1 for entry in out if entry[1] is None))
    return out


def _say_failed(count: int) -> None:
    """Tell the portal, through this task's worker, how many items raised: the task itself
    finished, and the portal counts the items inside it as done unless told. Outside a grid
    worker (a test, a plain Dask worker) there is no one to tell."""
    if not count:
        return
    from distributed import get_worker
    from distributed.worker import thread_state

    try:
        worker = get_worker()
    except ValueError:
        return
    emit = getattr(worker, "grid_emit", None)
    with contextlib.suppress(Exception):  # the items' own errors still reach the researcher
        if emit is not None:  # a sandboxed task process: its channel to the worker
            emit("failed_items", {"count": count})
        else:  # in the worker itself
            note_failed_items(worker, thread_state.key, count)


def note_failed_items(worker: Any, key: Any, count: int) -> None:
    """Record in the worker's state of a batch task how many of its items raised: Dask sends a
    task's ``metadata`` with its completion, and the portal counts those items as failed
    (they are inside the task's opaque value, which nothing on the way opens)."""
    ts = worker.state.tasks.get(key)
    if ts is not None:
        ts.metadata[FAILED_ITEMS_METADATA] = count


def _run_awaitable(value: Any) -> Any:
    import asyncio

    async def _wait() -> Any:
        return await value

    return asyncio.run(_wait())


def _dumps(value: Any) -> bytes:
    from grid_portal.payload import _pickle

    return _pickle(value)


def _error_entry(exc: BaseException) -> tuple[bytes | None, str, str, str]:
    try:
        data: bytes | None = pickle.dumps(exc, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception:  # noqa: BLE001 - the text below still says what happened
        data = None
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    return data, type(exc).__name__, str(exc)[:2000], text[-20_000:]


# -- deciding -------------------------------------------------------------------------------
def batch_mode(
    batch: int | str | None, calls: list[tuple[Any, ...]], replicas: int, kwargs: dict[str, Any]
) -> int | str | None:
    """What ``Grid.map(..., batch=)`` does with these items: ``None`` for one task per item
    (Dask's own map), ``"auto"`` to probe and size, or a fixed number of items per batch.
    Refuses (UsageError) an explicit batch size with what batching cannot do."""
    if batch is None:
        batch = "auto"
    if isinstance(batch, str):
        if batch != "auto":
            raise UsageError(f"batch={batch!r}: give 'auto', 1 (no batching) or a number of items")
    elif isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise UsageError(f"batch={batch!r}: give 'auto', 1 (no batching) or a number of items")
    if batch == 1:
        return None
    why_not = _why_not(calls, replicas, kwargs)
    if batch == "auto":
        return None if why_not or len(calls) < AUTO_MIN_ITEMS else "auto"
    if why_not:
        raise UsageError(f"batch={batch} {why_not}; leave batch out (or batch=1) for that")
    return min(int(batch), MAX_BATCH_ITEMS)


def _why_not(calls: list[tuple[Any, ...]], replicas: int, kwargs: dict[str, Any]) -> str | None:
    if replicas > 1:
        return "does not go with replicas (each item's copies are compared on their own)"
    named = sorted(UNBATCHED_KEYWORDS & kwargs.keys())
    if named:
        return f"does not go with {named[0]}= (a key or actor per item)"
    from distributed import Future

    for args in calls:
        if any(isinstance(a, Future) for a in args):
            return "does not go with futures among the items (one task per item depends on each)"
    return None


def batch_size(per_item: float | None, remaining: int, slots: int) -> int:
    """Items per batch: about TARGET_SECONDS of work, but at least TASKS_PER_SLOT batches per
    slot where there are enough items, and one item per batch without a timing."""
    if per_item is None or remaining <= 0:
        return 1
    size = int(TARGET_SECONDS / max(per_item, 1e-7))
    balanced = math.ceil(remaining / (max(1, slots) * TASKS_PER_SLOT))
    return max(1, min(size, balanced, MAX_BATCH_ITEMS))


# -- the kernel's side ------------------------------------------------------------------------
class Sweep(list):
    """The per-item futures ``Grid.map`` returns when it batches (a list, in input order),
    plus what concerns the whole sweep: ``cancel()``, its Dask ``tasks`` (probes and batches),
    ``batch_size`` and ``per_item`` (seconds, from the probe), once the rest was sent.

    The probe items go before ``map`` returns; the rest is sent from a thread once the first
    probe is back (``bound`` is set then), so ``map`` never waits for a node.
    """

    def __init__(self, grid: Any, token: str) -> None:
        super().__init__()
        self.grid = grid
        self.token = token
        self.tasks: list[Any] = []
        self.batch_size: int | None = None
        self.per_item: float | None = None
        self.bound = threading.Event()  # every item knows its task
        self.failure: BaseException | None = None  # why the rest could not be sent
        self.cancelled = False
        self._entries: dict[str, list[Any]] = {}  # task key -> its entries (plain data)
        self._nodes: dict[str, str | None] = {}  # task key -> the node that ran it
        self._cancelled: set[str] = set()  # item keys cancelled by the caller
        self._members: dict[str, list[ItemFuture]] = {}  # task key -> its items
        self._callbacks: list[tuple[ItemFuture, Callable[[ItemFuture], Any]]] = []
        self._lock = threading.Lock()

    def cancel(self) -> None:
        """Cancel the whole sweep: every batch, sent or still to send (a node ends a running
        batch's process at once)."""
        with self._lock:
            self.cancelled = True
            self._cancelled.update(item.key for item in self)
            tasks = list(self.tasks)
        if tasks:
            self.grid.client.cancel(tasks)

    def wait_bound(self, timeout: float | None = None) -> None:
        if not self.bound.wait(timeout):
            raise TimeoutError("the sweep's batches were not sent yet")
        if self.failure is not None:
            raise self.failure

    def _bind(self, item: ItemFuture, task: Any, index: int) -> None:
        item.task, item.index = task, index
        self._members.setdefault(task.key, []).append(item)

    def _finish_binding(self) -> None:
        with self._lock:
            callbacks, self._callbacks = self._callbacks, []
            self.bound.set()
            cancelled = [
                k
                for k, items in self._members.items()
                if all(i.key in self._cancelled for i in items)
            ]
        for item, fn in callbacks:
            item.add_done_callback(fn)
        if cancelled:
            self.grid.client.cancel([t for t in self.tasks if t.key in set(cancelled)])

    # -- opening a task's entries ------------------------------------------------------------
    def entries(self, task: Any, timeout: float | None = None) -> list[Any]:
        entries = self._entries.get(task.key)
        if entries is None:
            entries = task.result(timeout=timeout)
            with self._lock:
                entries = self._entries.setdefault(task.key, entries)
        return entries

    def node_of(self, task: Any) -> str | None:
        if task.key not in self._nodes:
            from grid_portal.safe_pickle import _node_names

            client = self.grid.client
            try:
                who_has = client.who_has([task])
                addresses = {a for holders in who_has.values() for a in holders}
                names = client.sync(_node_names, client, addresses)
                self._nodes[task.key] = next(iter(names)) if len(names) == 1 else None
            except Exception:  # noqa: BLE001 - an unknown node is not a trusted one
                self._nodes[task.key] = None
        return self._nodes[task.key]

    def value(self, item: ItemFuture, entry: Any) -> Any:
        from grid_portal.safe_pickle import loads_data

        try:
            return loads_data(entry[1])
        except UntrustedResult as refused:
            node = self.node_of(item.task)
            if node is not None and node in self.grid.trust:
                return pickle.loads(entry[1])  # noqa: S301 - a node the researcher trusts
            raise refused from None

    def error(self, item: ItemFuture, entry: Any) -> BaseException:
        """An item's exception: rebuilt if it is a builtin one (or the node is trusted), with
        the node's traceback text; else a RemoteError that carries that text."""
        from grid_portal.safe_pickle import loads_exception

        data, type_name, message, text = entry[2:6]
        lines = text.rstrip("\n").splitlines() if isinstance(text, str) else []
        exc: Any = None
        if data is not None:
            try:
                exc = loads_exception(data)
            except Exception:  # noqa: BLE001 - refused or unreadable: the text still says
                node = self.node_of(item.task) if self.grid.trust else None
                if node is not None and node in self.grid.trust:
                    with contextlib.suppress(Exception):
                        exc = pickle.loads(data)  # noqa: S301 - a trusted node
        if isinstance(exc, BaseException):
            _note_remote(exc, lines)
            return exc
        return RemoteError(str(type_name), str(message), lines)


def _note_remote(exc: BaseException, lines: list[str]) -> None:
    """Keep the node's traceback text with a rebuilt exception (``remote_traceback``, and a
    note that IPython and the traceback module show)."""
    if not lines:
        return
    with contextlib.suppress(Exception):  # some exceptions take no attributes
        exc.remote_traceback = "\n".join(lines)  # type: ignore[attr-defined]
        exc.add_note("on the node:\n" + "\n".join(lines))


class ItemFuture:
    """One item of a batched sweep: a future-like view of its place in a batch task
    (``task``, ``index``; None until the sweep's rest was sent)."""

    __slots__ = ("index", "key", "sweep", "task")

    def __init__(self, sweep: Sweep, key: str) -> None:
        self.sweep, self.key = sweep, key
        self.task: Any = None
        self.index = 0

    @property
    def status(self) -> str:
        sweep = self.sweep
        if self.key in sweep._cancelled:
            return "cancelled"
        if self.task is None:
            return "error" if sweep.failure is not None else "pending"
        status = self.task.status
        if status == "finished":
            entries = sweep._entries.get(self.task.key)
            if entries is not None and entries[self.index][1] is None:
                return "error"
        return status

    def done(self) -> bool:
        if self.key in self.sweep._cancelled:
            return True
        if self.task is None:
            return self.sweep.failure is not None
        return self.task.done()

    def cancelled(self) -> bool:
        return self.status == "cancelled"

    def cancel(self) -> None:
        """Cancel this item; its batch task is cancelled once all its items are."""
        sweep = self.sweep
        with sweep._lock:
            sweep._cancelled.add(self.key)
            task = self.task
            mates = sweep._members.get(task.key, ()) if task is not None else ()
            whole = bool(mates) and all(i.key in sweep._cancelled for i in mates)
        if whole:
            task.cancel()

    def _entry(self, timeout: float | None) -> Any:
        from distributed import CancelledError

        if self.key in self.sweep._cancelled:
            raise CancelledError(self.key)
        deadline = None if timeout is None else time.monotonic() + timeout
        self.sweep.wait_bound(timeout)
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        return self.sweep.entries(self.task, left)[self.index]

    def result(self, timeout: float | None = None) -> Any:
        entry = self._entry(timeout)
        if entry[1] is None:
            raise self.sweep.error(self, entry)
        return self.sweep.value(self, entry)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        from distributed import CancelledError

        if self.key in self.sweep._cancelled:
            return CancelledError(self.key)
        try:
            entry = self._entry(timeout)
        except TimeoutError:
            raise
        except Exception as exc:  # noqa: BLE001 - the batch's own failure is the item's
            return exc
        return self.sweep.error(self, entry) if entry[1] is None else None

    @property
    def seconds(self) -> float | None:
        """How long the function ran for this item on the node (None until it ran)."""
        entries = self.sweep._entries.get(self.task.key) if self.task is not None else None
        return float(entries[self.index][0]) if entries is not None else None

    def add_done_callback(self, fn: Callable[[ItemFuture], Any]) -> None:
        sweep = self.sweep
        with sweep._lock:
            if self.task is None:
                sweep._callbacks.append((self, fn))
                return
        self.task.add_done_callback(lambda _task: fn(self))

    def __repr__(self) -> str:
        return f"<ItemFuture: {self.status}, key: {self.key}>"


def holds_items(futures: Any) -> bool:
    return isinstance(futures, list | tuple) and any(isinstance(f, ItemFuture) for f in futures)


def _tasks_of(futures: Iterable[Any]) -> dict[str, Any]:
    """The Dask futures behind ``futures`` (each sweep's rest sent first), by key."""
    from distributed import Future

    for sweep in {id(f.sweep): f.sweep for f in futures if isinstance(f, ItemFuture)}.values():
        sweep.wait_bound()
    tasks: dict[str, Any] = {}
    for f in futures:
        task = f.task if isinstance(f, ItemFuture) else f
        if isinstance(task, Future):
            tasks.setdefault(task.key, task)
    return tasks


def gather_items(grid: Any, futures: Sequence[Any]) -> list[Any]:
    """``grid.gather`` of a list that holds item futures (and maybe Dask futures): one round
    trip for all their batch tasks; values in the list's order; the first failing item (in
    that order) raises its own exception."""
    from distributed import CancelledError, Future

    tasks = _tasks_of(futures)
    _wait(list(tasks.values()))
    finished = [t for t in tasks.values() if t.status == "finished"]
    values = dict(zip([t.key for t in finished], grid.client.gather(finished), strict=True))
    out = []
    for f in futures:
        if not isinstance(f, ItemFuture):
            if isinstance(f, Future):
                if f.key not in values:
                    f.result()  # raises the task's own error
                out.append(values[f.key])
            else:
                out.append(f)
            continue
        if f.key in f.sweep._cancelled:
            raise CancelledError(f.key)
        if f.task.key not in values:
            f.task.result()  # raises the batch's error (cancelled, node lost, ...)
        with f.sweep._lock:
            entries = f.sweep._entries.setdefault(f.task.key, values[f.task.key])
        entry = entries[f.index]
        if entry[1] is None:
            raise f.sweep.error(f, entry)
        out.append(f.sweep.value(f, entry))
    return out


def as_completed(futures: Iterable[Any]) -> Iterator[Any]:
    """Yield the given item futures (or Dask futures) as their tasks finish."""
    from distributed import as_completed as dask_as_completed

    futures = list(futures)
    tasks = _tasks_of(futures)
    by_task: dict[str, list[Any]] = {}
    for f in futures:
        by_task.setdefault((f.task if isinstance(f, ItemFuture) else f).key, []).append(f)
    for task in dask_as_completed(list(tasks.values())):
        yield from by_task[task.key]


# -- sending a sweep ----------------------------------------------------------------------------
def map_batched(
    grid: Any,
    fn: Callable[..., Any],
    calls: list[tuple[Any, ...]],
    mode: int | str,
    resources: dict[str, float],
    kwargs: dict[str, Any],
) -> Sweep:
    """Send a sweep in batches (see the module docstring); runs inside the sweep's job."""
    from grid_portal.payload import _pickle
    from grid_portal.protocol import SWEEP_ANNOTATION

    task_kw = {k: kwargs.pop(k) for k in list(kwargs) if k in TASK_KEYWORDS}
    task_kw["resources"] = resources
    for dropped in ("pure", "batch_size"):
        kwargs.pop(dropped, None)
    sender = _Sender(grid, _pickle(fn), _key_name(fn), kwargs, task_kw)
    sweep = sender.sweep
    sweep.extend(
        ItemFuture(sweep, f"{sender.name}-{sweep.token}-item-{i}") for i in range(len(calls))
    )
    if mode != "auto":
        sender.send(calls, 0, int(mode))
        sweep.batch_size = int(mode)
        sweep._finish_binding()
        return sweep
    probes = calls[:PROBE_ITEMS]
    rest = len(calls) - len(probes)
    sender.send(probes, 0, 1, {SWEEP_ANNOTATION: rest} if rest else {})
    if not rest:
        sweep.batch_size = 1
        sweep._finish_binding()
        return sweep
    # The rest goes from a thread once a probe is back, under this call's annotations (its
    # job, placement): a copy of this context carries them.
    context = contextvars.copy_context()
    threading.Thread(
        target=context.run,
        args=(sender.send_rest, calls, len(probes)),
        name=f"grid-sweep-{sweep.token}",
        daemon=True,
    ).start()
    return sweep


class _Sender:
    def __init__(
        self,
        grid: Any,
        fn: bytes,
        name: str,
        kwargs: dict[str, Any],
        task_kw: dict[str, Any],
    ) -> None:
        self.grid, self.fn, self.name, self.kwargs, self.task_kw = grid, fn, name, kwargs, task_kw
        self.sweep = Sweep(grid, uuid.uuid4().hex[:12])
        self.n_tasks = 0

    def send(
        self,
        calls: list[tuple[Any, ...]],
        first: int,
        size: int,
        annotations: dict[str, Any] | None = None,
    ) -> list[Any]:
        """Send items ``first``... of the sweep (``calls``) in batches of ``size``."""
        import dask

        from grid_portal.protocol import ITEMS_ANNOTATION

        sweep, sent = self.sweep, []
        start = 0
        while start < len(calls):
            full = (len(calls) - start) // size
            step = size if full else len(calls) - start
            count = full * size if full else step
            chunks = [calls[i : i + step] for i in range(start, start + count, step)]
            keys = [
                f"{self.name}-batch-{sweep.token}-{self.n_tasks + j}" for j in range(len(chunks))
            ]
            marks = dict(annotations or {})
            if step > 1:
                marks[ITEMS_ANNOTATION] = step
            with dask.annotate(**marks):
                tasks = self.grid.client.map(
                    run_batch,
                    chunks,
                    key=keys,
                    fn=self.fn,
                    kwargs=self.kwargs,
                    pure=False,
                    **self.task_kw,
                )
            self.n_tasks += len(tasks)
            with sweep._lock:
                sweep.tasks.extend(tasks)
            for j, task in enumerate(tasks):
                base = first + start + j * step
                for i in range(len(chunks[j])):
                    sweep._bind(sweep[base + i], task, i)
            sent.extend(tasks)
            start += count
        return sent

    def send_rest(self, calls: list[tuple[Any, ...]], first: int) -> None:
        """In a thread: wait for the first probe, size the batches, send the rest."""
        sweep = self.sweep
        probes = list(sweep.tasks)
        try:
            sweep.per_item = _probe(sweep, probes)
            with sweep._lock:
                stopped = sweep.cancelled
            lost = next((p for p in probes if p.status == "cancelled"), None)
            if stopped or lost is not None:
                # The sweep (or its job) was cancelled: the rest is cancelled with it.
                for item in sweep[first:]:
                    sweep._bind(item, lost or probes[0], 0)
                    sweep._cancelled.add(item.key)
                return
            sweep.batch_size = batch_size(
                sweep.per_item, len(calls) - first, _slots(self.grid, self.task_kw["resources"])
            )
            self.send(calls[first:], first, sweep.batch_size)
            with sweep._lock:
                stopped = sweep.cancelled
            if stopped:
                self.grid.client.cancel(sweep.tasks)
        except BaseException as exc:  # noqa: BLE001 - every waiting item raises it
            sweep.failure = exc
        finally:
            sweep._finish_binding()


def _probe(sweep: Sweep, probes: list[Any]) -> float | None:
    """The fastest item time the node reported for the first probe(s) back: ``map`` waits
    for one to finish (or be cancelled), then takes every one back by then."""
    _wait(probes, return_when="FIRST_COMPLETED")
    times = []
    for task in probes:
        if task.status != "finished":
            continue
        try:
            times.extend(float(e[0]) for e in sweep.entries(task))
        except Exception:  # noqa: BLE001, S112 - a probe that failed as a task times nothing
            continue
    return min(times) if times else None


def _wait(tasks: list[Any], **kwargs: Any) -> None:
    """``distributed.wait``, for which a cancelled task is an answer too, not an error.

    ``wait`` runs on Dask's current client, not on the tasks' own: with several Grids in one
    process (one per portal) another Grid's client waited for these tasks, and saw them end
    only on its own next wake-up, up to seconds later. The tasks' client is made current."""
    from distributed import wait
    from distributed.client import FuturesCancelledError

    if not tasks:
        return
    with contextlib.suppress(FuturesCancelledError), tasks[0].client.as_current():
        wait(tasks, **kwargs)


def _slots(grid: Any, resources: dict[str, float]) -> int:
    """How many items the grid runs at once: its online cores over the cores an item asks."""
    try:
        cores = grid.capacity().cores_total
    except Exception:  # noqa: BLE001 - a guess is enough for balancing
        cores = 1
    per_item = resources.get(CPU, 1) or 1
    return max(1, int(cores / per_item))


def _key_name(fn: Any) -> str:
    name = getattr(fn, "__name__", None) or type(fn).__name__
    return "".join(c if c.isalnum() or c in "_." else "_" for c in str(name))[:40] or "item"


__all__ = [
    "ItemFuture",
    "Sweep",
    "as_completed",
    "batch_mode",
    "batch_size",
    "gather_items",
    "holds_items",
    "map_batched",
    "run_batch",
]
