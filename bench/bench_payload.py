"""Cost per task of opaque payloads (issue 14): the client's wrapping and the portal's guard.

Run by hand from the repository root: ``python bench/bench_payload.py`` once the package is
installed (``pip install -e .``), else ``PYTHONPATH=. python bench/bench_payload.py``. Results go
to docs/benchmarks.md.

Three graphs of N tasks each (default 10,000): ``map`` (independent tasks, as ``client.map``
sends), ``chain`` (each task needs the one before) and ``array`` (a dask.array reduction, N
chunks). For each, in process, best of ``--repeat`` rounds:

- client: what a plain ``distributed.Client`` does before sending (serialize the expression)
  against what ``GridDaskClient`` does (materialize, wrap every task, serialize);
- portal: what Dask's scheduler does to read the graph (unpickle, materialize) against what the
  guarded portal does (restricted unpickle, check and rebuild every node, materialize);
- node: calling a task against calling it through ``run_opaque`` (open the payload, call, and
  pickle the value into an ``OpaqueResult``).

Then results (issue 14: the worker keeps them opaque), per value kind, best of ``--repeat``:
wrapping the value in the task process (``OpaqueResult.wrap``) and opening it in a downstream
task (``opened``); the task process's reply through the pipe (before: cloudpickle, then the
worker's plain unpickle of the value; now: pickle, then the restricted ``recv_plain`` of the
``OpaqueResult``);
and the kernel's data-only open of what Dask sends (Dask's serialization, then
``safe_pickle``'s pickle or dask family: the value itself before, the ``OpaqueResult`` now).
"""

from __future__ import annotations

import argparse
import operator
import time
from collections.abc import Callable
from typing import Any

from dask._expr import LLGExpr
from dask._task_spec import Task, TaskRef, convert_legacy_graph
from distributed.protocol import deserialize, serialize, to_serialize

from grid_portal.payload import opaque_graph
from grid_portal.portal.graph_guard import read_graph


def inc(x: int) -> int:
    return x + 1


def graphs(n: int) -> dict[str, tuple[Any, list[Any]]]:
    import dask.array as da
    from dask.base import collections_to_expr

    tasks = {f"inc-{i}": Task(f"inc-{i}", inc, i) for i in range(n)}
    chain = {"c-0": Task("c-0", inc, 0)}
    chain.update({f"c-{i}": Task(f"c-{i}", inc, TaskRef(f"c-{i - 1}")) for i in range(1, n)})
    x = da.ones((n * 10,), chunks=10).sum()
    expr = collections_to_expr([x]).finalize_compute()
    return {
        "map": (LLGExpr(tasks), list(tasks)),
        "chain": (LLGExpr(chain), [f"c-{n - 1}"]),
        "array": (expr, expr.__dask_keys__()),
    }


def best(fn: Callable[[], Any], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def plain_client(expr: Any) -> Any:
    return serialize(to_serialize(expr), on_error="raise")


def grid_client(expr: Any, keys: list[Any]) -> Any:
    return serialize(to_serialize(opaque_graph(expr, keys)), on_error="raise")


def plain_portal(frames: Any) -> int:
    expr = deserialize(*frames)
    return len(convert_legacy_graph(expr.__dask_graph__()))


def grid_portal(frames: Any) -> int:
    expr = read_graph(*frames)
    return len(convert_legacy_graph(expr.__dask_graph__()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=10_000, help="tasks per graph")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()

    print(f"{args.n} tasks per graph, best of {args.repeat}; microseconds per task")
    print(f"{'graph':8} {'client':>22} {'portal':>22} {'payload bytes':>14}")
    for name, (expr, keys) in graphs(args.n).items():
        tasks = len(convert_legacy_graph(expr.__dask_graph__()))
        plain_frames = plain_client(expr)
        grid_frames = grid_client(expr, keys)
        c0 = best(lambda e=expr: plain_client(e), args.repeat)
        c1 = best(lambda e=expr, k=keys: grid_client(e, k), args.repeat)
        p0 = best(lambda f=plain_frames: plain_portal(f), args.repeat)
        p1 = best(lambda f=grid_frames: grid_portal(f), args.repeat)
        size0 = sum(len(f) for f in plain_frames[1])
        size1 = sum(len(f) for f in grid_frames[1])

        def us(seconds: float, tasks: int = tasks) -> float:
            return seconds / tasks * 1e6

        print(
            f"{name:8} {us(c0):7.1f} -> {us(c1):5.1f} (+{us(c1 - c0):5.1f}) "
            f"{us(p0):7.1f} -> {us(p1):5.1f} (+{us(p1 - p0):5.1f}) "
            f"{size0 / tasks:6.0f} -> {size1 / tasks:4.0f}"
        )

    # On the node: a task called directly, and through run_opaque.
    wrapped = opaque_graph(LLGExpr({"a": Task("a", operator.add, 1, 2)}), ["a"]).operand("dsk")
    plain_task, opaque_task = Task("a", operator.add, 1, 2), wrapped["a"]
    reps = 20_000
    t0 = best(lambda: [plain_task({}) for _ in range(reps)], args.repeat) / reps * 1e6
    t1 = best(lambda: [opaque_task({}) for _ in range(reps)], args.repeat) / reps * 1e6
    print(f"node: a task called {t0:.2f} us, through run_opaque {t1:.2f} us (+{t1 - t0:.2f})")
    results(args.repeat)


def values() -> dict[str, Any]:
    import numpy as np
    import pandas as pd

    return {
        "int": 42,
        "dict (1 kB)": {f"k{i}": [i, float(i), str(i)] for i in range(40)},
        "ndarray 1 MB": np.random.default_rng(0).random(125_000),
        "DataFrame 10k rows": pd.DataFrame({"a": np.arange(10_000), "b": ["x"] * 10_000}),
    }


def results(repeat: int) -> None:
    """What keeping results opaque costs per task, per kind of value (microseconds)."""
    import pickle

    import cloudpickle

    from grid_portal.node.taskchild import loads_plain
    from grid_portal.payload import OpaqueResult, opened
    from grid_portal.safe_pickle import _data_family_loads

    def reply(value: Any) -> tuple[Any, ...]:
        return ("done", {"op": "task-finished", "result": value, "start": 0.0, "stop": 1.0}, 0)

    def kernel(value: Any) -> Any:
        header, frames = serialize(value)
        return _data_family_loads(header["serializer"], header, frames)

    print()
    print("results, microseconds per task (before -> now):")
    print(
        f"{'value':20} {'wrap':>8} {'open':>8} {'pipe: task process -> worker':>30} {'kernel':>22}"
    )
    for name, value in values().items():
        reps = 2_000 if name in ("int", "dict (1 kB)") else 20
        wrapped = OpaqueResult.wrap(value)

        def per(fn: Callable[[], Any], reps: int = reps) -> float:
            return best(lambda: [fn() for _ in range(reps)], repeat) / reps * 1e6

        w = per(lambda v=value: OpaqueResult.wrap(v))
        o = per(lambda r=wrapped: opened(r))
        pipe0 = per(lambda v=value: pickle.loads(cloudpickle.dumps(reply(v), protocol=5)))
        pipe1 = per(lambda r=wrapped: loads_plain(pickle.dumps(reply(r), protocol=5)))
        k0 = per(lambda v=value: kernel(v))
        k1 = per(lambda r=wrapped: kernel(r))
        print(
            f"{name:20} {w:8.1f} {o:8.1f} {pipe0:12.1f} -> {pipe1:8.1f} ({pipe1 - pipe0:+7.1f}) "
            f"{k0:8.1f} -> {k1:8.1f} ({k1 - k0:+7.1f})"
        )


if __name__ == "__main__":
    main()
