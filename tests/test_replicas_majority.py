"""Issue 14.6: replicas for ``Grid.submit/map(replicas=N)`` and ``%%grid --replicas N``.

Three real volunteers, "honest-a", "honest-b" and "liar"; ``gridtasks.honest_unless_liar``
returns a different value on a node whose name starts with "liar". With 3 copies the majority
answer comes back and the liar is named in the job's record; with 2 copies a disagreement
fails the item; 3 copies on 2 nodes are refused up front (or wait, with ``wait=True``).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from conftest import Portal, magic_shell, start_portal, start_volunteer, wait_for
from IPython.core.interactiveshell import InteractiveShell
from IPython.utils.capture import capture_output

from grid_portal import Grid
from grid_portal.errors import Unsatisfiable, UsageError
from grid_portal.notebook.magics import magics_for


@pytest.fixture(scope="module")
def trio(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Portal]:
    tmp = tmp_path_factory.mktemp("majority")
    portal = start_portal(tmp)
    try:
        for name in ("honest-a", "honest-b"):
            start_volunteer(portal, tmp, name, "--cpus", "1", "--memory", "1GB")
        # The liar's cells see GRID_TEST_LIAR (no sandbox: its tasks get the agent's env).
        start_volunteer(
            portal,
            tmp,
            "liar",
            "--cpus",
            "1",
            "--memory",
            "1GB",
            "--sandbox",
            "none",
            prefix=("env", "GRID_TEST_LIAR=1"),
        )
        yield portal
    finally:
        portal.stop()


def outvoted_of(grid: Grid, job_id: str) -> list[str]:
    return wait_for(
        lambda: (job := grid.get_job(job_id)) is not None and job.outvoted,
        timeout=30,
        what=f"job {job_id} to name the outvoted node",
    )


def test_submit_majority_wins_and_the_liar_is_named(trio: Portal) -> None:
    from gridtasks import honest_unless_liar

    with trio.grid() as grid:
        future = grid.submit(honest_unless_liar, 4, replicas=3)
        assert future.result(timeout=60) == 40
        notes = outvoted_of(grid, grid._session_job)
        assert any("liar returned" in n and "honest-a" in n and "honest-b" in n for n in notes)
        # The outvoted copy's task record says so too (grid-portal job ID shows it).
        tasks = grid._call("grid_job_tasks", job_id=grid._session_job)["tasks"]
        flagged = [t for t in tasks if (t["error"] or "").startswith("outvoted")]
        assert [t["node"] for t in flagged] == ["liar"]
        copies = [t for t in tasks if "agreed" not in t["stage"]]
        assert sorted(t["node"] for t in copies) == ["honest-a", "honest-b", "liar"]


def test_map_majority_per_item(trio: Portal) -> None:
    from gridtasks import honest_unless_liar

    with trio.grid() as grid:
        futures = grid.map(honest_unless_liar, range(4), replicas=3)
        assert grid.gather(futures) == [0, 10, 20, 30]
        job_id = grid.jobs()[-1].id
        notes = outvoted_of(grid, job_id)
        assert len([n for n in notes if "liar returned" in n]) == 4
        job = grid.get_job(job_id)
        assert job is not None and job.state.value == "done", job


def test_two_copies_that_disagree_fail_the_item(trio: Portal) -> None:
    from gridtasks import honest_unless_liar

    with trio.grid() as grid:
        futures = grid.map(
            honest_unless_liar, range(3), replicas=2, where='name == "liar" or name == "honest-a"'
        )
        with pytest.raises(Exception, match="disagree"):
            grid.gather(futures)


def test_errors_come_back_per_item(trio: Portal) -> None:
    from gridtasks import fail

    with trio.grid() as grid:
        future = grid.submit(fail, "boom", replicas=3)
        with pytest.raises(ValueError, match="boom"):
            future.result(timeout=60)


def test_three_copies_on_two_nodes_are_refused_or_wait(trio: Portal) -> None:
    from gridtasks import plus_one

    two = 'name == "honest-a" or name == "honest-b"'
    with trio.grid() as grid:
        with pytest.raises(Unsatisfiable, match="cannot place 3 copies on 3 different nodes"):
            grid.submit(plus_one, 1, replicas=3, where=two)
        with pytest.raises(UsageError, match="replicas"):
            grid.submit(plus_one, 1, replicas=9)
        waiting = grid.submit(plus_one, 1, replicas=3, where=two, wait=True)
        with pytest.raises(TimeoutError):
            waiting.result(timeout=3)  # the third copy waits for a third such node
        waiting.cancel()


# -- %%grid --replicas N --------------------------------------------------------------------------
LYING_CELL = """
import os, time
print("started at", time.time())   # differs between copies: shown, never compared
answer = base * 10 + (1 if os.environ.get("GRID_TEST_LIAR") else 0)
answer + 1
"""


@pytest.fixture(scope="module")
def shell(trio: Portal) -> Iterator[InteractiveShell]:
    with magic_shell(trio) as ip:
        yield ip


def test_cell_majority_wins_and_output_is_shown(shell: InteractiveShell) -> None:
    shell.user_ns["base"] = 4
    with capture_output() as captured:
        value = shell.run_cell_magic("grid", "--replicas 3 --name voted", LYING_CELL)
    assert value == 41
    assert shell.user_ns["answer"] == 40
    assert "started at" in captured.stdout  # copy 0's output, not compared
    magics = magics_for(shell)
    assert magics is not None
    grid = magics.grid
    job = next(j for j in reversed(grid.jobs()) if j.name == "voted")
    notes = outvoted_of(grid, job.id)
    assert len(notes) == 1 and "liar returned" in notes[0], notes


def test_cell_with_two_copies_that_disagree_fails(shell: InteractiveShell) -> None:
    from grid_portal.errors import GridError

    shell.user_ns["base"] = 1
    with capture_output(), pytest.raises(GridError, match="disagree") as failed:
        shell.run_cell_magic(
            "grid", '--replicas 2 --where name == "liar" or name == "honest-a"', LYING_CELL
        )
    assert "liar" in str(failed.value) and "honest-a" in str(failed.value)


def test_cell_replicas_beyond_the_nodes_is_refused(shell: InteractiveShell) -> None:
    with capture_output(), pytest.raises(Exception, match="cannot place 3 copies"):
        shell.run_cell_magic(
            "grid", '--replicas 3 --where name == "liar" or name == "honest-a"', "x = 1"
        )
