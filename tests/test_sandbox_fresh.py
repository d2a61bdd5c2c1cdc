"""A fresh sandbox per job (issue 14, point 5): nothing one job writes is there for the next,
the worker and its task processes run Python isolated (-I) and read no Dask config a task can
write, and a task reaches neither the node's key nor the host's sockets nor its other places.

A real portal, a real volunteer under bubblewrap (skipped, with the reason, where bubblewrap
does not work), two researchers. Task functions are pickled by value, as a notebook's are.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cloudpickle
import psutil
import pytest
from conftest import Portal, researcher_connection, start_portal, start_volunteer, wait_for

from grid_portal.node.sandbox import bwrap_problem

NODE = "fresh"
SOCKET = "/var/run/grid-test-docker.sock"
SRV_SECRET = "/srv/grid-test-secret"


# -- task functions (sent by value) -------------------------------------------------------------
def plant(markers: str) -> dict[str, Any]:
    """Job A: leave everything behind that could run in, or be read by, a later job."""
    import json

    planted: dict[str, Any] = {}

    def write(path: str, text: str) -> None:
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w") as f:
                f.write(text)
            planted[path] = True
        except OSError as exc:
            planted[path] = f"{type(exc).__name__}: {exc}"

    home = os.path.expanduser("~")
    version = f"python{sys.version_info[0]}.{sys.version_info[1]}"
    # A .pth file in the user site: its import line runs in every Python started without -I.
    pth = f"import os; open(os.path.join({markers!r}, 'pth-' + str(os.getpid())), 'w').close()\n"
    write(f"{home}/.local/lib/{version}/site-packages/evil.pth", pth)
    # A Dask config naming a preload: it would run in a worker that reads this config.
    preload = f"{home}/evil_preload.py"
    write(preload, f"open({markers!r} + '/preload', 'w').close()\n")
    config = json.dumps({"distributed": {"worker": {"preload": [preload]}}})
    write(f"{home}/.config/dask/evil.yaml", config)
    # Files where the next job would look: its home, /tmp, /dev/shm, its working directory
    # (a module there would shadow an import), and the worker's own home.
    write(f"{home}/planted.txt", "from job A")
    write("/tmp/planted.txt", "from job A")
    write("/dev/shm/planted.txt", "from job A")
    write(os.path.join(os.getcwd(), "planted.py"), "FROM = 'job A'\n")
    write("/home/grid-worker/.config/dask/evil.yaml", config)
    return {
        "planted": planted,
        "home": home,
        "cwd": os.getcwd(),
        "tmpdir": os.environ.get("TMPDIR"),
        "isolated": sys.flags.isolated,
    }


def look(markers: str) -> dict[str, Any]:
    """Job B: what of job A's is there?"""
    import importlib

    import dask

    home = os.path.expanduser("~")
    version = f"python{sys.version_info[0]}.{sys.version_info[1]}"
    candidates = [
        f"{home}/.local/lib/{version}/site-packages/evil.pth",
        f"{home}/.config/dask/evil.yaml",
        f"{home}/evil_preload.py",
        f"{home}/planted.txt",
        "/tmp/planted.txt",
        "/dev/shm/planted.txt",
        os.path.join(os.getcwd(), "planted.py"),
    ]
    try:
        importlib.import_module("planted")
        imported = True
    except ImportError:
        imported = False
    return {
        "found": [p for p in candidates if os.path.exists(p)],
        "imported_planted": imported,
        "markers": sorted(os.listdir(markers)),
        "preload": dask.config.get("distributed.worker.preload", []),
        "home": home,
        "cwd": os.getcwd(),
        "isolated": sys.flags.isolated,
    }


def reach(key: str, socket_path: str, srv_secret: str, key_line: str) -> dict[str, str]:
    """What a task gets when it reaches for the node's key, a host socket and /srv.
    ``key_line`` is a line of the key's own text (the test reads it outside the sandbox), to
    look for in every file the task can read: the words "PRIVATE KEY" alone also appear in
    libraries' own test keys and sources, wherever the checkout and its environment live."""
    import contextlib
    import socket as sockets

    outcome: dict[str, str] = {}

    def attempt(what: str, action: Any) -> None:
        try:
            action()
            outcome[what] = "reached"
        except OSError as exc:
            outcome[what] = f"refused: {type(exc).__name__}"

    def open_key() -> None:
        with open(key) as f:
            f.read()

    def connect() -> None:
        with sockets.socket(sockets.AF_UNIX) as s:
            s.settimeout(3)
            s.connect(socket_path)

    def open_secret() -> None:
        with open(srv_secret) as f:
            f.read()

    attempt("key", open_key)
    attempt("key directory", lambda: os.listdir(os.path.dirname(key)))
    attempt("socket", connect)
    attempt("srv", lambda: os.listdir("/srv"))
    attempt("srv secret", open_secret)
    python = [p for p in {sys.prefix, sys.base_prefix, *sys.path} if p]
    for place in ("/run", "/var/run", "/root", "/opt", "/mnt", "/media", "/var"):
        try:
            entries = os.listdir(place)
        except OSError as exc:
            outcome[place] = f"refused: {type(exc).__name__}"
            continue
        # Listed only on the way to Python (a prefix under /root, say): nothing else is there.
        others = [e for e in entries if not any(p.startswith(f"{place}/{e}/") for p in python)]
        outcome[place] = f"reached: {others}" if others else "refused: holds Python only"
    # /home holds the worker's empty, read-only home and nothing else.
    outcome["/home"] = "refused: holds only " + ",".join(sorted(os.listdir("/home")))
    # The key in the worker's memory: another process of the same user cannot read it there.
    worker = str(os.getppid())

    def read(path: str) -> None:
        with open(path, "rb") as f:
            f.read(1)

    attempt("worker memory", lambda: read(f"/proc/{worker}/mem"))
    attempt("worker environ", lambda: read(f"/proc/{worker}/environ"))
    with contextlib.suppress(OSError):  # its numbers may be listed, as root; never opened
        for fd in os.listdir(f"/proc/{worker}/fd"):
            attempt(f"worker fd {fd}", lambda fd=fd: read(f"/proc/{worker}/fd/{fd}"))
    # Nor did it ever land in a file the task can read (Dask writes a key given as text to a
    # temporary file to load it).
    holders = []
    scratch = os.path.dirname(os.path.dirname(os.path.dirname(os.getcwd())))  # jobs/ID/work
    for root in ("/tmp", "/dev/shm", scratch):
        for folder, _, files in os.walk(root):
            for name in files:
                with contextlib.suppress(OSError), open(os.path.join(folder, name), "rb") as f:
                    if key_line.encode() in f.read(1 << 20):
                        holders.append(os.path.join(folder, name))
    outcome["key files"] = ", ".join(holders) or "none"
    return outcome


cloudpickle.register_pickle_by_value(sys.modules[__name__])


# -- fixtures ------------------------------------------------------------------------------------
def whose_process() -> dict[str, Any]:
    """Which process runs this job's task, what an earlier job left in it, and whether the
    process it was forked from can be read or written (it must not be: later jobs are forked
    from it)."""
    import json

    me = {"pid": os.getpid(), "ppid": os.getppid()}
    me["left"] = getattr(json, "grid_left_by", None)
    json.grid_left_by = os.getpid()  # type: ignore[attr-defined]
    with open(f"/proc/{os.getppid()}/cmdline", "rb") as f:
        me["parent"] = f.read().decode(errors="replace")
    try:
        with open(f"/proc/{os.getppid()}/mem", "rb"):
            me["parent_mem"] = "opened"
    except OSError as exc:
        me["parent_mem"] = type(exc).__name__
    return me


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Portal, Path]]:
    problem = bwrap_problem()
    if problem is not None:
        pytest.skip(f"{problem}: install bubblewrap (apt-get install -y bubblewrap) to test it")
    tmp = tmp_path_factory.mktemp("fresh")
    portal = start_portal(tmp)
    try:
        start_volunteer(portal, tmp, NODE, "--cpus", "1", "--memory", "1GB")
        yield portal, tmp
    finally:
        portal.stop()


def scratch_of(tmp: Path) -> Path:
    return tmp / f"state-{NODE}" / "scratch" / NODE


def grid_of(portal: Portal, tmp: Path, user: str) -> Any:
    from grid_portal import Grid

    return Grid(researcher_connection(portal, tmp, user), start_embedded=False)


def worker_process(portal: Portal) -> psutil.Process:
    agent = next(v for v in portal.volunteers if v.name == NODE).process
    for proc in psutil.Process(agent.pid).children(recursive=True):
        with contextlib.suppress(psutil.Error):
            command = proc.cmdline()
            if (
                command
                and command[0] == sys.executable
                and "grid_portal.node.worker" in str(command)
            ):
                return proc
    raise AssertionError("no worker process")


# -- the tests -----------------------------------------------------------------------------------
def test_nothing_a_job_writes_is_there_for_the_next_job(node: tuple[Portal, Path]) -> None:
    portal, tmp = node
    markers = scratch_of(tmp) / "markers"  # where planted code would leave its trace
    markers.mkdir()

    with grid_of(portal, tmp, "alice") as alice:
        a = alice.submit(plant, str(markers), workers=[NODE]).result(timeout=60)
    # Job A did plant all of it (else the test would prove nothing)...
    written = [p for p, ok in a["planted"].items() if ok is True]
    assert len(written) == 7, a["planted"]
    # ...except into the worker's own home, which is read-only.
    assert "Read-only file system" in str(a["planted"]["/home/grid-worker/.config/dask/evil.yaml"])
    assert a["isolated"] == 1
    assert a["home"].startswith(str(scratch_of(tmp) / "jobs"))
    assert a["tmpdir"].startswith(str(scratch_of(tmp) / "jobs"))

    # The worker restarts (as after a crash, or the volunteer's reboot): a worker that read
    # the planted config or .pth files would run them now.
    worker = worker_process(portal)
    assert "-I" in worker.cmdline()
    worker.send_signal(signal.SIGKILL)
    with portal.grid() as admin:
        wait_for(lambda: not admin.node(NODE).online, timeout=30, what="the worker to go")
        wait_for(lambda: admin.node(NODE).online, timeout=60, what="the worker to rejoin")

    with grid_of(portal, tmp, "bob") as bob:
        b = bob.submit(look, str(markers), workers=[NODE]).result(timeout=60)
    assert b["found"] == [] and not b["imported_planted"], b
    assert b["markers"] == [], "planted code ran"
    assert b["preload"] == []
    assert b["isolated"] == 1
    assert b["home"] != a["home"] and b["cwd"] != a["cwd"]
    assert os.listdir(markers) == []

    # Without a restart too: job C, straight after job A on the same worker.
    with grid_of(portal, tmp, "alice") as alice:
        alice.submit(plant, str(markers), workers=[NODE]).result(timeout=60)
    with grid_of(portal, tmp, "carol") as carol:
        c = carol.submit(look, str(markers), workers=[NODE]).result(timeout=60)
    assert c["found"] == [] and not c["imported_planted"] and c["markers"] == [], c

    # Job A's directory is gone from the node: nothing of it is left anywhere in the scratch.
    leftovers = [p for p in scratch_of(tmp).rglob("planted*")]
    assert leftovers == []


def test_a_cell_gets_its_jobs_own_home_too(node: tuple[Portal, Path]) -> None:
    from grid_portal.jobs.cell import CellRun, NullSink, RunOptions, analyse_cell, make_payload

    portal, tmp = node
    source = (
        "import os, sys\n"
        "open(os.path.expanduser('~/cell.txt'), 'w').write('x')\n"
        "print('HOME', os.path.expanduser('~'), 'CWD', os.getcwd(), 'I', sys.flags.isolated)\n"
    )
    with portal.grid() as grid:

        def run_cell() -> str:
            code = analyse_cell(source, "<cell>")
            run = CellRun(grid, make_payload(code, {}, None), RunOptions(name="cell")).submit()
            (outcome,) = run.wait(NullSink())
            assert not outcome.get("error"), outcome
            return "".join(e.get("t", "") for e in outcome["events"] if e["k"] == "stdout")

        first, second = run_cell(), run_cell()
    jobs = str(scratch_of(tmp) / "jobs")
    words = first.split()
    assert words[1].startswith(jobs) and words[3].startswith(jobs) and words[5] == "1", first
    assert first.split()[1] != second.split()[1]  # two cells, two jobs, two homes


def test_a_task_reaches_neither_the_key_nor_host_sockets_nor_srv(
    node: tuple[Portal, Path],
) -> None:
    portal, tmp = node
    (key,) = (tmp / f"state-{NODE}").glob("*/node-key.pem")
    # A socket outside the sandbox (where Docker's would be), and a secret in /srv.
    server = socket.socket(socket.AF_UNIX)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(SOCKET)
    os.makedirs(os.path.dirname(os.path.realpath(SOCKET)), exist_ok=True)
    server.bind(SOCKET)
    server.listen(4)
    server.setblocking(False)
    os.makedirs("/srv", exist_ok=True)
    Path(SRV_SECRET).write_text("the host's own data")
    try:
        # Both are reachable from outside the sandbox: the test would prove nothing otherwise.
        with socket.socket(socket.AF_UNIX) as probe:
            probe.connect(SOCKET)
        server.accept()[0].close()
        assert Path(key).read_text().startswith("-----BEGIN")

        with grid_of(portal, tmp, "mallory") as mallory:
            key_line = Path(key).read_text().splitlines()[1]  # a line of the key's body
            outcome = mallory.submit(
                reach, str(key), SOCKET, SRV_SECRET, key_line, workers=[NODE]
            ).result(timeout=120)
        reached = {what: how for what, how in outcome.items() if not how.startswith("refused")}
        assert reached == {"key files": "none"}, outcome
        assert outcome["/home"] == "refused: holds only grid-worker"
        with pytest.raises(BlockingIOError):
            server.accept()  # nobody connected from inside
    finally:
        server.close()
        with contextlib.suppress(OSError):
            os.unlink(SOCKET)
        with contextlib.suppress(OSError):
            os.unlink(SRV_SECRET)


def test_each_job_gets_a_new_process_forked_from_the_fork_server(
    node: tuple[Portal, Path],
) -> None:
    portal, tmp = node
    with grid_of(portal, tmp, "alice") as alice:
        a = alice.submit(whose_process, workers=[NODE]).result(timeout=60)
    with grid_of(portal, tmp, "bob") as bob:
        b = bob.submit(whose_process, workers=[NODE]).result(timeout=60)
    assert b["pid"] != a["pid"]  # job B's own process...
    assert b["left"] is None  # ...with nothing job A set in its
    assert b["ppid"] == a["ppid"] and "grid_portal.node.taskzygote" in b["parent"], b
    # The fork server is out of reach of the tasks: no job can change what later jobs are
    # forked from (non-dumpable; the sandbox drops CAP_SYS_PTRACE).
    assert b["parent_mem"] == "PermissionError", b
    # On the host: the fork server is the worker's child, and not the worker itself.
    servers = [
        p
        for p in worker_process(portal).children()
        if "grid_portal.node.taskzygote" in " ".join(p.cmdline())
    ]
    assert len(servers) == 1
