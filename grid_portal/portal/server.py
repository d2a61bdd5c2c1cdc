"""``grid-portal serve``: a Dask scheduler with the portal plugin, mutual TLS only, plus the
portal's HTTPS endpoint for enrolment.

On first start it creates the portal's CA in the data dir. Every start issues a fresh
certificate for the scheduler (for the addresses it listens on) and, once, an admin client
certificate for the user who runs the portal, referenced by ``<data-dir>/connection.json``.
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
from grid_portal.portal.jobs import RESULT_EXPIRY_INTERVAL
from grid_portal.portal.ledger import LEDGER_FILE, EnrolmentBook
from grid_portal.portal.security import CertificateAuthority, ca_pin, write_private
from grid_portal.portal.tokens import TokenStore

logger = logging.getLogger("grid_portal.portal")


@dataclass
class PortalConfig:
    data_dir: Path
    host: str = "0.0.0.0"
    port: int = 8786
    http_port: int = 8788
    contact_host: str | None = None  # the name volunteers use to reach us, if not the default
    telemetry_interval: float = 2.0
    offline_retention: float = 3600.0
    # How soon a node that vanished without a word (power cut, cable pulled) is declared
    # offline and its tasks rerun elsewhere.
    node_timeout: float = 15.0
    result_ttl: float = 7 * 86400.0  # how long kept results (%%grid --bg) stay retrievable
    # How often kept results past their ttl are deleted from the ledger (portal/jobs.py).
    result_expiry_interval: float = RESULT_EXPIRY_INTERVAL
    # Issue 9: a grid_portal.portal.hub.HubSettings when run as a JupyterHub service.
    jupyterhub: Any = None
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
    """Run until ``stop`` is set or SIGINT/SIGTERM arrives."""
    import dask
    from distributed import Scheduler

    from grid_portal.portal.plugin import PortalPlugin
    from grid_portal.portal.security import tls_security

    ca, cert_path, key_path, connection = prepare(config)
    security = tls_security(str(ca.directory / "ca.pem"), str(cert_path), str(key_path))
    plugin = PortalPlugin(
        telemetry_interval=config.telemetry_interval,
        offline_retention=config.offline_retention,
        ledger_path=config.data_dir / LEDGER_FILE,
        result_ttl=config.result_ttl,
        node_timeout=config.node_timeout,
    )
    plugin.jobs.result_expiry_interval = config.result_expiry_interval
    plugin.ca = ca  # signs renewals of people's short-lived certificates (grid_renew)
    # Issue 9: per-volunteer contributions and capacity samples (a plugin of its own).
    from grid_portal.portal.contributions import ContributionsPlugin

    contributions = ContributionsPlugin(config.data_dir / LEDGER_FILE, plugin)
    # Dask's scheduler always runs a plain-HTTP server (dashboard, /info, metrics) that would
    # show the grid's workers to anyone: give it no routes, on loopback, on a spare port.
    with dask.config.set({"distributed.scheduler.http.routes": []}):
        scheduler = Scheduler(
            host=config.host,
            port=config.port,
            protocol="tls",
            security=security,
            dashboard=False,
            dashboard_address="127.0.0.1:0",
            plugins=[plugin, contributions],
            # Our plugin declares silent nodes offline after node_timeout; Dask's own check
            # stays as a backstop.
            worker_ttl=max(60.0, config.node_timeout * 4),
        )
        await scheduler
    ledger_path = config.data_dir / LEDGER_FILE
    context = PortalContext(
        ca=ca,
        tokens=TokenStore(ledger_path),
        enrolments=_with_admin_recorded(EnrolmentBook(ledger_path), connection),
        scheduler_port=scheduler.port,
        contact_host=config.contact_host,
    )
    # Issue 9: the public status page and exports, and JupyterHub enrolment when configured.
    from grid_portal.portal.hub import hub_routes
    from grid_portal.portal.status_page import status_routes

    context.extra_routes = status_routes(plugin, contributions) + hub_routes(
        context, config.jupyterhub
    )
    ssl_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ssl_ctx.load_cert_chain(str(cert_path), str(key_path))
    app = make_app(context)
    http_server = app.listen(config.http_port, address=config.host, ssl_options=ssl_ctx)
    http_port = next(iter(http_server._sockets.values())).getsockname()[1]

    shown = advertised_host(config.host) if config.contact_host is None else config.contact_host
    local = "127.0.0.1" if config.host in ("0.0.0.0", "::", "") else config.host
    connection.scheduler = f"tls://{local}:{scheduler.port}"
    connection.http = f"https://{local}:{http_port}"
    connection.save(config.data_dir / CONNECTION_FILE)
    info = PortalInfo(
        scheduler=f"tls://{shown}:{scheduler.port}",
        http=f"https://{shown}:{http_port}",
        ca_fingerprint=ca.fingerprint(),
        data_dir=config.data_dir,
        connection=connection,
        ca=ca,
    )
    write_private(
        config.data_dir / PORTAL_FILE,
        json.dumps(
            {
                "pid": os.getpid(),
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
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        # Not possible outside the main thread, or on Windows: then the caller stops us.
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    companions = [asyncio.create_task(c(info)) for c in config.companions]
    # Issue 8: resubmit the jobs the previous run left unfinished (portal/recovery.py).
    companions.append(asyncio.create_task(plugin.recovery.run(config.data_dir / CONNECTION_FILE)))
    if on_ready is not None:
        on_ready(info)
    try:
        finished = asyncio.create_task(scheduler.finished())
        waiter = asyncio.create_task(stop.wait())
        await asyncio.wait({finished, waiter}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in companions:
            task.cancel()
        await asyncio.gather(*companions, return_exceptions=True)
        http_server.stop()
        await scheduler.close()
        (config.data_dir / PORTAL_FILE).unlink(missing_ok=True)


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
