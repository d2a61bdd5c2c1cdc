"""``grid-portal serve``: a Dask scheduler with the portal plugin, mutual TLS only, plus the
portal's HTTPS endpoint for enrolment.

On first start it creates the portal's CA in the data dir. Every start issues a fresh
certificate for the scheduler (for the addresses it listens on) and, once, an admin client
certificate for the user who runs the portal, referenced by ``<data-dir>/connection.json``.

This process keeps the CA key and the join tokens and serves HTTPS; the scheduler runs in a
child process that never reads them (``portal/scheduler_link.py`` tells how and why).
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import json
import logging
import os
import signal
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from grid_portal.connection import CONNECTION_FILE, PORTAL_FILE, Connection
from grid_portal.portal.http import PortalContext, make_app
from grid_portal.portal.ledger import LEDGER_FILE, EnrolmentBook
from grid_portal.portal.security import CertificateAuthority, ca_pin, write_private
from grid_portal.portal.tokens import TokenStore
from grid_portal.settings import field_from

logger = logging.getLogger("grid_portal.portal")


@dataclass
class PortalConfig:
    """What ``grid-portal serve`` runs with. Unset fields take their value from the
    configuration, ``grid-portal.portal.*`` (grid_portal/settings.py; durations in seconds),
    when the PortalConfig is made; each is described in grid-portal-schema.yaml."""

    data_dir: Path
    host: str = field_from("portal.host")
    port: int = field_from("portal.port")
    http_port: int = field_from("portal.http-port")
    contact_host: str | None = None  # the name volunteers use to reach us, if not the default
    telemetry_interval: float = field_from("portal.telemetry-interval")
    offline_retention: float = field_from("portal.offline-retention")
    node_timeout: float = field_from("portal.node-timeout")
    result_ttl: float = field_from("portal.result-ttl")
    result_expiry_interval: float = field_from("portal.result-expiry-interval")
    # Dask settings the scheduler process applies at start (settings.apply_dask_settings).
    scheduler_dask: dict[str, Any] = field_from("portal.scheduler-dask")
    # A grid_portal.portal.hub.HubSettings when run as a JupyterHub service.
    jupyterhub: Any = None
    # Dask's dashboard on loopback, for the admin's JupyterLab (portal/dashboard.py).
    dashboard: bool = False
    # Extra things to run in the portal's event loop once it is up (the embedded volunteer).
    companions: list[Callable[[PortalInfo], Awaitable[Any]]] = field(default_factory=list)


@dataclass
class PortalInfo:
    scheduler: str  # tls://host:port, as reachable from this machine
    http: str  # https://host:port
    ca_fingerprint: str
    data_dir: Path
    connection: Connection
    ca: CertificateAuthority
    scheduler_pid: int | None = None  # the scheduler runs apart (portal/scheduler_link.py)
    # Ends the portal, as SIGTERM does: for a companion the portal is useless without (the
    # embedded portal's own volunteer). Set by run_portal before companions start.
    stop: Callable[[], None] | None = None


def advertised_host(host: str) -> str:
    """The address to print for others: the first LAN address when listening on all."""
    if host not in ("0.0.0.0", "::", ""):
        return host
    try:
        import psutil

        for addrs in psutil.net_if_addrs().values():
            for a in addrs:
                if a.family.name == "AF_INET" and not a.address.startswith("127."):
                    return a.address
    except Exception:  # noqa: BLE001 - printing a fallback beats failing to start
        pass
    return "127.0.0.1"


def _scheduler_hosts(host: str, contact: str | None) -> list[str]:
    hosts = {"127.0.0.1", "localhost", advertised_host(host)}
    if host not in ("0.0.0.0", "::", ""):
        hosts.add(host)
    if contact:
        hosts.add(contact)
    return sorted(hosts)


def prepare(config: PortalConfig) -> tuple[CertificateAuthority, Path, Path, Connection]:
    """CA, scheduler certificate and the admin's connection (all files in the data dir)."""
    data_dir = config.data_dir
    data_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(data_dir, 0o700)
    ca = CertificateAuthority.load_or_create(data_dir / "ca")
    cert, key = ca.issue(
        "portal-scheduler",
        role="scheduler",
        hosts=_scheduler_hosts(config.host, config.contact_host),
    )
    cert_path, key_path = data_dir / "scheduler.pem", data_dir / "scheduler-key.pem"
    cert_path.write_text(cert)
    write_private(key_path, key)
    admin_dir = data_dir / "admin"
    admin_cert, admin_key = admin_dir / "client.pem", admin_dir / "client-key.pem"
    user = getpass.getuser()
    if not admin_cert.exists() or not admin_key.exists():
        c, k = ca.issue(user, role="admin", days=3650)
        write_private(admin_key, k)
        admin_cert.write_text(c)
    connection = Connection(
        scheduler="",
        http="",
        ca=str(data_dir / "ca" / "ca.pem"),
        cert=str(admin_cert),
        key=str(admin_key),
        name=user,
        role="admin",
        pid=os.getpid(),
    )
    return ca, cert_path, key_path, connection


async def run_portal(
    config: PortalConfig,
    on_ready: Callable[[PortalInfo], None] | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Run until ``stop`` is set or SIGINT/SIGTERM arrives, or the scheduler process ends.

    This process keeps the CA and the join tokens and serves HTTPS; the scheduler runs in a
    process of its own that never reads them (``portal/scheduler_link.py``)."""
    from grid_portal.portal.hub import hub_routes
    from grid_portal.portal.scheduler_link import (
        SchedulerExited,
        SchedulerProcess,
        status_relay_routes,
        status_socket_path,
    )
    from grid_portal.portal.scheduler_process import ProcessSettings

    ca, cert_path, key_path, connection = prepare(config)
    ledger_path = config.data_dir / LEDGER_FILE
    enrolments = _with_admin_recorded(EnrolmentBook(ledger_path), connection)
    status_socket, socket_dir = status_socket_path(config.data_dir)
    child = SchedulerProcess(ca, enrolments)
    try:
        scheduler_port = await child.start(
            ProcessSettings(
                data_dir=str(config.data_dir),
                host=config.host,
                port=config.port,
                ca_file=str(ca.directory / "ca.pem"),
                cert_file=str(cert_path),
                key_file=str(key_path),
                status_socket=str(status_socket),
                dashboard=config.dashboard,
                telemetry_interval=config.telemetry_interval,
                offline_retention=config.offline_retention,
                node_timeout=config.node_timeout,
                result_ttl=config.result_ttl,
                result_expiry_interval=config.result_expiry_interval,
                scheduler_dask=dict(config.scheduler_dask),
                verbose=logging.getLogger().isEnabledFor(logging.DEBUG),
            )
        )
        context = PortalContext(
            ca=ca,
            tokens=TokenStore(ledger_path),
            enrolments=enrolments,
            scheduler_port=scheduler_port,
            contact_host=config.contact_host,
        )
        # The public status page (served by the scheduler process, relayed here) and
        # JupyterHub enrolment when configured.
        context.extra_routes = status_relay_routes(status_socket) + hub_routes(
            context, config.jupyterhub
        )
        ssl_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ssl_ctx.load_cert_chain(str(cert_path), str(key_path))
        app = make_app(context)
        http_server = app.listen(config.http_port, address=config.host, ssl_options=ssl_ctx)
    except BaseException:
        await child.stop()
        _remove_socket(status_socket, socket_dir)
        raise
    http_port = next(iter(http_server._sockets.values())).getsockname()[1]

    shown = advertised_host(config.host) if config.contact_host is None else config.contact_host
    local = "127.0.0.1" if config.host in ("0.0.0.0", "::", "") else config.host
    connection.scheduler = f"tls://{local}:{scheduler_port}"
    connection.http = f"https://{local}:{http_port}"
    connection.save(config.data_dir / CONNECTION_FILE)
    info = PortalInfo(
        scheduler=f"tls://{shown}:{scheduler_port}",
        http=f"https://{shown}:{http_port}",
        ca_fingerprint=ca.fingerprint(),
        data_dir=config.data_dir,
        connection=connection,
        ca=ca,
        scheduler_pid=child.pid,
    )
    write_private(
        config.data_dir / PORTAL_FILE,
        json.dumps(
            {
                "pid": os.getpid(),
                # The two processes (scheduler_link.py): this one holds the CA and the tokens.
                "enrolment_pid": os.getpid(),
                "scheduler_pid": child.pid,
                "scheduler": info.scheduler,
                "http": info.http,
                "local_scheduler": connection.scheduler,
                "local_http": connection.http,
                "ca_fingerprint": info.ca_fingerprint,
                "ca_pin": ca_pin(info.ca_fingerprint),
                "started": time.time(),
            },
            indent=2,
        ),
    )
    # After a restart, the scheduler process resubmits the jobs the previous run left unfinished once
    # the admin's connection file names this run (portal/recovery.py).
    await child.published()
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        # Not possible outside the main thread, or on Windows: then the caller stops us.
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    info.stop = stop.set
    companions = [asyncio.create_task(c(info)) for c in config.companions]
    if on_ready is not None:
        on_ready(info)
    exited = asyncio.create_task(child.wait())
    try:
        waiter = asyncio.create_task(stop.wait())
        channel_closed = asyncio.create_task(child.ended.wait())
        await asyncio.wait({exited, waiter, channel_closed}, return_when=asyncio.FIRST_COMPLETED)
        for task in (waiter, channel_closed):
            task.cancel()
    finally:
        for task in companions:
            task.cancel()
        await asyncio.gather(*companions, return_exceptions=True)
        http_server.stop()
        unexpected = not stop.is_set()
        await child.stop()
        exited.cancel()
        _remove_socket(status_socket, socket_dir)
        (config.data_dir / PORTAL_FILE).unlink(missing_ok=True)
    if unexpected:
        code = child.process.returncode if child.process is not None else None
        raise SchedulerExited(
            f"the portal's scheduler process ended unexpectedly (exit code {code}); "
            "the portal stopped. Its log is above."
        )


def _remove_socket(path: Path, folder: Path | None) -> None:
    with contextlib.suppress(OSError):
        path.unlink()
    if folder is not None:
        with contextlib.suppress(OSError):
            folder.rmdir()


def _with_admin_recorded(book: EnrolmentBook, connection: Connection) -> EnrolmentBook:
    """The owner's admin name is taken: nobody may enrol as a researcher under it."""
    from cryptography import x509

    if book.get(connection.name, "admin") is None:
        cert = x509.load_pem_x509_certificate(Path(connection.cert).read_bytes())
        book.record(connection.name, "admin", format(cert.serial_number, "x"))
    return book


def describe(info: PortalInfo) -> str:
    """What `grid-portal serve` prints once it is up."""
    return (
        f"Grid Portal is running.\n"
        f"  scheduler (mutual TLS): {info.scheduler}\n"
        f"  enrolment (HTTPS):      {info.http}\n"
        f"  public status page:     {info.http}/status\n"
        f"  data dir:               {info.data_dir}\n"
        f"  CA fingerprint:         {info.ca_fingerprint}\n"
        f"\n"
        f"To add a volunteer machine:\n"
        f"  1. here, make a join token:  grid-portal token create --data-dir {info.data_dir}\n"
        f"  2. on the volunteer:         grid-portal volunteer {info.http} --token TOKEN\n"
        f"\n"
        f"Researchers on this machine: Grid() or `grid-portal nodes` find this portal by itself.\n"
        f"Press Ctrl-C to stop."
    )
