"""Pipelines (issue 16): items stream through one-to-one stages (`map: {each: ...}`).

One portal and three volunteers with different labels serve the whole module: two "cpu"
nodes and one "mid" node. Every check reads the portal's task records (the ledger's
``job_tasks`` rows, flushed by ``grid_job_tasks``), never the tasks' own clocks.
"""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cloudpickle
import pytest
from conftest import Portal, grid_portal_command, start_portal, start_volunteer, wait_for

from grid_portal.jobs.spec import load_spec
from grid_portal.jobs.workflow import failed_items, release_outputs, workflow_outputs
from grid_portal.model import JobState

CPU_NODES = {"cpu-a", "cpu-b"}
MID_NODES = {"mid"}
ON_CPU = 'labels.role == "cpu"'
ON_MID = 'labels.role == "mid"'

# What the admin's client.run sends to a node is pickled by value: nodes need not import this.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope="module")
def portal(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Portal]:
    tmp = tmp_path_factory.mktemp("pipelines")
    p = start_portal(tmp)
    try:
        for name, role in (("cpu-a", "cpu"), ("cpu-b", "cpu"), ("mid", "mid")):
            args = ("--cpus", "2", "--memory", "1GB", "--label", f"role={role}")
            start_volunteer(p, tmp, name, *args, wait=False)
        with p.grid() as grid:
            wait_for(
                lambda: {n.name for n in grid.nodes() if n.online} >= CPU_NODES | MID_NODES,
                timeout=60,
                what="three volunteers",
            )
        yield p
    finally:
        p.stop()


def three_stages(items: int, **changes: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "name": "pipeline",
        "stages": [
            {
                "name": "decode",
                "run": "gridtasks:pipe_first",
                "map": {"range": {"stop": items}, "as": "item"},
                "params": {"seconds": 0.05, "size": 20_000},
                "where": ON_CPU,
            },
            {
                "name": "encode",
                "run": "gridtasks:pipe_next",
                "map": {"each": "decode"},
                "params": {"seconds": 0.05},
                "where": ON_MID,
            },
            {
                "name": "verify",
                "run": "gridtasks:pipe_next",
                "map": {"each": "encode"},
                "params": {"seconds": 0.02},
                "where": ON_CPU,
            },
        ],
    }
    for stage, fields in changes.items():
        next(s for s in spec["stages"] if s["name"] == stage).update(fields)
    return spec


def records(grid: Any, job_id: str) -> dict[tuple[str, int], dict[str, Any]]:
    detail = grid._call("grid_job_tasks", job_id=job_id)  # flushes the ledger first
    return {(t["stage"], t["item"]): t for t in detail["tasks"] if t["item"] is not None}


def run(grid: Any, spec: dict[str, Any], timeout: float = 60) -> Any:
    job = grid.run_workflow(spec)
    wait_for(lambda: grid.get_job(job.id).state.finished, timeout=timeout, what="the job")
    return grid.get_job(job.id)


def test_items_stream_through_stages_placed_by_where_and_fail_alone(
    portal: Portal, tmp_path: Path
) -> None:
    # Decoding spans about 1.5 s: longer than a job's first task processes take to start on
    # the mid node (a fresh sandbox per job), so "no barrier" is what the test measures.
    spec = three_stages(
        40,
        decode={"params": {"seconds": 0.15, "size": 20_000}},
        verify={"params": {"seconds": 0.02, "fail_item": 7}},
    )
    with portal.grid() as grid:
        job = run(grid, spec)
        tasks = records(grid, job.id)
    # One item's failure fails only its own chain: the job says failed, 39 items are done.
    assert job.state is JobState.FAILED and "item 7 is broken" in (job.error or "")
    assert tasks[("verify", 7)]["state"] == "failed"
    done = [i for i in range(40) if tasks[("verify", i)]["state"] == "done"]
    assert done == [i for i in range(40) if i != 7]
    assert all(tasks[(s, i)]["state"] == "done" for s in ("decode", "encode") for i in range(40))
    # No barrier: item 0's second stage started before the first stage's last item ended.
    last_decode = max(tasks[("decode", i)]["finished"] for i in range(40))
    assert tasks[("encode", 0)]["started"] < last_decode, (tasks[("encode", 0)], last_decode)
    # Each stage ran only on nodes that meet its `where`.
    for stage, allowed in (("decode", CPU_NODES), ("encode", MID_NODES), ("verify", CPU_NODES)):
        assert {tasks[(stage, i)]["node"] for i in range(40)} <= allowed, stage
    # The ledger keeps each item's path: node, start, end and the bytes that moved to it.
    ledger = sqlite3.connect(portal.data_dir / "ledger.sqlite")
    rows = ledger.execute(
        "SELECT stage, item, node, started, finished, moved, moved_from FROM job_tasks "
        "WHERE job_id = ? AND item = 3 ORDER BY started",
        (job.id,),
    ).fetchall()
    assert [r[0] for r in rows] == ["decode", "encode", "verify"]
    decode, encode, verify = rows
    assert decode[5] == 0 and encode[2] == "mid" and encode[6] == decode[2]
    assert encode[5] > 20_000  # the payload moved from the cpu node to the mid node
    assert decode[4] <= encode[3] + 0.05 and encode[4] <= verify[3] + 0.05
    # `grid-portal job ID` shows which stage each item is in and where it ran.
    shown = subprocess.run(
        grid_portal_command("job", job.id, "--portal", portal.connection_file),
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    assert "items: the stage each is in" in shown and "encode@mid" in shown
    # The 39 items that got through are kept and reachable; the broken one says why.
    with portal.grid() as grid:
        outputs = workflow_outputs(grid, job.id, partial=True)
    verify = outputs["verify"]
    assert [v["item"] for i, v in enumerate(verify) if i != 7] == [i for i in range(40) if i != 7]
    assert [verify[i]["path"][1] for i in (0, 39)] == ["mid", "mid"]
    (broken,) = failed_items(outputs)["verify"].items()
    assert broken[0] == 7 and "item 7 is broken" in str(broken[1])
    fetched = subprocess.run(
        grid_portal_command(
            "job", job.id, "--fetch", str(tmp_path / "out"), "--portal", portal.connection_file
        ),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert fetched.returncode != 0, fetched.stdout + fetched.stderr  # the job failed...
    assert "verify[7]: failed: ValueError: item 7 is broken" in fetched.stdout  # ...this item
    assert "verify: [{" in fetched.stdout  # and the others came back


def test_the_next_stage_runs_where_its_input_is_when_it_fits_there(portal: Portal) -> None:
    spec = three_stages(24, encode={"where": ON_CPU})  # decode and encode both fit on cpu-*
    spec["stages"].pop()  # two stages are enough
    with portal.grid() as grid:
        job = run(grid, spec)
        tasks = records(grid, job.id)
    assert job.state is JobState.DONE, job.error
    same = [i for i in range(24) if tasks[("encode", i)]["node"] == tasks[("decode", i)]["node"]]
    # Dask places a task with its input; work stealing may still move one at the very end.
    assert len(same) >= 22, {
        i: (tasks[("decode", i)]["node"], tasks[("encode", i)]["node"]) for i in range(24)
    }
    assert all(tasks[("encode", i)]["moved"] == 0 for i in same)


def test_stream_false_keeps_a_barrier_between_stages(portal: Portal) -> None:
    spec = three_stages(12)
    spec["stages"][1]["map"] = {"each": "decode", "stream": False}
    with portal.grid() as grid:
        job = run(grid, spec)
        tasks = records(grid, job.id)
        from grid_portal.jobs.workflow import release_outputs, workflow_outputs

        outputs = workflow_outputs(grid, job.id)
        release_outputs(grid, job.id)
    assert job.state is JobState.DONE, job.error
    last_decode = max(tasks[("decode", i)]["finished"] for i in range(12))
    assert min(tasks[("encode", i)]["started"] for i in range(12)) >= last_decode - 0.05
    assert [o["item"] for o in outputs["verify"]] == list(range(12))  # item i got item i


def test_a_fan_in_stage_after_a_pipeline_waits_for_every_item(portal: Portal) -> None:
    spec = three_stages(8)
    spec["stages"].append(
        {"name": "count", "run": "gridtasks:pipe_count", "needs": ["verify"], "where": ON_CPU}
    )
    with portal.grid() as grid:
        job = run(grid, spec)
        detail = grid.job_tasks(job.id)
        outputs = workflow_outputs(grid, job.id)
        from grid_portal.jobs.workflow import release_outputs

        release_outputs(grid, job.id)
    assert job.state is JobState.DONE, job.error
    assert detail is not None
    (count,) = [t for t in detail["tasks"] if t["stage"] == "count"]
    last_verify = max(t["finished"] for t in detail["tasks"] if t["stage"] == "verify")
    assert count["started"] >= last_verify - 0.05, (count, last_verify)
    assert outputs["count"] == 8  # it received all eight items at once


def test_a_fail_job_stage_fails_the_whole_job(portal: Portal) -> None:
    spec = three_stages(30, decode={"params": {"seconds": 0.2}})
    spec["stages"][1].update({"fail": "job", "params": {"fail_item": 0}})
    with portal.grid() as grid:
        job = run(grid, spec)
        tasks = records(grid, job.id)
    assert job.state is JobState.FAILED and "fail: job" in (job.error or "")
    assert sum(t["state"] == "cancelled" for t in tasks.values()) > 0
    assert not [t for t in tasks.values() if t["state"] in ("running", "queued")]


def test_cancel_mid_pipeline_leaves_nothing_running(portal: Portal) -> None:
    spec = three_stages(40, decode={"params": {"seconds": 0.3}})
    with portal.grid() as grid:
        job = grid.run_workflow(spec)
        wait_for(
            lambda: records(grid, job.id).get(("encode", 0), {}).get("state") == "done",
            timeout=30,
            what="the first item's second stage",
        )
        grid.cancel(job.id)
        cancelled_at = time.time()

        def settled() -> dict[tuple[str, int], dict[str, Any]] | None:
            tasks = records(grid, job.id)
            busy = [t for t in tasks.values() if t["state"] in ("running", "queued")]
            return None if busy else tasks

        tasks = wait_for(settled, timeout=20, what="every chain to stop")
        assert grid.get_job(job.id).state is JobState.CANCELLED
        time.sleep(1.0)
        after = records(grid, job.id)
    assert sum(t["state"] == "cancelled" for t in tasks.values()) > 40
    assert not [t for t in after.values() if (t["started"] or 0) > cancelled_at + 0.5]
    assert after == tasks or all(a["state"] == tasks[k]["state"] for k, a in after.items())


def test_the_each_form_through_set_and_the_schema(tmp_path: Path) -> None:
    spec = {
        "name": "p",
        "stages": [
            {"name": "a", "run": "gridtasks:pipe_first", "map": {"range": {"stop": 3}}},
            {"name": "b", "run": "gridtasks:pipe_next"},
        ],
    }
    checked = load_spec(spec, ["stages.b.map.each=a", "stages.b.map.stream=false"])
    b = checked.stage("b")
    assert b.map is not None and (b.map.each, b.map.stream, b.map.as_name) == ("a", False, "a")
    assert b.needs == ["a"] and checked.count(b) == 3 and checked.task_count() == 6
    assert load_spec(checked.to_dict()).to_dict() == checked.to_dict()


# -- moving an item's input: to the faster link, once; retries per stage ----------------------


def _measured(bandwidth: float, dask_worker: Any = None) -> None:
    """On a node: what its agent does after measuring its link to the portal (node/agent.py);
    the worker's node plugin sends it with its next telemetry."""
    network = {"bandwidth": bandwidth, "rtt": 0.001, "measured_at": time.time()}
    dask_worker.plugins["grid-node"].network = network


def measure(grid: Any, bandwidths: dict[str, float]) -> None:
    """Have these nodes report these bandwidths, and wait until the portal has them."""
    for name, bandwidth in bandwidths.items():
        grid.client.run(_measured, bandwidth, workers=[grid.node(name).address])
    wait_for(
        lambda: all(grid.node(n).capacity.network.bandwidth == b for n, b in bandwidths.items()),
        timeout=30,
        what=f"the portal to see the bandwidths {bandwidths}",
    )


def test_a_moved_input_goes_to_the_node_with_more_bandwidth_to_its_sender(
    portal: Portal,
) -> None:
    # Every item's first stage runs on "mid", which cannot run the second stage: each input
    # must move, to cpu-a or cpu-b, equally idle. cpu-b's measured link is 10,000 times slower,
    # so its 2 MB would take 20 s to arrive there, longer than cpu-a takes for every item.
    # With Dask's one bandwidth for every pair, the items would be spread over both.
    spec = three_stages(
        8,
        decode={"where": ON_MID, "params": {"seconds": 0.02, "size": 2_000_000}},
        encode={"where": ON_CPU, "params": {"seconds": 0.3}},
    )
    spec["stages"].pop()
    names = ("mid", "cpu-a", "cpu-b")
    with portal.grid() as grid:
        before = {n: grid.node(n).capacity.network.bandwidth for n in names}
        measure(grid, {"mid": 1e9, "cpu-a": 1e9, "cpu-b": 1e5})
        try:
            job = run(grid, spec)
            tasks = records(grid, job.id)
            release_outputs(grid, job.id)
        finally:  # the other tests' nodes measure what they measured at enrolment
            measure(grid, {n: b for n, b in before.items() if b})
    assert job.state is JobState.DONE, job.error
    where = {i: tasks[("encode", i)]["node"] for i in range(8)}
    assert set(where.values()) == {"cpu-a"}, where
    assert all(tasks[("encode", i)]["moved"] > 2_000_000 for i in range(8))


def _incoming(dask_worker: Any = None) -> list[list[str]]:
    """On a node: the keys of each transfer it received from another node, as text."""
    return [[str(key) for key in entry["keys"]] for entry in dask_worker.transfer_incoming_log]


def test_staged_files_travel_to_the_node_that_needs_them_once(portal: Portal) -> None:
    # A shell stage makes a file per item on a cpu node; two stages on "mid" each use it.
    spec = {
        "name": "staged-once",
        "stages": [
            {
                "name": "decode",
                "run": {"shell": "head -c 300000 /dev/zero > clip{item}.bin"},
                "map": {"range": {"stop": 4}, "as": "item"},
                "outputs": ["clip*.bin"],
                "where": ON_CPU,
            },
            {
                "name": "encode",
                "run": {"shell": "cat {decode} > enc.bin"},
                "map": {"each": "decode"},
                "outputs": ["enc.bin"],
                "where": ON_MID,
            },
            {
                "name": "check",
                "run": {"shell": "wc -c < {decode}"},
                "map": {"each": "decode"},
                "where": ON_MID,
            },
        ],
    }
    with portal.grid() as grid:
        job = run(grid, spec)
        tasks = records(grid, job.id)
        outputs = workflow_outputs(grid, job.id)
        release_outputs(grid, job.id)
        address = grid.node("mid").address
        received = grid.client.run(_incoming, workers=[address])[address]
    assert job.state is JobState.DONE, job.error
    assert [int(text) for text in outputs["check"]] == [300_000] * 4
    # The ledger: both of an item's later stages used the file made on a cpu node...
    for i in range(4):
        made_on = tasks[("decode", i)]["node"]
        for stage in ("encode", "check"):
            assert tasks[(stage, i)]["node"] == "mid"
            assert tasks[(stage, i)]["moved"] >= 300_000, tasks[(stage, i)]
            assert tasks[(stage, i)]["moved_from"] == made_on, tasks[(stage, i)]
    # ...and "mid" received each item's file once: one transfer per key, whatever used it.
    decoded = [k for keys in received for k in keys if f"decode-{job.id}" in k]
    assert sorted(decoded) == sorted({k for k in decoded}) and len(decoded) == 4, received


def test_a_stage_retries_a_failed_item_and_a_failing_one_fails_only_its_chain(
    portal: Portal,
) -> None:
    # encode runs on "mid" only, so a retry runs there too. Item 3 fails its first try and
    # works on the second; item 5 fails every time and, after its one retry, fails its chain.
    spec = three_stages(
        10,
        encode={
            "retries": 1,
            "params": {"seconds": 0.02, "fail_once": 3, "fail_item": 5, "mark": uuid.uuid4().hex},
        },
    )
    with portal.grid() as grid:
        job = run(grid, spec)
        tasks = records(grid, job.id)
        outputs = workflow_outputs(grid, job.id, partial=True)
        release_outputs(grid, job.id)
    assert job.state is JobState.FAILED and "item 5 is broken" in (job.error or "")
    assert tasks[("encode", 3)]["state"] == "done" and tasks[("encode", 3)]["attempts"] == 2
    assert tasks[("verify", 3)]["state"] == "done"
    assert tasks[("encode", 5)]["state"] == "failed" and tasks[("encode", 5)]["attempts"] == 2
    assert tasks[("verify", 5)]["state"] != "done"
    others = [i for i in range(10) if i != 5]
    assert [i for i in range(10) if tasks[("verify", i)]["state"] == "done"] == others
    assert all(tasks[("encode", i)]["attempts"] == 1 for i in others if i != 3)
    assert [outputs["verify"][i]["item"] for i in others] == others
    (broken,) = failed_items(outputs)["verify"].items()
    assert broken[0] == 5 and "item 5 is broken" in str(broken[1])
