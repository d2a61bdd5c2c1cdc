"""The sandbox: grid tasks cannot read the volunteer's home, write outside their scratch
directory, see the volunteer's environment, or take more memory than their limit; the node stays
up, and results, exceptions and get_worker() keep working.

A real portal and a real volunteer (bubblewrap where it works here: ./dev installs it); the task
functions below are pickled by value, as a notebook's are.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import cloudpickle
import pytest
from conftest import Portal, start_portal, start_volunteer

from grid_portal.envcheck import (
    IncompatibleEnvironment,
    check_versions,
    incompatibilities,
    local_versions,
)
from grid_portal.node.sandbox import bwrap_command, bwrap_problem, plan_sandbox, worker_env

SECRET = "the-volunteers-diary-7f3a"
ENV_SECRET = "GRID_TEST_VOLUNTEER_TOKEN"


# -- task functions (sent by value) -------------------------------------------------------------
def read_text(path: str) -> str:
    with open(path) as f:
        return f.read()


def write_text(path: str) -> str:
    with open(path, "w") as f:
        f.write("escaped")
    return "written"


def hold_memory(nbytes: int) -> int:
    data = b"x" * nbytes  # touches every page, unlike bytearray(n)
    return len(data)


def environment() -> dict[str, str]:
    return dict(os.environ)


def worker_facts() -> tuple[str, str]:
    from distributed import get_worker

    worker = get_worker()
    try:
        worker.batched_stream  # noqa: B018 - the real worker's internals are out of reach
    except AttributeError as exc:
        return str(worker.name), str(exc)
    return str(worker.name), ""


def divide(a: float, b: float) -> float:
    return a / b


cloudpickle.register_pickle_by_value(sys.modules[__name__])


# -- fixtures ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bubblewrap() -> None:
    problem = bwrap_problem()
    if problem is not None:
        pytest.skip(f"{problem}: install bubblewrap (apt-get install -y bubblewrap) to test it")


@pytest.fixture(scope="module")
def portal(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Portal, Path]]:
    tmp = tmp_path_factory.mktemp("sandbox")
    p = start_portal(tmp)
    yield p, tmp
    p.stop()


@pytest.fixture(scope="module")
def sandboxed(portal: tuple[Portal, Path], bubblewrap: None) -> tuple[Portal, Path]:
    """One volunteer under bubblewrap, whose HOME holds a secret file and whose environment
    holds a secret variable."""
    p, tmp = portal
    home = tmp / "home"
    home.mkdir(mode=0o700)
    (home / "diary.txt").write_text(SECRET)
    start_volunteer(
        p,
        tmp,
        "boxed",
        "--cpus",
        "1",
        "--memory",
        "1GB",
        prefix=("env", f"HOME={home}", f"{ENV_SECRET}={SECRET}"),
    )
    return p, tmp


# -- end to end ----------------------------------------------------------------------------------
def test_tasks_cannot_read_home_write_outside_scratch_or_see_secrets(
    sandboxed: tuple[Portal, Path],
) -> None:
    portal, tmp = sandboxed
    home = tmp / "home"
    with portal.grid() as grid:
        node = grid.node("boxed")
        assert node is not None and node.sandbox == "bubblewrap"

        with pytest.raises((FileNotFoundError, PermissionError)):
            grid.submit(read_text, str(home / "diary.txt")).result(timeout=60)

        # Outside the scratch directory the file system is read-only or private to the sandbox:
        # whatever the task thinks it wrote, nothing reaches the real files.
        targets = [home / "planted.txt", tmp / "planted.txt", Path(__file__).parent / "planted.txt"]
        for target in targets:
            with contextlib.suppress(OSError):
                grid.submit(write_text, str(target)).result(timeout=60)
            assert not target.exists(), target

        env = grid.submit(environment).result(timeout=60)
        assert ENV_SECRET not in env and SECRET not in "".join(env.values())
        assert env["HOME"] != str(home)

    volunteer_log = next(v for v in portal.volunteers if v.name == "boxed").output()
    assert SECRET not in volunteer_log


def test_a_task_over_its_memory_limit_fails_clearly_and_the_node_stays_up(
    sandboxed: tuple[Portal, Path],
) -> None:
    portal, _ = sandboxed
    with portal.grid() as grid:
        greedy = grid.submit(hold_memory, 400_000_000, memory="150MB")
        with pytest.raises(MemoryError, match=r"memory limit of 150\.0 MB on node 'boxed'"):
            greedy.result(timeout=60)
        # The same node goes on working, within the limit.
        assert grid.submit(hold_memory, 20_000_000, memory="150MB").result(timeout=60) == 20_000_000
        assert grid.node("boxed").online


def test_results_exceptions_and_get_worker_survive_the_process_boundary(
    sandboxed: tuple[Portal, Path],
) -> None:
    portal, _ = sandboxed
    with portal.grid() as grid:
        assert grid.submit(divide, 1, 4).result(timeout=60) == 0.25
        with pytest.raises(ZeroDivisionError):
            grid.submit(divide, 1, 0).result(timeout=60)
        name, missing = grid.submit(worker_facts).result(timeout=60)
        assert name == "boxed"
        assert "runs in its own sandboxed process" in missing
        # Dependencies travel into the task process and results out of it.
        a = grid.submit(divide, 3, 2)
        b = grid.submit(divide, a, 3)
        assert b.result(timeout=60) == 0.5


def test_without_bubblewrap_tasks_still_get_processes_and_memory_limits(
    portal: tuple[Portal, Path],
) -> None:
    portal, tmp = portal
    start_volunteer(
        portal,
        tmp,
        "plain",
        *("--cpus", "1", "--memory", "1GB", "--sandbox", "process"),
        prefix=("env", f"{ENV_SECRET}={SECRET}"),
    )
    with portal.grid() as grid:
        assert grid.node("plain").sandbox == "process"
        greedy = grid.submit(hold_memory, 400_000_000, memory="150MB", workers=["plain"])
        with pytest.raises(MemoryError, match="on node 'plain'"):
            greedy.result(timeout=60)
        name, _ = grid.submit(worker_facts, workers=["plain"]).result(timeout=60)
        assert name == "plain"
        env = grid.submit(environment, workers=["plain"]).result(timeout=60)
        assert ENV_SECRET not in env  # the environment is an allow-list at every level


# -- the parts, without processes ----------------------------------------------------------------
def test_bubblewrap_binds_an_allow_list_and_only_what_python_needs(tmp_path: Path) -> None:
    home = tmp_path / "home"
    (home / "venv" / "lib").mkdir(parents=True)
    scratch = tmp_path / "scratch"
    cert = home / ".local" / "node.pem"
    cert.parent.mkdir(parents=True)
    cert.write_text("cert")
    args = bwrap_command(
        scratch,
        readable=[str(cert)],
        environ={"HOME": str(home), "PYTHONPATH": str(home / "venv" / "lib")},
        bwrap="bwrap",
    )
    pairs = list(zip(args, args[1:], strict=False))
    binds = {b for a, b in pairs if a in ("--bind", "--ro-bind", "--ro-bind-try", "--dev-bind")}
    assert "/" not in binds  # no longer the whole host with a deny-list over it
    for place in ("/home", "/root", "/srv", "/opt", "/run", "/var", "/var/run", "/mnt", "/etc"):
        assert place not in binds, place
    assert not any(b.startswith(("/run", "/var/run")) for b in binds)  # no host socket
    assert ("--ro-bind", "/usr") in pairs
    assert ("--tmpfs", "/tmp") in pairs  # a /tmp of the sandbox's own
    assert ("--ro-bind-try", "/etc/resolv.conf") in pairs or not os.path.lexists("/etc/resolv.conf")
    assert ("--ro-bind", str(cert)) in pairs
    assert ("--ro-bind", str(home / "venv" / "lib")) in pairs
    assert ("--bind", str(scratch)) in pairs
    assert ("--ro-bind", str(home)) not in pairs  # never the home itself
    assert ("--remount-ro", "/") in pairs
    assert "--new-session" in args and "--die-with-parent" in args and args[-1] == "--"
    assert "--share-net" not in args and "--unshare-net" not in args  # the worker needs it


def test_the_worker_environment_is_an_allow_list(tmp_path: Path) -> None:
    env = worker_env(
        {"PATH": "/usr/bin", "AWS_SECRET_ACCESS_KEY": "k", "LC_ALL": "C", "DASK_X": "1"},
        tmp_path,
        gpus=[1],
    )
    assert env["PATH"] == "/usr/bin" and env["LC_ALL"] == "C" and env["DASK_X"] == "1"
    assert "AWS_SECRET_ACCESS_KEY" not in env
    assert env["HOME"] == str(tmp_path / "home") and env["CUDA_VISIBLE_DEVICES"] == "1"
    assert env["OMP_NUM_THREADS"] == "1"


def test_sandbox_levels_that_cannot_work_say_what_to_do(tmp_path: Path) -> None:
    from grid_portal.errors import UsageError

    with pytest.raises(UsageError, match="choose one of"):
        plan_sandbox("jail", tmp_path)
    if os.geteuid() != 0:
        with pytest.raises(UsageError, match="needs the volunteer to run as root"):
            plan_sandbox("user", tmp_path)
    else:
        with pytest.raises(UsageError, match="there is no user 'no-such-grid-user'"):
            plan_sandbox("user", tmp_path, sandbox_user="no-such-grid-user")
        with pytest.raises(UsageError, match="is root"):
            plan_sandbox("user", tmp_path, sandbox_user="root")
    plan = plan_sandbox("process", tmp_path)
    assert plan.level == "process" and "CAN read your files" in plan.describe()
    assert "bubblewrap" in plan.describe()


def test_environment_check_names_what_to_install() -> None:
    mine = local_versions()
    assert set(mine) == {"python", "dask", "distributed", "cloudpickle"}
    assert incompatibilities(mine, mine) == []
    assert incompatibilities(mine, {}) == []  # a portal that reports nothing is not judged
    theirs = {**mine, "distributed": "2001.1.0", "python": "2.7.18"}
    problems = incompatibilities(mine, theirs)
    assert any(p.startswith("distributed ") for p in problems)
    assert any(p.startswith("python ") for p in problems)
    with pytest.raises(IncompatibleEnvironment) as caught:
        check_versions(theirs, mine)
    message = str(caught.value)
    assert "'distributed==2001.1.0'" in message and "Python 2.7" in message
    # A newer bug-fix release of Python is compatible; a different cloudpickle major is not.
    patch = mine["python"].rsplit(".", 1)[0] + ".99"
    assert incompatibilities(mine, {**mine, "python": patch}) == []
    assert incompatibilities(mine, {**mine, "cloudpickle": "99.0.0"})


def test_the_package_is_readable_in_the_sandbox_even_from_its_own_checkout(monkeypatch) -> None:
    """CI runs from a clone that may sit in a hidden place (/tmp, a home directory), with the
    clone as the current directory: the package folder must still be put back."""
    from pathlib import Path

    import grid_portal
    from grid_portal.node import sandbox

    package = Path(grid_portal.__file__).resolve().parent
    monkeypatch.chdir(package.parent)
    paths = sandbox._python_paths({})
    assert package in paths
    assert package.parent not in paths  # never the rest of the checkout
