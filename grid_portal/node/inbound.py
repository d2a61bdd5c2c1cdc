"""What a volunteer's worker opens: data and the portal's task records, never code.

A Dask worker reads what reaches it with Dask's serialization families, and some of them
unpickle: ``pickle`` (values), ``dask`` (the type named in its header) and every ``ToPickle``
field of a message (``__Pickled__`` sub-frames). Dask reads a whole message before any handler
or the protocol's gate sees its op. A worker's peers are the portal's scheduler and other
volunteers' workers (``grid_portal.protocol``), and a volunteer can patch its own node: a
crafted pickle in its answer to ``get_data`` (a dependency another node fetches), or in any
request it sends, would run that volunteer's code in another volunteer's worker, the process
that holds that node's key. `install` makes this process read all of it as data:

- Worker-to-worker data travels in the grid's own family, `NODE_FAMILY`: a grid task's value
  (an ``OpaqueResult``, bytes the worker never opens) as its raw bytes, rebuilt without
  unpickling; any other value (plain data: a cell's outcome, bytes or data the researcher
  scattered) pickled and read back by the kernel's data-only unpickler
  (``grid_portal.safe_pickle``), opaque results left closed. The worker asks its peers for
  this family only (`NODE_DESERIALIZERS`, its Dask ``deserializers``): honest nodes never
  send worker-to-worker data as pickle.
- Every other family this process has (Dask's ``pickle``, ``dask``, ``cuda``...; not
  ``msgpack`` and ``error``, which load no code) reads data only, whoever used it: a peer that
  ignored what was asked, a scatter the portal relays. Opaque results stay closed; plain, numpy
  and pandas data load; anything else becomes a ``RefusedData`` that fails the task needing it
  with the reason (``grid_portal.payload.opened``). Dask cannot recover a fetch that fails to
  deserialize (the waiting task waits for ever, dask/distributed#6705), so a refusal is a
  value, not an error.
- ``ToPickle`` fields admit the grid's task records (the portal's ``compute-task`` carries
  Dask's graph classes, ``run_opaque``, payloads and entry points:
  ``grid_portal.payload.GRAPH_CLASSES``), opaque results and plain data; anything else is
  refused while the message is read, and Dask drops that connection.

Explicit ``pickle.loads`` calls in Dask's handlers (the admin's ``client.run`` and plugins,
which only the portal's scheduler may relay: protocol.py) are as before.
"""

from __future__ import annotations

import logging
import pickle
from typing import Any

from grid_portal.errors import UntrustedResult
from grid_portal.payload import GRAPH_CLASSES, OpaqueResult, RefusedData
from grid_portal.safe_pickle import ResultUnpickler, load_family, load_with

logger = logging.getLogger("grid_portal.node.inbound")

NODE_FAMILY = "grid-node"
# Families that load no code, left as Dask has them.
INERT_FAMILIES = frozenset({NODE_FAMILY, "msgpack", "error"})
REASON_LIMIT = 300  # characters of a refusal a peer names


def _refused(what: str) -> RefusedData:
    """The placeholder for a refused value, with the reason its task will fail with."""
    what = "".join(c for c in str(what) if c.isprintable())[:REASON_LIMIT]
    logger.warning("refused data from another node or relayed by the portal: %s", what)
    return RefusedData(
        f"a dependency of this task reached its node as {what}, which a node never opens: only "
        "grid results and plain data pass between nodes. It was not opened and nothing in it "
        "ran; the node that held it may be patched (run with replicas, or trust fewer nodes)"
    )


# -- the grid's family ---------------------------------------------------------------------------
def node_dumps(value: Any) -> tuple[dict[str, Any], list[Any]]:
    if type(value) is OpaqueResult:
        return {"grid": "opaque"}, [value.data]
    if type(value) is RefusedData:
        return {"grid": "refused", "reason": value.reason}, []
    buffers: list[pickle.PickleBuffer] = []
    try:
        data = pickle.dumps(value, protocol=5, buffer_callback=buffers.append)
    except Exception:  # noqa: BLE001 - the receiver is told what could not come
        return {"grid": "unsendable", "type": type(value).__qualname__}, []
    return {"grid": "data"}, [data, *(b.raw() for b in buffers)]


def node_loads(header: dict[str, Any], frames: list[Any]) -> Any:
    form = header.get("grid")
    if form == "opaque" and len(frames) == 1:
        return OpaqueResult(frames[0])
    if form == "data" and frames:
        return _data(lambda: load_family("pickle", header, frames, open_results=False))
    if form == "refused":  # a node that refused it passes the refusal on
        return RefusedData(str(header.get("reason", ""))[: REASON_LIMIT * 2])
    if form == "unsendable":
        return _refused(f"a {header.get('type')!s} its node could not send")
    return _refused(f"data in an unknown form ({form!r})")


def _data(load: Any) -> Any:
    try:
        return load()
    except UntrustedResult as exc:
        return _refused(exc.type_name)
    except Exception as exc:  # noqa: BLE001 - malformed bytes: refused, never half-opened
        return _refused(f"malformed data ({type(exc).__name__})")


class NodeFamilies(tuple):
    """A worker's ``deserializers``: it asks peers for `NODE_FAMILY` (what this tuple holds),
    and reads data a peer sent in any other registered family too, as data (`install`)."""

    def __contains__(self, name: object) -> bool:
        from distributed.protocol.serialize import families

        return isinstance(name, str) and name in families


NODE_DESERIALIZERS = NodeFamilies((NODE_FAMILY,))


# -- Dask's families and message fields, data only ------------------------------------------------
def _guarded_family(family: str) -> Any:
    def loads(header: dict[str, Any], frames: list[Any]) -> Any:
        if family in ("pickle", "dask"):
            return _data(lambda: load_family(family, header, frames, open_results=False))
        return _refused(f"data in Dask's {family!r} form")

    loads._grid_node_inbound = True  # type: ignore[attr-defined]
    return loads


class _TaskRecordUnpickler(ResultUnpickler):
    """A ``ToPickle`` field: the portal's task records, opaque results and plain data."""

    extra = GRAPH_CLASSES


def _message_loads(data: Any, *, buffers: Any = ()) -> Any:
    try:
        return load_with(_TaskRecordUnpickler, data, buffers)
    except UntrustedResult as exc:
        logger.warning("refused a message field that names %s", exc.type_name)
        raise pickle.UnpicklingError(
            f"refused a message field that names {exc.type_name}: a node opens only the "
            "portal's task records and plain data"
        ) from None


def install() -> None:
    """Make this process (a volunteer's worker) read what it receives as data (see the module
    docstring). Idempotent; call it before the worker starts."""
    from distributed.protocol.serialize import families, register_serialization_family

    from grid_portal.guard import restrict_message_pickles

    register_serialization_family(NODE_FAMILY, node_dumps, node_loads)
    for family, (dumps, loads, _) in list(families.items()):
        if family not in INERT_FAMILIES and not getattr(loads, "_grid_node_inbound", False):
            register_serialization_family(family, dumps, _guarded_family(family))
    restrict_message_pickles(_message_loads)


__all__ = ["NODE_DESERIALIZERS", "NODE_FAMILY", "install", "node_dumps", "node_loads"]
