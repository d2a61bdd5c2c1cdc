"""Volunteers in control: their rules pause the node and suspend its tasks, and
`grid-portal volunteer pause|resume|drain|status` steer the running agent over its local socket.

Real portal, real volunteers, real processes. The task functions are pickled by value. The CPU
hog test depends on the machine's load: other programs that keep every core busy also count as
"the owner" (that is the rule), so its waits are generous.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import cloudpickle
import psutil
import pytest
from conftest import Portal, Volunteer, grid_portal_command, start_portal, start_volunteer, wait_for

from grid_portal.model import Node, NodeState
from grid_portal.node.control import control_dir, peer_uid, socket_path


def spin(cpu_seconds: float, value: int) -> tuple[str, int]:
    """Busy for ``cpu_seconds`` of its own CPU time, which stands still while its process is
    stopped (a sleep, or a wall-clock loop, would go on), then ``value * 2`` and where."""
    import time

    from distributed import get_worker

    end = time.process_time() + cpu_seconds
    while time.process_time() < end:
        pass
    return str(get_worker().name), value * 2


cloudpickle.register_pickle_by_value(sys.modules[__name__])


def volunteer_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        grid_portal_command("volunteer", *args), capture_output=True, text=True, timeout=timeout
    )


def volunteer_status(name: str) -> dict[str, object]:
    result = volunteer_cli("status", "--name", name, "--json")
    assert result.returncode == 0, result.stderr
    return dict(json.loads(result.stdout))


def task_processes(volunteer: Volunteer) -> list[psutil.Process]:
    """The volunteer's task processes, seen from outside its sandbox."""
    agent = psutil.Process(volunteer.process.pid)
    found = []
    for proc in agent.children(recursive=True):
        try:
            if "grid_portal.node.taskchild" in " ".join(proc.cmdline()):
                found.append(proc)
        except psutil.Error:
            continue
    return found


def stopped_task(volunteer: Volunteer) -> bool:
    states = []
    for proc in task_processes(volunteer):
        try:
            states.append(proc.status())
        except psutil.Error:
            continue
    return psutil.STATUS_STOPPED in states


def connect_as(uid: int, path: Path) -> str:
    """Try to connect to a Unix socket as another user (needs root); what happened, in a word."""
    import socket

    pid = os.fork()
    if pid == 0:  # the child: become that user, try, and report through the exit code
        code = 1
        try:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(str(path))
            code = 0
        except PermissionError:
            code = 13
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return {0: "connected", 13: "PermissionError"}.get(os.waitstatus_to_exitcode(status), "error")


def node_where(grid: object, name: str, predicate: object) -> Node | None:
    node = grid.node(name)  # type: ignore[attr-defined]
    return node if node is not None and predicate(node) else None  # type: ignore[operator]


@pytest.fixture(scope="module")
def portal(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Portal]:
    p = start_portal(tmp_path_factory.mktemp("controls"))
    yield p
    p.stop()


@pytest.fixture(autouse=True)
def own_volunteers(portal: Portal) -> Iterator[None]:
    """Each test's volunteers leave with it: tasks of the next test go where that test says."""
    yield
    for volunteer in portal.volunteers:
        volunteer.kill()


# -- bad input ---------------------------------------------------------------------------------
TOKEN = "gpt_" + "ab" * 24 + "_" + "cd" * 16


@pytest.mark.parametrize(
    ("args", "config", "fragments"),
    [
        (("--hours", "25:00-08:00"), None, ("invalid hours", "hour must be 0-24")),
        (("--hours", "mon-fry 18:00-08:00"), None, ("unknown day 'fry'", "did you mean 'fri'")),
        (("--gpus", "7"), None, ("GPU",)),
        (("--max-owner-load", "150"), None, ("max_owner_load", "1 to 100")),
        ((), "cpus = 1\nmax_owner_lode = 50\n", ("unknown key 'max_owner_lode'", "max_owner_load")),
        ((), 'hours = "8-17"\n', ("invalid hours",)),
        ((), "gpus = [9]\n", ("GPU", "9")),
    ],
)
def test_bad_rules_are_refused_before_contacting_anyone(
    args: tuple[str, ...], config: str | None, fragments: tuple[str, ...], tmp_path: Path
) -> None:
    extra: tuple[str, ...] = ()
    if config is not None:
        path = tmp_path / "volunteer.toml"
        path.write_text(config)
        extra = ("--config", str(path))
    result = volunteer_cli(
        "https://127.0.0.1:9", "--token", TOKEN, "--state-dir", str(tmp_path), *args, *extra
    )
    assert result.returncode != 0
    assert "Traceback" not in result.stderr + result.stdout
    message = [line for line in result.stderr.splitlines() if line.strip()][-1]
    for fragment in fragments:
        assert fragment in message, message


def test_control_commands_without_a_volunteer_say_so(tmp_path: Path) -> None:
    result = volunteer_cli("status", "--name", "nobody-runs-this")
    assert result.returncode == 2 and "no volunteer named 'nobody-runs-this'" in result.stderr
    missing = volunteer_cli("--token", TOKEN)
    assert missing.returncode == 2 and "portal's address" in missing.stderr


# -- the rules ---------------------------------------------------------------------------------
def test_a_cpu_hog_pauses_the_node_and_its_task_resumes_when_the_hog_stops(
    portal: Portal, tmp_path: Path
) -> None:
    config = tmp_path / "volunteer.toml"
    config.write_text('max_owner_load = 70\nowner_load_grace = "1s"\n')
    volunteer = start_volunteer(
        portal, tmp_path, "hogged", "--cpus", "1", "--memory", "1GB", "--config", str(config)
    )
    hogs: list[subprocess.Popen[bytes]] = []
    with portal.grid() as grid:
        future = grid.submit(spin, 4.0, 21)
        wait_for(
            lambda: task_processes(volunteer) and grid.node("hogged").state is NodeState.BUSY,
            timeout=60,
            what="the task to start",
        )
        try:
            # More busy loops than cores, each in its own session (Linux gives every session
            # an equal share of the CPU): whatever else runs here, the owner is busy.
            hogs = [
                subprocess.Popen([sys.executable, "-c", "while True: pass"], start_new_session=True)
                for _ in range(3 * (os.cpu_count() or 1))
            ]
            paused = wait_for(
                lambda: node_where(
                    grid,
                    "hogged",
                    lambda n: n.state is NodeState.PAUSED and n.reason == "owner busy",
                ),
                timeout=60,
                what="the node to pause for its busy owner",
            )
            assert paused.reason == "owner busy"
            # Suspended (or, if the rule struck before it started, held): not finished.
            assert not future.done()
        finally:
            for hog in hogs:
                hog.kill()
                hog.wait()
        wait_for(
            lambda: node_where(grid, "hogged", lambda n: n.state is not NodeState.PAUSED),
            timeout=90,
            what="the node to resume once the hog stopped (other programs keeping every core "
            "busy also count as the owner)",
        )
        assert future.result(timeout=120)[1] == 42


def test_pause_resume_and_status_over_the_owner_only_socket(portal: Portal, tmp_path: Path) -> None:
    volunteer = start_volunteer(portal, tmp_path, "steered", "--cpus", "1", "--memory", "1GB")
    path = socket_path("steered")
    assert stat.S_IMODE(os.stat(control_dir()).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    with portal.grid() as grid:
        node = grid.node("steered")
        # What the node has installed reaches the registry, for requirements to match.
        assert node.capacity.packages.get("distributed") and node.capacity.packages.get("dask")
        assert node.sandbox in ("bubblewrap", "user", "process")

        future = grid.submit(spin, 4.0, 21, workers=["steered"])
        wait_for(
            lambda: volunteer_status("steered").get("in_process_tasks") == 1,
            what="the task to start in its task process",
        )

        paused = volunteer_cli("pause", "--name", "steered", "--reason", "exam tonight")
        assert paused.returncode == 0, paused.stderr
        assert paused.stdout.strip() == "steered: paused (exam tonight)"
        wait_for(
            lambda: node_where(grid, "steered", lambda n: n.reason == "exam tonight"),
            what="the pause to reach the registry",
        )
        assert grid.node("steered").state is NodeState.PAUSED
        wait_for(lambda: stopped_task(volunteer), what="the running task to be suspended")

        status = volunteer_status("steered")
        assert status["state"] == "paused" and status["manual_pause"] is True
        assert status["running_tasks"] == 1 and status["suspended_tasks"] == 1
        text = volunteer_cli("status", "--name", "steered").stdout
        assert "steered: paused (exam tonight)" in text and "sandbox" in text

        resumed = volunteer_cli("resume", "--name", "steered")
        assert resumed.returncode == 0 and "steered: running" in resumed.stdout
        wait_for(
            lambda: node_where(grid, "steered", lambda n: n.state is not NodeState.PAUSED),
            what="the node to run again",
        )
        assert future.result(timeout=120)[1] == 42

        # A cancelled task's process is ended at once, not left to run on.
        doomed = grid.submit(spin, 600.0, 1, workers=["steered"])
        wait_for(
            lambda: volunteer_status("steered").get("in_process_tasks") == 1,
            what="the doomed task to start",
        )
        before = {p.pid for p in task_processes(volunteer)}
        doomed.cancel()
        wait_for(
            lambda: before - {p.pid for p in task_processes(volunteer)},
            what="the cancelled task's process to end",
        )

    # Another user cannot even reach the socket (uid 65534 is `nobody`).
    if os.geteuid() == 0:
        assert connect_as(65534, path) == "PermissionError"
    else:
        print("skipped the other-user check: it needs root to act as another user")
    import socket

    left, right = socket.socketpair(socket.AF_UNIX)
    with left, right:
        assert peer_uid(left) in (None, os.getuid())


def test_a_node_paused_past_its_suspend_limit_hands_its_task_to_another(
    portal: Portal, tmp_path: Path
) -> None:
    start_volunteer(
        portal, tmp_path, "leaver", "--cpus", "1", "--memory", "1GB", "--suspend-limit", "2s"
    )
    start_volunteer(portal, tmp_path, "keeper", "--cpus", "1", "--memory", "1GB")
    with portal.grid() as grid:
        future = grid.submit(spin, 4.0, 21, workers=["leaver"], allow_other_workers=True)
        wait_for(lambda: grid.node("leaver").state is NodeState.BUSY, what="the task on leaver")
        assert volunteer_cli("pause", "--name", "leaver").returncode == 0
        # Suspended on leaver, then, past the limit, handed back and run on keeper.
        assert future.result(timeout=120) == ("keeper", 42)
        status = volunteer_status("leaver")
        assert status["state"] == "paused" and status["moved_tasks"] == 1


def test_drain_mid_task_finishes_the_task_then_leaves(portal: Portal, tmp_path: Path) -> None:
    volunteer = start_volunteer(portal, tmp_path, "drained", "--cpus", "1", "--memory", "1GB")
    with portal.grid() as grid:
        future = grid.submit(spin, 2.0, 21, workers=["drained"])
        wait_for(lambda: grid.node("drained").state is NodeState.BUSY, what="the task to start")
        drained = volunteer_cli("drain", "--name", "drained")
        assert drained.returncode == 0 and "drained: draining" in drained.stdout
        assert future.result(timeout=120) == ("drained", 42)
        assert volunteer.process.wait(60) == 0
        assert "Left the grid" in volunteer.output()
        wait_for(lambda: grid.node("drained").state is NodeState.OFFLINE, what="the node to leave")
        assert not socket_path("drained").exists()


# -- %%grid cells: their own child process, confined like a task process --------------------


def cell_children(volunteer: Volunteer) -> list[psutil.Process]:
    """Processes running cells on the volunteer: the children of its cells' fork server."""
    found = []
    for proc in psutil.Process(volunteer.process.pid).children(recursive=True):
        try:
            if "_zygote_main" in " ".join(proc.parent().cmdline()):
                found.append(proc)
        except psutil.Error:
            continue
    return found


def worker_process(volunteer: Volunteer) -> psutil.Process:
    """The Dask worker's own process (inside bubblewrap, when it is there)."""
    for proc in psutil.Process(volunteer.process.pid).children(recursive=True):
        command = proc.cmdline()
        if (
            command
            and "python" in os.path.basename(command[0])
            and "grid_portal.node.worker" in command
        ):
            return proc
    raise AssertionError("no worker process")


def test_a_cell_is_confined_suspended_moved_and_held_to_its_memory_like_a_task(
    portal: Portal, tmp_path: Path
) -> None:
    from grid_portal.jobs.cell import CellRun, NullSink, RunOptions, analyse_cell, make_payload

    leaver = start_volunteer(
        portal, tmp_path, "cell-a", "--cpus", "1", "--memory", "1GB", "--suspend-limit", "3s"
    )
    spin_cell = (
        "import time, platform\nend = time.process_time() + 3\n"
        "while time.process_time() < end:\n    pass\n"
    )
    with portal.grid() as grid:

        def submit(source: str, **options: object) -> CellRun:
            code = analyse_cell(source, "<cell>")
            return CellRun(
                grid, make_payload(code, {}, None), RunOptions(name="cell", **options)
            ).submit()

        run = submit(spin_cell)
        wait_for(
            lambda: volunteer_status("cell-a").get("in_process_tasks") == 1,
            what="the cell to start, watched by the node",
        )
        # Its child runs at the task processes' nice value, leads its own process group (the
        # node's signals reach whatever it starts) and stays in the worker's session (which
        # keeps the CPU share of the worker, whatever the nice values).
        children = cell_children(leaver)
        session = os.getsid(worker_process(leaver).pid)
        assert children and all(p.nice() == 10 for p in children)
        assert all(os.getpgid(p.pid) == p.pid and os.getsid(p.pid) == session for p in children)

        # Paused: the running cell is stopped where it is; past the suspend limit it is
        # handed back and runs on another node.
        assert volunteer_cli("pause", "--name", "cell-a").returncode == 0
        wait_for(
            lambda: any(p.status() == psutil.STATUS_STOPPED for p in cell_children(leaver)),
            what="the cell to be suspended",
        )
        start_volunteer(portal, tmp_path, "cell-b", "--cpus", "1", "--memory", "1GB")
        (outcome,) = run.wait(NullSink())
        assert outcome["node"] == "cell-b" and not outcome.get("error")
        assert volunteer_status("cell-a")["moved_tasks"] == 1

        # Held to the memory it asked for: the allocation fails inside the cell.
        hungry = submit("block = bytearray(600 * 2**20)\n", memory=200 * 2**20)
        (outcome,) = hungry.wait(NullSink())
        assert outcome["error"]["ename"] == "MemoryError"
