"""Shared fixtures: real portals and real volunteers, as processes, on loopback.

Every test session gets its own XDG and Jupyter dirs, so nothing here touches the user's own
portal, embedded portal or saved connections.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

_SESSION_HOME = Path(tempfile.mkdtemp(prefix="grid-portal-tests-"))
for _var, _sub in (
    ("XDG_DATA_HOME", "data"),
    ("XDG_CONFIG_HOME", "config"),
    ("XDG_RUNTIME_DIR", "runtime"),
    ("JUPYTER_RUNTIME_DIR", "jupyter-runtime"),
):
    os.environ[_var] = str(_SESSION_HOME / _sub)
    (_SESSION_HOME / _sub).mkdir(mode=0o700, exist_ok=True)
os.environ.pop("GRID_PORTAL_ADDRESS", None)
os.environ.pop("GRID_PORTAL_DATA_DIR", None)
os.environ.setdefault("PYTHONUNBUFFERED", "1")


def wait_for(
    predicate: Callable[[], Any], timeout: float = 30.0, interval: float = 0.1, what: str = ""
) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
        except Exception as exc:  # noqa: BLE001 - keep polling; report the last error
            last_error = exc
            value = None
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(
        f"timed out after {timeout:.0f} s waiting for {what or predicate}"
        + (f" (last error: {last_error!r})" if last_error else "")
    )


def grid_portal_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "grid_portal.cli", *args]


# Portals and volunteers started by the tests can import tests/gridtasks.py, the module of
# task functions the tests send (as a researcher's own package would be installed on nodes).
_TESTS_DIR = str(Path(__file__).resolve().parent)
os.environ["PYTHONPATH"] = os.pathsep.join(
    p for p in (_TESTS_DIR, os.environ.get("PYTHONPATH", "")) if p
)


@dataclass
class Portal:
    data_dir: Path
    process: subprocess.Popen[bytes]
    info: dict[str, Any]
    log: Path
    volunteers: list[Volunteer] = field(default_factory=list)

    @property
    def connection_file(self) -> str:
        return str(self.data_dir / "connection.json")

    @property
    def http(self) -> str:
        return self.info["local_http"]

    @property
    def scheduler(self) -> str:
        return self.info["local_scheduler"]

    def token(self, *extra: str) -> str:
        out = subprocess.run(
            grid_portal_command("token", "create", "--data-dir", str(self.data_dir), *extra),
            capture_output=True,
            text=True,
            check=True,
        )
        return out.stdout.strip()

    def grid(self) -> Any:
        from grid_portal import Grid

        return Grid(self.connection_file, start_embedded=False)

    def enrol(self, body: bytes, endpoint: str = "enrol") -> tuple[int, Any]:
        """``POST /api/enrol`` (or another ``endpoint`` of the enrolment process, such as
        ``join``) with these bytes as they are: (HTTP status, JSON reply)."""
        import ssl
        import urllib.error
        import urllib.request

        context = ssl.create_default_context(cafile=str(self.data_dir / "ca" / "ca.pem"))
        request = urllib.request.Request(
            f"{self.http}/api/{endpoint}",
            data=body,
            method="POST",
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, context=context, timeout=30) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    def stop(self) -> None:
        for v in self.volunteers:
            v.kill()
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@dataclass
class Volunteer:
    name: str
    process: subprocess.Popen[bytes]
    log: Path

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.process.poll() is None:
            # The agent's Nanny spawns the worker in its own process; a SIGKILL to the agent
            # alone would leave the worker orphaned, so signal the whole process group when
            # simulating a machine dying.
            if sig == signal.SIGKILL:
                os.killpg(self.process.pid, sig)
            else:
                self.process.send_signal(sig)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def start_portal(tmp: Path, *extra: str, host: str = "127.0.0.1") -> Portal:
    tmp.mkdir(parents=True, exist_ok=True)
    data_dir = tmp / "portal"
    log = tmp / "portal.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            grid_portal_command(
                "serve",
                "--host",
                host,
                "--port",
                "0",
                "--http-port",
                "0",
                "--data-dir",
                str(data_dir),
                "--telemetry-interval",
                "0.5",
                *extra,
            ),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def ready() -> dict[str, Any] | None:
        if process.poll() is not None:
            raise AssertionError(f"portal exited early:\n{log.read_text()}")
        path = data_dir / "portal.json"
        if not path.exists():
            return None
        info = json.loads(path.read_text())
        return info if info.get("pid") == process.pid else None

    info = wait_for(ready, timeout=30, what="the portal to start")
    return Portal(data_dir=data_dir, process=process, info=info, log=log)


def start_volunteer(
    portal: Portal,
    tmp: Path,
    name: str,
    *extra: str,
    token: str | None = None,
    wait: bool = True,
    prefix: tuple[str, ...] = (),
) -> Volunteer:
    token = token or portal.token()
    log = tmp / f"volunteer-{name}.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [
                *prefix,
                *grid_portal_command(
                    "volunteer",
                    portal.http,
                    "--token",
                    token,
                    "--name",
                    name,
                    "--state-dir",
                    str(tmp / f"state-{name}"),
                    "--reconnect-max",
                    "2s",
                    *extra,
                ),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    volunteer = Volunteer(name=name, process=process, log=log)
    portal.volunteers.append(volunteer)
    if wait:
        with portal.grid() as grid:

            def online() -> bool:
                if process.poll() is not None:
                    raise AssertionError(f"volunteer {name} exited:\n{volunteer.output()}")
                return any(n.name == name and n.online for n in grid.nodes())

            wait_for(online, timeout=60, what=f"volunteer {name} to join")
    return volunteer


@pytest.fixture
def portal(tmp_path: Path) -> Iterator[Portal]:
    p = start_portal(tmp_path)
    yield p
    p.stop()


@contextlib.contextmanager
def portal_with(tmp: Path, *volunteers: Sequence[str]) -> Iterator[Portal]:
    """A portal and these volunteers (each its name, then its ``grid-portal volunteer``
    options), all online; stopped at the end, also when one of them fails to start."""
    portal = start_portal(tmp)
    try:
        for name, *options in volunteers:
            start_volunteer(portal, tmp, name, *options)
        yield portal
    finally:
        portal.stop()


@contextlib.contextmanager
def magic_shell(portal: Portal) -> Iterator[Any]:
    """IPython with ``%load_ext grid_portal``, connected to ``portal`` as its admin: where the
    magic tests run their cells. The extension is unloaded at the end."""
    from IPython.core.interactiveshell import InteractiveShell
    from IPython.utils.capture import capture_output

    ip = InteractiveShell.instance()
    ip.run_line_magic("load_ext", "grid_portal")
    try:
        with capture_output():
            ip.run_line_magic("grid", f"connect {portal.connection_file}")
        yield ip
    finally:
        ip.run_line_magic("unload_ext", "grid_portal")


def grid_of(shell: Any) -> Any:
    """The Grid that the magics of ``shell`` use."""
    from grid_portal.notebook.magics import magics_for

    magics = magics_for(shell)
    assert magics is not None
    return magics.grid


def researcher_connection(portal: Portal, tmp: Path, user: str, role: str = "client") -> str:
    """A researcher's connection file (a role-client certificate, or ``role``), as enrolment
    gives one: recorded in the portal's ledger, so that it can be revoked."""
    from cryptography import x509

    from grid_portal.connection import Connection
    from grid_portal.portal.ledger import LEDGER_FILE, EnrolmentBook
    from grid_portal.portal.security import CertificateAuthority, write_private

    ca = CertificateAuthority.load_or_create(portal.data_dir / "ca")
    cert, key = ca.issue(user, role=role)
    serial = x509.load_pem_x509_certificate(cert.encode()).serial_number
    EnrolmentBook(portal.data_dir / LEDGER_FILE).record(user, role, format(serial, "x"))
    (tmp / f"{user}.pem").write_text(cert)
    write_private(tmp / f"{user}-key.pem", key)
    path = tmp / f"{user}.json"
    Connection(
        scheduler=portal.scheduler,
        http=portal.http,
        ca=str(portal.data_dir / "ca" / "ca.pem"),
        cert=str(tmp / f"{user}.pem"),
        key=str(tmp / f"{user}-key.pem"),
        name=user,
    ).save(path)
    return str(path)
