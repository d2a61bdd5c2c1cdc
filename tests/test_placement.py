"""Placement: tasks with a ``where`` requirement run only on nodes that meet it.

The grid here has two real volunteers with different labels and CPUs. That a task waits for a
node no one offers yet and starts when one joins is tested in-process
(tests/test_plugin_inprocess.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Portal, portal_with
from gridtasks import where_and_what
from test_matching import make_node

from grid_portal.errors import Unsatisfiable, UsageError
from grid_portal.jobs.workflow import release_outputs, workflow_outputs
from grid_portal.model import CPU, GPU, MEMORY, NodeState
from grid_portal.requirements import describe_refusal, match_report
from grid_portal.requirements.matching import ExpressionError

# -- which nodes match, and why the others do not ----------------------------------------------


def test_match_report_names_the_closest_nodes_and_what_they_lack() -> None:
    nodes = [
        make_node("laptop", gpus=(("RTX 3060", "12GB", "8.6"),), labels={"room": "B12"}),
        make_node("desktop", labels={"room": "A1"}),
        make_node("gpu-box", gpus=(("A100", "80GB", "8.0"),), labels={"room": "B12"}),
        make_node("gone", gpus=(("A100", "80GB", "8.0"),), state=NodeState.OFFLINE),
    ]
    report = match_report(nodes, "gpu.memory >= 16GB and labels.room == 'B12'")
    assert report["matching"] == ["gpu-box"]
    assert report["online"] == 3  # the offline node is not counted
    assert report["closest"] == [
        {"name": "laptop", "reasons": ["gpu.memory is 12.0 GB, needs >= 16.0 GB"]},
        {
            "name": "desktop",
            "reasons": [
                "gpu.memory is 0 B, needs >= 16.0 GB",
                'labels.room is "A1", needs == "B12"',
            ],
        },
    ]


def test_match_report_counts_resources_too() -> None:
    nodes = [make_node("small", cpus=2, memory="4GB"), make_node("big", cpus=16, memory="64GB")]
    report = match_report(nodes, None, {CPU: 8, MEMORY: 8e9, GPU: 0})
    assert report["matching"] == ["big"]
    assert report["closest"][0]["reasons"] == [
        "offers 2 CPUs, needs 8",
        "offers 4.0 GB memory, needs 8.0 GB",
    ]
    message = describe_refusal("where 'cpus >= 8'", match_report(nodes[:1], "cpus >= 8"))
    assert "small: cpus is 2, needs >= 8" in message and "wait=True" in message


def test_a_bad_requirement_is_refused_before_matching() -> None:
    with pytest.raises(ExpressionError, match="unknown attribute 'gpu.mem'"):
        match_report([make_node()], "gpu.mem >= 16GB")


# -- on a real grid -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def grid(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Portal, Path]]:
    tmp = tmp_path_factory.mktemp("placement")
    small = ("small", "--cpus", "1", "--memory", "1GB", "--label", "room=A")
    big = ("big", "--cpus", "2", "--memory", "1GB", "--label", "room=B", "--label", "tier=fast",
           "--oversubscribe")  # fmt: skip
    with portal_with(tmp, small, big) as portal:
        yield portal, tmp


@pytest.mark.parametrize(
    ("where", "expected"),
    [
        ('labels.room == "B"', {"big"}),
        ('labels.room == "A"', {"small"}),
        ("cpus >= 2", {"big"}),
        ('"tier" in labels or name == "small"', {"big", "small"}),
    ],
)
def test_tasks_land_only_on_matching_nodes(
    grid: tuple[Portal, Path], where: str, expected: set[str]
) -> None:
    portal, _ = grid
    with portal.grid() as g:
        futures = g.map(where_and_what, range(12), [0.02] * 12, where=where)
        ran_on = {node for node, _ in g.gather(futures)}
    if len(expected) == 1:
        assert ran_on == expected
    else:
        assert ran_on <= expected


def test_a_workflow_stage_runs_where_it_says(grid: tuple[Portal, Path]) -> None:
    portal, _ = grid
    spec = {
        "name": "placed",
        "stages": [
            {
                "name": "anywhere",
                "run": "gridtasks:where_and_what",
                "map": {"range": {"stop": 4}, "as": "value"},
            },
            {
                "name": "on-a",
                "run": "gridtasks:wf_where_ran",
                "where": 'labels.room == "A"',
                "needs": ["anywhere"],
            },
        ],
    }
    with portal.grid() as g:
        job = g.run_workflow(spec, wait=True)
        assert job.state.value == "done", job.error
        outputs = workflow_outputs(g, job.id)
        release_outputs(g, job.id)
        detail = g._call("grid_job_tasks", job_id=job.id)
    assert outputs["on-a"] == {"node": "small", "inputs": 4}
    assert {t["node"] for t in detail["tasks"] if t["stage"] == "on-a"} == {"small"}


def test_what_no_node_meets_is_refused_at_once_with_the_closest_nodes(
    grid: tuple[Portal, Path],
) -> None:
    portal, _ = grid
    with portal.grid() as g:
        before = len(g.jobs())
        with pytest.raises(Unsatisfiable) as info:
            g.submit(where_and_what, 1, where='labels.room == "C" and cpus >= 2')
        message = str(info.value)
        assert 'big: labels.room is "B", needs == "C"' in message
        assert "small:" in message and "cpus is 1, needs >= 2" in message
        assert "wait=True" in message
        with pytest.raises(ExpressionError, match="did you mean labels.room") as bad:
            g.submit(where_and_what, 1, where='label.room == "B"')
        assert isinstance(bad.value, UsageError)
        assert len(g.jobs()) == before  # nothing was submitted
