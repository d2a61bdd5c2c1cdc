"""Pushed results (grid_portal.pushed): a small %%grid result comes back with its task's
completion, to the client that asked for it and to no one else; a large one is gathered."""

from __future__ import annotations

import pickle
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import Portal, researcher_connection, start_portal, start_volunteer, wait_for

from grid_portal import Grid
from grid_portal.jobs.cell import CellRun, NullSink, RunOptions, analyse_cell, make_payload, unpack
from grid_portal.pushed import PUSH_LIMIT


@pytest.fixture(scope="module")
def portal(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Portal]:
    tmp = tmp_path_factory.mktemp("pushed")
    p = start_portal(tmp)
    start_volunteer(p, tmp, "vol", "--cpus", "2", "--memory", "1GB")
    yield p
    p.stop()


@pytest.fixture(scope="module")
def alice(portal: Portal, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Grid]:
    path = researcher_connection(portal, tmp_path_factory.mktemp("alice"), "alice")
    with Grid(path, start_embedded=False) as grid:
        # Pushes of cells sent as Dask tasks: no cell session (tests/test_cell_session.py).
        grid.cells.idle = 0
        yield grid


@pytest.fixture(scope="module")
def eve(portal: Portal, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Grid]:
    path = researcher_connection(portal, tmp_path_factory.mktemp("eve"), "eve")
    with Grid(path, start_embedded=False) as grid:
        yield grid


def run_cell(grid: Grid, source: str) -> tuple[CellRun, dict[str, Any]]:
    code = analyse_cell(source, "<cell>")
    run = CellRun(grid, make_payload(code, {}, None), RunOptions(name="cell")).submit()
    outcomes = run.wait(NullSink())
    return run, unpack(outcomes).values


def test_a_small_result_comes_with_the_completion(alice: Grid) -> None:
    run, values = run_cell(alice, "x = 41 + 1\nname = 'grid'\n")
    assert values == {"x": 42, "name": "grid"}
    assert run._pushed == {0}  # it was not fetched with a second round trip


def test_a_large_result_is_gathered_as_before(alice: Grid) -> None:
    run, values = run_cell(alice, f"big = b'a' * {PUSH_LIMIT + 1000}\n")
    assert values["big"] == b"a" * (PUSH_LIMIT + 1000)
    assert run._pushed == set()


def test_a_pushed_result_reaches_only_the_client_that_asked(alice: Grid, eve: Grid) -> None:
    # Eve listens for the key of Alice's next cell (as if she had guessed its name).
    job_id = "pushspy00001"
    overheard: list[bytes] = []
    eve.pushed.expect(f"grid-cell-{job_id}-0", overheard.append)
    code = analyse_cell("secret = 'alice only'\n", "<cell>")
    run = CellRun(alice, make_payload(code, {}, None), RunOptions(name="cell"), job_id=job_id)
    assert unpack(run.submit().wait(NullSink())).values == {"secret": "alice only"}
    assert run._pushed == {0}
    # Anything the portal sent Eve about Alice's cell would reach her before her own cell's
    # result: the portal's stream to each client is in order.
    eve_run, values = run_cell(eve, "mine = 1\n")
    assert values == {"mine": 1} and eve_run._pushed == {0}
    assert overheard == []


def _forge_push(dask_scheduler: Any, key: str, worker: str | None) -> str:
    """On the portal (admin only): a push for ``key`` as if from ``worker`` (None: the node
    that runs it), through the portal's own stream handler."""
    ts = dask_scheduler.tasks[key]
    if ts.processing_on is None:
        return "not running"
    address = worker or ts.processing_on.address
    data = pickle.dumps({"from": worker or "its node"})
    dask_scheduler.stream_handlers["grid-pushed-result"](key=key, data=data, worker=address)
    return "sent"


def test_the_portal_forwards_a_push_only_from_the_node_running_the_task(
    portal: Portal, alice: Grid
) -> None:
    code = analyse_cell("import time\ntime.sleep(60)\n", "<cell>")
    run = CellRun(alice, make_payload(code, {}, None), RunOptions(name="cell")).submit()
    key = f"grid-cell-{run.job_id}-0"
    received: list[bytes] = []
    alice.pushed.expect(key, received.append)  # replaces the run's own callback; gets the first
    with portal.grid() as admin:
        wait_for(
            lambda: (
                admin.client.run_on_scheduler(_forge_push, key=key, worker="tls://10.9.9.9:1")
                == "sent"
            ),
            timeout=30,
            what="the cell to start running",
        )
        # Then from the node that runs it: forwarded. The portal's stream to Alice is in
        # order, so had the first been forwarded, it would be the one received.
        assert admin.client.run_on_scheduler(_forge_push, key=key, worker=None) == "sent"
        wait_for(lambda: received, timeout=10, what="the push from the node running the task")
    assert [pickle.loads(d) for d in received] == [{"from": "its node"}]
    run.cancel("test over")
