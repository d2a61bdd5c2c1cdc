"""`replicas: 2`: each task runs on two different nodes and the portal compares the results.

Two real volunteers: "honest" and "liar". ``gridtasks.honest_unless_liar`` returns a different
value on a node whose name starts with "liar", as a faulty or dishonest machine would.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from conftest import Portal, portal_with, wait_for

from grid_portal import Grid
from grid_portal.jobs.spec import MAX_REPLICAS, SpecError, load_spec
from grid_portal.jobs.workflow import workflow_outputs
from grid_portal.model import Job, JobState


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Portal]:
    tmp = tmp_path_factory.mktemp("replicas")
    nodes = [(name, "--cpus", "1", "--memory", "1GB") for name in ("honest", "liar")]
    with portal_with(tmp, *nodes) as portal:
        yield portal


def two_stages(run: str, items: int) -> dict[str, Any]:
    return {
        "name": "checked",
        "replicas": 2,
        "stages": [
            {"name": "work", "run": run, "map": {"range": {"stop": items}, "as": "i"}},
            {"name": "sum", "run": "gridtasks:total", "needs": ["work"], "replicas": 1},
        ],
    }


def finished(grid: Grid, job_id: str) -> Job:
    return wait_for(
        lambda: (j := grid.get_job(job_id)) and j.state.finished and j,
        timeout=60,
        what=f"job {job_id} to finish",
    )


def test_copies_that_agree_run_on_different_nodes(pair: Portal) -> None:
    spec = two_stages("gridtasks:plus_one", 4)
    spec["stages"][1]["run"] = "gridtasks:total"
    spec["stages"][0]["name"] = "slow"  # gridtasks.total takes `slow`
    spec["stages"][1]["needs"] = ["slow"]
    with pair.grid() as grid:
        job = grid.run_workflow(spec, wait=True)
        assert job.state is JobState.DONE, job.error
        assert workflow_outputs(grid, job.id) == {"sum": 1 + 2 + 3 + 4}
        assert job.tasks_total == 4 * 2 + 1
        tasks = grid._call("grid_job_tasks", job_id=job.id)["tasks"]
        node = {t["key"]: t["node"] for t in tasks}
        for i in range(4):
            first = node[str((f"slow-{job.id}", i))]
            second = node[str((f"slow-{job.id}-replica1", i))]
            assert {first, second} == {"honest", "liar"}, (i, first, second)
        stages = {s["stage"]: s for s in grid._call("grid_job_tasks", job_id=job.id)["stages"]}
        assert stages["slow"]["done"] == stages["slow-replica1"]["done"] == 4


def test_copies_that_disagree_fail_the_job_loudly(pair: Portal) -> None:
    with pair.grid() as grid:
        job = grid.run_workflow(two_stages("gridtasks:honest_unless_liar", 2), wait=True)
        job = finished(grid, job.id)
        assert job.state is JobState.FAILED
        assert "disagree" in job.error and "honest" in job.error and "liar" in job.error
        assert "faulty or dishonest" in job.error
        tasks = grid._call("grid_job_tasks", job_id=job.id)["tasks"]
        flagged = [t for t in tasks if (t["error"] or "").startswith("replicas disagree")]
        assert len(flagged) >= 2  # both copies of the task that disagreed
        assert {t["node"] for t in flagged} == {"honest", "liar"}
        # Nothing used the unchecked result: the stage that needs it never ran.
        assert all(t["state"] != "done" for t in tasks if t["stage"] == "sum")
        with pytest.raises(Exception, match="no outputs|keeps no outputs"):
            workflow_outputs(grid, job.id)


def test_the_spec_bounds_replicas() -> None:
    base = {"name": "r", "stages": [{"name": "a", "run": "m:f", "map": {"range": {"stop": 3}}}]}
    assert load_spec(base).stages[0].replicas == 1
    assert load_spec({**base, "replicas": 2}).stages[0].replicas == 2
    own = {"name": "r", "replicas": 3, "stages": [{"name": "a", "run": "m:f", "replicas": 1}]}
    assert load_spec(own).stages[0].replicas == 1
    assert load_spec({**base, "replicas": 2}).to_dict()["stages"][0]["replicas"] == 2
    for bad in (0, MAX_REPLICAS + 1, "2"):
        with pytest.raises(SpecError, match="replicas"):
            load_spec({**base, "replicas": bad})
    # Copies are tasks: they count towards the limit on tasks per job.
    big = {"name": "r", "replicas": 2, "stages": [{"name": "a", "run": "m:f"}]}
    big["stages"][0]["map"] = {"range": {"stop": 60_000}}
    with pytest.raises(SpecError, match="120,000 tasks"):
        load_spec(big)
