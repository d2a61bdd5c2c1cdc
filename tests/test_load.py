"""Load, scaled to the tests' 2 cores: 50 simulated volunteers, 5 researchers x 200 tasks at
once; every task completes exactly once in the ledger. (The full 200 volunteers x 20 clients x
1,000 tasks is bench/bench_load.py, results in docs/benchmarks.md.)"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Portal, researcher_connection, start_portal, wait_for
from gridtasks import plus_one
from simnodes import start_simulated_nodes, stop_simulated_nodes

from grid_portal import Grid
from grid_portal.model import JobState

NODES = 50
CLIENTS = 5
TASKS = 200


@pytest.fixture(scope="module")
def crowd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Portal]:
    tmp = tmp_path_factory.mktemp("load")
    portal = start_portal(tmp)
    names = [f"sim-{i:03d}" for i in range(NODES)]
    nodes = []
    try:
        nodes = start_simulated_nodes(portal, tmp, names, per_process=NODES // 2)
        yield portal
    finally:
        stop_simulated_nodes(nodes)
        portal.stop()


def test_every_node_is_listed_with_its_capacity(crowd: Portal) -> None:
    with crowd.grid() as grid:
        nodes = wait_for(
            lambda: (ns := [n for n in grid.nodes() if n.online]) and len(ns) == NODES and ns,
            timeout=60,
            what=f"{NODES} simulated nodes online",
        )
        assert {n.offer.cpus for n in nodes} == {1}
        assert grid.capacity().nodes_online == NODES


def test_concurrent_clients_every_task_exactly_once(crowd: Portal, tmp_path: Path) -> None:
    grids = [researcher(crowd, tmp_path, f"user{i}") for i in range(CLIENTS)]
    job_ids: list[str] = [""] * CLIENTS
    results: list[list[int]] = [[] for _ in range(CLIENTS)]
    errors: list[BaseException] = []
    # Grid.job tags tasks through Dask's global annotations: one submission at a time (as the
    # Jupyter server does); the clients then wait for their results all at once.
    submit_lock = threading.Lock()

    def client(i: int) -> None:
        try:
            grid = grids[i]
            with submit_lock, grid.job(f"load {i}") as job_id:
                # One Dask task per item (no sweep batching): the ledger is checked per task.
                futures = grid.map(plus_one, range(i * 1000, i * 1000 + TASKS), batch=1)
            job_ids[i] = job_id
            results[i] = grid.gather(futures)
        except BaseException as exc:  # noqa: BLE001 - reported below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        assert not errors, errors
        for i in range(CLIENTS):
            assert results[i] == [v + 1 for v in range(i * 1000, i * 1000 + TASKS)]
        with crowd.grid() as admin:
            for i, job_id in enumerate(job_ids):
                job = wait_for(
                    lambda job_id=job_id: (j := admin.get_job(job_id)) and j.state.finished and j,
                    what=f"job {job_id} to finish",
                )
                assert job.owner == f"user{i}"
                assert job.state is JobState.DONE
                assert (job.tasks_total, job.tasks_done, job.tasks_failed) == (TASKS, TASKS, 0)
                # The ledger: one row per task, each done, each run once.
                rows = admin._call("grid_job_tasks", job_id=job_id)["tasks"]
                assert len(rows) == len({r["key"] for r in rows}) == TASKS
                assert {r["state"] for r in rows} == {"done"}
                assert {r["attempts"] for r in rows} == {1}
                assert len({r["node"] for r in rows}) > 1  # spread over the crowd
    finally:
        for grid in grids:
            grid.close()


def researcher(portal: Portal, tmp: Path, user: str) -> Grid:
    """A Grid with a researcher's own certificate (role client)."""
    return Grid(researcher_connection(portal, tmp, user), start_embedded=False)
