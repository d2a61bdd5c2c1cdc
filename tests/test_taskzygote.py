"""The task processes' fork server (grid_portal/node/taskzygote.py), through the executor.

Each job's task process is a fork of one fork server per worker: new for each job (nothing a
job left in its process is there for the next), forked (its parent is the server, not the
worker), bound to its own job's workspace, and the server itself never runs a task. No Dask
worker is needed: the executor's own steps (a job's workspace, its process, a call in it) are
driven directly, with plain functions sent by value as a notebook's are.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cloudpickle
import pytest

from grid_portal.node.taskchild import recv_plain, send
from grid_portal.node.taskproc import TaskProcessExecutor
from grid_portal.node.taskzygote import can_fork

pytestmark = pytest.mark.skipif(not can_fork(), reason="no fork and fd passing here")


def plant() -> dict[str, Any]:
    """Job A: leave state in the process itself (a module global, an environment variable)."""
    import json
    import sys

    json.grid_planted_by = "job A"  # type: ignore[attr-defined]
    sys.modules["grid_planted_module"] = json
    os.environ["GRID_PLANTED"] = "job A"
    return {"pid": os.getpid(), "ppid": os.getppid(), "home": os.environ.get("HOME")}


def look() -> dict[str, Any]:
    """Job B: is anything of job A's process state here?"""
    import ctypes
    import json
    import random
    import sys

    return {
        "pid": os.getpid(),
        "ppid": os.getppid(),
        "pgid": os.getpgid(0),
        "home": os.environ.get("HOME"),
        "cwd": os.getcwd(),
        "global": getattr(json, "grid_planted_by", None),
        "module": "grid_planted_module" in sys.modules,
        "env": os.environ.get("GRID_PLANTED"),
        "dumpable": ctypes.CDLL(None).prctl(3, 0, 0, 0, 0),  # PR_GET_DUMPABLE
        "isolated": sys.flags.isolated,
        "random": random.random(),
    }


@pytest.fixture
def executor(tmp_path: Path) -> Iterator[TaskProcessExecutor]:
    ex = TaskProcessExecutor(1, memory_limit=None, jobs_dir=str(tmp_path / "jobs"))
    ex._view = {"name": "zygote-test", "local_directory": str(tmp_path)}
    try:
        yield ex
    finally:
        ex.shutdown()


def run(ex: TaskProcessExecutor, job: str, fn: Any) -> tuple[dict[str, Any], Any]:
    """One call of ``fn`` as a task of ``job`` in that job's task process."""
    workspace = ex._enter(("job", job))
    try:
        child = ex._take_child(workspace)
        send(child.to_child, ("run", job, 0, cloudpickle.dumps((_boxed, (fn,), {}))))
        reply = recv_plain(child.from_child)
    finally:
        ex._leave(workspace)
    assert reply[0] == "done" and reply[1]["op"] == "value", reply
    ex._give_back(child)
    return reply[1]["value"].open()[0], child


def _boxed(fn: Any) -> list[Any]:
    return [fn()]  # not a dict: a plain value, not a Dask result message


def test_each_jobs_task_process_is_a_new_fork_of_the_server(
    executor: TaskProcessExecutor, tmp_path: Path
) -> None:
    a, child_a = run(executor, "A", plant)
    server = executor._server
    assert server is not None and server.alive()
    assert a["ppid"] == server.pid != os.getpid()  # forked by the server, not by us
    with open(f"/proc/{server.pid}/cmdline", "rb") as f:
        assert b"grid_portal.node.taskzygote" in f.read()

    b, child_b = run(executor, "B", look)
    assert b["pid"] != a["pid"]  # a new process for job B...
    assert b["ppid"] == server.pid  # ...from the same fork server
    assert b["pgid"] == b["pid"]  # leading its own process group, for the node's signals
    assert b["global"] is None and not b["module"] and b["env"] is None, b
    assert b["home"] != a["home"] and b["home"].startswith(str(tmp_path / "jobs"))
    assert b["cwd"].startswith(str(tmp_path / "jobs"))
    assert b["dumpable"] == 1 and b["isolated"] == 1
    # Job A's process was ended when job B came (it had nothing running) and reaped.
    assert child_a.proc.returncode == -signal.SIGKILL
    assert not os.path.exists(f"/proc/{a['pid']}") or _is_gone(a["pid"])

    # The same job keeps its own process; the next job again gets a new one.
    again, _ = run(executor, "B", look)
    assert again["pid"] == b["pid"]
    c, _ = run(executor, "C", look)
    assert c["pid"] not in (a["pid"], b["pid"]) and c["ppid"] == server.pid
    assert c["global"] is None and c["env"] is None
    assert len({b["random"], again["random"], c["random"]}) == 3  # each its own random stream


def test_the_server_runs_no_task_and_a_lost_server_is_replaced(
    executor: TaskProcessExecutor,
) -> None:
    first, _ = run(executor, "A", look)
    server = executor._server
    assert server is not None
    # What a task did to its own process is not in the server: a later fork is clean.
    run(executor, "B", plant)
    c, _ = run(executor, "C", look)
    assert c["global"] is None and c["ppid"] == server.pid

    os.kill(server.pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while server.alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not server.alive()
    d, _ = run(executor, "D", look)
    assert executor._server is not None and executor._server is not server
    assert d["ppid"] == executor._server.pid and d["global"] is None


def test_a_spawned_task_process_still_works_without_the_server(tmp_path: Path) -> None:
    ex = TaskProcessExecutor(
        1, memory_limit=None, jobs_dir=str(tmp_path / "jobs"), fork_server=False
    )
    ex._view = {"name": "zygote-test"}
    try:
        b, _ = run(ex, "B", look)
        assert ex._server is None and b["ppid"] == os.getpid() and b["isolated"] == 1
    finally:
        ex.shutdown()


def _is_gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] == "Z"  # a zombie of another process: not running
    except OSError:
        return True
