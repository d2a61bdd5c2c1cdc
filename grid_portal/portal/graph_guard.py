"""What the portal opens: graphs and pickled message fields read by restricted unpicklers.

Dask's scheduler unpickles what clients send in two places, and a pickle may name any function
to call while it is read:

1. the graph of ``update-graph`` (``expr_ser``), which ``Scheduler.update_graph`` deserializes
   with plain pickle before anything else looks at it;
2. every ``ToPickle`` field of every message on every connection (``__Pickled__`` sub-frames,
   decoded by ``distributed.protocol.core.loads`` while the comm reads the message, whatever
   its op): ``update-graph``'s ``code``, ``annotations`` and ``span_metadata``, and anything a
   peer chooses to send so.

`install` closes both in the portal process:

1. the ``update-graph`` stream handler is wrapped: the graph is read by `GraphUnpickler`, which
   admits the grid's graph as the grid's client sends it (``grid_portal.payload``: Dask's
   ``Task``/``TaskRef``/``Alias``/``DataNode``, ``OpaqueGraph``, ``OpaquePayload``,
   ``run_opaque``, and the grid's own entry points such as a ``%%grid`` cell's task) and
   nothing else. The graph is then checked node by node (the function each task calls, plain
   arguments) and rebuilt from those parts, so no state a pickle set directly (a forged
   dependency set, a coroutine flag) survives. A refused graph never reaches Dask: its keys err
   for the sending client with a `PermissionError` that says why, and the portal logs it. A
   graph that passes is handed to Dask's own handler already read (`CHECKED_FAMILY`): it is
   unpickled once, by the restricted unpickler.
2. ``distributed.protocol.core``'s ``pickle`` is replaced by a shim whose ``loads`` admits plain
   data only (`DataUnpickler`: builtins' containers and literals, Dask's ``SourceCode`` record,
   and a few data classes). A message with anything else is refused while it is read; Dask
   then closes that connection.

Nothing else in the process changes: explicit ``pickle.loads`` calls of Dask's handlers (the
admin-only ``run_on_scheduler``, plugin registration) and every outgoing message are as before.
"""

from __future__ import annotations

import io
import itertools
import logging
import os
import pickle
import threading
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from grid_portal.payload import ENTRY_POINTS, GRAPH_CLASSES, RUN_OPAQUE

if TYPE_CHECKING:
    from distributed import Scheduler

logger = logging.getLogger("grid_portal.portal.graph_guard")

# For developers: a file to which every global a pickle names is appended ("kind module name
# verdict"), to find what a new Dask version sends. Nothing is refused while it is set.
AUDIT_ENV = "GRID_PORTAL_PICKLE_AUDIT"

# What a pickled message field may name: plain data.
DATA_CLASSES = frozenset(
    {
        ("builtins", "frozenset"),
        ("builtins", "set"),
        ("builtins", "complex"),
        ("builtins", "slice"),
        ("builtins", "range"),
        ("builtins", "bytearray"),
        ("collections", "OrderedDict"),
        ("collections", "defaultdict"),
        ("datetime", "datetime"),
        ("datetime", "date"),
        ("datetime", "time"),
        ("datetime", "timedelta"),
        ("datetime", "timezone"),
        ("decimal", "Decimal"),
        ("distributed.client", "SourceCode"),
    }
)

# A refused graph's error, as its keys' error: a type every client can unpickle.
REFUSAL = (
    "the portal refused this graph: it names {what}. Graphs sent to a Grid Portal carry each "
    "task's code as an opaque payload that only the node's task process opens; send work "
    "through Grid (grid.client, grid.submit, %%grid), not a plain distributed.Client."
)

CHECKED_FAMILY = "grid-checked-graph"  # the serializer name of a graph already read here


class Refused(pickle.UnpicklingError):
    """A pickle named something outside the allow-list, or a graph broke the grid's shape."""


class _Audit:
    def __init__(self) -> None:
        path = os.environ.get(AUDIT_ENV)
        self.file = open(path, "a", buffering=1, encoding="utf-8") if path else None  # noqa: SIM115
        self.lock = threading.Lock()

    def note(self, kind: str, module: str, name: str, ok: bool) -> bool:
        """True when the pickle may go on regardless (audit mode)."""
        if self.file is None:
            return False
        with self.lock:
            self.file.write(f"{kind} {module} {name} {'ok' if ok else 'refused'}\n")
        return True


_audit = _Audit()


class _Restricted(pickle.Unpickler):
    allowed: frozenset[tuple[str, str]] = frozenset()
    kind = "pickle"

    def find_class(self, module: str, name: str) -> Any:
        ok = (module, name) in self.allowed
        if not ok and not _audit.note(self.kind, module, name, ok):
            raise Refused(f"{module}.{name}")
        if ok:
            _audit.note(self.kind, module, name, ok)
        return super().find_class(module, name)

    def persistent_load(self, pid: Any) -> Any:
        raise Refused("a persistent id")


class GraphUnpickler(_Restricted):
    """Reads a graph the grid's client sent (see the module docstring)."""

    allowed = GRAPH_CLASSES
    kind = "graph"


class DataUnpickler(_Restricted):
    """Reads a pickled message field: plain data only."""

    allowed = DATA_CLASSES
    kind = "message"


def loads_graph(data: bytes | memoryview, buffers: Any = ()) -> Any:
    return GraphUnpickler(io.BytesIO(data), buffers=buffers).load()


def loads_data(data: bytes | memoryview, *, buffers: Any = ()) -> Any:
    return DataUnpickler(io.BytesIO(data), buffers=buffers).load()


# -- the graph's shape ---------------------------------------------------------------------------
def _functions() -> tuple[Any, frozenset[Any]]:
    import importlib

    def resolve(ref: tuple[str, str]) -> Any:
        return getattr(importlib.import_module(ref[0]), ref[1])

    return resolve(RUN_OPAQUE), frozenset(resolve(ref) for ref in ENTRY_POINTS)


def _is_key(value: Any, depth: int = 0) -> bool:
    if type(value) in (str, bytes, int, float):
        return True
    return type(value) is tuple and depth < 8 and all(_is_key(v, depth + 1) for v in value)


def check_graph(expr: Any) -> Any:
    """The graph rebuilt from checked parts; raises `Refused` naming what is wrong."""
    from dask._task_spec import Alias, DataNode, Task, TaskRef

    from grid_portal.payload import OpaqueGraph, OpaquePayload, is_plain

    run_opaque, entry_points = _functions()
    if type(expr) is not OpaqueGraph:
        raise Refused(f"a graph of type {type(expr).__name__}, not the grid's OpaqueGraph")
    dsk = expr.operand("dsk")
    annotations = expr.operand("grid_annotations") or {}
    if type(dsk) is not dict:
        raise Refused("a graph that is not a dict of tasks")
    if type(annotations) is not dict or not all(
        type(k) is str and type(v) is dict and all(is_plain(x) for x in v.values())
        for k, v in annotations.items()
    ):
        raise Refused("annotations that are not plain data")

    def ref(value: Any) -> Any:
        if type(value) is TaskRef and _is_key(value.key):
            return TaskRef(value.key)
        if is_plain(value):
            return value
        raise Refused(f"a task argument of type {type(value).__name__}")

    checked: dict[Any, Any] = {}
    for key, node in dsk.items():
        if not _is_key(key) or getattr(node, "key", None) != key:
            raise Refused(f"a task whose key {key!r} is not a plain key of its own")
        kind = type(node)
        if kind is Alias:
            if not _is_key(node.target):
                raise Refused(f"an alias {key!r} to something that is not a key")
            checked[key] = Alias(key, node.target)
        elif kind is DataNode:
            if not is_plain(node.value):
                raise Refused(f"data of type {type(node.value).__name__} in the clear ({key!r})")
            checked[key] = DataNode(key, node.value)
        elif kind is Task:
            func, args, kwargs = node.func, node.args, node.kwargs
            if type(args) is not tuple or type(kwargs) is not dict:
                raise Refused(f"a malformed task {key!r}")
            if func is run_opaque:
                if kwargs or not args or type(args[0]) is not OpaquePayload:
                    raise Refused(f"task {key!r} calls run_opaque without its payload")
                payload = OpaquePayload(args[0].func, args[0].data)
                checked[key] = Task(key, run_opaque, payload, *map(_task_ref, args[1:]))
            elif _member(func, entry_points):
                new_kwargs = {str(k): ref(v) for k, v in kwargs.items()}
                checked[key] = Task(key, func, *map(ref, args), **new_kwargs)
            else:
                raise Refused(f"task {key!r} calls {getattr(func, '__name__', func)!r}")
        else:
            raise Refused(f"a graph node of type {kind.__name__} ({key!r})")
    return OpaqueGraph(checked, {k: dict(v) for k, v in annotations.items()})


def _task_ref(value: Any) -> Any:
    from dask._task_spec import TaskRef

    if type(value) is not TaskRef or not _is_key(value.key):
        raise Refused("run_opaque with an argument that is not a dependency")
    return TaskRef(value.key)


def _member(func: Any, functions: frozenset[Any]) -> bool:
    try:
        return func in functions
    except TypeError:
        return False


# -- reading update-graph ------------------------------------------------------------------------
_checked: dict[int, Any] = {}
_tokens = itertools.count(1)
_checked_lock = threading.Lock()


def _checked_loads(header: Mapping[str, Any], frames: list[Any]) -> Any:
    with _checked_lock:
        return _checked.pop(header["grid-token"])


def read_graph(header: Mapping[str, Any], frames: list[Any]) -> Any:
    """The checked graph of one ``update-graph`` message, or `Refused`."""
    if header.get("serializer") != "pickle" or "is-collection" in header:
        raise Refused(f"a graph serialized as {header.get('serializer')!r}, not pickle")
    if any(c is not None for c in header.get("compression") or ()):
        raise Refused("a compressed graph")
    if not frames:
        raise Refused("an empty graph")
    try:
        expr = loads_graph(frames[0], buffers=frames[1:])
    except Refused:
        raise
    except Exception as exc:  # noqa: BLE001 - a malformed pickle: say so, run nothing more
        raise Refused(f"a malformed pickle ({type(exc).__name__}: {exc})") from None
    return check_graph(expr)


def guard_update_graph(scheduler: Scheduler, handler: Callable[..., Any]) -> Callable[..., Any]:
    """``update-graph`` behind `read_graph` (see the module docstring)."""
    from distributed.protocol.serialize import Serialized

    async def update_graph(**msg: Any) -> Any:
        expr_ser = msg.get("expr_ser")
        client = msg.get("client")
        keys = msg.get("keys") or ()
        started = time.perf_counter()
        try:
            if not isinstance(expr_ser, Serialized):
                raise Refused("a graph that is not a serialized object")
            graph = read_graph(expr_ser.header, expr_ser.frames)
        except Refused as exc:
            _refuse(scheduler, client, keys, str(exc))
            return None
        token = next(_tokens)
        with _checked_lock:
            _checked[token] = graph
        msg["expr_ser"] = Serialized({"serializer": CHECKED_FAMILY, "grid-token": token}, [])
        logger.debug(
            "graph of %d tasks checked in %.2f ms",
            len(graph.operand("dsk")),
            (time.perf_counter() - started) * 1e3,
        )
        try:
            return await handler(**msg)
        finally:
            with _checked_lock:
                _checked.pop(token, None)  # Dask failed before reading it

    update_graph._grid_graph_guard = handler  # type: ignore[attr-defined]
    return update_graph


def _refuse(scheduler: Scheduler, client: Any, keys: Any, what: str) -> None:
    from distributed.core import error_message

    comm = getattr(scheduler.client_comms.get(client), "comm", None)
    peer = getattr(comm, "peer_address", "?")
    logger.warning("refused a graph from client %s at %s: it names %s", client, peer, what)
    try:
        raise PermissionError(REFUSAL.format(what=what))
    except PermissionError as exc:
        err = error_message(exc)
    for key in list(keys)[:100_000]:
        scheduler.report(
            {
                "op": "task-erred",
                "key": key,
                "exception": err["exception"],
                "traceback": err["traceback"],
            },
            client=client,
        )


# -- reading pickled message fields ----------------------------------------------------------------
def _message_loads(data: Any, *, buffers: Any = ()) -> Any:
    """A pickled message field, as plain data only (see the module docstring)."""
    try:
        return loads_data(data, buffers=buffers)
    except Refused as exc:
        logger.warning("refused a message field that names %s", exc)
        raise


def install(scheduler: Scheduler) -> None:
    """Put both guards in place in this (the portal's) process; see the module docstring."""
    from distributed.protocol.serialize import register_serialization_family

    from grid_portal.guard import restrict_message_pickles

    register_serialization_family(CHECKED_FAMILY, None, _checked_loads)
    restrict_message_pickles(_message_loads)
    handler = scheduler.stream_handlers["update-graph"]
    if not hasattr(handler, "_grid_graph_guard"):
        scheduler.stream_handlers["update-graph"] = guard_update_graph(scheduler, handler)


__all__ = [
    "AUDIT_ENV",
    "DataUnpickler",
    "GraphUnpickler",
    "Refused",
    "check_graph",
    "install",
    "loads_data",
    "loads_graph",
    "read_graph",
]
