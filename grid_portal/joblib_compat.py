"""joblib's dask backend on grid nodes.

joblib's dask backend sends each batch as ``_TracebackCapturingWrapper(Batch(...))``, and
``Batch.__call__`` enters ``parallel_config(backend="dask")`` on the worker so that nested
``Parallel`` calls go back to the cluster. That builds a ``DaskDistributedBackend``, which
calls ``get_client()``: a grid task runs in its own process on the node, where there is no
worker and a node certificate may not act as a client, so every batch failed.
``GridDaskClient.submit`` runs such batches through :func:`run_joblib_batch` instead, which
first makes "dask" mean joblib's sequential backend in the task process: the batch's own
calls run as they would, nested ``Parallel`` calls run in line. No Dask import here; joblib
only where a joblib batch runs.
"""

from __future__ import annotations

from typing import Any


def is_joblib_batch(func: Any) -> bool:
    kind = type(func)
    return kind.__name__ == "_TracebackCapturingWrapper" and kind.__module__.startswith("joblib")


def run_joblib_batch(wrapper: Any, **kwargs: Any) -> Any:
    from joblib.parallel import SequentialBackend, register_parallel_backend

    register_parallel_backend("dask", SequentialBackend)
    return wrapper(**kwargs)
