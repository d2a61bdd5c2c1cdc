"""The portal plugin in-process, in Dask's own test harness (issue 15, point 7).

``gen_cluster`` starts a scheduler and workers in this process; each test installs a fresh
``PortalPlugin`` on that scheduler and talks to it with the grid's own Dask client
(``GridDaskClient``: opaque payloads, as the plugin's graph guard wants), through the
plugin's handlers (``client.scheduler.grid_jobs(...)``). What the process-level suite still
owns: roles and refusals over real TLS (tests/test_roles.py), the sandbox and task processes,
and the end-to-end paths (CLI, Jupyter, restarts of a real portal process). The process-level
tests these replace are gone: a failing task and cancelling a job (test_jobs.py), a task that
waits for a matching node to join (test_placement.py), two users taking turns
(test_fairshare.py).

How the harness is set up, and why:
- Every comm is ``inproc://`` (``scheduler_kwargs={"protocol": "inproc"}`` and the workers'
  ``protocol``): the gate (grid_portal/guard.py) treats an in-process peer as the process
  itself (``IN_PROCESS``, the portal's admin). Over the harness's default TCP the peer has no
  certificate and every grid handler is refused, as it must be.
- ``client=False``: the harness's client is a plain ``distributed.Client``, whose graphs the
  graph guard refuses; each test opens a ``GridDaskClient`` instead.
- The plugin's graph guard swaps ``distributed.protocol.core.pickle`` for a data-only one in
  the whole process. Over inproc nothing is serialized, so the test's own client is not
  affected; the ``_restore_process`` fixture puts Dask's module (and ``dask.config``, which
  ``Scheduling`` changes) back after each test, so no other test in the session runs with it.
- Workers advertise what volunteers advertise: ``resources`` (CPU, MEMORY, GPU) and the
  ``grid`` startup information a real node sends (grid_portal/node/plugin.py), which is how
  labels reach the registry and placement.

Task functions live at module level: their payloads pickle them by reference, and workers in
this process run them in their threads, so they can share a ``threading.Event``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import threading
from collections.abc import AsyncIterator
from typing import Any

import dask
import distributed.protocol.core as dask_core
import pytest
from distributed import Worker, get_worker
from distributed.core import Status
from distributed.utils_test import gen_cluster

from grid_portal.daskclient import GridDaskClient
from grid_portal.jobs.graph import job_annotations, resubmit_workflow
from grid_portal.payload import opened
from grid_portal.portal.plugin import PortalPlugin
from grid_portal.protocol import JOB_OWNER_ANNOTATION
from grid_portal.replication import submit_replicated

GIB = 2**30
RESOURCES = {"CPU": 2, "MEMORY": 4 * GIB, "GPU": 0}


def node(labels: dict[str, str] | None = None, cpus: int = 2) -> dict[str, Any]:
    """A harness worker's keywords: a volunteer's resources and startup report."""
    info = {
        "labels": labels or {},
        "offer": {"cpus": cpus, "memory": 4 * GIB, "gpus": []},
        "sandbox": "none",
    }
    return {
        "protocol": "inproc",
        "resources": {**RESOURCES, "CPU": cpus},
        "startup_information": {"grid": lambda worker: info},
    }


def grid_cluster(*nodes: dict[str, Any], threads: int = 2) -> Any:
    """``gen_cluster`` over inproc comms with these nodes (defaults: two unlabelled nodes)."""
    nodes = nodes or (node(), node())
    return gen_cluster(
        client=False,
        scheduler="",
        nthreads=[("", threads, kw) for kw in nodes],
        scheduler_kwargs={"protocol": "inproc"},
        timeout=20,
    )


@pytest.fixture(autouse=True)
def _restore_process() -> Any:
    pickle_module = dask_core.pickle
    config = dask.config.config
    dask.config.config = dask.config.merge(config)  # a copy, put back after each test
    yield
    dask_core.pickle = pickle_module
    dask.config.config = config


@contextlib.asynccontextmanager
async def portal(s: Any, **kwargs: Any) -> AsyncIterator[tuple[PortalPlugin, GridDaskClient]]:
    """A fresh PortalPlugin on the harness's scheduler, and a grid client of it."""
    plugin = PortalPlugin(telemetry_interval=0.2, **kwargs)
    s.add_plugin(plugin)
    await plugin.start(s)  # add_plugin does not start it; start() also adds present workers
    async with GridDaskClient(s.address, asynchronous=True) as client:
        yield plugin, client


async def wait_until(predicate: Any, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("timed out waiting")
        await asyncio.sleep(0.01)


async def job_state(client: GridDaskClient, job_id: str) -> dict[str, Any]:
    return await client.scheduler.grid_job(job_id=job_id)


def annotations(job_id: str, **more: Any) -> Any:
    """What ``Grid.job`` and ``Grid.submit`` annotate."""
    return dask.annotate(
        **job_annotations(job_id, f"job {job_id}", "task"),
        resources=more.pop("resources", {"CPU": 1}),
        **more,
    )


# -- task functions ---------------------------------------------------------------------------
GATE = threading.Event()  # blocking tasks wait for it; each test sets it before it ends
RAN: list[tuple[str, Any]] = []  # (owner, item) in the order tasks ran (fair share)


def square(i: int) -> int:
    return i * i


def blocked(i: int) -> int:
    GATE.wait(10)
    return i


def boom(message: str) -> None:
    raise ValueError(message)


def where_am_i(i: int) -> str:
    return str(get_worker().name)


def same_everywhere(i: int) -> int:
    return i * 10


CALLS = itertools.count()


def a_new_answer_each_time(i: int) -> int:
    return next(CALLS)


def record(owner: str, i: int) -> int:
    RAN.append((owner, i))
    return i


@pytest.fixture(autouse=True)
def _gate() -> Any:
    GATE.clear()
    RAN.clear()
    yield
    GATE.set()  # never leave a worker thread waiting


# -- jobs from annotations ----------------------------------------------------------------------
@grid_cluster()
async def test_a_job_appears_progresses_and_finishes(s, a, b):
    async with portal(s) as (plugin, client):
        with annotations("job-1"):
            quick = client.map(square, range(3), key=[f"sq-{i}" for i in range(3)])
            slow = client.submit(blocked, 7, key="slow")
        await client.gather(quick)

        async def progressed() -> bool:
            job = await job_state(client, "job-1")
            return job["tasks_done"] == 3

        await wait_until(progressed)
        job = await job_state(client, "job-1")
        assert job["state"] == "running"
        assert job["tasks_total"] == 4
        assert job["name"] == "job job-1"
        assert job["owner"] == "(this process)"  # the harness's peer is the process itself

        GATE.set()
        assert opened(await slow) == 7
        assert [opened(r) for r in await client.gather(quick)] == [0, 1, 4]

        async def done() -> bool:
            return (await job_state(client, "job-1"))["state"] == "done"

        await wait_until(done)
        job = await job_state(client, "job-1")
        assert (job["tasks_done"], job["tasks_failed"], job["error"]) == (4, 0, None)
        assert set(job["nodes"]) <= {"0", "1"} and job["nodes"]
        listed = await client.scheduler.grid_jobs()
        assert [j["id"] for j in listed["jobs"]] == ["job-1"]


@grid_cluster()
async def test_a_failed_task_fails_its_job_with_the_error(s, a, b):
    async with portal(s) as (plugin, client):
        with annotations("job-2"):
            good = client.submit(square, 3, key="good")
            bad = client.submit(boom, "the flux capacitor melted", key="bad")
        assert opened(await good) == 9
        with pytest.raises(ValueError, match="flux capacitor"):
            await bad

        async def finished() -> bool:
            return (await job_state(client, "job-2"))["state"] == "failed"

        await wait_until(finished)
        job = await job_state(client, "job-2")
        assert (job["tasks_done"], job["tasks_failed"]) == (1, 1)
        assert "the flux capacitor melted" in job["error"]


# -- cancel ------------------------------------------------------------------------------------
@grid_cluster()
async def test_cancel_stops_running_and_queued_tasks(s, a, b):
    async with portal(s) as (plugin, client):
        # Each task takes a whole node (CPU 2): two run, four wait.
        with annotations("job-3", resources={"CPU": 2}):
            futures = client.map(blocked, range(6), key=[f"b-{i}" for i in range(6)])

        async def two_running() -> bool:
            return sum(1 for ts in s.tasks.values() if ts.state == "processing") == 6 and (
                len([w for w in (a, b) if w.state.executing_count]) == 2
            )

        await wait_until(two_running)
        reply = await client.scheduler.grid_job_cancel(job_id="job-3", reason="enough of that")
        assert reply["job"]["state"] == "cancelled"
        assert reply["job"]["error"] == "enough of that"

        async def all_cancelled() -> bool:
            return all(f.status == "cancelled" for f in futures)

        await wait_until(all_cancelled)
        GATE.set()  # the two running threads end; nothing else may start

        async def scheduler_let_go() -> bool:
            return not any(k in s.tasks for k in (f.key for f in futures))

        await wait_until(scheduler_let_go)
        job = await job_state(client, "job-3")
        assert job["state"] == "cancelled" and job["tasks_done"] == 0

        # Tasks that arrive for a cancelled job are cancelled on arrival.
        with annotations("job-3"):
            late = client.submit(square, 2, key="late")
        await wait_until(lambda: _true(late.status == "cancelled"))
        # A job that is not there is refused by name (Grid.cancel shows it as one line).
        with pytest.raises(Exception, match="no job 'no-such-job'"):
            await client.scheduler.grid_job_cancel(job_id="no-such-job")


async def _true(value: bool) -> bool:
    return value


# -- placement ---------------------------------------------------------------------------------
@grid_cluster(node({"room": "A"}), node({"room": "B"}))
async def test_where_runs_only_on_matching_nodes_and_waits_for_one(s, a, b):
    async with portal(s) as (plugin, client):
        names = {n["name"]: n["labels"] for n in await client.scheduler.grid_nodes()}
        assert names == {"0": {"room": "A"}, "1": {"room": "B"}}

        with annotations("job-4", grid_where='labels.room == "B"'):
            futures = client.map(where_am_i, range(8), key=[f"w-{i}" for i in range(8)])
        assert {opened(r) for r in await client.gather(futures)} == {"1"}

        # Nothing matches yet: the task waits (no-worker) until a matching node joins.
        with annotations("job-5", grid_where='labels.room == "C"'):
            waiting = client.submit(where_am_i, 0, key="c-0")

        async def parked() -> bool:
            ts = s.tasks.get("c-0")
            return ts is not None and ts.state == "no-worker"

        await wait_until(parked)
        # Who may join is checked on the node's TLS certificate (tests/test_roles.py); an
        # in-process worker has none, so this portal lets it in.
        plugin.refusal = lambda identity, name: None
        async with Worker(s.address, nthreads=1, name="late-c", **node({"room": "C"})):
            assert opened(await waiting) == "late-c"
        job = await job_state(client, "job-5")
        assert job["nodes"] == ["late-c"]


# -- replicas ------------------------------------------------------------------------------------
@grid_cluster()
async def test_replicas_run_on_distinct_nodes_and_are_compared(s, a, b):
    async with portal(s) as (plugin, client):
        with annotations("job-6"):
            agreed = submit_replicated(
                client, same_everywhere, [((i,), {}) for i in range(3)], 2, {"CPU": 1}
            )
        assert [opened(r) for r in await client.gather(agreed)] == [0, 10, 20]

        async def done() -> bool:
            return (await job_state(client, "job-6"))["state"] == "done"

        await wait_until(done)
        report = await client.scheduler.grid_job_tasks(job_id="job-6")
        copies: dict[Any, set[str]] = {}
        for task in report["tasks"]:
            if "agreed" not in str(task.get("stage")):
                copies.setdefault(task.get("item"), set()).add(task["node"])
        assert copies and all(nodes == {"0", "1"} for nodes in copies.values()), report["tasks"]


@grid_cluster()
async def test_replicas_that_disagree_fail_the_job_naming_the_nodes(s, a, b):
    async with portal(s) as (plugin, client):
        with annotations("job-7"):
            (agreed,) = submit_replicated(
                client, a_new_answer_each_time, [((0,), {})], 2, {"CPU": 1}
            )
        with pytest.raises(Exception):  # noqa: B017 - cancelled: never an unchecked value
            await agreed

        async def failed() -> bool:
            return (await job_state(client, "job-7"))["state"] == "failed"

        await wait_until(failed)
        error = (await job_state(client, "job-7"))["error"]
        assert "disagree" in error and "0 returned" in error and "1 returned" in error, error


# -- copies the scheduler asked a node to make ------------------------------------------------------
@grid_cluster()
async def test_a_node_that_leaves_is_owed_no_copies(s, a, b):
    """The portal believes a node's "I copied it" only for copies it asked for (Access); a
    node that leaves takes those requests with it, so a later worker at its address (one
    that reconnects) cannot claim them."""
    async with portal(s) as (plugin, client):
        with annotations("job-copies"):
            held = client.submit(square, 3, key="held")
        assert opened(await held) == 9
        holder = next(iter(s.tasks["held"].who_has)).address
        target = a if holder == b.address else b
        target.status = Status.paused  # a paused worker fetches nothing: the request stays open
        s.request_acquire_replicas(target.address, ["held"], stimulus_id="test-copies")
        assert plugin.access.replicas_asked == {target.address: {"held"}}

        await s.remove_worker(target.address, stimulus_id="test-leaves")
        assert target.address not in plugin.access.replicas_asked
        assert opened(await held) == 9  # the copy on the node that stays is untouched


# -- fair share ------------------------------------------------------------------------------------
@grid_cluster(node(cpus=2), threads=1)
async def test_two_owners_jobs_interleave(s, a):
    async with portal(s) as (plugin, client):
        # Carol's task holds the only slot while Alice, then Bob, queue six tasks each. The
        # portal's admin (this process) may name a job's owner, as the portal does on
        # resubmission.
        with annotations("carol-job", resources={"CPU": 2}, **{JOB_OWNER_ANNOTATION: "carol"}):
            hold = client.submit(blocked, 0, key="hold")
        await wait_until(lambda: _true(a.state.executing_count == 1))
        futures = []
        for owner in ("alice", "bob"):
            with annotations(f"{owner}-job", resources={"CPU": 2}, **{JOB_OWNER_ANNOTATION: owner}):
                futures += client.map(
                    record, [owner] * 6, range(6), key=[f"{owner}-{i}" for i in range(6)]
                )
        await wait_until(lambda: _true(all(f.key in s.tasks for f in futures)))
        # Fair share puts a tag in front of Dask's priority: the two users' tasks take turns.
        queue = sorted(futures, key=lambda f: s.tasks[f.key].priority)
        assert [f.key.split("-")[0] for f in queue] == ["alice", "bob"] * 6
        GATE.set()
        await hold
        await client.gather(futures)
        assert sorted(owner for owner, _ in RAN) == ["alice"] * 6 + ["bob"] * 6
        jobs = {
            j["id"]: j["owner"] for j in (await client.scheduler.grid_jobs(everyone=True))["jobs"]
        }
        assert jobs == {"carol-job": "carol", "alice-job": "alice", "bob-job": "bob"}
        share = await client.scheduler.grid_fairshare()
        assert {"alice", "bob"} <= set(share["users"]), share


# -- recovery ------------------------------------------------------------------------------------
WORKFLOW = {
    "name": "survives a restart",
    "stages": [
        {"name": "slow", "run": "gridtasks:slow_square", "map": {"range": {"stop": 4}, "as": "i"}},
        {"name": "sum", "run": "gridtasks:total", "needs": ["slow"]},
    ],
}


@pytest.fixture
def interrupted_ledger(tmp_path):
    """A ledger left by a portal that died with a workflow (kept spec) and a plain job running."""
    path = tmp_path / "ledger.sqlite"
    before = PortalPlugin(ledger_path=path)
    before.jobs.ensure("wf-1", owner="alice", name="wf", kind="workflow", spec=WORKFLOW)
    before.jobs.add_tasks("wf-1", ["x"], None, 0)
    before.jobs.task_started("x", "0")
    before.jobs.ensure("plain-1", owner="alice", name="plain", kind="task")
    before.jobs.add_tasks("plain-1", ["y"], None, 0)
    before.jobs.flush()
    return path


@grid_cluster()
async def test_a_kept_workflow_is_reopened_and_runs_again_after_a_restart(
    s, a, b, interrupted_ledger
):
    async with portal(s, ledger_path=interrupted_ledger) as (plugin, client):
        # Reopened when the plugin is built, before anyone could see it interrupted.
        job = await job_state(client, "wf-1")
        assert (job["state"], job["owner"], job["tasks_total"]) == ("queued", "alice", 0)
        assert [r.job_id for r in plugin.recovery.pending] == ["wf-1"]
        plain = await job_state(client, "plain-1")
        assert plain["state"] == "interrupted"
        assert "keeps no copy" in plain["error"]

        # What Recovery submits, through this process's client (the admin names the owner).
        with dask.annotate(**{JOB_OWNER_ANNOTATION: "alice"}):
            futures = resubmit_workflow(client, "wf-1", WORKFLOW)

        async def done() -> bool:
            return (await job_state(client, "wf-1"))["state"] == "done"

        await wait_until(done)
        assert [opened(r) for r in await client.gather(futures)] == [0 + 1 + 4 + 9]
        job = await job_state(client, "wf-1")
        assert (job["owner"], job["tasks_done"], job["tasks_failed"]) == ("alice", 5, 0)
