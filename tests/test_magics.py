"""%%grid and %grid through IPython's own InteractiveShell, against a real portal and a real
volunteer (processes on loopback, shared by the whole module)."""

from __future__ import annotations

import _thread
import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Portal, grid_of, magic_shell, start_portal, start_volunteer, wait_for
from IPython.core.error import UsageError as IPythonUsageError
from IPython.core.interactiveshell import InteractiveShell
from IPython.utils.capture import capture_output

from grid_portal.errors import GridError
from grid_portal.jobs.cell import CellInterrupted, CellTimedOut, analyse_cell
from grid_portal.model import JobState


@pytest.fixture(scope="module")
def portal(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Portal]:
    tmp = tmp_path_factory.mktemp("magics")
    p = start_portal(tmp)
    # The volunteer's default sandbox (bubblewrap here): each task runs in a sandboxed task
    # process, which streams and keeps results through its channel to the worker.
    start_volunteer(p, tmp, "vol", "--cpus", "2", "--memory", "1GB", "--label", "pool=a")
    yield p
    p.stop()


@pytest.fixture(scope="module")
def unboxed(portal: Portal, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A second node with --sandbox none (the embedded portal's kind): there a cell's task runs
    in the worker itself and reaches the scheduler through the worker's own connection, a
    path of its own that still needs covering. Returns the --where that picks it."""
    tmp = tmp_path_factory.mktemp("unboxed")
    start_volunteer(
        portal,
        tmp,
        "unboxed",
        "--cpus",
        "1",
        "--memory",
        "1GB",
        "--label",
        "box=no",
        "--sandbox",
        "none",
    )
    return '--where labels.box == "no"'


@pytest.fixture(scope="module")
def shell(portal: Portal) -> Iterator[InteractiveShell]:
    with magic_shell(portal) as ip:
        yield ip


def cell(shell: InteractiveShell, source: str, line: str = "") -> Any:
    return shell.run_cell_magic("grid", line, source)


def run(shell: InteractiveShell, source: str) -> tuple[Any, Any]:
    """Run a whole cell as the notebook would (errors are shown, not raised)."""
    with capture_output() as captured:
        result = shell.run_cell(source)
    return result, captured


class Recorder:
    """Stands in for the cell's stdout and stderr; calls ``on_text`` with everything written."""

    def __init__(self, log: list[tuple[str, str, float]], name: str, on_text: Any = None):
        self.log, self.name, self.on_text = log, name, on_text

    def write(self, text: str) -> int:
        self.log.append((self.name, text, time.monotonic()))
        if self.on_text is not None:
            self.on_text("".join(t for _, t, _ in self.log))
        return len(text)

    def flush(self) -> None:
        pass


@contextlib.contextmanager
def recording(on_text: Any = None) -> Iterator[list[tuple[str, str, float]]]:
    log: list[tuple[str, str, float]] = []
    out, err = Recorder(log, "stdout", on_text), Recorder(log, "stderr", on_text)
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):  # type: ignore[type-var]
        yield log


class Gate:
    """What a cell waits on until the test lets it go on: a socket on loopback. (Not a file:
    bubblewrap hides /tmp from grid tasks; the network is shared.) ``code`` is the cell's
    side: it sets ``passed`` to whether the gate opened within 30 s."""

    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.server.settimeout(60)
        self.opened = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()
        port = self.server.getsockname()[1]
        self.code = (
            "import socket\n"
            "try:\n"
            f"    passed = socket.create_connection(('127.0.0.1', {port}), 30).recv(4) == b'open'\n"
            "except OSError:\n"
            "    passed = False\n"
        )

    def _serve(self) -> None:
        with self.server, contextlib.suppress(OSError):
            while True:  # every cell (every --map item) that waits on it; ends after 60 s idle
                conn, _ = self.server.accept()
                threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn: socket.socket) -> None:
        with conn:
            if self.opened.wait(60):
                conn.sendall(b"open")

    def open(self) -> None:
        self.opened.set()


# -- values -------------------------------------------------------------------------------------
def test_values_round_trip_including_notebook_functions_and_classes(shell) -> None:
    import numpy as np

    shell.run_cell(
        "import numpy as np\n"
        "n = 41\n"
        "word = 'grid'\n"
        "arr = np.arange(6).reshape(2, 3)\n"
        "def double(v):\n"
        "    return 2 * v\n"
        "class Point:\n"
        "    def __init__(self, x, y):\n"
        "        self.x, self.y = x, y\n"
        "    def norm2(self):\n"
        "        return self.x ** 2 + self.y ** 2\n"
    )
    grid_of(shell).trust.add("vol")  # issue 14: functions and classes only from trusted nodes
    with capture_output() as captured:
        value = cell(
            shell,
            "n2 = n + 1\n"
            "word2 = word.upper()\n"
            "arr2 = arr * 10\n"
            "twice = double(arr2)\n"
            "p = Point(3, 4)\n"
            "def triple(v):\n"
            "    return 3 * v\n"
            "p.norm2()\n",
        )
    ns = shell.user_ns
    assert value == 25 and captured.stdout == ""
    assert ns["n2"] == 42 and ns["word2"] == "GRID"
    assert isinstance(ns["arr2"], np.ndarray) and ns["arr2"].tolist() == [[0, 10, 20], [30, 40, 50]]
    assert ns["twice"].tolist() == [[0, 20, 40], [60, 80, 100]]
    assert isinstance(ns["p"], ns["Point"]) and ns["p"].norm2() == 25  # the same class, here
    assert ns["triple"](5) == 15  # a function defined on the node works here
    grid_of(shell).trust.discard("vol")


def test_inputs_are_what_the_cell_reads_and_outputs_what_it_assigns() -> None:
    code = analyse_cell(
        "import math\n"
        "total = start\n"
        "for i in items:\n"
        "    total += f(i)\n"
        "def g(v):\n"
        "    local = v + offset\n"
        "    return local\n"
        "squares = [k * k for k in total_range]\n"
        "del scratch\n"
        "total\n",
        "Cell In[1]",
    )
    assert set(code.reads) == {"start", "items", "f", "offset", "total_range", "scratch"}
    assert set(code.writes) == {"math", "total", "i", "g", "squares"}
    assert code.deletes == ("scratch",) and code.has_value
    assert not analyse_cell("x = 1\nx;", "c").has_value


# -- output ---------------------------------------------------------------------------------------
def check_output_streams(shell: InteractiveShell, line: str = "") -> None:
    """A cell's output reaches this kernel while the cell runs (the cell can only finish once
    the kernel has seen its output), in order, and only this kernel."""
    gate = Gate()

    def on_text(text: str) -> None:
        if "waiting" in text:
            gate.open()

    with recording(on_text) as log:
        cell(
            shell,
            "import sys\n"
            "for k in range(3):\n"
            "    print('out', k)\n"
            "    print('err', k, file=sys.stderr)\n"
            "print('waiting', flush=True)\n"
            f"{gate.code}"
            "print('seen' if passed else 'never seen')\n",
            line,
        )
    text = "".join(t for _, t, _ in log)
    assert text == "out 0\nerr 0\nout 1\nerr 1\nout 2\nerr 2\nwaiting\nseen\n"
    streams = [(name, t) for name, t, _ in log if t.strip()]
    assert streams[0][0] == "stdout" and streams[1] == ("stderr", "err 0\n")
    # Not broadcast: Dask's event log, which every client may read, holds none of it.
    events = grid_of(shell).client.get_events()
    assert "waiting" not in repr(events)


def test_output_streams_from_a_sandboxed_node_in_order_and_only_to_its_kernel(shell) -> None:
    check_output_streams(shell)


def test_display_calls_and_figures_come_back_as_rich_outputs(shell) -> None:
    with capture_output() as captured:
        cell(
            shell,
            "from IPython.display import HTML, display\n"
            "display(HTML('<b>from the grid</b>'))\n"
            "import matplotlib.pyplot as plt\n"
            "plt.plot([1, 2, 3])\n"
            "plt.title('remote')\n",
        )
    kinds = [sorted(o.data) for o in captured.outputs]
    assert ["text/html", "text/plain"] in kinds
    html = next(o.data["text/html"] for o in captured.outputs if "text/html" in o.data)
    assert html == "<b>from the grid</b>"
    png = next(o.data["image/png"] for o in captured.outputs if "image/png" in o.data)
    import base64

    assert base64.b64decode(png)[:8] == b"\x89PNG\r\n\x1a\n"


# -- errors ---------------------------------------------------------------------------------------
def test_an_error_shows_the_cell_line_and_keeps_what_ran_before(shell) -> None:
    shell.run_cell("def helper(v):\n    return 1 / v\n")
    result, captured = run(
        shell,
        "%%grid\nbefore = 'kept'\nvalue = helper(2)\n\nbad = helper(0)\nafter = 'not reached'\n",
    )
    assert isinstance(result.error_in_exec, ZeroDivisionError)
    shown = captured.stdout
    assert 'File "Cell In[' in shown and "line 5" in shown and "bad = helper(0)" in shown
    assert "ZeroDivisionError: division by zero" in shown
    assert "grid_portal" not in shown and "site-packages" not in shown  # none of our frames
    assert shell.user_ns["before"] == "kept" and shell.user_ns["value"] == 0.5
    assert "after" not in shell.user_ns


def test_a_crafted_message_from_a_cell_runs_nothing_in_the_worker(shell, portal) -> None:
    """A cell's code writes a crafted pickle into its own channel to the worker (found through
    the child's outbox): the worker, which holds the node's key, opens it as plain data only,
    so the marker its unpickling would write never appears, and the cell fails clearly."""
    marker = portal.data_dir.parent / "state-vol" / "scratch" / "crafted-frame-marker"
    payload = f'open({str(marker)!r}, "w").write("ran")'
    code = (
        "import gc, os, pickle\n"
        "from grid_portal.jobs.cell_child import FRAME\n"
        "class Probe:\n"
        "    def __reduce__(self):\n"
        f"        return (exec, ({payload!r},))\n"
        "fd = next(o.fd for o in gc.get_objects() if type(o).__name__ == '_Outbox')\n"
        "body = pickle.dumps({'k': 'result', 'value': Probe()})\n"
        "os.write(fd, FRAME.pack(len(body)) + body)\n"
    )
    result, captured = run(shell, f"%%grid\n{code}")
    assert result.error_in_exec is not None
    assert "does not open" in captured.stdout + str(result.error_in_exec)
    assert not marker.exists()


def test_bad_input_is_one_clear_line_and_sends_nothing(shell, tmp_path: Path) -> None:
    grid = grid_of(shell)
    jobs_before = len(grid.jobs())
    shell.user_ns["lock"] = threading.Lock()
    cases = {
        "%%grid --cpu 2\nx = 1\n": "unrecognized arguments: --cpu",
        "%%grid --memory 12 parsecs\nx = 1\n": "unrecognized arguments",
        "%%grid --memory 4XB\nx = 1\n": "unknown unit 'XB'",
        "%%grid --timeout soon\nx = 1\n": "invalid duration 'soon'",
        "%%grid --cpus 0\nx = 1\n": "more than 0 CPUs",
        "%%grid --map x in 5\ny = x\n": "int object is not iterable",
        "%%grid --map x range(3)\ny = x\n": "NAME in EXPRESSION",
        "%%grid --map x in undefined_thing\ny = x\n": "NameError",
        "%%grid\nx = (1,\ny = 2\n": "SyntaxError",
        "%%grid\n!ls\n": "magics and ! shell commands do not run on the grid",
        "%%grid\nwith lock:\n    x = 1\n": "cannot send variable 'lock'",
        "%%grid --in nothing_here\nx = 1\n": "--in names nothing_here",
        '%%grid --where labels.pool == "b"\nx = 1\n': "no online node meets it",
        "%%grid --where gpus >= \nx = 1\n": "requirement",
        "%%grid --cpus 64\nx = 1\n": "no node on the grid offers 64 CPUs",
        "%grid frobnicate": "unknown command",
        "%grid result": "takes a job ID",
        "%grid result 000000000000": "no job 000000000000",
    }
    for source, expected in cases.items():
        result, captured = run(shell, source)
        shown = (captured.stdout + captured.stderr).strip()
        assert result.error_in_exec is not None or result.error_before_exec, source
        assert expected in shown, (source, shown)
        assert "Traceback" not in shown and "grid_portal/" not in shown, (source, shown)
    assert "--in a,b" in run(shell, "%%grid\nwith lock:\n    x = 1\n")[1].stderr
    assert len(grid.jobs()) == jobs_before  # nothing was sent


def test_help_lists_the_options(shell) -> None:
    with capture_output() as captured:
        shell.run_cell("%%grid?")
    for option in ("--cpus", "--memory", "--where", "--timeout", "--map", "--bg", "--in", "--out"):
        assert option in captured.stdout


# -- stopping -------------------------------------------------------------------------------------
# A cell that names its own process (Linux prctl PR_SET_NAME), so tests can find it on the node.
MARKED_SLEEP = (
    "import ctypes, time\n"
    "ctypes.CDLL(None).prctl(15, b'grid-test-cell', 0, 0, 0)\n"
    "time.sleep({seconds})\n"
)


def cell_processes(portal: Portal, volunteer: int = 0) -> list[int]:
    """The processes of running MARKED_SLEEP cells in one of the portal's volunteers' trees."""
    import psutil

    found = []
    agent = portal.volunteers[volunteer].process.pid
    with contextlib.suppress(psutil.Error):
        for proc in psutil.Process(agent).children(recursive=True):
            with contextlib.suppress(psutil.Error):
                if proc.name() == "grid-test-cell":
                    found.append(proc.pid)
    return found


def test_interrupt_cancels_a_running_cell_and_frees_its_node(shell, portal: Portal) -> None:
    pressed: list[float] = []
    running: list[int] = []

    def press_when_running() -> None:
        running.extend(wait_for(lambda: cell_processes(portal), what="the cell to start"))
        pressed.append(time.monotonic())
        _thread.interrupt_main()  # what the kernel's interrupt button does

    threading.Thread(target=press_when_running, daemon=True).start()
    with capture_output(), pytest.raises(CellInterrupted) as info:
        cell(shell, MARKED_SLEEP.format(seconds=60))
    took = time.monotonic() - pressed[0]
    assert took < 5, f"cancelling took {took:.1f} s"
    assert "cancelled job" in str(info.value) and "vol" in str(info.value)
    wait_for(lambda: not any(map(_alive, running)), timeout=5, what="the cell to be killed")
    grid = grid_of(shell)
    job = next(j for j in reversed(grid.jobs()) if "import ctypes" in j.name)
    assert job.state is JobState.CANCELLED
    # The node takes new work at once: both its CPUs are free again.
    assert cell(shell, "2 + 2", "--cpus 2 --timeout 20s") == 4


def test_timeout_stops_the_cell_on_its_node(shell) -> None:
    started = time.monotonic()
    with capture_output() as captured, pytest.raises(CellTimedOut, match="--timeout of 0.5 s"):
        cell(shell, "import time\nprint('going', flush=True)\ntime.sleep(60)\n", "--timeout 0.5s")
    assert time.monotonic() - started < 10
    assert "going" in captured.stdout
    assert cell(shell, "'free'", "--cpus 2 --timeout 20s") == "free"


# -- sweeps and background jobs --------------------------------------------------------------
def test_map_runs_once_per_value_and_returns_lists_in_order(shell) -> None:
    with capture_output() as captured:
        squares = cell(
            shell,
            "import time\ntime.sleep(0.02 * (20 - v))\nsquare = v * v\nprint('done', v)\nsquare\n",
            "--map v in range(20)",
        )
    assert squares == [v * v for v in range(20)]
    assert shell.user_ns["square"] == [v * v for v in range(20)]
    lines = captured.stdout.splitlines()
    assert sorted(lines) == sorted(f"[v={v}] done {v}" for v in range(20))
    job = next(j for j in reversed(grid_of(shell).jobs()) if j.name.startswith("cell: import"))
    assert job.tasks_total == 20


def test_a_failing_map_value_stops_the_sweep_with_its_error(shell) -> None:
    result, captured = run(shell, "%%grid --map v in [1, 0, 2]\nr = 1 / v\n")
    assert isinstance(result.error_in_exec, ZeroDivisionError)
    assert "[v=0] Traceback from node vol" in captured.stdout


def check_background_result_outlives_its_kernel(
    shell: InteractiveShell, portal: Portal, line: str = ""
) -> None:
    """A --bg cell whose kernel went away while it ran: its node keeps the result at the
    portal, and a fresh extension (as after a kernel restart) loads it."""
    gate = Gate()
    with capture_output():
        handle = cell(
            shell, f"{gate.code}kept = [1, 2, 3]\nprint('bg', passed)\n'value'", f"--bg {line}"
        )
    assert handle.job_id in repr(handle)
    grid = grid_of(shell)
    wait_for(lambda: grid.get_job(handle.job_id).state is JobState.RUNNING, what="the cell")
    # The kernel's connection closes while the cell runs: no one here can keep its result.
    with capture_output():
        shell.run_line_magic("unload_ext", "grid_portal")
        wait_for(handle.done, what="the handle to see its connection close")
    gate.open()
    with portal.grid() as admin:  # the portal's admin may look at anyone's job
        wait_for(lambda: admin.get_job(handle.job_id).has_result, what="the node to keep it")
    shell.run_line_magic("load_ext", "grid_portal")
    shell.user_ns.pop("kept", None)
    with capture_output():
        shell.run_line_magic("grid", f"connect {portal.connection_file}")
    with capture_output() as captured:
        value = shell.run_line_magic("grid", f"result {handle.job_id}")
    assert value == "value" and shell.user_ns["kept"] == [1, 2, 3]
    assert captured.stdout == "bg True\n"
    job = grid_of(shell).get_job(handle.job_id)
    assert job.has_result and job.state is JobState.DONE


def test_background_result_outlives_its_kernel_on_a_sandboxed_node(shell, portal) -> None:
    check_background_result_outlives_its_kernel(shell, portal)


def test_line_magics_list_show_and_cancel(shell) -> None:
    with capture_output():
        handle = cell(shell, "import time\ntime.sleep(60)\n", "--bg --name sleeper")
    grid = grid_of(shell)
    wait_for(lambda: grid.get_job(handle.job_id).state is JobState.RUNNING, what="running")
    with capture_output() as captured:
        shell.run_line_magic("grid", "jobs")
        shell.run_line_magic("grid", "status")
        shell.run_line_magic("grid", "nodes")
    assert "sleeper" in captured.stdout and "running" in captured.stdout
    assert "nodes online" in captured.stdout and "vol" in captured.stdout
    with capture_output() as captured:
        shell.run_line_magic("grid", f"cancel {handle.job_id}")
    assert f"cancelled job {handle.job_id}" in captured.stdout
    wait_for(lambda: handle.done(), timeout=10, what="the background cell to end")
    assert grid.get_job(handle.job_id).state is JobState.CANCELLED
    with pytest.raises(IPythonUsageError):
        shell.run_line_magic("grid", "")
    with pytest.raises(GridError, match="cancelled"):
        shell.run_line_magic("grid", f"result {handle.job_id}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


# -- other front ends -------------------------------------------------------------------------
def test_a_plain_ipython_terminal(portal: Portal) -> None:
    """IPython in a terminal (its simple prompt, fed on stdin; a blank line pair ends a cell)."""
    script = (
        "%load_ext grid_portal\n"
        f"%grid connect {portal.connection_file}\n"
        "x = 20\n"
        "%%grid\nprint('from the grid', x + 1)\ny = x * 2\n\n\n"
        "print('back here', y)\n"
        "%%grid\nz = 1\n1 / 0\n\n\n"
        "print('after', z)\n"
        "exit\n"
    )
    out = subprocess.run(
        [sys.executable, "-m", "IPython", "--simple-prompt", "--no-banner", "--colors=NoColor"],
        input=script,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "from the grid 21" in out.stdout and "back here 40" in out.stdout
    assert 'File "Cell In[' in out.stdout and "line 3" in out.stdout
    assert "ZeroDivisionError: division by zero" in out.stdout and "after 1" in out.stdout
    assert "grid_portal/" not in out.stdout + out.stderr


def test_the_embedded_portal_with_no_configuration(shell, portal: Portal) -> None:
    """Nothing configured (conftest clears GRID_PORTAL_ADDRESS and isolates the user's dirs):
    the first %%grid cell starts the embedded portal and waits for its local volunteer."""
    from grid_portal.embedded import stop_embedded_portal

    shell.run_line_magic("unload_ext", "grid_portal")
    shell.run_line_magic("load_ext", "grid_portal")
    try:
        shell.user_ns["parent"] = os.getpid()
        with capture_output() as captured:
            value = cell(shell, "import os\nos.getpid() != parent", "--timeout 60s")
        assert value is True
        assert "embedded Grid Portal" in captured.stderr
        assert grid_of(shell).nodes()[0].labels.get("embedded") == "true"
        # Its volunteer answers `volunteer status` (and the sidebar's This machine).
        from grid_portal.node.agent import hostname
        from grid_portal.node.control import find_agent, request

        status = request(find_agent(f"{hostname()}-local"), "status")
        assert [p["state"] for p in status["portals"]] == ["running"], status
    finally:
        shell.run_line_magic("unload_ext", "grid_portal")
        stop_embedded_portal()
        shell.run_line_magic("load_ext", "grid_portal")
        with capture_output():
            shell.run_line_magic("grid", f"connect {portal.connection_file}")


# -- the sandboxed task's channel --------------------------------------------------------------
def test_a_sandboxed_task_reaches_only_its_own_queue_and_job(shell) -> None:
    """A task process's one way out (get_worker().grid_emit) carries a queue item to the
    queue its task came with, and nothing else: not to another queue, not a result for another
    job, not data that is not plain, not another kind of message even when written raw."""
    import uuid

    import dask
    from distributed import Queue

    grid = grid_of(shell)
    mine = f"grid-test-{uuid.uuid4().hex}"
    other = Queue(f"grid-test-{uuid.uuid4().hex}", client=grid.client)
    inbox = Queue(mine, client=grid.client)

    def probe(mine: str, other: str) -> dict[str, str]:
        from distributed import get_worker

        from grid_portal.node.taskchild import recv, send

        worker = get_worker()
        worker.grid_emit("queue_put", {"name": mine, "data": {"hello": "world", "n": 2}})
        tries = {
            "other queue": ("queue_put", {"name": other, "data": 1}),
            "not plain": ("queue_put", {"name": mine, "data": {"x": object()}}),
            "other job": ("store_result", {"job_id": "000000000000", "data": b"x"}),
        }
        seen = {}
        for label, (kind, payload) in tries.items():
            try:
                worker.grid_emit(kind, payload)
                seen[label] = "sent"
            except Exception as exc:  # noqa: BLE001 - the kind of refusal is the result
                seen[label] = type(exc).__name__
        channel = worker.__dict__["_channel"]  # past the task side's own checks
        with channel.lock:
            send(channel.out, ("emit", "run_function", {"function": b"anything"}))
            answer = recv(channel.inp)
        seen["raw other kind"] = "refused" if answer[1].get("refused") else "sent"
        return seen

    with dask.annotate(grid_stream=mine):
        seen = grid.submit(probe, mine, other.name).result(timeout=60)
    assert inbox.get(timeout=30) == {"hello": "world", "n": 2}
    assert seen == {
        "other queue": "PermissionError",
        "not plain": "PermissionError",
        "other job": "PermissionError",
        "raw other kind": "refused",
    }
    assert other.qsize() == 0 and inbox.qsize() == 0


# -- a node without a sandbox (last: once it joins, any cell may land on it) ------------------
def test_a_node_without_sandbox_streams_and_keeps_results_from_its_worker(
    shell, portal: Portal, unboxed: str
) -> None:
    check_output_streams(shell, unboxed)
    check_background_result_outlives_its_kernel(shell, portal, unboxed)
