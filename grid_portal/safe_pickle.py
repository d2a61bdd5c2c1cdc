"""What a researcher's kernel opens: data, never code, from nodes it does not trust.

A pickle names functions to call while it is read, so opening one that a volunteer's machine
made runs whatever that machine chose, in the researcher's kernel. Everything that comes back
from a node is therefore opened with :func:`loads_data`, an unpickler whose ``find_class``
admits an allow-list of data types (builtins and containers, numbers, strings and bytes,
datetime, Decimal, Fraction, UUID, numpy arrays of non-object dtype, pandas frames, series
and indexes) and refuses every other global *before* it is looked up, so nothing outside
the list is ever imported or called. A refused value raises :class:`UntrustedResult`, naming
the type it carried; results from nodes in the researcher's :class:`Trust` setting are
opened with plain pickle, as before.

Dask opens what it receives itself (its serialization families); :func:`attach` makes a
``distributed.Client`` open node data through this module too (see its docstring). No Dask
import at module level: the kernel imports this on every ``%%grid`` cell.
"""

from __future__ import annotations

import _compat_pickle
import contextlib
import contextvars
import importlib
import io
import os
import pickle
import sys
import threading
from collections.abc import Callable, Iterable
from typing import Any

from grid_portal.errors import RemoteError, UntrustedResult

TRUST_ENV = "GRID_PORTAL_TRUST"  # comma-separated node names the kernel trusts; "*" = all

# -- the allow-list ---------------------------------------------------------------------------
_BUILTINS = {
    "list", "dict", "tuple", "set", "frozenset", "bytes", "bytearray", "str", "int", "float",
    "complex", "bool", "slice", "range", "object", "NoneType", "Ellipsis", "NotImplemented",
}  # fmt: skip
_NUMPY_CORE = {"_reconstruct", "scalar", "_frombuffer"}
_PANDAS_TOP = {
    "DataFrame", "Series", "Index", "RangeIndex", "MultiIndex", "DatetimeIndex",
    "TimedeltaIndex", "PeriodIndex", "CategoricalIndex", "IntervalIndex", "Categorical",
    "CategoricalDtype", "StringDtype", "BooleanDtype", "DatetimeTZDtype", "PeriodDtype",
    "IntervalDtype", "Int8Dtype", "Int16Dtype", "Int32Dtype", "Int64Dtype", "UInt8Dtype",
    "UInt16Dtype", "UInt32Dtype", "UInt64Dtype", "Float32Dtype", "Float64Dtype", "Timestamp",
    "Timedelta", "Period", "Interval", "NaT",
    "NA",  # the missing value of pandas' string columns (StringDtype's na_value): a singleton
}  # fmt: skip
ALLOWED: dict[str, frozenset[str]] = {
    "builtins": frozenset(_BUILTINS),
    "copyreg": frozenset({"_reconstructor"}),  # protocol < 2 objects; the class still checked
    "_codecs": frozenset({"encode"}),  # how protocol < 3 writes bytes
    "collections": frozenset({"OrderedDict", "defaultdict", "deque", "Counter"}),
    "datetime": frozenset({"date", "time", "datetime", "timedelta", "timezone"}),
    "decimal": frozenset({"Decimal"}),
    "fractions": frozenset({"Fraction"}),
    "uuid": frozenset({"UUID", "SafeUUID"}),
    "numpy": frozenset({"ndarray", "dtype"}),
    "numpy.core.multiarray": frozenset(_NUMPY_CORE),
    "numpy._core.multiarray": frozenset(_NUMPY_CORE),
    "numpy.core.numeric": frozenset(_NUMPY_CORE),
    "numpy._core.numeric": frozenset(_NUMPY_CORE),
    "pandas": frozenset(_PANDAS_TOP),
    "pandas.arrays": frozenset(
        {
            "DatetimeArray",
            "TimedeltaArray",
            "PeriodArray",
            "StringArray",
            "ArrowStringArray",
            "ArrowExtensionArray",
            "BooleanArray",
            "IntegerArray",
            "FloatingArray",
            "IntervalArray",
            "Categorical",
        }
    ),  # fmt: skip
    # A module a cell imported (cloudpickle's reference to it): only one this process has
    # imported already, so that nothing is imported, and so run, on a node's word.
    "cloudpickle.cloudpickle": frozenset({"subimport"}),
    # Arrow-backed columns (pandas' strings when pyarrow is installed); arrays rebuilt from
    # buffers are validated in full (``_arrow_array``), so bad offsets are an error.
    "pyarrow.lib": frozenset({"_restore_array", "py_buffer", "type_for_alias"}),
    # The grid's own plain-data record of a workflow's files (a path, bytes, a checksum; no
    # __setstate__ of its own): paths are checked again where they are written. Its home is
    # jobs/stage_task.py; nodes running a version from before that split name jobs/workflow.py.
    "grid_portal.jobs.stage_task": frozenset({"StagedFile"}),
    "grid_portal.jobs.workflow": frozenset({"StagedFile"}),
    "pandas.core.indexes.base": frozenset({"_new_Index"}),
    "pandas.core.indexes.datetimes": frozenset({"_new_DatetimeIndex"}),
    "pandas.core.indexes.period": frozenset({"_new_PeriodIndex"}),
    "pandas.core.internals.managers": frozenset({"BlockManager", "SingleBlockManager"}),
    "pandas._libs.internals": frozenset({"_unpickle_block"}),
    "pandas._libs.arrays": frozenset({"__pyx_unpickle_NDArrayBacked"}),
    "pandas._libs.tslibs.timestamps": frozenset({"_unpickle_timestamp"}),
    "pandas._libs.tslibs.timedeltas": frozenset({"_timedelta_unpickle"}),
    "pandas._libs.tslibs.nattype": frozenset({"__nat_unpickle"}),
    "pandas._libs.tslibs.offsets": frozenset(
        {
            "Day",
            "Hour",
            "Minute",
            "Second",
            "Milli",
            "Micro",
            "Nano",
            "Week",
            "MonthEnd",
            "MonthBegin",
            "QuarterEnd",
            "QuarterBegin",
            "YearEnd",
            "YearBegin",
            "BusinessDay",
            "DateOffset",
        }
    ),  # fmt: skip
}
# Exceptions: builtin ones are rebuilt (so ``except ValueError`` works); any other arrives as
# a RemoteError with the node's traceback text. The cell task's own error type and Dask's
# word that a worker died are plain data too.
_EXCEPTIONS: dict[str, frozenset[str]] = {
    "grid_portal.jobs.cell_payload": frozenset({"CellFailed"}),
    "grid_portal.jobs.cell": frozenset({"CellFailed"}),  # nodes from before the split
    "grid_portal.jobs.stage_task": frozenset({"TaskFailed"}),
    "grid_portal.jobs.workflow": frozenset({"TaskFailed"}),  # nodes from before the split
    "distributed.scheduler": frozenset({"KilledWorker"}),
    "grid_portal.errors": frozenset({"NodeLost"}),  # the portal's word that a node was lost
    # How Dask pickles exceptions (tblib): the exception class still comes through find_class
    # and the node's frames are dropped (``_no_traceback``); its text travels separately.
    "tblib.pickling_support": frozenset(
        {"unpickle_exception_with_attrs", "unpickle_exception", "unpickle_traceback"}
    ),
    "tblib": frozenset({"Frame", "Code", "Traceback"}),
}
_PLAIN_FACTORIES = (list, dict, set, int, float, str, tuple, bytes, frozenset, complex, bool)


class _Refused(Exception):
    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


class _DataUnpickler(pickle.Unpickler):
    exceptions = False

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _compat_pickle.NAME_MAPPING:  # Python 2 names (protocol < 3)
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        if name in ALLOWED.get(module, ()) or (
            self.exceptions and name in _EXCEPTIONS.get(module, ())
        ):
            if name == "unpickle_traceback":
                return _no_traceback
            if name == "_restore_array":
                return _arrow_array
            if name == "subimport":
                return _imported_module
            return getattr(importlib.import_module(module), name)
        if self.exceptions and module == "builtins":
            import builtins

            obj = getattr(builtins, name, None)
            if isinstance(obj, type) and issubclass(obj, BaseException):
                return obj
        raise _Refused(f"{module}.{name}")


def _imported_module(name: Any) -> Any:
    module = sys.modules.get(name) if isinstance(name, str) else None
    if module is None:
        raise _Refused(f"module {name} (not imported in this kernel)")
    return module


def _arrow_array(data: Any) -> Any:
    from pyarrow.lib import _restore_array

    array = _restore_array(data)
    array.validate(full=True)
    return array


def _no_traceback(*args: Any) -> None:
    """tblib would rebuild the node's frames by compiling code; the kernel keeps none."""


def loads_data(data: bytes | memoryview, buffers: Iterable[Any] | None = None) -> Any:
    """Open a pickle as data only; raise :class:`UntrustedResult` naming anything else.

    Nothing outside the allow-list is imported or called: every global a pickle names goes
    through ``find_class`` first, and the refusal happens there.
    """
    return _load(data, buffers, exceptions=False)


def loads_exception(data: bytes | memoryview) -> BaseException:
    """An exception pickled on a node: builtin exception types and plain data only."""
    exc = _load(data, None, exceptions=True)
    if not isinstance(exc, BaseException):
        raise UntrustedResult(
            f"the node sent {type(exc).__name__} where an exception was expected; it was not opened"
        )
    return exc


class _ExceptionUnpickler(_DataUnpickler):
    exceptions = True


def _load(data: Any, buffers: Iterable[Any] | None, exceptions: bool) -> Any:
    value = load_with(_ExceptionUnpickler if exceptions else _DataUnpickler, data, buffers)
    _check(value)
    return value


def untrusted(type_name: str, nodes: Iterable[str] = ()) -> UntrustedResult:
    """The refusal, naming the type and how to trust the node(s) it came from."""
    named = sorted(set(nodes))
    where = f"node {', '.join(named)}" if named else "a node you do not trust"
    listed = ", ".join(repr(n) for n in named) or "'NODE'"
    return UntrustedResult(
        f"refused a result from {where}: it carries {type_name}, and a kernel opens only data "
        "(numbers, strings, containers, numpy arrays, pandas frames) from nodes it does not "
        f"trust. If you trust the node, connect with Grid(trust=[{listed}]) or set "
        f"{TRUST_ENV}={','.join(named) or 'NODE'} (docs/security.md); or bring back plain "
        "data instead",
        type_name=type_name,
    )


def _check(value: Any) -> None:
    """What find_class cannot see: numpy arrays of object dtype outside pandas (whose string
    columns are object arrays of allowed values), and defaultdicts whose factory is not a
    plain type. Walks containers only, without recursion."""
    stack, seen = [value], set()
    while stack:
        item = stack.pop()
        kind = type(item)
        if kind in (list, tuple, set, frozenset):
            if id(item) not in seen:
                seen.add(id(item))
                stack.extend(item)
        elif isinstance(item, dict):
            if id(item) not in seen:
                seen.add(id(item))
                stack.extend(item.keys())
                stack.extend(item.values())
                factory = getattr(item, "default_factory", None)
                if factory is not None and factory not in _PLAIN_FACTORIES:
                    raise untrusted(f"collections.defaultdict of {_name_of(factory)}")
        elif kind.__module__ == "numpy" and kind.__name__ == "ndarray" and item.dtype.hasobject:
            raise untrusted("numpy.ndarray of object dtype")


def _name_of(obj: Any) -> str:
    kind = obj if isinstance(obj, type) else type(obj)
    return f"{kind.__module__}.{kind.__qualname__}"


# -- trust ------------------------------------------------------------------------------------
class Trust:
    """The nodes whose results a kernel opens with plain pickle (functions, classes, any
    object) and whose rich output it shows unsanitised.

    From, together: ``Grid(trust=[...])``, the ``GRID_PORTAL_TRUST`` environment variable
    (comma-separated names) and, on the embedded portal, this machine's own volunteer. ``"*"``
    trusts every node (a grid of one's own machines). Node names are bound to the node's
    certificate by the portal, so a node cannot take another's name. Labels are not a basis
    for trust: volunteers choose their own.
    """

    def __init__(self, names: Iterable[str] | str | None = None, env: bool = True) -> None:
        self.names: set[str] = set()
        if isinstance(names, str):
            names = [names]
        self.add(*(names or ()))
        if env:
            self.add(*os.environ.get(TRUST_ENV, "").split(","))

    def add(self, *names: str) -> None:
        self.names.update(n.strip() for n in names if n and n.strip())

    def discard(self, *names: str) -> None:
        self.names.difference_update(names)

    @property
    def everyone(self) -> bool:
        return "*" in self.names

    def __contains__(self, node: object) -> bool:
        return self.everyone or (isinstance(node, str) and node in self.names)

    def all(self, nodes: Iterable[str | None]) -> bool:
        """Whether every one of ``nodes`` is trusted (and there is at least one)."""
        nodes = list(nodes)
        return bool(nodes) and all(n in self for n in nodes)

    def __bool__(self) -> bool:
        return bool(self.names)

    def __repr__(self) -> str:
        return f"Trust({sorted(self.names)!r})"


# -- Dask's side ------------------------------------------------------------------------------
class UntrustedData:
    """Stands for a value Dask received in a data-only client and that is not plain data; it
    holds the bytes unopened. ``open()`` opens them as Dask would have (plain pickle): the
    Grid does so for results held by trusted nodes, and raises UntrustedResult otherwise."""

    __slots__ = ("family", "frames", "header", "type_name")

    def __init__(self, family: str, header: dict[str, Any], frames: list[Any], type_name: str):
        self.family, self.header, self.frames, self.type_name = family, header, frames, type_name

    def open(self) -> Any:
        from distributed.protocol.serialize import dask_loads, pickle_loads

        from grid_portal.payload import opened

        loads = pickle_loads if self.family == "pickle" else dask_loads
        return opened(loads(self.header, self.frames))  # a task's OpaqueResult, opened

    def __repr__(self) -> str:
        return f"<unopened result from a node: {self.type_name}>"


# Set by a data-only client's deserializers (see _DataFamilies) for the one load that follows,
# in the thread that does it; and, as a context variable, for the client's own tasks (its
# stream of messages from the portal), which offloaded reads inherit.
_next_load = threading.local()
_GUARDED: contextvars.ContextVar[bool] = contextvars.ContextVar("grid_data_only", default=False)
_installed = threading.Lock()
_FAMILIES = ("pickle", "dask")


class _DataFamilies(tuple):
    """A client's ``deserializers``: the usual families, but Dask's check of a family (made
    right before it loads with it, in the same thread) marks that load as data-only."""

    def __contains__(self, name: object) -> bool:
        found = tuple.__contains__(self, name)
        _next_load.active = bool(found and name in _FAMILIES)
        return found


def _install_families() -> None:
    """Wrap Dask's ``pickle`` and ``dask`` families once per process: loads marked data-only
    go through :func:`_data_family_loads`; every other load is Dask's own, unchanged."""
    serialize = importlib.import_module("distributed.protocol.serialize")  # not the function

    with _installed:
        for family in _FAMILIES:
            dumps, loads, _ = serialize.families[family]
            if getattr(loads, "_grid_data_only", False):
                continue

            def guarded(header: Any, frames: Any, _family: str = family, _loads: Any = loads):
                marked = getattr(_next_load, "active", False)
                _next_load.active = False
                if marked or _GUARDED.get():
                    return _data_family_loads(_family, header, frames)
                return _loads(header, frames)

            guarded._grid_data_only = True  # type: ignore[attr-defined]
            serialize.register_serialization_family(family, dumps, guarded)


def _data_family_loads(family: str, header: dict[str, Any], frames: list[Any]) -> Any:
    try:
        return load_family(family, header, frames)
    except UntrustedResult as exc:
        return UntrustedData(family, header, frames, exc.type_name)


def load_family(
    family: str, header: dict[str, Any], frames: list[Any], *, open_results: bool = True
) -> Any:
    """A value Dask's ``pickle`` or ``dask`` family sent, read as data only (UntrustedResult
    naming anything else). ``open_results``: a grid task's ``OpaqueResult`` is opened too
    (a kernel); else it stays closed (a node's worker, which never opens results)."""
    from distributed.protocol.serialize import dask_deserialize

    if family == "pickle":
        return _load_result(frames[0], frames[1:], open_results=open_results)
    kind = loads_data(header["type-serialized"])
    if not isinstance(kind, type):
        raise untrusted(_name_of(kind))
    sub = header.get("sub-header") or {}
    name = f"{kind.__module__}.{kind.__name__}"
    if name == "numpy.ndarray" and sub.get("pickle"):
        return loads_data(frames[0], buffers=frames[1:])  # Dask's path for object arrays
    if name in ("numpy.ndarray", "builtins.bytes", "builtins.bytearray"):
        return dask_deserialize.dispatch(kind)(sub, frames)
    raise untrusted(name)


class ResultUnpickler(_DataUnpickler):
    """Data, and the grid's opaque result type (bytes; its constructor takes nothing else).
    ``extra``: further (module, name) pairs a subclass admits."""

    extra: frozenset[tuple[str, str]] = frozenset()

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("grid_portal.payload", "OpaqueResult"):
            from grid_portal.payload import OpaqueResult

            return OpaqueResult
        if (module, name) in self.extra:
            return getattr(importlib.import_module(module), name)
        return super().find_class(module, name)


def _load_result(data: Any, buffers: Iterable[Any], *, open_results: bool = True) -> Any:
    """A value a node holds, as Dask's pickle family sent it. A grid task's value is an
    ``OpaqueResult`` (the node's worker never opened it): with ``open_results`` its bytes are
    opened here, as data only; UntrustedResult for anything else, as for any value."""
    value = load_with(ResultUnpickler, data, buffers)
    from grid_portal.payload import OpaqueResult

    if type(value) is OpaqueResult:
        return loads_data(value.data) if open_results else value
    _check(value)
    return value


def load_with(
    unpickler: type[pickle.Unpickler], data: Any, buffers: Iterable[Any] | None = ()
) -> Any:
    """``data`` read by ``unpickler`` (one of this module's); UntrustedResult on a refusal."""
    try:
        return unpickler(io.BytesIO(data), buffers=buffers).load()
    except _Refused as refused:
        raise untrusted(refused.name) from None


def _data_client_kwargs() -> dict[str, Any]:
    """Keyword arguments for ``distributed.Client`` that make its requests data-only."""
    _install_families()
    return {"deserializers": _DataFamilies(("dask", "pickle", "msgpack", "error"))}


@contextlib.contextmanager
def data_only() -> Any:
    """Tasks started inside (a client's connection and stream reader) open node data as data
    only. Wrap the construction of a ``distributed.Client`` in it."""
    _install_families()
    token = _GUARDED.set(True)
    try:
        yield
    finally:
        _GUARDED.reset(token)


def attach(
    client: Any,
    trusted: Callable[[list[str]], bool],
    everyone: Callable[[], bool] = lambda: False,
) -> None:
    """Make a ``distributed.Client`` (made inside :func:`data_only`, with
    :func:`_data_client_kwargs`) hand back only data from untrusted nodes.

    - gathered results (``Future.result``, ``gather``, ``as_completed``): a value that is not
      plain data is opened with plain pickle when every worker holding the keys asked for is
      trusted (``trusted(node_names)``), else the call raises UntrustedResult;
    - a task's exception (opened by Dask with plain pickle): rebuilt if it is a builtin
      exception, else a RemoteError naming what it carried (Dask does not say which node
      raised it, so only ``everyone()``, a trust of all nodes, opens it as before);
    - a task's result type (Dask unpickles it for ``Future.type``): data-only.

    Like ``PushedResults.attach``, this uses the client's handler tables (Dask offers no
    public hook there); a client without them is left as it is.
    """
    original_gather = client._gather

    async def gather(futures: Any, *args: Any, data_only: bool = False, **kwargs: Any) -> Any:
        result = await original_gather(futures, *args, **kwargs)
        if data_only or not _holds_unopened(result):
            return result  # data_only: what is not plain data stays unopened, whoever is trusted
        from distributed.client import futures_of

        keys = [f.key for f in futures_of(futures)]
        who_has = await client.scheduler.who_has(keys=keys)
        addresses = {a for holders in who_has.values() for a in holders}
        nodes = await _node_names(client, addresses)
        if trusted(sorted(nodes)):
            return _open_all(result)
        raise untrusted(_first_unopened(result).type_name, nodes)

    client._gather = gather
    streams = getattr(client, "_stream_handlers", None)
    states = getattr(client, "_state_handlers", None)
    if not isinstance(streams, dict) or not isinstance(states, dict):
        return
    original_erred, original_memory = streams["task-erred"], streams["key-in-memory"]

    def erred(key: Any = None, exception: Any = None, traceback: Any = None, **kw: Any) -> None:
        if not everyone():
            exception, traceback = safe_task_error(exception, traceback)
        original_erred(key=key, exception=exception, traceback=traceback, **kw)

    def in_memory(key: Any = None, type: Any = None, **kw: Any) -> None:  # noqa: A002
        kind = None
        if isinstance(type, bytes | bytearray | memoryview):
            with contextlib.suppress(Exception):
                kind = loads_data(type)
        original_memory(key=key, type=None, **kw)
        state = client.futures.get(key)
        if state is not None and kind is not None and not state.type:
            state.type = kind

    streams["task-erred"], streams["key-in-memory"] = erred, in_memory
    states["erred"], states["memory"] = erred, in_memory


async def _node_names(client: Any, addresses: set[str]) -> set[str]:
    """The node names of worker addresses, as the portal knows them (names are bound to the
    nodes' certificates); an address it does not know stays an address (never trusted)."""
    names = {}
    with contextlib.suppress(Exception):  # a plain Dask scheduler has no grid_nodes
        for node in await client.scheduler.grid_nodes():
            if node.get("address"):
                names[node["address"]] = str(node["name"])
    return {names.get(a, a) for a in addresses}


def safe_task_error(exception: Any, traceback: Any) -> tuple[BaseException, Any]:
    """Dask's pickled exception and traceback from a task, opened as data only."""
    text = None
    if isinstance(traceback, bytes | bytearray | memoryview):
        with contextlib.suppress(Exception):
            opened = loads_data(traceback)
            text = opened if isinstance(opened, str) else None
    if isinstance(exception, UntrustedData):
        return _refused_error(exception.type_name, text), None
    if isinstance(exception, bytes | bytearray | memoryview):
        try:
            return loads_exception(exception), None
        except UntrustedResult as exc:
            return _refused_error(exc.type_name, text), None
        except Exception:  # noqa: BLE001 - a pickle that does not load is not an exception
            return RemoteError("Exception", "(the node's exception could not be read)", []), None
    if isinstance(exception, BaseException):
        return exception, None
    return RemoteError("Exception", str(exception)[:500], _lines(text)), None


def _refused_error(type_name: str, text: str | None) -> RemoteError:
    return RemoteError(
        "RemoteError",
        f"the task raised an exception that is not a builtin one (it carries {type_name}); "
        f"it was not opened here. Trust all nodes (Grid(trust='*'), {TRUST_ENV}=*) to get "
        "it as raised, or raise a builtin exception",
        _lines(text),
    )


def _lines(text: str | None) -> list[str]:
    return text.rstrip("\n").splitlines() if text else []


def _holds_unopened(value: Any) -> bool:
    return _first_unopened(value) is not None


def _first_unopened(value: Any) -> UntrustedData | None:
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, UntrustedData):
            return item
        if type(item) in (list, tuple, set, frozenset):
            stack.extend(item)
        elif type(item) is dict:
            stack.extend(item.values())
    return None


def _open_all(value: Any) -> Any:
    if isinstance(value, UntrustedData):
        return value.open()
    if type(value) in (list, tuple, set, frozenset):
        return type(value)(_open_all(v) for v in value)
    if type(value) is dict:
        return {k: _open_all(v) for k, v in value.items()}
    return value
