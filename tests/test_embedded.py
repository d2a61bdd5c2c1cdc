"""The embedded portal (`grid-portal serve --embedded`) as Grid() starts it, in its own dirs."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

from conftest import grid_portal_command, wait_for


def test_the_local_volunteer_joins_even_where_its_control_socket_cannot_be_made(
    tmp_path: Path,
) -> None:
    """A runtime dir whose socket path is too long for Unix (a deep pytest or CI temp dir; CI
    failed so: the volunteer gave up before joining and every notebook waited 60 s for nothing):
    the embedded portal's volunteer joins without a control socket and says why."""
    runtime = tmp_path / ("r" * 100)
    dirs = {
        "XDG_DATA_HOME": tmp_path / "data",
        "XDG_CONFIG_HOME": tmp_path / "config",
        "XDG_RUNTIME_DIR": runtime,
        "JUPYTER_RUNTIME_DIR": tmp_path / "jupyter",
    }
    for path in dirs.values():
        path.mkdir(mode=0o700)
    env = {**os.environ, **{var: str(path) for var, path in dirs.items()}}
    log = tmp_path / "portal.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            grid_portal_command("serve", "--embedded", "--cpus", "1"),
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
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
            lambda: (dirs["JUPYTER_RUNTIME_DIR"] / "grid-portal-embedded.json").exists(),
            timeout=10,
            what="the embedded portal's connection file",
        )
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
