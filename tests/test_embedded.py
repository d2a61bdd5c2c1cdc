"""The embedded portal (`grid-portal serve --embedded`) as Grid() starts it, in its own dirs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from conftest import grid_portal_command, wait_for

CONNECTION_FILE = "grid-portal-embedded.json"  # in the Jupyter runtime dir


def private_dirs(tmp_path: Path, runtime: Path | None = None) -> dict[str, Path]:
    """The user's dirs, private to this test (the embedded portal lives in them)."""
    dirs = {
        "XDG_DATA_HOME": tmp_path / "data",
        "XDG_CONFIG_HOME": tmp_path / "config",
        "XDG_RUNTIME_DIR": runtime or tmp_path / "run",
        "JUPYTER_RUNTIME_DIR": tmp_path / "jupyter",
    }
    for path in dirs.values():
        path.mkdir(mode=0o700)
    return dirs


def start_embedded(
    tmp_path: Path, dirs: dict[str, Path], cpus: int = 1
) -> tuple[subprocess.Popen, Path]:
    env = {**os.environ, **{var: str(path) for var, path in dirs.items()}}
    log = tmp_path / "portal.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            grid_portal_command("serve", "--embedded", "--cpus", str(cpus)),
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    return process, log


def embedded_stop(dirs: dict[str, Path]) -> str:
    env = {**os.environ, **{var: str(path) for var, path in dirs.items()}}
    done = subprocess.run(
        grid_portal_command("embedded", "stop"), env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_the_local_volunteer_joins_even_where_its_control_socket_cannot_be_made(
    tmp_path: Path,
) -> None:
    """A runtime dir whose socket path is too long for Unix (a deep pytest or CI temp dir; CI
    failed so: the volunteer gave up before joining and every notebook waited 60 s for nothing):
    the embedded portal's volunteer joins without a control socket and says why."""
    dirs = private_dirs(tmp_path, runtime=tmp_path / ("r" * 100))
    process, log = start_embedded(tmp_path, dirs)
    try:
        wait_for(
            lambda: "grid_portal.volunteer INFO: joined" in log.read_text(),
            timeout=45,
            what="the embedded portal's volunteer to join",
        )
        text = log.read_text()
        assert "no control socket (volunteer status cannot reach it)" in text
        assert "too long for a Unix socket" in text
        # The kernels' connection file is there as soon as it joined, not after a timeout.
        wait_for(
            lambda: (dirs["JUPYTER_RUNTIME_DIR"] / CONNECTION_FILE).exists(),
            timeout=10,
            what="the embedded portal's connection file",
        )
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)


def test_embedded_stop_finds_a_portal_that_published_no_connection_file(tmp_path: Path) -> None:
    """A portal whose volunteer has not joined yet has no connection file (nor has one started
    under another Jupyter runtime dir, here): `embedded stop` finds it by its data dir's pid."""
    dirs = private_dirs(tmp_path)
    process, log = start_embedded(tmp_path, dirs)
    connection = dirs["JUPYTER_RUNTIME_DIR"] / CONNECTION_FILE
    try:
        wait_for(connection.exists, timeout=45, what="the embedded portal's connection file")
        connection.unlink()
        assert embedded_stop(dirs) == "stopped the embedded portal"
        assert process.wait(timeout=30) is not None
        assert embedded_stop(dirs) == "no embedded portal runs"
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=60)


def test_embedded_stop_never_signals_another_program_with_a_reused_pid(tmp_path: Path) -> None:
    """The pid in portal.json outlived its portal and now belongs to another program."""
    dirs = private_dirs(tmp_path)
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        data = dirs["XDG_DATA_HOME"] / "grid-portal" / "embedded"
        data.mkdir(parents=True)
        (data / "portal.json").write_text(json.dumps({"pid": bystander.pid}))
        assert embedded_stop(dirs) == "no embedded portal runs"
        assert bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait()


def test_a_machine_that_cannot_lend_what_was_asked_is_told_why_at_once(tmp_path: Path) -> None:
    """`c.GridPortal.embedded_cpus = 4096` on a small machine: whoever starts the embedded
    portal (a kernel's Grid(), the Jupyter server) hears why this machine cannot be its
    volunteer within seconds, not "did not start within 60 s", and no node-less portal is
    left running."""
    dirs = private_dirs(tmp_path)
    env = {**os.environ, **{var: str(path) for var, path in dirs.items()}}
    script = (
        "import sys\n"
        "from grid_portal.embedded import ensure_embedded_portal\n"
        "from grid_portal.errors import ConnectionFailed\n"
        "try:\n"
        "    ensure_embedded_portal(cpus=4096)\n"
        "except ConnectionFailed as exc:\n"
        "    print(exc)\n"
        "    sys.exit(3)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=50
    )
    assert done.returncode == 3, (done.stdout, done.stderr)
    message = done.stdout.strip()
    assert message.startswith("the embedded portal started, but this machine could not join it: ")
    assert "--cpus 4096: this machine has" in message and "logical CPUs" in message, message
    assert not (dirs["JUPYTER_RUNTIME_DIR"] / CONNECTION_FILE).exists()
    portal_file = dirs["XDG_DATA_HOME"] / "grid-portal" / "embedded" / "portal.json"
    wait_for(lambda: not portal_file.exists(), timeout=30, what="the node-less portal to stop")
    assert embedded_stop(dirs) == "no embedded portal runs"


def test_an_embedded_portal_started_by_hand_stops_when_this_machine_cannot_join(
    tmp_path: Path,
) -> None:
    """`grid-portal serve --embedded` run directly, not through Grid(): the same refusal ends
    the portal (a portal with no node is of no use), with the reason in its output."""
    dirs = private_dirs(tmp_path)
    process, log = start_embedded(tmp_path, dirs, cpus=4096)
    try:
        assert process.wait(timeout=45) is not None
        text = log.read_text()
        assert "this machine could not join its embedded portal: --cpus 4096" in text, text
        assert "Traceback" not in text, text
        assert "--oversubscribe" not in text  # serve --embedded has no such flag
        assert not (dirs["JUPYTER_RUNTIME_DIR"] / CONNECTION_FILE).exists()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
