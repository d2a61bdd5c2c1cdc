"""Jobs: tracked by the portal from task annotations, kept in the ledger, owned by a user.

Through a real portal and volunteer: what the Grid client makes of jobs (names, owners, times),
who may see and cancel them, and what survives a restart. How the portal plugin follows a job's
tasks (progress, failure, cancel) is tested in-process, in tests/test_plugin_inprocess.py.
"""

from __future__ import annotations

import sqlite3
from contextlib import closing
from pathlib import Path

import pytest
from conftest import Portal, researcher_connection, start_portal, start_volunteer, wait_for
from distributed import CancelledError
from gridtasks import where_and_what

from grid_portal import Grid
from grid_portal.errors import GridError
from grid_portal.model import JobState


@pytest.fixture
def grid_with_node(portal: Portal, tmp_path: Path):
    start_volunteer(portal, tmp_path, "worker", "--cpus", "2", "--memory", "1GB")
    return portal


def test_map_is_one_job_with_progress_and_nodes(grid_with_node: Portal) -> None:
    with grid_with_node.grid() as grid:
        futures = grid.map(where_and_what, range(5), [0.05] * 5)
        assert [v for _, v in grid.gather(futures)] == list(range(5))
        job = wait_for(
            lambda: next(
                (j for j in grid.jobs() if j.name == "map where_and_what" and j.state.finished),
                None,
            ),
            what="the map job to finish",
        )
        assert job.state is JobState.DONE
        assert (job.tasks_total, job.tasks_done, job.tasks_failed) == (5, 5, 0)
        assert job.nodes == ["worker"]
        assert job.kind == "task" and job.owner  # the admin connection's user
        assert job.started is not None and job.finished >= job.started


def test_users_see_and_cancel_only_their_own_jobs(grid_with_node: Portal, tmp_path: Path) -> None:
    alice = Grid(researcher_connection(grid_with_node, tmp_path, "alice"), start_embedded=False)
    bob = Grid(researcher_connection(grid_with_node, tmp_path, "bob"), start_embedded=False)
    try:
        with alice.job("alice's work") as job_id:
            future = alice.submit(where_and_what, 1, 20.0)
        wait_for(lambda: alice.get_job(job_id) is not None)
        assert alice.get_job(job_id).owner == "alice"
        assert [j.id for j in bob.jobs()] == []
        assert bob.get_job(job_id) is None
        assert (
            bob.jobs_overview()["others"]["running"] + bob.jobs_overview()["others"]["queued"] == 1
        )
        with pytest.raises(GridError):
            bob.cancel(job_id)
        assert alice.get_job(job_id).state in (JobState.QUEUED, JobState.RUNNING)
        with grid_with_node.grid() as admin:  # the portal's admin sees everyone's jobs
            assert job_id in [j.id for j in admin.jobs(everyone=True)]
        alice.cancel(job_id)
        with pytest.raises(CancelledError):
            future.result(timeout=10)
        with pytest.raises(GridError, match="no job"):
            alice.cancel("no-such-job")
    finally:
        alice.close()
        bob.close()


def test_jobs_and_kept_results_survive_a_portal_restart(tmp_path: Path) -> None:
    portal = start_portal(tmp_path)
    try:
        start_volunteer(portal, tmp_path, "worker", "--cpus", "1", "--memory", "1GB")
        with portal.grid() as grid:
            with grid.job("finished before", kind="cell") as done_id:
                assert grid.submit(where_and_what, 3).result(timeout=30) == ("worker", 3)
            grid.store_result(done_id, b"kept bytes")
            with grid.job("cut short") as cut_id:
                running = grid.submit(where_and_what, 4, 60.0)  # noqa: F841 - kept alive
            wait_for(lambda: grid.get_job(cut_id).state is JobState.RUNNING)
            wait_for(lambda: grid.get_job(done_id).state is JobState.DONE)
            # kill -9 while the job runs: no chance to write anything more
            portal.process.kill()
            portal.process.wait()
        restarted = start_portal(tmp_path)
        try:
            with restarted.grid() as grid:
                done = grid.get_job(done_id)
                assert done.state is JobState.DONE and done.tasks_done == 1
                assert done.has_result and grid.fetch_result(done_id) == b"kept bytes"
                cut = grid.get_job(cut_id)
                assert cut.state is JobState.INTERRUPTED
                assert "restarted" in cut.error
        finally:
            restarted.stop()
    finally:
        portal.stop()


def test_expired_kept_results_leave_the_ledger_without_a_fetch(tmp_path: Path) -> None:
    portal = start_portal(tmp_path, "--result-expiry-interval", "0.2")
    ledger = portal.data_dir / "ledger.sqlite"

    def kept(job_id: str) -> bool:
        with closing(sqlite3.connect(f"file:{ledger}?mode=ro", uri=True)) as conn:
            row = conn.execute(
                "SELECT result IS NOT NULL FROM jobs WHERE id = ?", (job_id,)
            ).fetchone()
        return bool(row and row[0])

    try:
        with portal.grid() as grid:
            short = grid.register_job("short-lived", "short", kind="cell").id
            long = grid.register_job("long-lived", "long", kind="cell").id
            grid.store_result(short, b"x" * 100_000, ttl=1.0)
            grid.store_result(long, b"kept bytes", ttl=3600.0)
            assert kept(short) and kept(long)
            # Nobody fetches the short one: the portal's own schedule deletes it.
            wait_for(lambda: not kept(short), timeout=30, what="the expired result to go")
            wait_for(lambda: not grid.get_job(short).has_result, what="has_result to clear")
            assert kept(long) and grid.get_job(long).has_result
            assert grid.fetch_result(long) == b"kept bytes"
    finally:
        portal.stop()


def test_only_the_admin_may_run_code_on_the_portal(grid_with_node: Portal, tmp_path: Path) -> None:
    student = Grid(researcher_connection(grid_with_node, tmp_path, "student"), start_embedded=False)
    try:
        with pytest.raises(PermissionError, match="reserved for the portal's admin"):
            student.client.run_on_scheduler(lambda: "pwned")
        with pytest.raises(PermissionError):
            student.client.run(lambda: "pwned")  # on every volunteer, outside any task
        assert student.submit(where_and_what, 1).result(timeout=30) == ("worker", 1)
    finally:
        student.close()
    with grid_with_node.grid() as admin:
        assert admin.client.run_on_scheduler(lambda: "ok") == "ok"


def test_tasks_naming_another_users_job_are_refused(grid_with_node: Portal, tmp_path: Path) -> None:
    alice = Grid(researcher_connection(grid_with_node, tmp_path, "alice"), start_embedded=False)
    mallory = Grid(researcher_connection(grid_with_node, tmp_path, "mallory"), start_embedded=False)
    try:
        with alice.job("alice's") as job_id:
            assert alice.submit(where_and_what, 1).result(timeout=30) == ("worker", 1)
        with mallory.job("sneaky", job_id=job_id):
            sneaky = mallory.submit(where_and_what, 2)
        with pytest.raises(CancelledError):
            sneaky.result(timeout=30)
        assert alice.get_job(job_id).tasks_total == 1
    finally:
        alice.close()
        mallory.close()
