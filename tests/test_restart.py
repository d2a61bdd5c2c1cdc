"""Nothing lost when the portal is killed (kill -9) and started again at the same address.

One portal life cycle for the whole module, as the tests share what happens across it: a
workflow, a ``%%grid --bg`` cell and a plain ``Grid.submit`` job are running when the portal
is killed; after the restart the workflow and the cell run again by themselves and finish
with the right results, the plain job is ``interrupted`` with the reason, and the clients
made before the kill (a ``Grid``, a notebook's magics, the Jupyter server's event feed) keep
working without being told anything.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from conftest import Portal, researcher_connection, start_portal, start_volunteer, wait_for
from gridtasks import where_and_what
from IPython.core.interactiveshell import InteractiveShell
from IPython.utils.capture import capture_output

from grid_portal.client import Grid
from grid_portal.jobs.workflow import workflow_outputs
from grid_portal.model import JobState
from grid_portal.notebook.magics import magics_for

WORKFLOW = {
    "name": "survives a restart",
    "stages": [
        {
            "name": "slow",
            "run": "gridtasks:slow_square",
            "map": {"range": {"stop": 4}, "as": "i"},
            "params": {"seconds": 2.0},
        },
        {"name": "sum", "run": "gridtasks:total", "needs": ["slow"]},
    ],
}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class FeedListener:
    """Stands in for a websocket of the Jupyter server's event feed."""

    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []
        self.lock = threading.Lock()

    def send(self, text: str) -> None:
        with self.lock:
            self.messages.append(json.loads(text))

    def snapshots(self) -> list[dict[str, Any]]:
        with self.lock:
            return [m for m in self.messages if m["type"] == "snapshot"]

    def view_after(self, snapshots_seen: int) -> dict[str, str]:
        """Node states as a sidebar would show them, built from the first snapshot after
        ``snapshots_seen`` snapshots and the deltas that followed it."""
        with self.lock:
            messages = list(self.messages)
        view: dict[str, str] | None = None
        seen = 0
        for message in messages:
            if message["type"] == "snapshot":
                seen += 1
                if seen > snapshots_seen:
                    view = {n["name"]: n["state"] for n in message["nodes"]}
            elif message["type"] == "nodes" and view is not None:
                view.update({n["name"]: n["state"] for n in message["nodes"]})
                for name in message["removed"]:
                    view.pop(name, None)
        return view or {}


@dataclass
class Feed:
    """The Jupyter server's GridPortal service and its event feed, on a loop of their own."""

    loop: asyncio.AbstractEventLoop
    thread: threading.Thread
    service: Any
    listener: FeedListener = field(default_factory=FeedListener)

    def call(self, coro: Any, timeout: float = 60) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)


def _start_feed(connection_file: str) -> Feed:
    from grid_portal.jupyter.service import GridPortal

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="feed-loop", daemon=True)
    thread.start()

    async def make() -> Any:
        return GridPortal(address=connection_file, events_poll_timeout=2.0)

    service = asyncio.run_coroutine_threadsafe(make(), loop).result(30)
    feed = Feed(loop=loop, thread=thread, service=service)

    async def subscribe() -> None:
        service.events.subscribe(feed.listener)

    feed.call(subscribe())
    return feed


@dataclass
class Story:
    """What happened around the restart, for the tests below to check."""

    portal: Portal
    grid: Grid  # alice's: she submitted the workflow and the plain job
    admin: Grid
    shell: InteractiveShell
    feed: Feed
    workflow_id: str
    cell: Any  # the BackgroundCell handle
    plain_id: str
    plain_future: Any
    snapshots_before: int


@pytest.fixture(scope="module")
def story(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Story]:
    tmp = tmp_path_factory.mktemp("restart")
    ports = ("--port", str(_free_port()), "--http-port", str(_free_port()))
    portal = start_portal(tmp, *ports)
    shell = InteractiveShell.instance()
    feed = None
    grid: Grid | None = None
    admin: Grid | None = None
    restarted: Portal | None = None
    try:
        start_volunteer(portal, tmp, "steady", "--cpus", "4", "--oversubscribe", "--memory", "1GB")
        # A researcher's own identity: the resubmitted workflow must stay hers.
        grid = Grid(researcher_connection(portal, tmp, "alice"), start_embedded=False)
        admin = portal.grid()  # sees everyone's jobs (the magics below run as the admin)
        shell.run_line_magic("load_ext", "grid_portal")
        with capture_output():
            shell.run_line_magic("grid", f"connect {portal.connection_file}")
        feed = _start_feed(portal.connection_file)
        wait_for(feed.listener.snapshots, timeout=30, what="the event feed's first snapshot")

        workflow = grid.run_workflow(WORKFLOW)
        with capture_output():
            cell = shell.run_cell_magic(
                "grid", "--bg --name restarted-cell", "import time\ntime.sleep(2)\nkept = 6 * 7\n"
            )
        with grid.job("plain submit") as plain_id:
            plain_future = grid.submit(where_and_what, 1, 30.0)

        def all_running() -> bool:
            jobs = {j.id: j for j in admin.jobs(everyone=True)}
            return all(
                jobs.get(i) is not None and jobs[i].state is JobState.RUNNING
                for i in (workflow.id, cell.job_id, plain_id)
            )

        wait_for(all_running, timeout=30, what="the three jobs to run")
        snapshots_before = len(feed.listener.snapshots())
        portal.process.kill()  # kill -9: nothing more is written
        portal.process.wait()
        restarted = start_portal(tmp, *ports)
        restarted.volunteers = portal.volunteers
        yield Story(
            restarted,
            grid,
            admin,
            shell,
            feed,
            workflow.id,
            cell,
            plain_id,
            plain_future,
            snapshots_before,
        )
    finally:
        if feed is not None:
            feed.call(feed.service.close())
            feed.loop.call_soon_threadsafe(feed.loop.stop)
        shell.run_line_magic("unload_ext", "grid_portal")
        for client in (grid, admin):
            if client is not None:
                client.close()
        if restarted is not None:
            restarted.stop()
        portal.stop()


def test_a_running_workflow_completes_with_the_right_results(story: Story) -> None:
    grid = story.grid  # made before the kill: it reconnects by itself

    def finished() -> Any:
        job = grid.get_job(story.workflow_id)
        return job if job is not None and job.state.finished else None

    job = wait_for(finished, timeout=90, what="the resubmitted workflow to finish")
    assert job.state is JobState.DONE, job.error
    assert job.owner == "alice"  # resubmitted by the portal, still hers
    assert (job.tasks_done, job.tasks_failed) == (job.tasks_total, 0)
    assert job.nodes == ["steady"]
    assert workflow_outputs(grid, story.workflow_id) == {"sum": 0 + 1 + 4 + 9}
    # The ledger has exactly one row per task of the job, all done (the rerun replaced the
    # rows the restart had marked cancelled).
    tasks = grid._call("grid_job_tasks", job_id=story.workflow_id)["tasks"]
    assert sorted(t["state"] for t in tasks) == ["done"] * 5


def test_a_background_cell_runs_again_and_fills_in(story: Story) -> None:
    handle = story.cell
    assert handle.finished.wait(90), "the --bg cell never finished"
    assert handle.state == "done", handle.error
    job = story.admin.get_job(handle.job_id)
    assert job is not None and job.state is JobState.DONE and job.has_result
    with capture_output():
        story.shell.run_line_magic("grid", f"result {handle.job_id}")
    assert story.shell.user_ns["kept"] == 42


def test_other_jobs_are_interrupted_with_the_reason(story: Story) -> None:
    job = story.grid.get_job(story.plain_id)
    assert job is not None and job.state is JobState.INTERRUPTED
    assert "restarted" in job.error and "submit it again" in job.error
    assert story.plain_future.status == "cancelled"


def test_clients_made_before_the_restart_keep_working(story: Story) -> None:
    grid = story.grid
    wait_for(
        lambda: any(n.name == "steady" and n.online for n in grid.nodes()),
        timeout=60,
        what="the volunteer to rejoin the restarted portal",
    )
    assert grid.submit(where_and_what, 7).result(timeout=60) == ("steady", 7)
    magics = magics_for(story.shell)
    assert magics is not None
    assert story.shell.run_cell_magic("grid", "", "x = 5\nx * 2") == 10
    # The Jupyter server's feed noticed the restart, sent every listener a fresh snapshot, and
    # its deltas since then show the rejoined volunteer.
    wait_for(
        lambda: (
            story.feed.listener.view_after(story.snapshots_before).get("steady")
            not in (None, "offline")
        ),
        timeout=60,
        what="the event feed to resume after the restart",
    )


def test_closed_grids_leave_local_dask_working(story: Story) -> None:
    """Every Grid is the default Dask client while open; one that reconnected made a second
    Dask client. Once all are closed, dask's own compute runs locally again."""
    import dask

    story.shell.run_line_magic("unload_ext", "grid_portal")
    story.grid.close()
    story.admin.close()
    assert dask.config.get("scheduler", None) != "dask.distributed"
    assert dask.delayed(sum)([1, 2]).compute() == 3
