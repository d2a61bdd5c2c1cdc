"""Cell sessions: a kernel's %%grid cells after the first go to a slot leased for it.

A real portal and a real volunteer (processes on loopback), cells through IPython's own
InteractiveShell, as tests/test_magics.py does. Behaviour, not time: the cells reuse one lease
and keep the variables' semantics; the lease goes back when the kernel idles or dies and when
its volunteer pauses or drains, and the next cell still runs; cancelling a leased cell stops
it; another researcher cannot send cells into it; a killed volunteer holding one still goes
offline in time.
"""

from __future__ import annotations

import _thread
import contextlib
import os
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    Portal,
    grid_portal_command,
    researcher_connection,
    start_portal,
    start_volunteer,
    wait_for,
)
from IPython.core.interactiveshell import InteractiveShell
from IPython.utils.capture import capture_output

from grid_portal.jobs.cell import CellInterrupted
from grid_portal.model import JobState, NodeState
from grid_portal.notebook.magics import magics_for
from grid_portal.protocol import CELL_SEND_OP

VOLUNTEER = f"lease-{uuid.uuid4().hex[:6]}"  # its control socket is named after it


@pytest.fixture(scope="module")
def portal(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Portal]:
    tmp = tmp_path_factory.mktemp("lease")
    p = start_portal(tmp)
    # The volunteer's default sandbox: the lease task runs in a worker thread and each cell's
    # child is confined as a task process would be.
    start_volunteer(p, tmp, VOLUNTEER, "--cpus", "2", "--memory", "1GB")
    yield p
    p.stop()


@pytest.fixture(scope="module")
def shell(portal: Portal) -> Iterator[InteractiveShell]:
    ip = InteractiveShell.instance()
    ip.run_line_magic("load_ext", "grid_portal")
    with capture_output():
        ip.run_line_magic("grid", f"connect {portal.connection_file}")
    yield ip
    ip.run_line_magic("unload_ext", "grid_portal")


def grid_of(shell: InteractiveShell) -> Any:
    magics = magics_for(shell)
    assert magics is not None
    return magics.grid


def cell(shell: InteractiveShell, source: str, line: str = "") -> Any:
    return shell.run_cell_magic("grid", line, source)


def leased_cell(shell: InteractiveShell, source: str, line: str = "") -> Any:
    """Run a cell once the session's lease is ready, and check that it went there."""
    session = grid_of(shell).cells
    wait_for(
        lambda: session.lease is not None and session.lease.ready,
        timeout=30,
        what="the cell session's lease to be ready",
    )
    sent = session.cells_sent
    value = cell(shell, source, line)
    assert session.cells_sent == sent + 1, "the cell did not go to the lease"
    return value


def volunteer_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        grid_portal_command("volunteer", *args), capture_output=True, text=True, timeout=60
    )


def test_consecutive_cells_reuse_one_lease_and_keep_variables(shell) -> None:
    session = grid_of(shell).cells
    session.release()
    taken = session.leases_taken
    shell.user_ns["base"] = 10
    assert cell(shell, "x = base + 1\nx") == 11  # the usual way; asks for the lease
    assert session.leases_taken == taken + 1
    assert leased_cell(shell, "y = x * 2\ndel base\ny") == 22
    assert shell.user_ns["y"] == 22 and "base" not in shell.user_ns
    with capture_output() as captured:
        assert leased_cell(shell, "print('hello from', 'the lease')\nz = [y] * 3") is None
    assert "hello from the lease" in captured.stdout
    assert shell.user_ns["z"] == [22, 22, 22]
    # A notebook function travels as before, and the cell's own error is the cell's.
    shell.run_cell("def half(v):\n    return v / 2\n")
    assert leased_cell(shell, "half(y)") == 11
    with capture_output(), pytest.raises(ZeroDivisionError):
        leased_cell(shell, "w = 1 / 0")
    assert leased_cell(shell, "'after the error'") == "after the error"
    assert session.leases_taken == taken + 1, "each cell asked for a lease of its own"
    # Each leased cell is still a job of its own, recorded by the portal with its node.
    grid = grid_of(shell)
    job = next(j for j in reversed(grid.jobs()) if "'after the error'" in j.name)
    wait_for(lambda: grid.get_job(job.id).state is JobState.DONE, what="the job to be done")
    assert grid.get_job(job.id).nodes == [VOLUNTEER]
    # Other resources go the usual way, and give the lease back (they may need its slot).
    lease = session.lease
    assert cell(shell, "'two cpus'", "--cpus 2 --timeout 30s") == "two cpus"
    wait_for(lambda: lease.ended, timeout=10, what="the lease to be given back")


def test_a_lease_keeps_the_executor_counting_one_task(shell) -> None:
    """On a sandboxed node each leased cell's child is registered with the executor (pause,
    move, memory watch) and let go when it ends: the lease counts as one task in process."""
    import json

    session = grid_of(shell).cells
    cell(shell, "0")
    for n in range(3):
        assert leased_cell(shell, f"{n}") == n
    status = volunteer_cli("status", "--name", VOLUNTEER, "--json")
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["in_process_tasks"] <= 1
    assert session.lease is not None and session.lease.ready


def test_an_idle_lease_gives_its_slot_back(shell) -> None:
    session = grid_of(shell).cells
    session.release()
    session.idle = 1.0
    try:
        cell(shell, "1")
        lease = session.lease
        assert lease is not None
        wait_for(lambda: lease.ended, timeout=20, what="the idle lease to end")
        assert lease.ended == "idle"
        # The next cell goes the usual way and asks for a new lease.
        assert cell(shell, "2") == 2
        assert session.lease is not lease
    finally:
        session.idle = 60.0
        session.release()


MARKED_SLEEP = (
    "import ctypes, time\n"
    "ctypes.CDLL(None).prctl(15, b'grid-lease-cell', 0, 0, 0)\n"
    "time.sleep(60)\n"
)


def cell_processes(portal: Portal) -> list[int]:
    """The running MARKED_SLEEP cells in the volunteer's process tree (seen from outside its
    sandbox, which a cell cannot write out of)."""
    import psutil

    found = []
    with contextlib.suppress(psutil.Error):
        for proc in psutil.Process(portal.volunteers[0].process.pid).children(recursive=True):
            with contextlib.suppress(psutil.Error):
                if proc.name() == "grid-lease-cell":
                    found.append(proc.pid)
    return found


def test_interrupt_cancels_a_running_leased_cell(shell, portal: Portal) -> None:
    session = grid_of(shell).cells
    cell(shell, "0")
    wait_for(lambda: session.lease is not None and session.lease.ready, what="the lease")
    sent = session.cells_sent
    running: list[int] = []

    def press_when_running() -> None:
        running.extend(wait_for(lambda: cell_processes(portal), what="the leased cell to start"))
        _thread.interrupt_main()  # what the kernel's interrupt button does

    threading.Thread(target=press_when_running, daemon=True).start()
    started = time.monotonic()
    with capture_output(), pytest.raises(CellInterrupted) as info:
        cell(shell, MARKED_SLEEP)
    assert time.monotonic() - started < 20
    assert session.cells_sent == sent + 1
    assert "cancelled job" in str(info.value) and VOLUNTEER in str(info.value)
    wait_for(lambda: not cell_processes(portal), timeout=5, what="the cell to be killed")
    grid = grid_of(shell)
    job = next(j for j in reversed(grid.jobs()) if "import ctypes" in j.name)
    assert job.state is JobState.CANCELLED
    # The lease is still there and runs the next cell.
    assert leased_cell(shell, "'next'") == "next"


def crafted_cell(grid: Any, lease: str, heard: list[str]) -> dict[str, Any]:
    """A cell message for ``lease``, as a kernel's session sends it; what the portal answers
    on ``grid``'s connection is appended to ``heard``."""
    from grid_portal.jobs.cell import analyse_cell, make_payload

    code = analyse_cell("'ran in the lease'", filename="crafted")
    job = uuid.uuid4().hex[:12]
    key = f"grid-cell-{job}-0"
    grid.cells._waiting[key] = lambda kind, data: heard.append(kind)
    return {
        "op": CELL_SEND_OP,
        "lease": lease,
        "cell": key,
        "job": job,
        "name": "crafted",
        "payload": make_payload(code, {}, None, None),
        "request": {"job_id": job, "index": 0, "map_value": None, "timeout": None},
    }


def test_another_researcher_cannot_send_cells_into_my_lease(
    shell, portal: Portal, tmp_path: Path
) -> None:
    from grid_portal import Grid

    me = grid_of(shell)
    cell(shell, "0")
    wait_for(lambda: me.cells.lease is not None and me.cells.lease.ready, what="my lease")
    lease = me.cells.lease.key
    # The same message from my own connection runs in my lease (the message is a real cell).
    heard: list[str] = []
    message = crafted_cell(me, lease, heard)
    me.send_to_portal(message)
    wait_for(lambda: heard, timeout=10, what="my crafted cell's result")
    assert heard == ["result"]
    # From another researcher's connection, over real TLS: refused, nothing runs or is recorded.
    theirs: list[str] = []
    with Grid(researcher_connection(portal, tmp_path, "mallory"), start_embedded=False) as other:
        message = crafted_cell(other, lease, theirs)
        other.send_to_portal(message)
        wait_for(lambda: theirs, timeout=10, what="the portal's answer to mallory")
        assert theirs == ["lapsed"]
        assert other.get_job(message["job"]) is None
    assert me.get_job(message["job"]) is None
    assert leased_cell(shell, "'still mine'") == "still mine"


KERNEL = """
import os, sys
from IPython.core.interactiveshell import InteractiveShell
from IPython.utils.capture import capture_output
ip = InteractiveShell.instance()
ip.run_line_magic("load_ext", "grid_portal")
with capture_output():
    ip.run_line_magic("grid", "connect " + sys.argv[1])
ip.run_cell_magic("grid", "", "1")
from grid_portal.notebook.magics import magics_for
session = magics_for(ip).grid.cells
import time
deadline = time.monotonic() + 60
while not (session.lease is not None and session.lease.ready):
    assert time.monotonic() < deadline, "no lease"
    time.sleep(0.05)
print("leased", flush=True)
os._exit(0)  # the kernel dies: no goodbye to the portal
"""


def test_a_dead_kernels_lease_is_given_back(shell, portal: Portal) -> None:
    grid = grid_of(shell)
    grid.cells.release()
    wait_for(lambda: grid.node(VOLUNTEER).state is NodeState.ONLINE, timeout=30, what="a free node")
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(KERNEL), portal.connection_file],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "leased" in done.stdout, done.stderr
    # Both of the node's CPUs are free again: a two-CPU cell runs.
    assert cell(shell, "'whole node'", "--cpus 2 --timeout 30s") == "whole node"


def test_pausing_the_volunteer_ends_the_lease_and_the_next_cell_still_runs(shell) -> None:
    session = grid_of(shell).cells
    cell(shell, "0")
    wait_for(lambda: session.lease is not None and session.lease.ready, what="the lease")
    lease = session.lease
    paused = volunteer_cli("pause", "--name", VOLUNTEER, "--reason", "owner is back")
    assert paused.returncode == 0, paused.stderr
    try:
        wait_for(lambda: lease.ended, timeout=10, what="the pause to end the lease")
        assert "stopped taking work" in lease.ended
    finally:
        resumer = threading.Timer(1.0, volunteer_cli, args=("resume", "--name", VOLUNTEER))
        resumer.start()
    with capture_output():
        assert cell(shell, "'after the pause'", "--timeout 60s") == "after the pause"
    resumer.join()


def test_draining_the_volunteer_ends_the_lease_and_it_leaves(shell, portal: Portal) -> None:
    """Last in the module: the volunteer leaves the grid."""
    session = grid_of(shell).cells
    cell(shell, "0")
    wait_for(lambda: session.lease is not None and session.lease.ready, what="the lease")
    lease = session.lease
    drained = volunteer_cli("drain", "--name", VOLUNTEER)
    assert drained.returncode == 0, drained.stderr
    wait_for(lambda: lease.ended, timeout=15, what="the drain to end the lease")
    grid = grid_of(shell)
    wait_for(lambda: not grid.node(VOLUNTEER).online, timeout=30, what="the drained node to leave")


def test_a_killed_volunteer_holding_a_lease_goes_offline_within_the_node_timeout(
    tmp_path: Path,
) -> None:
    portal = start_portal(tmp_path, "--node-timeout", "3")
    try:
        volunteer = start_volunteer(portal, tmp_path, f"killed-{uuid.uuid4().hex[:6]}")
        with portal.grid() as grid:
            from grid_portal.jobs.cell_lease_task import run_cell_lease
            from grid_portal.jobs.cell_session import LeaseSpec

            grid.cells._ask(LeaseSpec(1, 0, None, None))
            lease = grid.cells.lease
            wait_for(lambda: lease.ready, timeout=30, what="the lease")
            assert run_cell_lease  # the task the lease runs
            os.killpg(volunteer.process.pid, 9)  # the machine dies, its idle lease with it
            killed = time.monotonic()
            wait_for(
                lambda: not grid.node(volunteer.name).online,
                timeout=20,
                what="the killed volunteer to go offline",
            )
            assert time.monotonic() - killed < 3 + 5
    finally:
        portal.stop()
