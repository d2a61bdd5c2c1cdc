"""``GridDaskClient``: a ``distributed.Client`` whose graphs carry opaque payloads.

``Grid.client`` is one of these. It is a drop-in ``distributed.Client``: ``submit``, ``map``,
``compute``/``persist`` of delayed, bag, array and dataframe collections, ``gather``,
``as_completed`` and ``progress`` work as with Dask's own. The one difference is the graph it
sends: every one of those calls ends in ``Client._graph_to_futures``, which turns a Dask
expression into the ``update-graph`` message. Here the expression is materialized first, on
the client (as the scheduler would otherwise do), and every task is wrapped by
``grid_portal.payload.opaque_graph``: the portal's scheduler then reads only Dask's graph
classes, ``run_opaque`` and bytes, with a restricted unpickler, and refuses anything else
(``grid_portal.portal.graph_guard``).

Two things differ from a plain client, both because a grid task runs in a task process of its
own and never inside the Dask worker:

- Dask's P2P shuffles and rechunks run inside the worker (its shuffle extension), so a graph
  with P2P steps is refused here with a clear message; dataframes shuffle with
  ``method="tasks"`` by default (unless ``dataframe.shuffle.method`` is set), which works
  across nodes, where Dask's own default without a default client ("disk") does not.
- Inside a task, ``get_client()``/``secede()``/``rejoin()`` need the worker (and a client
  certificate on the node); see docs/security.md.
"""

from __future__ import annotations

import contextlib
import functools
import uuid
from collections.abc import Iterator
from typing import Any

import dask
from distributed import Client

from grid_portal.isolation import is_self_isolating
from grid_portal.joblib_compat import is_joblib_batch, run_joblib_batch
from grid_portal.payload import OpaqueResult, is_plain, opaque_graph
from grid_portal.protocol import (
    JOB_ANNOTATION,
    JOB_KIND_ANNOTATION,
    JOB_NAME_ANNOTATION,
    JOB_OPEN_ANNOTATION,
)

P2P_REFUSAL = (
    "this graph uses Dask's P2P {what} (task {key!r}), which runs inside the Dask worker; grid "
    "tasks run in their own processes on the node. Use method='tasks' (for example "
    "df.shuffle(..., shuffle_method='tasks'), x.rechunk(..., method='tasks'), or "
    "dask.config.set({{'dataframe.shuffle.method': 'tasks', 'array.rechunk.method': 'tasks'}}))"
)


def _refuse_p2p(node: Any) -> None:
    module = getattr(getattr(node, "func", None), "__module__", None) or ""
    if module.startswith("distributed.shuffle"):
        what = "rechunk" if "rechunk" in module else "shuffle"
        raise ValueError(P2P_REFUSAL.format(what=what, key=node.key))


@contextlib.contextmanager
def _grid_methods() -> Iterator[None]:
    """Shuffle dataframes with tasks unless the user chose a method."""
    if dask.config.get("dataframe.shuffle.method", None):
        yield
        return
    with dask.config.set({"dataframe.shuffle.method": "tasks"}):
        yield


def _closed(data: Any) -> Any:
    """What ``scatter`` is given, with each value that is not plain data pickled here into an
    ``OpaqueResult`` (the shape of ``data`` kept: Dask scatters a dict's, list's, tuple's or
    set's items one by one)."""
    kind = type(data)
    if kind is dict:
        return {k: _closed_value(v) for k, v in data.items()}
    if kind in (list, tuple, set, frozenset):
        return kind(_closed_value(v) for v in data)
    if isinstance(data, tuple) and hasattr(data, "_fields"):  # a namedtuple: its items
        return kind(*(_closed_value(v) for v in data))
    if isinstance(data, (Iterator, range)):
        return [_closed_value(v) for v in data]
    return _closed_value(data)


def _closed_value(value: Any) -> Any:
    return value if is_plain(value) or type(value) is OpaqueResult else OpaqueResult.wrap(value)


class GridDaskClient(Client):
    """A ``distributed.Client`` that sends each task's code as an opaque payload.

    ``session_job``: the id of the interactive-session job (``Grid`` sets it) that plain Dask
    work sent outside any ``grid.job(...)`` joins, as ``Grid.submit`` calls do, so that it is
    counted, listed and cancellable like any grid work (and a node gives it the workspace of
    that job instead of one per task).
    """

    session_job: str | None = None

    def _graph_to_futures(self, expr: Any, keys: Any, *args: Any, **kwargs: Any) -> Any:
        # Tasks that run the user's code in a process of their own (a %%grid cell's task,
        # grid_portal.isolation) go as they are: their arguments are bytes and plain data
        # (checked in opaque_graph), and the node must see which function they call.
        with _grid_methods():
            graph = opaque_graph(expr, keys, is_self_isolating, check=_refuse_p2p)
        if self.session_job is None or JOB_ANNOTATION in dask.get_annotations():
            return super()._graph_to_futures(graph, keys, *args, **kwargs)
        session = {
            JOB_ANNOTATION: self.session_job,
            JOB_NAME_ANNOTATION: "interactive session",
            JOB_KIND_ANNOTATION: "task",
            JOB_OPEN_ANNOTATION: True,
        }
        with dask.annotate(**session):
            return super()._graph_to_futures(graph, keys, *args, **kwargs)

    def submit(self, func: Any, *args: Any, **kwargs: Any) -> Any:
        if is_joblib_batch(func):  # joblib's dask backend: see grid_portal/joblib_compat.py
            kwargs.setdefault("key", f"{type(func).__name__}-{uuid.uuid4().hex}")
            func = functools.partial(run_joblib_batch, func)
        return super().submit(func, *args, **kwargs)

    async def _scatter(self, data: Any, *args: Any, **kwargs: Any) -> Any:
        # A node's worker opens only plain data and grid results (grid_portal.node.inbound):
        # anything else travels closed, opened by the task that uses it, like a task's value.
        return await super()._scatter(_closed(data), *args, **kwargs)

    def compute(self, *args: Any, **kwargs: Any) -> Any:
        with _grid_methods():
            return super().compute(*args, **kwargs)

    def persist(self, *args: Any, **kwargs: Any) -> Any:
        with _grid_methods():
            return super().persist(*args, **kwargs)

    def get(self, *args: Any, **kwargs: Any) -> Any:
        with _grid_methods():
            return super().get(*args, **kwargs)


__all__ = ["GridDaskClient"]
