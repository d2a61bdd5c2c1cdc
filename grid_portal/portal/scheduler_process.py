"""The process that runs the Dask scheduler, apart from the portal's secrets.

``grid-portal serve`` is two processes (see ``portal/scheduler_link.py`` for the whole
picture). This module is the second one, started by the first as
``python -m grid_portal.portal.scheduler_process FD PARENT_PID``: it runs the Scheduler with
the portal plugins and the public status page, and never reads the CA key or the join tokens.
It gets everything over the private channel ``FD`` (one end of a socketpair the enrolment
process made; no other process holds it):

- its settings, the first line the enrolment process sends (``ProcessSettings`` as JSON);
  the scheduler's own certificate and key are files the enrolment process issued at start
  (``<data-dir>/scheduler.pem``, ``scheduler-key.pem``, 0600);
- ``{"op": "published"}`` once ``connection.json`` is written: then the jobs a restart cut
  short are resubmitted (``portal/recovery.py``);
- answers to its requests: ``{"id": 1, "op": "renew", "csr": PEM, "name": N, "role": R}``
  is answered ``{"re": 1, "cert": PEM}`` or ``{"re": 1, "error": "...", "refused": true}``.

It tells the enrolment process ``{"op": "ready", "port": P, "pid": PID}`` once the scheduler
listens, or ``{"op": "failed", "error": "..."}`` when it cannot start.

It ends with the enrolment process: the kernel kills it when its parent dies
(``PR_SET_PDEATHSIG``), and it stops by itself when the channel closes or on SIGTERM. SIGINT
(Ctrl-C in a terminal reaches the whole process group) is left to the enrolment process, which
stops this one in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from grid_portal.errors import GridError, NotAllowed
from grid_portal.process_logging import setup_logging

logger = logging.getLogger("grid_portal.portal.scheduler_process")

MAX_MESSAGE = 2**20  # a message is a certificate or a CSR, a few KB
RENEW_TIMEOUT = 30.0


@dataclass
class ProcessSettings:
    """What the scheduler process needs to start: plain data, no secret."""

    data_dir: str
    host: str
    port: int
    ca_file: str  # the CA's certificate (public)
    cert_file: str  # the scheduler's own certificate and key, issued by the enrolment process
    key_file: str
    status_socket: str  # the status page, served over HTTP on this Unix socket
    # Seconds, from the enrolment process's configuration (grid_portal/settings.py).
    telemetry_interval: float
    offline_retention: float
    node_timeout: float
    result_ttl: float
    result_expiry_interval: float
    # Dask settings for this process's scheduler: grid-portal.portal.scheduler-dask.
    scheduler_dask: dict[str, Any]
    verbose: bool = False
    dashboard: bool = False  # Dask's dashboard on loopback, for the admin (portal/dashboard.py)


# -- the channel ------------------------------------------------------------------------------
async def send(writer: asyncio.StreamWriter, message: dict[str, Any]) -> None:
    writer.write(json.dumps(message).encode() + b"\n")
    await writer.drain()


async def receive(reader: asyncio.StreamReader) -> dict[str, Any] | None:
    """The next message, or None once the channel is closed (or sends garbage)."""
    try:
        line = await reader.readline()
    except (ValueError, ConnectionError):  # over the limit, or reset
        return None
    if not line:
        return None
    try:
        message = json.loads(line)
    except ValueError:
        return None
    return message if isinstance(message, dict) else None


class EnrolmentChannel:
    """The scheduler's side of the channel: asks for renewals, hears notices."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.published = asyncio.Event()
        self.closed = asyncio.Event()
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._next = 0

    async def listen(self) -> None:
        """Read until the channel closes; then every waiting request fails."""
        try:
            while (message := await receive(self.reader)) is not None:
                if "re" in message:
                    future = self._pending.pop(message["re"], None)
                    if future is not None and not future.done():
                        future.set_result(message)
                elif message.get("op") == "published":
                    self.published.set()
        finally:
            self.closed.set()
            for future in self._pending.values():
                if not future.done():
                    future.set_exception(GridError("the portal's enrolment process is gone"))
            self._pending.clear()

    async def request(self, op: str, **fields: Any) -> dict[str, Any]:
        if self.closed.is_set():
            raise GridError("the portal's enrolment process is gone")
        self._next += 1
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[self._next] = future
        await send(self.writer, {"id": self._next, "op": op, **fields})
        return await asyncio.wait_for(future, RENEW_TIMEOUT)

    async def renew(self, csr: str, name: str, role: str) -> str:
        """A person's new certificate, signed by the enrolment process (which checks again
        that the enrolment stands and that the role is a person's)."""
        return _signed(await self.request("renew", csr=csr, name=name, role=role))

    async def delegate(self, csr: str, name: str) -> str:
        """A job's delegated credential (``name``: ``<owner>/job/<job id>``), signed by the
        enrolment process (which checks that the owner's enrolment stands)."""
        return _signed(await self.request("delegate", csr=csr, name=name))


def _signed(reply: dict[str, Any]) -> str:
    if "cert" in reply and isinstance(reply["cert"], str):
        return reply["cert"]
    error = str(reply.get("error") or "the portal could not sign the certificate")
    raise NotAllowed(error) if reply.get("refused") else GridError(error)


# -- the process ----------------------------------------------------------------------------
def _die_with_parent(parent_pid: int) -> None:
    """Be killed by the kernel when the enrolment process dies, however it dies (Linux)."""
    with contextlib.suppress(Exception):  # elsewhere: the closed channel stops us instead
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:  # it died before prctl took effect
        os._exit(1)


async def run(channel_sock: socket.socket) -> int:
    reader, writer = await asyncio.open_unix_connection(sock=channel_sock, limit=MAX_MESSAGE)
    first = await receive(reader)
    if first is None:
        return 1
    settings = ProcessSettings(**first)
    setup_logging(settings.verbose)
    channel = EnrolmentChannel(reader, writer)
    try:
        return await _serve(settings, channel)
    finally:
        writer.close()


async def _serve(settings: ProcessSettings, channel: EnrolmentChannel) -> int:
    import dask
    import tornado.httpserver
    import tornado.netutil
    import tornado.web
    from distributed import Scheduler

    from grid_portal.connection import CONNECTION_FILE
    from grid_portal.portal.contributions import ContributionsPlugin
    from grid_portal.portal.dashboard import LOOPBACK, http_routes
    from grid_portal.portal.ledger import LEDGER_FILE
    from grid_portal.portal.plugin import PortalPlugin
    from grid_portal.portal.security import tls_security
    from grid_portal.portal.status_page import status_routes
    from grid_portal.settings import apply_dask_settings

    data_dir = Path(settings.data_dir)
    ledger = data_dir / LEDGER_FILE
    listening = asyncio.create_task(channel.listen())
    plugin = PortalPlugin(
        telemetry_interval=settings.telemetry_interval,
        offline_retention=settings.offline_retention,
        ledger_path=ledger,
        result_ttl=settings.result_ttl,
        node_timeout=settings.node_timeout,
    )
    plugin.jobs.result_expiry_interval = settings.result_expiry_interval
    plugin.renewals = channel.renew  # people's renewals are signed by the enrolment process
    plugin.delegations = channel.delegate  # and jobs' delegated credentials
    # Per-volunteer contributions and capacity samples: a plugin of its own, so credit is
    # counted apart from the jobs.
    contributions = ContributionsPlugin(ledger, plugin)
    security = tls_security(settings.ca_file, settings.cert_file, settings.key_file)
    # This process exists to run one scheduler, so the portal's Dask settings (an idle portal's
    # quieter timers, faster work stealing: grid-portal.portal.scheduler-dask) are set here for
    # the whole process, once, where the enrolment process's configuration put them.
    apply_dask_settings(settings.scheduler_dask)
    routes = http_routes(settings.dashboard)
    try:
        # Dask's scheduler always runs a plain-HTTP server (dashboard, /info, metrics) that
        # would show the grid's workers to anyone: give it no routes (unless --dashboard), on
        # loopback, on a spare port.
        with dask.config.set({"distributed.scheduler.http.routes": routes}):
            scheduler = Scheduler(
                host=settings.host,
                port=settings.port,
                protocol="tls",
                security=security,
                dashboard=settings.dashboard,
                dashboard_address=LOOPBACK,  # never another interface
                plugins=[plugin, contributions],
                # Our plugin declares silent nodes offline after node_timeout; Dask's own
                # check stays as a backstop.
                worker_ttl=max(60.0, settings.node_timeout * 4),
            )
            await scheduler
    except Exception as exc:  # noqa: BLE001 - told to the enrolment process, which reports it
        # Dask wraps a port in use (OSError) in RuntimeError("Scheduler failed to start.").
        cause: BaseException | None = exc
        while cause is not None and not isinstance(cause, OSError):
            cause = cause.__cause__
        error = str(cause if cause is not None else exc)
        with contextlib.suppress(ConnectionError):
            await send(channel.writer, {"op": "failed", "error": error, "os_error": bool(cause)})
        return 1
    # The public status page reads the plugin's live registry, so it is served here, on a Unix
    # socket in the 0700 data dir; the enrolment process relays it on the public HTTPS port.
    if settings.dashboard:
        plugin.dashboard.started(scheduler)
    status_server = tornado.httpserver.HTTPServer(
        tornado.web.Application(status_routes(plugin, contributions))
    )
    status_server.add_socket(tornado.netutil.bind_unix_socket(settings.status_socket, 0o600))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    with contextlib.suppress(NotImplementedError, RuntimeError):
        loop.add_signal_handler(signal.SIGTERM, stop.set)
    await send(channel.writer, {"op": "ready", "port": scheduler.port, "pid": os.getpid()})

    async def recover() -> None:
        # A restart must not lose work: resubmit the jobs the previous run left unfinished,
        # once the admin's connection file names this run (portal/recovery.py).
        await channel.published.wait()
        await plugin.recovery.run(data_dir / CONNECTION_FILE)

    recovery = asyncio.create_task(recover())
    waits = {
        asyncio.create_task(scheduler.finished()),
        asyncio.create_task(stop.wait()),
        asyncio.create_task(channel.closed.wait()),
    }
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (*waits, recovery, listening):
            task.cancel()
        await asyncio.gather(*waits, recovery, listening, return_exceptions=True)
        status_server.stop()
        await scheduler.close()
        with contextlib.suppress(OSError):
            os.unlink(settings.status_socket)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print(
            "usage: python -m grid_portal.portal.scheduler_process FD PARENT_PID\n"
            "(started by `grid-portal serve`, not by hand)",
            file=sys.stderr,
        )
        return 2
    _die_with_parent(int(args[1]))
    # Ctrl-C reaches the whole process group: the enrolment process stops us in order.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sock = socket.socket(fileno=int(args[0]))
    return asyncio.run(run(sock))


if __name__ == "__main__":
    sys.exit(main())
