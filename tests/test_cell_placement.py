"""%%grid --where is placed by the portal like every other submission: it re-matches as nodes
join, so a matching node that joins after the cell was sent takes part of its work (a cell
used to be pinned to the nodes that matched when it was sent)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from conftest import Portal, grid_of, magic_shell, start_portal, start_volunteer
from IPython.core.interactiveshell import InteractiveShell
from IPython.utils.capture import capture_output

from grid_portal.errors import Unsatisfiable


@pytest.fixture(scope="module")
def portal(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Portal]:
    tmp = tmp_path_factory.mktemp("cell-placement")
    p = start_portal(tmp)
    start_volunteer(p, tmp, "first", "--cpus", "1", "--memory", "1GB", "--label", "pool=a")
    start_volunteer(p, tmp, "other", "--cpus", "1", "--memory", "1GB", "--label", "pool=b")
    p.tmp = tmp  # type: ignore[attr-defined]
    yield p
    p.stop()


@pytest.fixture(scope="module")
def shell(portal: Portal) -> Iterator[InteractiveShell]:
    with magic_shell(portal) as ip:
        yield ip


def test_a_refused_where_names_the_closest_node(shell: InteractiveShell) -> None:
    with capture_output(), pytest.raises(Unsatisfiable) as info:
        shell.run_cell_magic("grid", '--where labels.pool == "c"', "x = 1\n")
    assert "no online node meets it" in str(info.value)
    assert 'labels.pool is "' in str(info.value)
    assert info.value.where == 'labels.pool == "c"' and info.value.online == 2


def test_a_matching_node_that_joins_after_the_cell_was_sent_runs_part_of_it(
    portal: Portal, shell: InteractiveShell
) -> None:
    line = '--bg --map i in range(6) --where labels.pool == "a"'
    with capture_output():
        handle = shell.run_cell_magic("grid", line, "import time\ntime.sleep(4)\nv = i\n")
    # Sent while only "first" matched; "later" matches too and joins while the cell runs.
    start_volunteer(portal, portal.tmp, "later", "--cpus", "1", "--memory", "1GB", "--label",  # type: ignore[attr-defined]
                    "pool=a")  # fmt: skip
    with capture_output():
        handle.wait()
    grid = grid_of(shell)
    ran_on = {t["node"] for t in grid.job_tasks(handle.job_id)["tasks"]}
    assert "later" in ran_on, ran_on
    assert ran_on <= {"first", "later"}, ran_on  # never on a node that does not match
