"""Issue 14, points 1 and 2: opaque payloads and the portal's restricted graph unpickler.

The probe: a task argument whose unpickling writes a marker file with the command line of the
process that unpickled it (``/proc/self/cmdline``). Sent by a plain ``distributed.Client`` with
a researcher's certificate it must be refused, leaving no marker anywhere; sent through
``grid.client`` it runs, and only a task process on the node leaves a marker.

Then Dask's tutorial workloads through ``grid.client`` give the results a LocalCluster gives.
Real portals and volunteers as processes; nothing of ours is mocked.
"""

from __future__ import annotations

import operator
import os
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cloudpickle
import dask
import pytest
from conftest import Portal, researcher_connection, start_portal, start_volunteer, wait_for
from distributed import Client, LocalCluster, as_completed, wait
from probes import Probe, probes_opened

from grid_portal import Grid
from grid_portal.connection import Connection
from grid_portal.payload import OpaqueGraph, OpaquePayload, opaque_graph, opened, run_opaque
from grid_portal.portal import graph_guard


# -- the probe ------------------------------------------------------------------------------------
def probe_task(value: Any) -> str:
    return "ran"


def markers(*dirs: Path) -> list[str]:
    """The command lines the probe left, from every place it may have written, except this
    test's own process (Dask's tokenizing on the client side unpickles arguments here)."""
    return [cmdline for pid, cmdline in probes_opened(*dirs) if pid != os.getpid()]


def _raw_client(portal: Portal, tmp: Path, user: str) -> Client:
    """A plain ``distributed.Client`` holding a researcher's certificate."""
    conn = Connection.load(Path(researcher_connection(portal, tmp, user)))
    return Client(conn.scheduler, security=conn.security(), timeout=20, set_as_default=False)


def _researcher_grid(portal: Portal, tmp: Path, user: str) -> Grid:
    return Grid(researcher_connection(portal, tmp, user), start_embedded=False)


# -- the restricted unpickler, on crafted pickles (no processes needed) -------------------------------
def _frames(obj: Any) -> tuple[dict[str, Any], list[Any]]:
    from distributed.protocol import serialize, to_serialize

    return serialize(to_serialize(obj), on_error="raise")


def test_the_graph_unpickler_admits_the_grids_graph_and_nothing_else(tmp_path: Path) -> None:
    from dask._expr import LLGExpr
    from dask._task_spec import DataNode, Task, TaskRef

    good = opaque_graph(
        LLGExpr({"a": Task("a", operator.add, 1, 2), "b": Task("b", operator.neg, TaskRef("a"))}),
        ["b"],
    )
    checked = graph_guard.read_graph(*_frames(good))
    assert type(checked) is OpaqueGraph
    b = checked.operand("dsk")["b"]
    assert b.func is run_opaque and isinstance(b.args[0], OpaquePayload)
    assert b.dependencies == {"a"}
    # What the node does: open the payload, run it; the value goes back opaque (issue 14).
    assert opened(b({"a": 3})) == -3

    crafted = {
        "a plain Dask graph": LLGExpr({"a": Task("a", operator.add, 1, 2)}),
        "a probe in a task's arguments": LLGExpr({"a": Task("a", probe_task, Probe(tmp_path))}),
        "a probe in the grid's own graph": OpaqueGraph({"a": DataNode("a", Probe(tmp_path))}, {}),
        "another function": OpaqueGraph({"a": Task("a", operator.add, 1, 2)}, {}),
        "run_opaque without a payload": OpaqueGraph({"a": Task("a", run_opaque, b"x")}, {}),
        "a payload with a smuggled argument": OpaqueGraph(
            {"a": Task("a", run_opaque, OpaquePayload(b"", b"x"), OpaquePayload(b"", b"y"))}, {}
        ),
    }
    for what, expr in crafted.items():
        with pytest.raises(graph_guard.Refused):
            graph_guard.read_graph(*_frames(expr))
        assert markers(tmp_path) == [], what
    # State a pickle sets directly does not survive: each node is rebuilt from checked parts.
    rebuilt = graph_guard.read_graph(*_frames(_forged_coroutine())).operand("dsk")["a"]
    assert not rebuilt.is_coro


def _forged_coroutine() -> Any:
    """A wrapped task whose pickled state says it is a coroutine: a worker would await it on
    its event loop, in the worker process, instead of running it in a task process."""
    from dask._task_spec import Task

    task = Task("a", run_opaque, OpaquePayload(b"", b"x"))
    task._is_coro = True
    return OpaqueGraph({"a": task}, {})


def test_pickled_message_fields_are_read_as_data(tmp_path: Path) -> None:
    from distributed.client import SourceCode

    plain = {"grid_job": "j1", "resources": {"CPU": 1.0}, "n": (1, 2.5, None, b"x", {3})}
    assert graph_guard.loads_data(pickle.dumps(plain, protocol=5)) == plain
    code = (SourceCode("x = 1", 1, 1, "<cell>"),)
    assert graph_guard.loads_data(pickle.dumps(code, protocol=5)) == code
    with pytest.raises(graph_guard.Refused):
        graph_guard.loads_data(cloudpickle.dumps({"x": Probe(tmp_path)}))
    assert markers(tmp_path) == []


# -- the probe over real connections -------------------------------------------------------------
@pytest.fixture
def sandboxed(tmp_path: Path) -> Iterator[tuple[Portal, Path]]:
    """A portal and one volunteer whose tasks run in task processes (the default sandbox)."""
    portal = start_portal(tmp_path)
    scratch = tmp_path / "scratch"
    start_volunteer(portal, tmp_path, "v1", "--scratch", str(scratch))
    try:
        yield portal, scratch
    finally:
        portal.stop()


def test_the_probe_from_a_plain_dask_client_is_refused_and_runs_nowhere(
    sandboxed: tuple[Portal, Path], tmp_path: Path
) -> None:
    portal, scratch = sandboxed
    marks = tmp_path / "marks"
    with _raw_client(portal, tmp_path, "mallory") as client:
        # In a task's arguments: the graph is refused before Dask reads it.
        future = client.submit(probe_task, Probe(scratch, marks))
        with pytest.raises(PermissionError, match="refused this graph"):
            future.result(timeout=30)
        # The same through a collection.
        with pytest.raises(PermissionError, match="refused this graph"):
            client.compute(dask.delayed(probe_task)(Probe(scratch, marks))).result(timeout=30)
        # In a pickled field of the message (annotations): refused while it is read.
        with dask.annotate(grid_note=Probe(scratch, marks)):
            client.submit(operator.add, 1, 2)
        wait_for(
            lambda: "refused a message field that names builtins.exec" in portal.log.read_text(),
            what="the portal to refuse the pickled annotations",
        )
    assert markers(marks, scratch) == []
    assert "refused a graph from client" in portal.log.read_text()

    # Through the grid's client it runs, and only a task process on the node opens it.
    with _researcher_grid(portal, tmp_path, "alice") as grid:
        assert grid.client.submit(probe_task, Probe(scratch, marks)).result(timeout=60) == "ran"
        assert grid.submit(probe_task, Probe(scratch, marks)).result(timeout=60) == "ran"
    found = markers(marks, scratch)
    assert len(found) == 2, found
    assert all("grid_portal.node.taskchild" in line for line in found), found


def test_on_an_unsandboxed_node_the_payload_opens_in_the_worker_not_the_portal(
    portal: Portal, tmp_path: Path
) -> None:
    """``--sandbox none`` runs tasks in worker threads, as a plain ``dask worker`` does: the
    payload opens in the worker process, never in the portal."""
    start_volunteer(portal, tmp_path, "bare", "--sandbox", "none")
    marks = tmp_path / "marks"
    with _researcher_grid(portal, tmp_path, "alice") as grid:
        assert grid.client.submit(probe_task, Probe(marks)).result(timeout=60) == "ran"
    (found,) = markers(marks)
    assert "grid_portal.node.worker" in found and "taskchild" not in found, found


# -- Dask's tutorial workloads, the same as on a LocalCluster ----------------------------------------
def square(x: int) -> int:
    return x * x


def inc(x: int) -> int:
    return x + 1


def add(x: int, y: int) -> int:
    return x + y


def _workloads(client: Client) -> dict[str, Any]:
    import dask.array as da
    import dask.bag as db
    import dask.dataframe as dd
    import numpy as np
    import pandas as pd

    out: dict[str, Any] = {}
    # Futures, in the order they finish.
    futures = client.map(square, range(20))
    with client.as_current():
        out["as_completed"] = sorted(f.result() for f in as_completed(futures))
    total = client.submit(sum, futures)
    out["futures"] = total.result(timeout=60)
    # Delayed: a tree of additions.
    parts = [dask.delayed(inc)(i) for i in range(8)]
    while len(parts) > 1:
        parts = [dask.delayed(add)(a, b) for a, b in zip(parts[::2], parts[1::2], strict=True)]
    out["delayed"] = client.compute(parts[0]).result(timeout=60)
    # Bag.
    words = db.from_sequence(["grid", "dask", "portal", "grid", "node", "dask", "grid"], 3)
    out["bag"] = sorted(words.frequencies().compute(scheduler=client.get))
    out["bag_sum"] = client.compute(
        db.from_sequence(range(1000), npartitions=8).filter(lambda n: n % 2).map(square).sum()
    ).result(timeout=60)
    # Array.
    x = da.arange(250_000, chunks=25_000).reshape((500, 500)).rechunk((125, 125))
    out["array"] = client.compute(((x + x.T) / 7).mean(axis=0)[:25]).result(timeout=60)
    out["array_dot"] = client.compute((x @ x.T).sum()).result(timeout=60)
    # Dataframe: groupby, a shuffle, a merge, and a persisted frame used twice.
    pdf = pd.DataFrame({"k": np.arange(400) % 7, "v": np.arange(400, dtype=float)})
    df = dd.from_pandas(pdf, npartitions=5)
    out["groupby"] = client.compute(df.groupby("k").v.mean()).result(timeout=60).sort_index()
    out["set_index"] = client.compute(df.set_index("v").k).result(timeout=60).sort_index()
    merged = client.compute(df.merge(df.head(40, compute=False), on="k")).result(timeout=60)
    out["merge"] = merged.sort_values(["k", "v_x", "v_y"]).reset_index(drop=True)
    kept = client.persist(df[df.v > 100])
    with client.as_current():
        wait(kept)
    out["persisted"] = client.gather(client.compute([kept.v.sum(), kept.v.count()]))
    return out


@pytest.fixture(scope="module")
def reference() -> dict[str, Any]:
    with (
        LocalCluster(
            n_workers=1, threads_per_worker=2, processes=False, dashboard_address=":0"
        ) as cluster,
        Client(cluster, set_as_default=False) as client,
    ):
        return _workloads(client)


def _same(a: Any, b: Any) -> bool:
    import numpy as np
    import pandas as pd

    if isinstance(a, (pd.Series, pd.DataFrame)):
        return a.equals(b)
    if isinstance(a, np.ndarray):
        return bool(np.allclose(a, b))
    if isinstance(a, tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def test_dask_tutorial_workloads_through_grid_client_match_a_local_cluster(
    sandboxed: tuple[Portal, Path], tmp_path: Path, reference: dict[str, Any]
) -> None:
    portal, _ = sandboxed
    with _researcher_grid(portal, tmp_path, "alice") as grid:
        got = _workloads(grid.client)
    assert set(got) == set(reference)
    different = [name for name in reference if not _same(reference[name], got[name])]
    assert different == [], {name: (reference[name], got[name]) for name in different}


def fib(n: int) -> int:
    """The evolving workflow of Dask's docs: tasks that submit tasks."""
    from distributed import get_client, rejoin, secede

    if n < 2:
        return n
    client = get_client()
    a, b = client.submit(fib, n - 1), client.submit(fib, n - 2)
    secede()
    total = a.result() + b.result()
    rejoin()
    return total


def test_tasks_that_submit_tasks(sandboxed: tuple[Portal, Path], tmp_path: Path) -> None:
    portal, _ = sandboxed
    with _researcher_grid(portal, tmp_path, "alice") as grid:
        # Each task asks for its job's delegated credential (tests/test_delegation.py).
        assert grid.client.submit(fib, 6).result(timeout=120) == 8


def test_a_graph_with_p2p_steps_is_refused_with_a_clear_message(
    sandboxed: tuple[Portal, Path], tmp_path: Path
) -> None:
    import dask.dataframe as dd
    import pandas as pd

    portal, _ = sandboxed
    df = dd.from_pandas(pd.DataFrame({"k": range(20), "v": range(20)}), npartitions=4)
    with (
        _researcher_grid(portal, tmp_path, "alice") as grid,
        pytest.raises(ValueError, match="P2P shuffle"),
    ):
        grid.client.compute(df.shuffle("k", shuffle_method="p2p"))


def test_the_payload_round_trip_is_plain_pickle() -> None:
    """What a node runs: ``run_opaque`` opens the payload with plain pickle (cloudpickle's
    output loads without cloudpickle's help for functions pickled by value)."""
    from dask._expr import LLGExpr
    from dask._task_spec import Task

    graph = opaque_graph(LLGExpr({"a": Task("a", lambda: 41 + 1)}), ["a"])
    task = graph.operand("dsk")["a"]
    assert opened(pickle.loads(pickle.dumps(task))({})) == 42
