"""Retries when a node dies mid-task: a real volunteer process killed with SIGKILL while its
task runs. With retries left the task runs again on another node and the job succeeds; with
``retries=0`` it fails with a message naming the lost node (grid_portal/portal/retries.py).
Through ``Grid.submit``, ``%%grid --retries`` and a workflow stage's ``retries``."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Portal, magic_shell, portal_with, wait_for
from gridtasks import where_and_what
from IPython.core.interactiveshell import InteractiveShell
from IPython.utils.capture import capture_output

from grid_portal.errors import GridError, NodeLost, UsageError
from grid_portal.jobs.workflow import workflow_outputs
from grid_portal.model import JobState, NodeState

TASK_SECONDS = 6.0  # long enough to be killed mid-task, short enough to run twice


@pytest.fixture
def two_nodes(tmp_path: Path) -> Iterator[Portal]:
    nodes = [(name, "--cpus", "1", "--memory", "1GB") for name in ("alpha", "beta")]
    with portal_with(tmp_path, *nodes) as portal:
        yield portal


def kill_the_busy_node(portal: Portal) -> str:
    """Wait until one node runs the task, SIGKILL its volunteer (agent, nanny, worker and task
    processes: the whole machine gone), and return its name."""
    with portal.grid() as grid:
        busy = wait_for(
            lambda: next((n.name for n in grid.nodes() if n.state is NodeState.BUSY), None),
            timeout=60,
            what="a node to start the task",
        )
    volunteer = next(v for v in portal.volunteers if v.name == busy)
    volunteer.kill(signal.SIGKILL)
    return busy


def other(name: str) -> str:
    return {"alpha": "beta", "beta": "alpha"}[name]


def test_grid_submit_with_a_retry_runs_again_on_another_node(two_nodes: Portal) -> None:
    with two_nodes.grid() as grid:
        future = grid.submit(where_and_what, 7, TASK_SECONDS, retries=1)
        lost = kill_the_busy_node(two_nodes)
        assert future.result(timeout=120) == (other(lost), 7)


def test_grid_submit_with_no_retries_fails_naming_the_lost_node(two_nodes: Portal) -> None:
    with two_nodes.grid() as grid:
        future = grid.submit(where_and_what, 7, TASK_SECONDS, retries=0)
        lost = kill_the_busy_node(two_nodes)
        with pytest.raises(NodeLost, match=rf"node '{lost}' was lost while running this task"):
            future.result(timeout=120)
        assert future.exception().node == lost
        # Bad input is one clear line, before anything is sent.
        with pytest.raises(UsageError, match=r"retries=-1: retries is a whole number"):
            grid.submit(where_and_what, 1, retries=-1)


def _workflow(retries: int) -> dict[str, Any]:
    return {
        "name": f"retries-{retries}",
        "stages": [
            {
                "name": "slow",
                "run": "gridtasks:wf_timed",
                "params": {"value": 3, "seconds": TASK_SECONDS},
                "retries": retries,
            }
        ],
    }


def _run_and_kill(portal: Portal, grid: Any, retries: int) -> tuple[Any, str]:
    """Run the one-task workflow, kill its node mid-task; the finished job and the lost node."""
    job = grid.run_workflow(_workflow(retries))
    lost = kill_the_busy_node(portal)
    finished = wait_for(
        lambda: (j := grid.get_job(job.id)) and j.state.finished and j,
        timeout=120,
        what="the workflow to finish",
    )
    return finished, lost


def test_a_workflow_stage_with_a_retry_survives_a_lost_node(two_nodes: Portal) -> None:
    with two_nodes.grid() as grid:
        done, lost = _run_and_kill(two_nodes, grid, retries=1)
        assert done.state is JobState.DONE, done.error
        output = workflow_outputs(grid, done.id)["slow"]  # one task: its value
        assert output["node"] == other(lost) and output["value"] == 3


def test_a_workflow_stage_with_no_retries_fails_naming_the_lost_node(two_nodes: Portal) -> None:
    with two_nodes.grid() as grid:
        failed, lost = _run_and_kill(two_nodes, grid, retries=0)
        assert failed.state is JobState.FAILED
        assert f"node '{lost}' was lost while running this task" in (failed.error or "")


@pytest.fixture
def shell(two_nodes: Portal) -> Iterator[InteractiveShell]:
    with magic_shell(two_nodes) as ip:
        yield ip


def _cell_with_a_killed_node(shell: InteractiveShell, portal: Portal, retries: int) -> Any:
    """Run a cell that sleeps, killing its node while it runs (from another thread: the
    cell holds this one, as it holds a notebook's kernel)."""
    lost: list[str] = []
    killer = threading.Thread(target=lambda: lost.append(kill_the_busy_node(portal)))
    killer.start()
    source = f"import time, socket\ntime.sleep({TASK_SECONDS})\nhost = 'ran'\n"
    with capture_output() as captured:
        result = shell.run_cell(f"%%grid --retries {retries}\n{source}")
    killer.join(120)
    assert lost, "no node was killed"
    return result, captured, lost[0]


def test_a_cell_with_a_retry_survives_a_lost_node(shell, two_nodes: Portal) -> None:
    shell.user_ns.pop("host", None)
    result, captured, _ = _cell_with_a_killed_node(shell, two_nodes, retries=1)
    assert result.error_in_exec is None, captured.stdout + captured.stderr
    assert shell.user_ns["host"] == "ran"


def test_a_cell_with_no_retries_fails_naming_the_lost_node(shell, two_nodes: Portal) -> None:
    shell.user_ns.pop("host", None)
    result, captured, lost = _cell_with_a_killed_node(shell, two_nodes, retries=0)
    error = result.error_in_exec
    assert isinstance(error, GridError), captured.stdout + captured.stderr
    assert f"NodeLost: node '{lost}' was lost while running this task" in str(error)
    assert f"node '{lost}' was lost" in captured.stdout + captured.stderr  # shown in one line
    assert "Traceback" not in captured.stdout + captured.stderr
    assert "host" not in shell.user_ns
