"""Issue 14, point 1 (second half): the worker keeps results as opaque bytes.

A grid task's value leaves its task process as an ``OpaqueResult`` (``run_opaque`` pickles it
in the task); the Dask worker holds, moves and hands out those bytes and never opens them; a
downstream task opens its dependencies in its own task process, and the researcher's kernel
opens what it gathers as data only (plain pickle for trusted nodes). What a task process sends
its worker is read by a restricted unpickler (``taskchild.recv_plain``).

The probe: a value whose unpickling writes a marker file with its process's command line
(``/proc/self/cmdline``) and pid. Real portals and volunteers as processes; nothing of ours is
mocked.
"""

from __future__ import annotations

import io
import os
import pickle
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Portal, researcher_connection, start_portal, start_volunteer
from probes import Probe, probes_opened

from grid_portal import Grid
from grid_portal.errors import UntrustedResult
from grid_portal.node import taskchild
from grid_portal.node.taskproc import _reply_problem
from grid_portal.payload import OpaqueResult, opaque_graph, opened


# -- the probe ------------------------------------------------------------------------------------
def make_probe(*dirs: str) -> Any:
    """A task whose value is the probe: returned, it is pickled in the task, opened nowhere."""
    return Probe(*dirs)


def describe(value: Any) -> str:
    return f"got {value!r}"


def make_data(n: int) -> dict[str, Any]:
    import numpy as np

    return {"n": n, "squares": np.arange(n) ** 2, "name": "upstream"}


def use_data(data: dict[str, Any], more: int) -> tuple[int, str, int]:
    return (
        int(data["squares"].sum()) + more,
        data["name"],
        type(data["squares"]).__name__ == "ndarray",
    )


def write_crafted_reply(dirs: list[str], kind: str) -> str:
    """A task that writes its own message into its result channel: past every check of the
    task process's side, straight into the pipe the worker reads."""
    from distributed import get_worker

    channel = get_worker().__dict__["_channel"]
    if kind == "done":
        message: Any = ("done", {"op": "task-finished", "result": Probe(*dirs)}, 0)
    else:
        message = ("emit", "queue_put", {"name": "anything", "data": Probe(*dirs)})
    data = pickle.dumps(message)
    with channel.lock:
        channel.out.write(taskchild._HEADER.pack(len(data)) + data)
        channel.out.flush()
    time.sleep(60)  # the worker refuses the message and ends this process meanwhile
    return "not refused"


# -- the parts, without processes -------------------------------------------------------------------
def test_an_opaque_result_is_bytes_that_dask_moves_unopened() -> None:
    from dask.sizeof import sizeof
    from distributed.protocol import deserialize, serialize

    value = {"x": list(range(1000))}
    result = OpaqueResult.wrap(value)
    assert type(result.data) is bytes and result.open() == value
    # Dask's memory accounting sees the bytes it holds.
    assert len(result.data) <= sizeof(result) <= len(result.data) + 128
    # Dask sends it with its pickle family, the bytes as their own frame, and the worker that
    # receives it gets the same bytes back, unopened.
    header, frames = serialize(result)
    assert header["serializer"] == "pickle" and bytes(frames[-1]) == result.data
    again = deserialize(header, frames)
    assert type(again) is OpaqueResult and again == result
    # Through a task process's pipe (plain pickle, no buffer callback) as well.
    assert pickle.loads(pickle.dumps(result, protocol=5)) == result
    assert pickle.loads(pickle.dumps(result, protocol=2)) == result
    with pytest.raises(TypeError):
        OpaqueResult("not bytes")  # type: ignore[arg-type]


def test_run_opaque_opens_its_dependencies_and_wraps_its_value() -> None:
    from dask._expr import LLGExpr
    from dask._task_spec import Task, TaskRef

    graph = opaque_graph(
        LLGExpr({"a": Task("a", make_data, 4), "b": Task("b", use_data, TaskRef("a"), 1)}),
        ["b"],
    )
    dsk = graph.operand("dsk")
    a = dsk["a"]({})
    assert type(a) is OpaqueResult
    b = dsk["b"]({"a": a})  # the worker hands the task its dependency as it holds it
    assert type(b) is OpaqueResult and b.open() == (15, "upstream", True)
    # Values that are not opaque (scattered data) go to the function as they are.
    assert opened(dsk["b"]({"a": make_data(4)})) == (15, "upstream", True)


def test_the_worker_reads_a_task_process_with_a_restricted_unpickler(tmp_path: Path) -> None:
    # The pipe's own messages come through.
    for message in (
        ("ready", 123),
        ("emit", "queue_put", {"name": "q", "data": {"a": [1, 2.5, None, "s", b"b"]}}),
        ("emit", "store_result", {"job_id": "j", "data": b"\x00" * 10}),
        ("done", {"op": "task-finished", "result": OpaqueResult(b"x"), "start": 1.0}, 0),
        ("done", {"op": "x", "s": {1, 2}, "f": frozenset({3}), "c": 1j, "b": bytearray(b"")}, 0),
    ):
        for protocol in (4, 5):  # the pipe's: pickle.HIGHEST_PROTOCOL
            assert taskchild.loads_plain(pickle.dumps(message, protocol=protocol)) == message
    # A pickle that names anything else is refused before it is looked up: nothing runs.
    crafted = [
        ("done", {"op": "task-finished", "result": Probe(tmp_path)}, 0),
        ("emit", "queue_put", {"name": "q", "data": Probe(tmp_path)}),
        ("done", {"op": "task-erred", "exception": ValueError("x")}, 0),
        ("done", {"op": "task-finished", "type": KeyError}, 0),
        ("done", {"op": "task-finished", "result": OpaqueResult(b"x"), "f": os.system}, 0),
    ]
    for message in crafted:
        with pytest.raises(taskchild.PipeRefused):
            taskchild.loads_plain(pickle.dumps(message))
    stream = io.BytesIO()
    data = pickle.dumps(crafted[0])
    stream.write(taskchild._HEADER.pack(len(data)) + data)
    stream.seek(0)
    with pytest.raises(taskchild.PipeRefused, match="builtins.exec"):
        taskchild.recv_plain(stream)
    assert probes_opened(tmp_path) == []


def test_the_task_process_sends_only_what_the_worker_admits() -> None:
    from distributed.worker import _run_task_simple

    from grid_portal.payload import wrap_node

    def fails() -> None:
        raise KeyError("missing")

    for func, op in ((make_data, "task-finished"), (fails, "task-erred")):
        from dask._task_spec import Task

        args = (3,) if func is make_data else ()
        msg = _run_task_simple(wrap_node(Task("k", func, *args)), {}, 0.0)
        msg.pop("actual_exception", None)
        reply = ("done", taskchild.plain_reply(msg), 0)
        opened_reply = taskchild.loads_plain(pickle.dumps(reply))
        assert _reply_problem(opened_reply) is None and opened_reply[1]["op"] == op
    # An exception arrives as pickled bytes and its text; the worker does not open it.
    assert opened_reply[1]["exception_text"] == "KeyError('missing')"
    assert type(opened_reply[1]["exception"]) is bytes
    # A task that was not wrapped (no run_opaque) still sends its value opaque.
    plain = taskchild.plain_reply({"op": "task-finished", "result": [1], "start": 0, "stop": 1})
    assert plain["result"] == OpaqueResult.wrap([1])
    assert _reply_problem(("done", {"op": "task-finished", "result": [1]}, 0)) is not None


def test_the_kernel_opens_an_opaque_result_as_data_and_refuses_the_rest(tmp_path: Path) -> None:
    import numpy as np
    from distributed.protocol import serialize

    from grid_portal.safe_pickle import UntrustedData, _data_family_loads

    header, frames = serialize(OpaqueResult.wrap({"a": np.arange(3)}))
    value = _data_family_loads("pickle", header, frames)
    assert list(value) == ["a"] and (value["a"] == np.arange(3)).all()

    header, frames = serialize(OpaqueResult.wrap(Probe(tmp_path)))
    held = _data_family_loads("pickle", header, frames)
    assert isinstance(held, UntrustedData) and held.type_name == "builtins.exec"
    assert probes_opened(tmp_path) == []
    assert held.open() is None  # what a trusted node's result gets: plain pickle
    assert [pid for pid, _ in probes_opened(tmp_path)] == [os.getpid()]


# -- on a real portal ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sandboxed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Portal, Path, Path]]:
    """A portal and one volunteer, ``v1``, whose tasks run in task processes."""
    tmp = tmp_path_factory.mktemp("sandboxed")
    portal = start_portal(tmp)
    scratch = tmp / "scratch"
    start_volunteer(portal, tmp, "v1", "--scratch", str(scratch))
    try:
        yield portal, scratch, tmp
    finally:
        portal.stop()


def _grid(portal: Portal, tmp: Path, user: str, **kwargs: Any) -> Grid:
    return Grid(researcher_connection(portal, tmp, user), start_embedded=False, **kwargs)


def test_a_crafted_value_is_opened_by_no_worker(
    sandboxed: tuple[Portal, Path, Path], tmp_path: Path
) -> None:
    portal, scratch, tmp = sandboxed
    where = tmp_path / "marks"
    dirs = (str(scratch / "value"), str(where))
    with _grid(portal, tmp, "alice") as grid:
        # The node is not trusted: the kernel refuses it, naming what it carried.
        future = grid.client.submit(make_probe, *dirs)
        with pytest.raises(UntrustedResult, match="builtins.exec"):
            future.result(timeout=60)
        with pytest.raises(UntrustedResult):
            grid.client.gather([future])
        # The worker held it and moved it without opening it.
        assert probes_opened(scratch / "value", where) == []
        # A downstream task opens it, in its own task process.
        assert grid.client.submit(describe, future).result(timeout=60) == "got None"
        found = probes_opened(scratch / "value", where)
        assert len(found) == 1 and "grid_portal.node.taskchild" in found[0][1], found
    # From a node the researcher trusts, the kernel opens it as code, as before.
    with _grid(portal, tmp, "bob", trust=["v1"]) as grid:
        assert grid.client.submit(make_probe, *dirs, pure=False).result(timeout=60) is None
        assert grid.submit(make_probe, *dirs).result(timeout=60) is None
    found = probes_opened(scratch / "value", where)
    kernel = [cmd for pid, cmd in found if pid == os.getpid()]
    others = [cmd for pid, cmd in found if pid != os.getpid()]
    assert len(kernel) == 2 and len(others) == 1 and "taskchild" in others[0], found


def test_a_downstream_task_receives_the_upstream_value(
    sandboxed: tuple[Portal, Path, Path],
) -> None:
    import dask
    import numpy as np
    from distributed import as_completed

    portal, _, tmp = sandboxed
    with _grid(portal, tmp, "alice") as grid:
        client = grid.client
        up = client.submit(make_data, 4)
        down = client.submit(use_data, up, 1)
        assert down.result(timeout=60) == (15, "upstream", True)
        value = up.result(timeout=60)
        assert (value["squares"] == np.arange(4) ** 2).all() and value["name"] == "upstream"
        # gather, as_completed, compute of delayed; Grid.submit/map and their replicas.
        assert client.gather([up, down])[1] == (15, "upstream", True)
        futures = client.map(make_data, range(1, 4))
        with client.as_current():
            got = sorted(int(f.result()["n"]) for f in as_completed(futures))
        assert got == [1, 2, 3]
        part = dask.delayed(make_data)(5)
        assert client.compute(dask.delayed(use_data)(part, 0)).result(timeout=60)[0] == 30
        assert grid.submit(use_data, grid.submit(make_data, 3), 2).result(timeout=60)[0] == 7
        assert [r[0] for r in grid.gather(grid.map(use_data, [make_data(2)] * 2, [0, 1]))] == [
            1,
            2,
        ]


def test_a_crafted_message_from_a_task_process_is_refused(
    sandboxed: tuple[Portal, Path, Path], tmp_path: Path
) -> None:
    portal, scratch, tmp = sandboxed
    where = tmp_path / "marks"
    dirs = [str(scratch / "pipe"), str(where)]
    with _grid(portal, tmp, "alice") as grid:
        for kind in ("done", "emit"):
            future = grid.client.submit(write_crafted_reply, dirs, kind, pure=False)
            with pytest.raises(PermissionError, match="does not open.*builtins.exec"):
                future.result(timeout=60)
        # The node goes on working.
        assert grid.client.submit(use_data, make_data(3), 0).result(timeout=60)[0] == 5
    assert probes_opened(scratch / "pipe", where) == []
    log = "\n".join(v.output() for v in portal.volunteers)
    assert "its task process was ended" in log


def test_dask_collections_come_back_as_numpy_and_pandas(
    sandboxed: tuple[Portal, Path, Path],
) -> None:
    import dask.array as da
    import dask.dataframe as dd
    import numpy as np
    import pandas as pd

    sys.path.insert(0, str(Path(__file__).parent))
    from test_opaque_payloads import _same, _workloads

    portal, _, tmp = sandboxed
    with _grid(portal, tmp, "alice") as grid:
        client = grid.client
        array = client.compute(da.arange(100, chunks=10).reshape(10, 10).sum(axis=0))
        assert type(array.result(timeout=60)) is np.ndarray
        frame = dd.from_pandas(pd.DataFrame({"k": [1, 2, 1], "v": [1.0, 2.0, 3.0]}), 2)
        assert type(client.compute(frame).result(timeout=60)) is pd.DataFrame
        assert type(frame.v.sum().compute(scheduler=client.get)) is np.float64
        got = _workloads(client)
    from distributed import Client, LocalCluster

    with (
        LocalCluster(
            n_workers=1, threads_per_worker=2, processes=False, dashboard_address=":0"
        ) as c,
        Client(c, set_as_default=False) as local,
    ):
        reference = _workloads(local)
    different = [k for k in reference if not _same(reference[k], got[k])]
    assert different == [], different


def test_on_an_unsandboxed_node_the_worker_is_the_task_process(tmp_path: Path) -> None:
    """``--sandbox none``: tasks run in worker threads, so ``run_opaque`` (a downstream task
    opening its dependency) runs in the worker itself; a value nobody uses downstream is still
    opened by no worker, and the kernel still opens it as data only."""
    portal = start_portal(tmp_path)
    try:
        start_volunteer(portal, tmp_path, "bare", "--sandbox", "none")
        where = tmp_path / "marks"
        with _grid(portal, tmp_path, "alice") as grid:
            future = grid.client.submit(make_probe, str(where))
            with pytest.raises(UntrustedResult):
                future.result(timeout=60)
            assert probes_opened(where) == []
            assert grid.client.submit(use_data, make_data(3), 1).result(timeout=60)[0] == 6
            assert grid.client.submit(describe, future).result(timeout=60) == "got None"
        ((_, cmdline),) = probes_opened(where)
        assert "grid_portal.node.worker" in cmdline and "taskchild" not in cmdline, cmdline
    finally:
        portal.stop()
