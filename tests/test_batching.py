"""Batched sweeps (issue 17, target 3): Grid.map groups small items into batch tasks and
still hands back one future per item, with its own result, error, order and cancellation."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from batchtasks import custom_fail, nap, square_or_fail
from conftest import Portal, start_volunteer, wait_for
from distributed import CancelledError, Future

from grid_portal.batching import ItemFuture, Sweep, as_completed, batch_mode
from grid_portal.errors import RemoteError, UsageError
from grid_portal.model import JobState, NodeState


@pytest.fixture
def grid_with_node(portal: Portal, tmp_path: Path) -> Portal:
    start_volunteer(portal, tmp_path, "worker", "--cpus", "2", "--memory", "1GB")
    return portal


def _job(grid, job_id: str):
    return wait_for(
        lambda: (j := grid.get_job(job_id)) and j.state.finished and j, what="the job to end"
    )


def test_a_sweep_is_batched_with_per_item_results_errors_and_order(
    grid_with_node: Portal,
) -> None:
    with grid_with_node.grid() as grid:
        with grid.job("sweep") as job_id:
            items = grid.map(square_or_fail, range(300), bad=(7, 150))
        assert isinstance(items, Sweep) and all(isinstance(f, ItemFuture) for f in items)
        assert len({f.key for f in items}) == 300
        with pytest.raises(ValueError, match="bad item 7"):
            grid.gather(items)  # the first failing item, in input order, raises
        items.wait_bound(30)
        assert items.batch_size > 1 and len(items.tasks) < 300  # batched, after the probe
        assert [f.result() for f in items[:7]] == [i * i for i in range(7)]
        for i, f in enumerate(items):
            if i in (7, 150):
                assert f.status == "error" and f.done()
                error = f.exception()
                assert isinstance(error, ValueError) and f"bad item {i}" in str(error)
                assert "square_or_fail" in error.remote_traceback  # the node's traceback
                with pytest.raises(ValueError, match=f"bad item {i}"):
                    f.result()
            else:  # batch-mates of the failing items are not harmed
                assert f.result() == i * i and f.exception() is None
        good = [f for i, f in enumerate(items) if i not in (7, 150)]
        assert grid.gather(good) == [i * i for i in range(300) if i not in (7, 150)]
        assert sorted(f.result() for f in as_completed(good)) == sorted(grid.gather(good))
        assert all(f.seconds is not None and f.seconds >= 0 for f in items)
        job = _job(grid, job_id)
        # The job counts items, not batch tasks; an item that raised inside a batch that
        # finished counts as failed (its node says how many did), not as done.
        assert (job.tasks_total, job.tasks_done, job.tasks_failed) == (300, 298, 2)
        assert job.state is JobState.FAILED and "items of a batch raised" in job.error


def test_items_that_raise_in_a_batch_run_in_the_worker_count_as_failed(
    portal: Portal, tmp_path: Path
) -> None:
    """The same on a node without a sandbox, where a batch runs in the worker itself."""
    start_volunteer(portal, tmp_path, "bare", "--cpus", "2", "--memory", "1GB", "--sandbox", "none")
    with portal.grid() as grid:
        with grid.job("sweep") as job_id:
            items = grid.map(square_or_fail, range(100), bad=(50, 51, 52))
        assert sum(f.exception() is not None for f in items) == 3
        job = _job(grid, job_id)
        assert (job.tasks_done, job.tasks_failed, job.state) == (97, 3, JobState.FAILED)


def test_an_error_that_is_not_builtin_arrives_as_remote_error_for_that_item_only(
    grid_with_node: Portal,
) -> None:
    with grid_with_node.grid() as grid:
        items = grid.map(custom_fail, range(50), batch=10)
        assert items.batch_size == 10 and len(items.tasks) == 5
        error = items[3].exception(timeout=30)
        assert isinstance(error, RemoteError) and "custom trouble at 3" in str(error)
        assert any("custom_fail" in line for line in error.lines)
        assert [f.result() for i, f in enumerate(items) if i != 3] == [
            i for i in range(50) if i != 3
        ]


def test_a_cancelled_sweep_stops_all_its_batches(grid_with_node: Portal) -> None:
    with grid_with_node.grid() as grid:
        with grid.job("long sweep") as job_id:
            items = grid.map(nap, range(40), [0.5] * 40, batch=4)  # 10 batches of 2 s
        assert len(items.tasks) == 10
        wait_for(lambda: grid.get_job(job_id).state is JobState.RUNNING, what="job running")
        job = grid.cancel(job_id)
        assert job.state is JobState.CANCELLED
        for f in items:
            with pytest.raises(CancelledError):
                f.result(timeout=10)
            assert f.cancelled()

        def idle() -> bool:
            node = grid.node("worker")
            detail = grid._call("grid_job_tasks", job_id=job_id)
            busy = [t for t in detail["tasks"] if t["state"] in ("running", "queued")]
            idle = node is not None and node.state is not NodeState.BUSY
            return idle and grid.capacity().tasks_running == 0 and not busy

        wait_for(idle, timeout=20, what="nothing of the sweep left running on the node")
        assert grid.get_job(job_id).state is JobState.CANCELLED


def test_cancelling_the_sweep_object_cancels_what_was_sent_and_what_was_not(
    grid_with_node: Portal,
) -> None:
    with grid_with_node.grid() as grid:
        items = grid.map(nap, range(60), [0.05] * 60)  # auto: probes first, then batches
        items.cancel()
        for f in items:
            with pytest.raises(CancelledError):
                f.result(timeout=20)
        items.wait_bound(20)
        wait_for(lambda: all(t.status == "cancelled" for t in items.tasks), timeout=20)
        wait_for(
            lambda: grid.node("worker").state is not NodeState.BUSY, timeout=20, what="idle node"
        )


def test_one_cancelled_item_leaves_its_batch_mates_alone(grid_with_node: Portal) -> None:
    with grid_with_node.grid() as grid:
        items = grid.map(square_or_fail, range(40), batch=8)
        items[5].cancel()
        assert items[5].cancelled()
        with pytest.raises(CancelledError):
            items[5].result()
        assert [f.result(timeout=30) for i, f in enumerate(items) if i != 5] == [
            i * i for i in range(40) if i != 5
        ]
        for f in items[8:16]:  # cancel a whole batch: its task goes
            f.cancel()
        wait_for(lambda: items[8].task.status == "cancelled", timeout=10)


def test_batch_1_is_one_dask_task_per_item(grid_with_node: Portal) -> None:
    with grid_with_node.grid() as grid:
        futures = grid.map(square_or_fail, range(40), batch=1)
        assert type(futures) is list and all(isinstance(f, Future) for f in futures)
        assert grid.gather(futures) == [i * i for i in range(40)]
        small = grid.map(square_or_fail, range(5))  # auto leaves small maps alone
        assert all(isinstance(f, Future) for f in small)
        assert grid.gather(small) == [0, 1, 4, 9, 16]


def test_replicas_and_batching() -> None:
    calls = [(i,) for i in range(100)]
    assert batch_mode(None, calls, 1, {}) == "auto"
    assert batch_mode("auto", calls, 3, {}) is None  # each item's copies compared alone
    assert batch_mode(None, calls, 1, {"key": ["k"] * 100}) is None
    assert batch_mode(1, calls, 1, {}) is None
    assert batch_mode(25, calls, 1, {}) == 25
    with pytest.raises(UsageError, match="replicas"):
        batch_mode(10, calls, 2, {})
    with pytest.raises(UsageError, match="batch="):
        batch_mode(0, calls, 1, {})
    with pytest.raises(UsageError, match="batch="):
        batch_mode("fast", calls, 1, {})


def test_replicas_with_a_batch_size_are_refused_before_anything_runs(
    grid_with_node: Portal,
) -> None:
    with grid_with_node.grid() as grid:
        before = len(grid.jobs())
        with pytest.raises(UsageError, match="does not go with replicas"):
            grid.map(square_or_fail, range(100), replicas=2, batch=10)
        time.sleep(0.2)
        assert len(grid.jobs()) == before
