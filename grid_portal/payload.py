"""Opaque payloads: what a grid task carries instead of the researcher's code.

Dask sends a task's function and arguments as pickles, and every process that reads the graph
unpickles them: the portal's scheduler when the graph arrives, the worker when the task is
assigned. A pickle can name any function to call while it is read, so whoever may send a graph
could run code in those processes. On the grid the graph the scheduler sees holds only:

- Dask's graph classes (``Task``, ``TaskRef``, ``Alias``, ``DataNode`` of plain values);
- :func:`run_opaque` as the one function tasks call (plus a few grid entry points whose
  arguments are plain bytes and data, such as a ``%%grid`` cell's task);
- :class:`OpaquePayload`: bytes that only :func:`run_opaque` opens, in the task itself, on the
  node (in its task process on a sandboxed node);
- keys and plain literals.

The client side (:func:`opaque_graph`, used by ``grid_portal.daskclient.GridDaskClient``)
rewrites every task: the original ``Task`` (function, arguments, nested tasks) is pickled with
cloudpickle into an :class:`OpaquePayload`, and the new task is
``run_opaque(payload, *dependency results)``. Dependencies still flow between tasks as ordinary
Dask data, so Dask schedules, moves and gathers them as before.

The portal side reads graphs with a restricted unpickler (``grid_portal.portal.graph_guard``)
that admits exactly these classes. This module is imported on all three sides: keep its
imports light (no ``distributed`` at import time).
"""

from __future__ import annotations

import hashlib
import pickle
from collections.abc import Callable
from typing import Any

from dask._expr import LLGExpr
from dask._task_spec import Alias, DataNode, GraphNode, Task, TaskRef

# Values a DataNode may carry in the clear: the scheduler reads them, and they run nothing.
PLAIN_TYPES = (type(None), bool, int, float, complex, str, bytes)

# What a grid graph may name (module, qualified name): the portal reads graphs with these
# (grid_portal.portal.graph_guard), a node's worker the task records the portal sends it
# (grid_portal.node.inbound). Functions listed are also the only ones a task may call
# (ENTRY_POINTS: plain arguments; run_opaque: a payload).
RUN_OPAQUE = ("grid_portal.payload", "run_opaque")
ENTRY_POINTS = frozenset(
    {
        ("grid_portal.jobs.cell_task", "run_cell_task"),  # a %%grid cell: bytes and plain data
        ("grid_portal.jobs.cell_lease_task", "run_cell_lease"),  # a cell session's lease
    }
)
GRAPH_CLASSES = frozenset(
    {
        ("dask._task_spec", "Task"),
        ("dask._task_spec", "TaskRef"),
        ("dask._task_spec", "Alias"),
        ("dask._task_spec", "DataNode"),
        ("grid_portal.payload", "OpaqueGraph"),
        ("grid_portal.payload", "OpaquePayload"),
        RUN_OPAQUE,
        *ENTRY_POINTS,
        ("builtins", "frozenset"),
        ("builtins", "set"),
        ("builtins", "complex"),
    }
)


class OpaquePayload:
    """A task's function and arguments, pickled; opened only by :func:`run_opaque`.

    ``func`` is the pickled function (empty when ``data`` holds a whole graph node), ``data``
    the rest. Tasks of one graph that call the same function share one ``func`` bytes object,
    which pickle then writes once for the whole graph (its memo goes by identity).
    """

    __slots__ = ("data", "func")

    def __init__(self, func: bytes, data: bytes) -> None:
        if type(func) is not bytes or type(data) is not bytes:
            raise TypeError("an opaque payload is two bytes objects")
        self.func = func
        self.data = data

    def __reduce__(self) -> tuple[Any, ...]:
        return (OpaquePayload, (self.func, self.data))

    def __dask_tokenize__(self) -> str:
        digest = hashlib.sha1(self.func, usedforsecurity=False)
        digest.update(self.data)
        return digest.hexdigest()

    def __sizeof__(self) -> int:
        return len(self.func) + len(self.data) + 64

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, OpaquePayload) and other.func == self.func and other.data == self.data
        )

    def __hash__(self) -> int:
        return hash((self.func, self.data))

    def __repr__(self) -> str:
        return f"<OpaquePayload {len(self.func) + len(self.data)} bytes>"


class OpaqueResult:
    """A grid task's value, pickled in the task itself: what the Dask worker holds.

    :func:`run_opaque` returns one of these, so the worker process keeps, moves and hands out
    only bytes, and never unpickles what a task made (a task's own code could craft a pickle
    that runs code where it is opened). A result is opened only by :func:`run_opaque` in a
    downstream task's process, or in the researcher's kernel (``grid_portal.safe_pickle``:
    data only, unless the node is trusted). Dask sends it with its ``pickle`` family, the
    bytes as one out-of-band frame (protocol 5: not copied), so replicas' bytes compare as
    they are. ``sizeof`` is the byte length, for Dask's memory accounting.
    """

    __slots__ = ("data",)

    def __init__(self, data: bytes | bytearray | memoryview) -> None:
        if type(data) is not bytes:
            if not isinstance(data, (bytearray, memoryview, pickle.PickleBuffer)):
                raise TypeError("an opaque result is bytes")
            data = bytes(data)
        self.data = data

    @classmethod
    def wrap(cls, value: Any) -> OpaqueResult:
        """``value`` pickled (plain pickle; cloudpickle for what lives in ``__main__``)."""
        try:
            return cls(_pickle(value))
        except Exception as exc:  # noqa: BLE001 - say what to return instead
            raise TypeError(
                f"the task's result ({type(value).__name__}) cannot be pickled to send it back "
                f"from its node: {exc}; return plain data (numbers, arrays, frames, dicts, lists)"
            ) from exc

    def open(self) -> Any:
        """The value, with plain pickle: for a task process and for trusted nodes only."""
        return pickle.loads(self.data)  # noqa: S301 - see the callers

    def __reduce_ex__(self, protocol: Any) -> tuple[Any, ...]:
        if isinstance(protocol, int) and protocol >= 5:
            return (OpaqueResult, (pickle.PickleBuffer(self.data),))
        return (OpaqueResult, (self.data,))

    def __sizeof__(self) -> int:
        return len(self.data) + 48

    def __dask_tokenize__(self) -> str:
        return hashlib.sha1(self.data, usedforsecurity=False).hexdigest()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, OpaqueResult) and other.data == self.data

    def __hash__(self) -> int:
        return hash(self.data)

    def __repr__(self) -> str:
        return f"<OpaqueResult {len(self.data)} bytes>"


class RefusedData:
    """What a node's worker keeps in place of a value it refused to open (data from another
    node, or relayed by the portal, that was neither a grid result nor plain data:
    ``grid_portal.node.inbound``). A task that needs it fails with ``reason``; nothing of the
    refused bytes is kept, so nothing of them can run later."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = str(reason)

    def __reduce__(self) -> tuple[Any, ...]:
        return (RefusedData, (self.reason,))

    def __sizeof__(self) -> int:
        return len(self.reason) + 48

    def __repr__(self) -> str:
        return f"<RefusedData: {self.reason}>"


def opened(value: Any) -> Any:
    """A dependency's value as a task sees it: an :class:`OpaqueResult` opened, else as is
    (scattered data, plain literals); a :class:`RefusedData` fails the task."""
    kind = type(value)
    if kind is OpaqueResult:
        return value.open()
    if kind is RefusedData:
        raise PermissionError(value.reason)
    return value


def run_opaque(payload: OpaquePayload, *values: Any) -> Any:
    """The one function grid tasks call: open the payload here, in the task, and run it.

    ``values`` are the results of the task's dependencies, in the order the payload names
    their keys: opaque results, opened here. The task's value goes back as an
    :class:`OpaqueResult`.
    """
    values = tuple(opened(v) for v in values)
    if payload.func:  # a plain task: its function, then (key, args, kwargs, dependency keys)
        func = pickle.loads(payload.func)
        key, args, kwargs, keys = pickle.loads(payload.data)
        node: Any = Task(key, func, *args, **kwargs)
    else:  # any other graph node, whole
        node, keys = pickle.loads(payload.data)
    result = node(dict(zip(keys, values, strict=True)) if keys else {})
    if _is_awaitable(result):  # an async task function: run it to its end here
        import asyncio

        async def _wait() -> Any:
            return await result

        result = asyncio.run(_wait())
    return OpaqueResult.wrap(result)


def _is_awaitable(value: Any) -> bool:
    return hasattr(value, "__await__") and not isinstance(value, type)


class OpaqueGraph(LLGExpr):
    """The graph expression the grid's client sends: tasks already wrapped, with their
    annotations per key (Dask's graph layers are materialized on the client)."""

    _parameters = ["dsk", "grid_annotations"]
    _defaults = {"grid_annotations": None}

    def __reduce__(self) -> tuple[Any, ...]:
        return (OpaqueGraph, (self.operand("dsk"), self.operand("grid_annotations")))

    def __dask_annotations__(self) -> dict[str, dict[Any, Any]]:
        return dict(self.operand("grid_annotations") or {})

    @property
    def deterministic_token(self) -> str:
        if not self._determ_token:
            import uuid

            self._determ_token = uuid.uuid4().hex
        return self._determ_token


# -- wrapping (the client's side) ----------------------------------------------------------------
def _pickle(obj: Any) -> bytes:
    """Plain pickle where it suffices (fast), cloudpickle for what lives in ``__main__`` (a
    notebook's functions and classes) or what plain pickle cannot take (lambdas)."""
    try:
        data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
        if b"__main__" not in data:
            return data
    except Exception:  # noqa: BLE001, S110 - cloudpickle takes more kinds of objects
        pass
    import cloudpickle

    return cloudpickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)


def _never(func: Any) -> bool:
    return False


def wrap_node(
    node: Any,
    entry_point: Callable[[Any], bool] = _never,
    functions: dict[int, tuple[Any, bytes]] | None = None,
) -> Any:
    """One graph node as the scheduler may see it: ``Alias`` and plain ``DataNode`` as they
    are, a task of a grid entry point with plain arguments as it is, anything else as
    ``run_opaque(payload, *dependencies)``."""
    if isinstance(node, Alias):
        return node
    if isinstance(node, DataNode) and isinstance(node.value, PLAIN_TYPES):
        return node
    if type(node) is Task and entry_point(node.func) and _plain_args(node):
        return _plain_refs(node)
    if not isinstance(node, GraphNode):
        raise TypeError(f"not a graph node: {type(node).__name__}")
    keys = tuple(node.dependencies)
    node = _plain_refs(node)
    if type(node) is Task:
        # The function apart, pickled once per graph (``functions``): a notebook's function
        # goes by value, and 10,000 tasks of one map need it pickled only once.
        func = node.func
        cached = functions.get(id(func)) if functions is not None else None
        if cached is None:
            cached = (func, _pickle(func))
            if functions is not None:
                functions[id(func)] = cached  # keeps func alive, so its id stays its own
        payload = OpaquePayload(cached[1], _pickle((node.key, node.args, node.kwargs, keys)))
    else:
        payload = OpaquePayload(b"", _pickle((node, keys)))
    return Task(node.key, run_opaque, payload, *(TaskRef(k) for k in keys))


def _plain_refs(node: GraphNode) -> GraphNode:
    """The node with Dask futures among its arguments turned into plain ``TaskRef``s (a
    ``Future`` unpickled in a task process would look for a client there)."""
    if not isinstance(node, Task) or not node.dependencies:
        return node
    if not any(_has_future(a) for a in (*node.args, *node.kwargs.values())):
        return node
    return node.substitute({k: TaskRef(k) for k in node.dependencies})


def _has_future(value: Any) -> bool:
    return isinstance(value, TaskRef) and type(value) is not TaskRef


def _plain_args(task: Task) -> bool:
    return all(isinstance(a, TaskRef) or is_plain(a) for a in (*task.args, *task.kwargs.values()))


def is_plain(value: Any, depth: int = 0) -> bool:
    """Plain data: literals, and lists, tuples, sets and dicts of them (bounded depth)."""
    if isinstance(value, PLAIN_TYPES):
        return type(value) in PLAIN_TYPES
    if depth > 16:
        return False
    if type(value) in (list, tuple, set, frozenset):
        return all(is_plain(v, depth + 1) for v in value)
    if type(value) is dict:
        return all(is_plain(k, depth + 1) and is_plain(v, depth + 1) for k, v in value.items())
    return False


def opaque_graph(
    expr: Any,
    keys: Any,
    entry_point: Callable[[Any], bool] = _never,
    check: Callable[[Any], None] | None = None,
) -> OpaqueGraph:
    """Materialize a Dask expression on the client and wrap every task (see the module
    docstring); the result is what the grid's client sends instead of ``expr``. ``check``
    sees each node first and may raise to refuse the graph."""
    from dask._task_spec import convert_legacy_graph

    dsk = convert_legacy_graph(expr.__dask_graph__())
    annotations = {k: dict(v) for k, v in expr.__dask_annotations__().items()}
    if isinstance(expr, LLGExpr):  # the scheduler culls these; send only what is wanted
        dsk = _cull(dsk, set(keys))
    if check is not None:
        for node in dsk.values():
            check(node)
    functions: dict[int, tuple[Any, bytes]] = {}
    wrapped = {key: wrap_node(node, entry_point, functions) for key, node in dsk.items()}
    return OpaqueGraph(wrapped, annotations)


def _cull(dsk: dict[Any, GraphNode], keys: set[Any]) -> dict[Any, GraphNode]:
    work, seen, out = set(keys), set(), {}
    while work:
        key = work.pop()
        if key in seen or key not in dsk:
            continue
        seen.add(key)
        out[key] = node = dsk[key]
        work.update(node.dependencies)
    return out


__all__ = [
    "OpaqueGraph",
    "OpaquePayload",
    "OpaqueResult",
    "RefusedData",
    "is_plain",
    "opaque_graph",
    "opened",
    "run_opaque",
    "wrap_node",
]
