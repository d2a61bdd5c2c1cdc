"""The portal's secrets live apart from its scheduler: the enrolment process's side.

``grid-portal serve`` runs as two processes, so that a bug in the scheduler, or code the
admin runs there (``run_on_scheduler``), cannot reach the portal's secrets:

- **the enrolment process** (the one ``grid-portal serve`` starts; its pid is the portal's pid
  in ``portal.json`` and ``connection.json``) alone loads the CA key and opens the join-token
  table. It serves the public HTTPS URL: enrolment with a token or a Hub token, join requests,
  the CA, ping and bandwidth; it signs every certificate, people's renewals included; it runs
  the companions (the embedded volunteer, the LAN announcement) and writes the connection
  files. At start it issues the scheduler's own certificate and key (``scheduler.pem``,
  ``scheduler-key.pem``, 0600 in the 0700 data dir) and starts
- **the scheduler process** (``portal/scheduler_process.py``, its pid is ``scheduler_pid`` in
  ``portal.json``): the Dask Scheduler with the portal plugins, the ledger's jobs and
  contributions, the public status page. It never opens ``ca/ca-key.pem``.

They talk over one socketpair made here and inherited by the child (no path, no port: no other
process can reach it), in JSON lines (``scheduler_process.py`` lists the messages). The
scheduler process may ask for one thing: a renewal of a person's certificate, for the name and
role the TLS session showed it. The enrolment process signs only for people's roles
(``PERSON_ROLES_RENEWED``: client, teacher) and only while the ledger holds that enrolment
unrevoked (``EnrolmentBook.renew`` records the new serial in the same statement).

Where the status page is served, and why. It shows the plugin's live registry, which lives in
the scheduler process. Of the two ways (copy the registry to the enrolment process, or ask the
scheduler process per request) the simplest that keeps the one public HTTPS URL that volunteers
and the docs use is to relay: the scheduler process serves ``portal/status_page.py``, unchanged,
over plain HTTP on a Unix socket in the data dir (0600, in the 0700 dir), and the enrolment
process answers the same paths on the public port by asking that socket (``GET`` only, a
size cap, a time limit, only the status page's own headers passed on). The relay adds no way
in: the scheduler process gets a path and a query string, and what it answers is copied out as
bytes, never read.

Either process ending ends the other: the scheduler process is killed by the kernel when its
parent dies (``PR_SET_PDEATHSIG``) and stops when the channel closes; the enrolment process
stops (with an error) when the scheduler process exits, and on SIGINT/SIGTERM it stops the
scheduler process first (SIGTERM, then SIGKILL after ``STOP_TIMEOUT``), so no orphan keeps the
scheduler's port.

The limit (docs/security.md): both processes run as the same Unix user, so code running in the
scheduler process could still open ``ca-key.pem`` from disk, or write to the ledger file. What
this split gives is that the key is never in the scheduler's memory, open files or Python
objects; hiding the file too needs the enrolment process to run as another user.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import tempfile
import time
from collections import deque
from dataclasses import asdict
from pathlib import Path
from typing import Any

import tornado.web

from grid_portal import settings as configured
from grid_portal.errors import GridError
from grid_portal.portal.ledger import EnrolmentBook
from grid_portal.portal.scheduler_process import MAX_MESSAGE, ProcessSettings, receive, send
from grid_portal.portal.security import CertificateAuthority, check_csr
from grid_portal.protocol import (
    CLIENT,
    DELEGATE,
    DELEGATE_CERT_HOURS,
    PERSON_CERT_DAYS,
    PERSON_ROLES_RENEWED,
    TEACHER,
    delegation,
)

logger = logging.getLogger("grid_portal.portal.scheduler_link")

# Not settings: how long the portal waits for its own scheduler process (on this machine) to
# end or answer before it gives up on it. Nothing a deployment changes makes these slower, and
# the slow case (a cold start) has its own setting, portal.scheduler-start-timeout.
STOP_TIMEOUT = 20.0
STATUS_TIMEOUT = 10.0
MAX_STATUS_RESPONSE = 32 * 2**20
STATUS_SOCKET = "status.sock"
RENEWALS_PER_MINUTE = 120  # a runaway (or compromised) scheduler cannot keep us signing
_UNIX_PATH_MAX = 100  # sun_path is 108 bytes on Linux; keep a margin
# The headers of the status page's answers that are passed on (status_page.py sets them).
RELAYED_HEADERS = frozenset(
    {
        "content-type",
        "content-security-policy",
        "x-content-type-options",
        "referrer-policy",
        "cache-control",
        "access-control-allow-origin",
        "content-disposition",
    }
)


class SchedulerExited(GridError):
    """The scheduler process ended while the portal ran."""


def status_socket_path(data_dir: Path) -> tuple[Path, Path | None]:
    """Where the scheduler process serves the status page: in the data dir, or, when that
    path is too long for a Unix socket, in a fresh 0700 temporary dir (returned second, to
    remove at the end)."""
    path = data_dir / STATUS_SOCKET
    if len(os.fsencode(str(path))) <= _UNIX_PATH_MAX:
        return path, None
    folder = Path(tempfile.mkdtemp(prefix="grid-portal-"))  # 0700
    return folder / STATUS_SOCKET, folder


# -- signing for the scheduler process --------------------------------------------------------
def answer_renewal(
    ca: CertificateAuthority, book: EnrolmentBook, message: dict[str, Any]
) -> dict[str, Any]:
    """``{"cert": PEM}`` for a person whose enrolment stands, else ``{"error": ...}``."""
    from cryptography import x509

    csr, name, role = message.get("csr"), message.get("name"), message.get("role")
    if not all(isinstance(v, str) and v for v in (csr, name, role)):
        return {"error": "a renewal names a csr, a name and a role"}
    assert isinstance(csr, str) and isinstance(name, str) and isinstance(role, str)
    if role not in PERSON_ROLES_RENEWED:
        logger.warning("refused to renew a %s certificate for %r: not a person's role", role, name)
        return {"error": f"a {role} certificate is not renewed; enrol again", "refused": True}
    enrolment = book.get(name, role)
    if enrolment is None or enrolment.revoked:
        return {
            "error": f"the certificate of {role} {name!r} was revoked (or never enrolled "
            "here): ask the portal's admin for a new token",
            "refused": True,
        }
    try:
        check_csr(csr)
        cert = ca.sign_csr(csr, name=name, role=role, days=PERSON_CERT_DAYS)
    except GridError as exc:
        return {"error": str(exc)}
    serial = format(x509.load_pem_x509_certificate(cert.encode()).serial_number, "x")
    if not book.renew(name, role, serial):  # revoked in the meantime: nothing is recorded
        return {
            "error": f"the certificate of {role} {name!r} was revoked: ask the portal's "
            "admin for a new token",
            "refused": True,
        }
    logger.info("signed the renewed certificate of %s %s", role, name)
    return {"cert": cert}


def answer_delegation(
    ca: CertificateAuthority, book: EnrolmentBook, message: dict[str, Any]
) -> dict[str, Any]:
    """``{"cert": PEM}``: a job's delegated credential (role ``delegate``, short-lived), for an
    owner whose enrolment stands; which job may have one is the scheduler's to decide (it
    knows which node runs what)."""
    csr, name = message.get("csr"), message.get("name")
    parsed = delegation(name) if isinstance(name, str) else None
    if not isinstance(csr, str) or not isinstance(name, str) or parsed is None:
        return {"error": "a delegation names a csr and <owner>/job/<job id>"}
    owner = parsed[0]
    enrolments = [book.get(owner, role) for role in (CLIENT, TEACHER)]
    if not any(e is not None and not e.revoked for e in enrolments):
        logger.warning("refused a delegated credential for %r: no standing enrolment", owner)
        return {"error": f"{owner!r} holds no standing enrolment here", "refused": True}
    try:
        cert = ca.sign_csr(csr, name=name, role=DELEGATE, days=DELEGATE_CERT_HOURS / 24)
    except GridError as exc:
        return {"error": str(exc)}
    logger.info("signed a delegated credential for %s", name)
    return {"cert": cert}


# -- the scheduler process -----------------------------------------------------------------
class SchedulerProcess:
    """The child process that runs the scheduler, seen from the enrolment process."""

    def __init__(self, ca: CertificateAuthority, book: EnrolmentBook) -> None:
        self.ca, self.book = ca, book
        self.process: asyncio.subprocess.Process | None = None
        self.port: int | None = None
        self.pid: int | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._serving: asyncio.Task[None] | None = None
        self.ended = asyncio.Event()  # the channel closed: the scheduler process is gone
        self._recent: deque[float] = deque()  # when the last renewals were asked

    async def start(self, settings: ProcessSettings) -> int:
        """Start it and wait until the scheduler listens; returns its port."""
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "grid_portal.portal.scheduler_process",
                str(theirs.fileno()),
                str(os.getpid()),
                stdin=asyncio.subprocess.DEVNULL,
                pass_fds=(theirs.fileno(),),
            )
        finally:
            theirs.close()  # the child holds its own copy: EOF here when it ends
        reader, self._writer = await asyncio.open_unix_connection(sock=mine, limit=MAX_MESSAGE)
        await send(self._writer, asdict(settings))
        first = asyncio.create_task(receive(reader))
        exited = asyncio.create_task(self.process.wait())
        # Importing distributed on a busy 2-core machine can take a while (configurable).
        start_timeout = configured.value("portal.scheduler-start-timeout")
        done, _ = await asyncio.wait(
            {first, exited}, timeout=start_timeout, return_when=asyncio.FIRST_COMPLETED
        )
        message = first.result() if first in done else None
        if message is None or message.get("op") != "ready":
            first.cancel()
            exited.cancel()
            await self.stop()
            if message is not None and message.get("os_error"):
                raise OSError(str(message.get("error")))
            reason = (message or {}).get("error") or (
                f"exit code {self.process.returncode}"
                if self.process.returncode is not None
                else f"no answer within {start_timeout:.0f} s"
            )
            raise SchedulerExited(f"the scheduler process did not start: {reason}")
        exited.cancel()
        self.port, self.pid = int(message["port"]), int(message["pid"])
        self._serving = asyncio.create_task(self._serve(reader))
        return self.port

    async def published(self) -> None:
        """Tell the scheduler process that connection.json names this run."""
        if self._writer is not None:
            with contextlib.suppress(ConnectionError):
                await send(self._writer, {"op": "published"})

    async def _serve(self, reader: asyncio.StreamReader) -> None:
        try:
            while (message := await receive(reader)) is not None:
                request_id, op = message.get("id"), message.get("op")
                if op in ("renew", "delegate") and self._over_rate():
                    answer = {"error": "too many certificates at once; try again in a minute"}
                elif op == "renew":
                    answer = answer_renewal(self.ca, self.book, message)
                elif op == "delegate":
                    answer = answer_delegation(self.ca, self.book, message)
                else:
                    answer = {"error": f"unknown request {op!r}"}
                assert self._writer is not None
                await send(self._writer, {"re": request_id, **answer})
        except ConnectionError:
            pass
        finally:
            self.ended.set()

    def _over_rate(self) -> bool:
        now = time.monotonic()
        while self._recent and now - self._recent[0] > 60:
            self._recent.popleft()
        if len(self._recent) >= RENEWALS_PER_MINUTE:
            return True
        self._recent.append(now)
        return False

    async def wait(self) -> int:
        """Until the scheduler process has ended (its exit code)."""
        assert self.process is not None
        return await self.process.wait()

    async def stop(self) -> None:
        """SIGTERM, then SIGKILL if it has not ended within STOP_TIMEOUT."""
        process = self.process
        if process is not None and process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), STOP_TIMEOUT)
            except asyncio.TimeoutError:
                logger.warning("the scheduler process did not stop in time: killing it")
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()
        if self._serving is not None:
            self._serving.cancel()
            await asyncio.gather(self._serving, return_exceptions=True)
        if self._writer is not None:
            self._writer.close()


# -- the status page, relayed --------------------------------------------------------------
async def fetch_status(socket_path: str, uri: str) -> tuple[int, list[tuple[str, str]], bytes]:
    """``GET uri`` from the scheduler process's status server: (status, headers, body)."""

    async def exchange() -> bytes:
        reader, writer = await asyncio.open_unix_connection(socket_path)
        try:
            writer.write(f"GET {uri} HTTP/1.0\r\nHost: grid-portal\r\n\r\n".encode("latin-1"))
            await writer.drain()
            data = b""
            while chunk := await reader.read(65536):
                data += chunk
                if len(data) > MAX_STATUS_RESPONSE:
                    raise ValueError("the status page's answer is too large")
            return data
        finally:
            writer.close()

    data = await asyncio.wait_for(exchange(), STATUS_TIMEOUT)
    head, sep, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if not sep or len(parts) < 2 or not parts[0].startswith("HTTP/"):
        raise ValueError("the status page's answer is not HTTP")
    headers = []
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if colon:
            headers.append((name.strip(), value.strip()))
    return int(parts[1]), headers, body


class StatusRelay(tornado.web.RequestHandler):
    """The status page's paths on the public port, answered by the scheduler process."""

    def initialize(self, socket_path: str) -> None:
        self.socket_path = socket_path

    async def get(self, *args: Any) -> None:
        try:
            status, headers, body = await fetch_status(self.socket_path, self.request.uri or "/")
        except (OSError, ValueError, asyncio.TimeoutError) as exc:
            logger.info("the status page is not available: %s", exc)
            self.set_status(503)
            self.set_header("Content-Type", "text/plain; charset=utf-8")
            self.finish("503 the status page is not available right now\n")
            return
        self.set_status(status)
        self.clear_header("Content-Type")
        for name, value in headers:
            if name.lower() in RELAYED_HEADERS:
                self.set_header(name, value)
        self.finish(body)


def status_relay_routes(socket_path: Path) -> list[Any]:
    """The status page's own paths (``status_page.status_routes``), relayed."""
    from grid_portal.portal.status_page import status_routes

    kwargs = {"socket_path": str(socket_path)}
    return [(rule[0], StatusRelay, kwargs) for rule in status_routes(None, None)]  # type: ignore[arg-type]
