"""The embedded default: a private portal on loopback with this machine as its one volunteer.

With nothing configured, ``Grid()`` and the Jupyter server extension use it, so a notebook
works with zero set-up. It runs as its own background process (``grid-portal serve
--embedded``) so that it outlives kernel restarts: results kept by the portal are still there
after one. Kernels find it through a connection file in the Jupyter runtime dir.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil

from grid_portal.connection import (
    PORTAL_FILE,
    Connection,
    embedded_connection_path,
    embedded_data_dir,
    pid_alive,
)
from grid_portal.errors import ConnectionFailed, UsageError
from grid_portal.keys import file_lock
from grid_portal.portal.server import PortalConfig, PortalInfo

logger = logging.getLogger("grid_portal.embedded")

JOIN_TIMEOUT = 60.0  # publish the portal even if its local volunteer is slow to join
# The portal's log line when this machine cannot be its volunteer (the portal then stops);
# ensure_embedded_portal reads it back, so that whoever started the portal hears why.
COULD_NOT_JOIN = "this machine could not join its embedded portal:"


def embedded_config(
    data_dir: Path | None = None, cpus: int | None = None, memory: int | None = None
) -> PortalConfig:
    """Loopback only, ports chosen by the OS, plus the local volunteer as a companion."""
    config = PortalConfig(
        data_dir=data_dir or embedded_data_dir(), host="127.0.0.1", port=0, http_port=0
    )

    async def local_volunteer(info: PortalInfo) -> None:
        joined = await run_local_volunteer(info, cpus=cpus, memory=memory)
        if not joined and info.stop is not None:
            info.stop()  # a portal without this machine has nothing to run on

    config.companions.append(local_volunteer)
    return config


async def run_local_volunteer(
    info: PortalInfo, cpus: int | None = None, memory: int | None = None
) -> bool:
    """This machine as a volunteer of its own portal: no token needed, the CA is right here.

    Runs until the portal stops; returns False at once if this machine could not join (the
    reason is logged, as ``COULD_NOT_JOIN``), True when it ran and was stopped."""
    from grid_portal.node.agent import (
        Credentials,
        Volunteer,
        VolunteerOptions,
        decide_offer,
        hostname,
    )
    from grid_portal.node.probe import probe_static
    from grid_portal.portal.security import write_private

    static = probe_static()
    try:
        offer = decide_offer(cpus, memory, [], static, oversubscribe=None)
    except UsageError as exc:  # e.g. GridPortal.embedded_cpus over what the machine has
        logger.error("%s %s", COULD_NOT_JOIN, exc)
        return False
    name = f"{hostname()}-local"
    directory = info.data_dir / "local-volunteer"
    cert, key = info.ca.issue(name, role="node")
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "node.pem").write_text(cert)
    write_private(directory / "node-key.pem", key)
    creds = Credentials(
        name=name,
        scheduler=info.connection.scheduler,
        ca=info.connection.ca,
        cert=str(directory / "node.pem"),
        key=str(directory / "node-key.pem"),
    )
    # `grid-portal volunteer status|pause --name NAME-local` and the sidebar's This machine
    # reach it as any volunteer of this user.
    options = VolunteerOptions(
        cpus=offer.cpus, memory=offer.memory, labels={"embedded": "true"}, control_if_free=True
    )
    volunteer = Volunteer(creds, options, static)
    running = asyncio.create_task(volunteer.run())
    try:
        # Publish the connection only once this machine has joined, so that a kernel that
        # finds the portal also finds a node to run on (and is not told "no node offers...").
        # A volunteer that fails before joining must say so now, not after JOIN_TIMEOUT.
        joined = asyncio.ensure_future(volunteer.joined.wait())
        await asyncio.wait(
            {joined, running}, timeout=JOIN_TIMEOUT, return_when=asyncio.FIRST_COMPLETED
        )
        joined.cancel()
        if running.done() and not running.cancelled() and running.exception() is not None:
            # A portal without this machine runs nothing: publish nothing; the portal stops,
            # and ensure_embedded_portal reads why from this log.
            logger.error("%s %s", COULD_NOT_JOIN, running.exception())
            return False
        publish_connection(info)
        await running
        return True
    finally:
        volunteer.request_stop()
        await asyncio.gather(running, return_exceptions=True)


def publish_connection(info: PortalInfo) -> None:
    """Tell kernels and servers of this user where the embedded portal is."""
    path = embedded_connection_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    info.connection.save(path)


def ensure_embedded_portal(
    timeout: float = 60.0, cpus: int | None = None, memory: int | None = None
) -> Connection:
    """The running embedded portal's connection, starting the portal first if needed.

    ``cpus`` and ``memory`` (bytes) are what its local volunteer lends when this call starts
    it; a portal that already runs keeps its own.
    """
    path = embedded_connection_path()
    lock_path = embedded_data_dir() / "start.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(lock_path):  # two kernels starting at once must not start two portals
        existing = _alive_connection(path)
        if existing is not None:
            return existing
        log_path = embedded_data_dir() / "portal.log"
        log_start = log_path.stat().st_size if log_path.exists() else 0  # this start's lines
        command = [sys.executable, "-m", "grid_portal.cli", "serve", "--embedded"]
        if cpus is not None:
            command += ["--cpus", str(cpus)]
        if memory is not None:
            command += ["--memory", str(memory)]
        with open(log_path, "ab") as log:
            process = subprocess.Popen(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # outlive the kernel that started it
            )
        print(
            f"Started an embedded Grid Portal (pid {process.pid}) with this machine as its "
            "volunteer; stop it with `grid-portal embedded stop`.",
            file=sys.stderr,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            conn = _alive_connection(path)
            if conn is not None and conn.pid == process.pid:
                return conn
            if process.poll() is not None:
                # A portal whose volunteer cannot join stops itself; its log says why.
                reason = _join_failure(log_path, log_start)
                if reason is not None:
                    raise ConnectionFailed(
                        "the embedded portal started, but this machine could not join it: "
                        f"{reason}. See {log_path}"
                    )
                raise ConnectionFailed(
                    f"the embedded portal failed to start (exit code {process.returncode}); "
                    f"see {log_path}"
                )
            time.sleep(0.1)  # polling for a file another process writes
        raise ConnectionFailed(
            f"the embedded portal did not start within {timeout:.0f} s; see {log_path}"
        )


def _join_failure(log_path: Path, start: int) -> str | None:
    """Why this machine could not join the portal that just stopped, from the lines its log
    gained since ``start``; None: that was not why."""
    try:
        with open(log_path, "rb") as log:
            log.seek(start)
            text = log.read().decode(errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        if COULD_NOT_JOIN in line:
            return line.split(COULD_NOT_JOIN, 1)[1].strip()
    return None


def _alive_connection(path: Path) -> Connection | None:
    if not path.exists():
        return None
    try:
        conn = Connection.load(path)
    except ConnectionFailed:
        return None
    return conn if pid_alive(conn.pid) else None


def stop_embedded_portal(timeout: float = 30.0) -> bool:
    """Stop the embedded portal if one runs; returns whether one did.

    Found through the kernels' connection file, or else through the pid in its data dir's
    ``portal.json``: a portal whose volunteer has not joined yet has published no connection
    file, and one started under another Jupyter runtime dir published it elsewhere.
    """
    conn = _alive_connection(embedded_connection_path())
    pid = conn.pid if conn is not None else _running_embedded_pid()
    if pid is None:
        return False
    os.kill(pid, 15)
    deadline = time.monotonic() + timeout
    while pid_alive(pid) and time.monotonic() < deadline:
        # Started by this very process (Grid() or a Jupyter server): reap it, or it lingers
        # as a zombie (which pid_alive() counts as gone) until this process ends.
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        time.sleep(0.1)
    return True


def _running_embedded_pid() -> int | None:
    """The pid in the embedded data dir's ``portal.json``, if that process is still this
    user's ``grid-portal serve --embedded`` (a pid is reused: never signal another program)."""
    try:
        pid = json.loads((embedded_data_dir() / PORTAL_FILE).read_text()).get("pid")
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(pid, int) or not pid_alive(pid):
        return None
    try:
        command = psutil.Process(pid).cmdline()
    except psutil.Error:
        return None
    ours = any(part == "grid_portal.cli" or Path(part).name == "grid-portal" for part in command)
    return pid if ours and "serve" in command and "--embedded" in command else None
