"""``grid-portal volunteer``: enrol with a portal, then run a supervised Dask Nanny + Worker.

A plain ``dask worker`` exits when its scheduler goes away. A volunteer must not: the agent
starts a fresh Nanny whenever the previous one ended, with back-off, until the owner stops it.
SIGINT/SIGTERM drain the node (running tasks finish, nothing new starts) and then leave
gracefully, so nothing is lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import socket
import ssl
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import platformdirs
import psutil

from grid_portal.errors import ConnectionFailed, EnrolmentRefused, UsageError
from grid_portal.model import NetworkInfo, Offer, StaticCapacity
from grid_portal.units import format_size

logger = logging.getLogger("grid_portal.volunteer")

# Dask settings that make an idle worker cheap for its owner (FIELD-NOTES: 2.35 % of a core
# with defaults, 0.30 % with these).
QUIET_WORKER_CONFIG = {
    "distributed.worker.profile.enabled": False,
    "distributed.admin.tick.interval": "1s",
    "distributed.admin.system-monitor.interval": "2s",
    # Grid tasks may start processes of their own (multiprocessing, subprocess pools).
    "distributed.worker.daemon": False,
}


@dataclass
class Credentials:
    """What enrolment gives a volunteer; stored 0600 in its state dir."""

    name: str
    scheduler: str
    ca: str  # paths
    cert: str
    key: str

    def security(self) -> Any:
        from distributed import Security

        return Security(
            tls_ca_file=self.ca,
            tls_client_cert=self.cert,
            tls_client_key=self.key,
            tls_worker_cert=self.cert,
            tls_worker_key=self.key,
            require_encryption=True,
        )


@dataclass
class VolunteerOptions:
    cpus: int
    memory: int
    gpus: list[int] = field(default_factory=list)
    labels: dict[str, str] = field(default_factory=dict)
    death_timeout: float = 30.0  # how long a worker waits for an unreachable portal
    reconnect_max: float = 30.0  # longest wait between attempts to rejoin
    drain_timeout: float = 120.0  # on SIGTERM: how long running tasks may take to finish
    telemetry_interval: float = 2.0
    local_directory: str | None = None


def default_state_dir() -> Path:
    return Path(platformdirs.user_data_dir("grid-portal")) / "volunteer"


# -- offer -------------------------------------------------------------------------------
def decide_offer(
    cpus: int | None,
    memory: int | None,
    gpus: list[int],
    static: StaticCapacity,
    oversubscribe: bool = False,
) -> Offer:
    """What the volunteer lends, checked against what the machine has."""
    have_cpus = static.cores_logical
    if cpus is None:
        cpus = max(1, have_cpus - 1) if have_cpus > 2 else have_cpus
    if cpus < 1:
        raise UsageError(f"--cpus {cpus}: offer at least 1 CPU (or don't volunteer)")
    if cpus > have_cpus and not oversubscribe:
        raise UsageError(
            f"--cpus {cpus}: this machine has {have_cpus} logical CPUs; offer at most "
            f"{have_cpus}, or add --oversubscribe if you mean it"
        )
    have_memory = static.memory_total
    if memory is None:
        memory = int(have_memory * 0.5)
    if memory <= 0:
        raise UsageError("--memory must be more than 0 (for example --memory 4GB)")
    if memory > have_memory and not oversubscribe:
        raise UsageError(
            f"--memory {format_size(memory)}: this machine has {format_size(have_memory)} of "
            "memory; offer less, or add --oversubscribe if you mean it"
        )
    return Offer(cpus=int(cpus), memory=int(memory), gpus=list(gpus))


# -- enrolment -----------------------------------------------------------------------------
def _fingerprint(pem: str) -> str:
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    cert = x509.load_pem_x509_certificate(pem.encode())
    return hashlib.sha256(cert.public_bytes(Encoding.DER)).hexdigest()


def _unverified_context() -> ssl.SSLContext:
    # Only used to fetch the CA certificate, which we then check against the token's pin.
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def _pinned_context(ca_pem: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cadata=ca_pem)
    # The CA itself is pinned, so any certificate it signed is the portal; the host name the
    # volunteer typed (an IP, a .local name) need not be in the certificate.
    ctx.check_hostname = False
    return ctx


def _http(
    url: str, ctx: ssl.SSLContext, data: dict[str, Any] | None = None, timeout: float = 10
) -> bytes:
    body = None if data is None else json.dumps(data).encode()
    request = urllib.request.Request(
        url, data=body, headers={"Content-Type": "application/json"} if body else {}
    )
    with urllib.request.urlopen(request, context=ctx, timeout=timeout) as response:
        return response.read()


def _portal_base(url: str) -> str:
    url = url.strip().rstrip("/")
    if url.startswith("http://"):
        raise UsageError(
            f"{url}: the portal speaks HTTPS only; use https://{url[len('http://') :]}"
        )
    if not url.startswith("https://"):
        url = "https://" + url
    return url


def enrol(portal_url: str, token: str, name: str, state_dir: Path) -> Credentials:
    """Join a portal with a token: check its CA against the token's pin, send a CSR, store
    the certificate. A node that enrolled before with this portal reuses its certificate."""
    from grid_portal.keys import parse_token

    secret_pin = parse_token(token)
    pin = secret_pin[1]
    base = _portal_base(portal_url)
    node_dir = state_dir / pin
    saved = node_dir / "node.json"
    if saved.exists():
        creds = Credentials(**json.loads(saved.read_text()))
        logger.info("using this machine's earlier enrolment as %s", creds.name)
        return creds
    try:
        ca_pem = _http(f"{base}/api/ca", _unverified_context()).decode()
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise ConnectionFailed(
            f"cannot reach the portal at {base} ({_reason(exc)}); check the URL that "
            "`grid-portal serve` printed, and that the portal is running"
        ) from None
    if not _fingerprint(ca_pem).startswith(pin):
        raise EnrolmentRefused(
            f"the server at {base} is not the portal this token belongs to (its CA does not "
            "match the token's pin); check the URL, or ask for a new token"
        )
    from grid_portal.keys import make_key_and_csr, write_private

    key_pem, csr_pem = make_key_and_csr(name)
    try:
        reply = json.loads(
            _http(
                f"{base}/api/enrol",
                _pinned_context(ca_pem),
                {"token": token, "csr": csr_pem, "name": name},
            )
        )
    except urllib.error.HTTPError as exc:
        try:
            message = json.loads(exc.read()).get("error") or str(exc)
        except ValueError:
            message = str(exc)
        raise EnrolmentRefused(f"the portal refused to enrol this machine: {message}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise ConnectionFailed(f"enrolment at {base} failed: {_reason(exc)}") from None
    node_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(node_dir, 0o700)
    (node_dir / "ca.pem").write_text(reply["ca"])
    (node_dir / "node.pem").write_text(reply["cert"])
    write_private(node_dir / "node-key.pem", key_pem)
    creds = Credentials(
        name=reply["name"],
        scheduler=reply["scheduler"],
        ca=str(node_dir / "ca.pem"),
        cert=str(node_dir / "node.pem"),
        key=str(node_dir / "node-key.pem"),
    )
    write_private(saved, json.dumps(asdict(creds), indent=2))
    return creds


def measure_network(portal_url: str, ca_pem: str, probe_bytes: int = 2**20) -> NetworkInfo:
    """Round-trip time (best of 3 pings) and download bandwidth (one short transfer)."""
    base = _portal_base(portal_url)
    ctx = _pinned_context(ca_pem)
    try:
        rtts = []
        for _ in range(3):
            t0 = time.perf_counter()
            _http(f"{base}/api/ping", ctx, timeout=5)
            rtts.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        data = _http(f"{base}/api/bandwidth?bytes={probe_bytes}", ctx, timeout=30)
        elapsed = max(time.perf_counter() - t0 - min(rtts), 1e-6)
        return NetworkInfo(bandwidth=len(data) / elapsed, rtt=min(rtts), measured_at=time.time())
    except (urllib.error.URLError, OSError) as exc:
        logger.warning("could not measure the network to the portal: %s", _reason(exc))
        return NetworkInfo()


def _reason(exc: BaseException) -> str:
    reason = getattr(exc, "reason", None)
    return str(reason or exc)


# -- the supervised worker ----------------------------------------------------------------
class Volunteer:
    """Keeps one Nanny + Worker connected to the portal until stopped."""

    def __init__(
        self,
        creds: Credentials,
        options: VolunteerOptions,
        capacity: StaticCapacity,
        sandbox: str | None = None,
    ) -> None:
        self.creds = creds
        self.options = options
        self.capacity = capacity
        self.sandbox = sandbox
        self.stop_requested = asyncio.Event()
        self.nanny: Any = None
        self.joined = asyncio.Event()

    def offer(self) -> Offer:
        return Offer(cpus=self.options.cpus, memory=self.options.memory, gpus=self.options.gpus)

    def _info(self) -> dict[str, Any]:
        return {
            "capacity": asdict(self.capacity),
            "offer": asdict(self.offer()),
            "labels": self.options.labels,
            "sandbox": self.sandbox,
        }

    async def run(self) -> None:
        import dask
        from distributed import Nanny

        from grid_portal.node.plugin import NodePlugin

        delay = 1.0
        while not self.stop_requested.is_set():
            started = time.monotonic()
            try:
                with dask.config.set(QUIET_WORKER_CONFIG):
                    self.nanny = Nanny(
                        self.creds.scheduler,
                        security=self.creds.security(),
                        nthreads=self.options.cpus,
                        memory_limit=self.options.memory,
                        resources=self.offer().resources(),
                        name=self.creds.name,
                        plugins={
                            NodePlugin(
                                self._info(),
                                gpus=self.options.gpus,
                                telemetry_interval=self.options.telemetry_interval,
                            )
                        },
                        death_timeout=self.options.death_timeout,
                        dashboard=False,
                        local_directory=self.options.local_directory,
                        silence_logs=logging.WARNING,
                        # Tasks see only the GPUs the volunteer lends. NVML numbers devices
                        # in PCI order; make CUDA use the same order so the indices agree.
                        env={
                            "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
                            "CUDA_VISIBLE_DEVICES": ",".join(map(str, self.options.gpus)),
                        },
                    )
                    await self.nanny
                logger.info(
                    "joined %s as %s, offering %d CPUs, %s memory, %s",
                    self.creds.scheduler,
                    self.creds.name,
                    self.options.cpus,
                    format_size(self.options.memory),
                    f"GPUs {self.options.gpus}" if self.options.gpus else "no GPU",
                )
                self.joined.set()
                delay = 1.0
                await self._wait_until_done()
            except (OSError, asyncio.TimeoutError, TimeoutError) as exc:
                logger.warning("cannot reach the portal at %s (%s)", self.creds.scheduler, exc)
            except Exception as exc:  # noqa: BLE001 - a volunteer must keep trying
                logger.warning("the worker stopped: %s", exc)
            finally:
                self.joined.clear()
            if self.stop_requested.is_set():
                break
            if time.monotonic() - started > 60:
                delay = 1.0
            logger.info("rejoining in %.0f s", delay)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.stop_requested.wait(), delay)
            delay = min(delay * 2, self.options.reconnect_max)

    async def _wait_until_done(self) -> None:
        nanny = self.nanny
        finished = asyncio.ensure_future(nanny.finished())
        stop = asyncio.ensure_future(self.stop_requested.wait())
        await asyncio.wait({finished, stop}, return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        if not finished.done():
            await self._leave_gracefully(nanny)
            finished.cancel()
        else:
            logger.warning("lost the portal; the worker closed")

    async def _leave_gracefully(self, nanny: Any) -> None:
        """Drain: let running tasks finish, then retire (results move to other nodes)."""
        from distributed.core import rpc

        logger.info("leaving the grid: finishing running tasks first (Ctrl-C again to force)")
        address = nanny.worker_address
        if address:
            try:
                async with rpc(
                    address, connection_args=self.creds.security().get_connection_args("client")
                ) as worker:
                    await asyncio.wait_for(
                        worker.grid_drain(timeout=self.options.drain_timeout),
                        self.options.drain_timeout + 10,
                    )
                await asyncio.wait_for(nanny.finished(), self.options.drain_timeout + 30)
            except Exception as exc:  # noqa: BLE001 - fall through to a plain close
                logger.warning("graceful leave failed (%s); closing", exc)
        await nanny.close(reason="volunteer-stopped")

    def request_stop(self) -> None:
        self.stop_requested.set()


def hostname() -> str:
    return socket.gethostname().split(".")[0] or "node"


def machine_cpus() -> int:
    return psutil.cpu_count() or 1
