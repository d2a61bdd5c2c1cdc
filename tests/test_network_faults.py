"""A volunteer on another (simulated) host loses its network mid-task, then gets it back."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from conftest import start_portal, start_volunteer, wait_for
from gridtasks import where_and_what
from netns import guest_host, why_namespaces_unavailable

from grid_portal.model import JobState, NodeState

_reason = why_namespaces_unavailable()
pytestmark = pytest.mark.skipif(_reason is not None, reason=_reason or "")

NODE_TIMEOUT = 10.0


def test_link_cut_mid_task_reruns_elsewhere_and_the_volunteer_rejoins(tmp_path: Path) -> None:
    with guest_host() as guest:
        portal = start_portal(tmp_path, "--node-timeout", f"{NODE_TIMEOUT:g}s", host=guest.host_ip)
        try:
            remote = start_volunteer(
                portal, tmp_path, "remote", "--cpus", "1", "--memory", "1GB", prefix=guest.prefix
            )
            start_volunteer(portal, tmp_path, "local", "--cpus", "1", "--memory", "1GB")
            with portal.grid() as grid:
                with grid.job("survives a cut cable") as job_id:
                    future = grid.submit(
                        where_and_what, 5, 8.0, workers=["remote"], allow_other_workers=True
                    )
                wait_for(lambda: grid.node("remote").state is NodeState.BUSY, what="task on remote")
                guest.cut()
                cut_at = time.monotonic()
                wait_for(
                    lambda: grid.node("remote").state is NodeState.OFFLINE,
                    timeout=NODE_TIMEOUT * 3,
                    what="the cut-off node to be declared offline",
                )
                detection = time.monotonic() - cut_at
                assert detection <= NODE_TIMEOUT + 5, f"took {detection:.1f} s"
                assert future.result(timeout=60) == ("local", 5)

                guest.restore()
                wait_for(
                    lambda: grid.node("remote").online,
                    timeout=90,
                    what="the volunteer to rejoin by itself once the link is back",
                )
                assert remote.process.poll() is None
                # The flapping link produced exactly one result in the ledger.
                job = wait_for(lambda: (j := grid.get_job(job_id)) and j.state.finished and j)
                assert job.state is JobState.DONE
                assert (job.tasks_total, job.tasks_done, job.tasks_failed) == (1, 1, 0)
        finally:
            portal.stop()
