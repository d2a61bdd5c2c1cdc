"""Portals on the LAN: browse DNS-SD (``_gridportal._tcp.local.``), resolve, check, report.

Shared by the volunteer agent, the CLI (``grid-portal discover``, ``grid-portal volunteer``
with no URL, ``grid-portal login`` with no URL) and the Jupyter server (browsers cannot do
multicast DNS). It imports no portal code: a portal announces itself with
``grid_portal/portal/announce.py``, and both sides agree only on the names below.

What an announcement says is never trusted alone: anyone on the LAN can announce anything, and
TXT records are not authenticated. Before a join request or a token is sent, ``verify`` fetches
the CA certificate from the announced enrolment endpoint and checks that it hashes to the
fingerprint the announcement carries; the pairing code the admin compares (``pairing_code``)
then ties the CA to this machine's key, so that an impostor who announces its own CA is caught
either way.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import json
import logging
import threading
import urllib.error
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

from grid_portal.enrolment import fingerprint, pinned_context, request, unverified_context
from grid_portal.errors import ConnectionFailed, EnrolmentRefused

logger = logging.getLogger("grid_portal.discovery")

SERVICE_TYPE = "_gridportal._tcp.local."
DEFAULT_TIMEOUT = 3.0  # seconds of browsing: across a LAN a portal answers in well under 1 s
RESOLVE_TIMEOUT_MS = 2000
# TXT keys (each value at most 255 bytes; the whole record well under a packet).
TXT_NAME, TXT_VERSION, TXT_ENROL, TXT_STATUS, TXT_CA = "name", "version", "enrol", "status", "ca"
MIN_FINGERPRINT_HEX = 32  # a TXT "ca" shorter than a join token's pin is not accepted
PAIRING_DIGITS = 6

TYPE_THE_URL = (
    "type the portal's address instead (`grid-portal serve` prints it): grid-portal "
    "volunteer https://PORTAL:8788 (or `grid-portal login https://PORTAL:8788` for a "
    "researcher), with --token TOKEN if the admin gave you one"
)
# The same way in, worded for someone in JupyterLab (the sidebar has no address field: the
# login a terminal saves is what the Jupyter server uses once restarted).
TYPE_THE_URL_IN_JUPYTER = (
    "type the portal's address instead: ask its admin for it, then in a terminal run "
    "grid-portal login https://PORTAL:8788 (with --token TOKEN if the admin gave you one) "
    "and restart JupyterLab"
)


@dataclass
class DiscoveredPortal:
    """One announcement, resolved. ``verified`` is None until ``verify`` ran."""

    instance: str  # the DNS-SD instance name, unique on the LAN
    name: str
    addresses: list[str]
    port: int
    version: str = ""
    enrol_url: str = ""
    status_url: str = ""
    ca_fingerprint: str = ""
    nodes_online: int | None = None
    verified: bool | None = None
    problem: str | None = None

    @property
    def url(self) -> str:
        """The enrolment endpoint at the address this machine resolved (not a TXT claim)."""
        host = self.addresses[0] if self.addresses else "?"
        if ":" in host:
            host = f"[{host}]"
        return f"https://{host}:{self.port}"

    @property
    def address(self) -> str:
        return ", ".join(self.addresses)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "url": self.url}


def lan_addresses() -> list[str]:
    """This machine's non-loopback IPv4 addresses: the interfaces to browse and announce on.

    Chosen explicitly (never "every interface" by default) so that a busy host with bridges
    and tunnels is not flooded; link-local (169.254/16) is left out too.
    """
    import psutil

    found: list[str] = []
    for addrs in psutil.net_if_addrs().values():
        for a in addrs:
            if getattr(a.family, "name", "") != "AF_INET":
                continue
            ip = ipaddress.ip_address(a.address)
            if ip.is_loopback or ip.is_link_local or ip.is_unspecified:
                continue
            if a.address not in found:
                found.append(a.address)
    return found


def _text(props: dict[bytes, bytes | None], key: str) -> str:
    value = props.get(key.encode())
    return "" if value is None else value.decode("utf-8", "replace")[:255]


def _record(info: Any) -> DiscoveredPortal | None:
    addresses = [a for a in info.parsed_addresses() if ":" not in a] or info.parsed_addresses()
    if not addresses or not info.port:
        return None
    props = info.properties or {}
    instance = str(info.name)
    default_name = instance[: -len(SERVICE_TYPE) - 1] if instance.endswith(SERVICE_TYPE) else ""
    return DiscoveredPortal(
        instance=instance,
        name=_text(props, TXT_NAME) or default_name,
        addresses=list(addresses),
        port=int(info.port),
        version=_text(props, TXT_VERSION),
        enrol_url=_text(props, TXT_ENROL),
        status_url=_text(props, TXT_STATUS),
        ca_fingerprint=_text(props, TXT_CA).lower(),
    )


async def browse(
    timeout: float = DEFAULT_TIMEOUT, interfaces: Iterable[str] | None = None
) -> list[DiscoveredPortal]:
    """Browse for ``timeout`` seconds; every portal that answered and resolved, by name."""
    from zeroconf import IPVersion, ServiceStateChange
    from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

    chosen = list(interfaces) if interfaces is not None else lan_addresses()
    if not chosen:
        logger.info("no network interface with an IPv4 address: nothing to browse")
        return []
    found: dict[str, DiscoveredPortal] = {}
    pending: set[asyncio.Task[None]] = set()
    aiozc = AsyncZeroconf(interfaces=chosen, ip_version=IPVersion.V4Only)

    async def resolve(name: str) -> None:
        info = AsyncServiceInfo(SERVICE_TYPE, name)
        if await info.async_request(aiozc.zeroconf, RESOLVE_TIMEOUT_MS):
            record = _record(info)
            if record is not None:
                found[name] = record

    def changed(
        zeroconf: Any, service_type: str, name: str, state_change: ServiceStateChange
    ) -> None:
        if state_change is ServiceStateChange.Removed:
            found.pop(name, None)
            return
        task = asyncio.ensure_future(resolve(name))
        pending.add(task)
        task.add_done_callback(pending.discard)

    browser = AsyncServiceBrowser(aiozc.zeroconf, [SERVICE_TYPE], handlers=[changed])
    try:
        await asyncio.sleep(timeout)
        if pending:  # answers that came in late still get their resolve time
            await asyncio.wait(set(pending), timeout=RESOLVE_TIMEOUT_MS / 1000)
    finally:
        for task in pending:
            task.cancel()
        with contextlib.suppress(Exception):
            await browser.async_cancel()
        await aiozc.async_close()
    return sorted(found.values(), key=lambda p: (p.name, p.instance))


def verify(portal: DiscoveredPortal, timeout: float = 5.0) -> str:
    """The portal's CA certificate, after checking it hashes to the announced fingerprint.

    Raises EnrolmentRefused (a mismatch: an impostor, or a stale announcement) or
    ConnectionFailed (the endpoint does not answer), each with the way to type the URL.
    """
    claimed = portal.ca_fingerprint
    if len(claimed) < MIN_FINGERPRINT_HEX or any(c not in "0123456789abcdef" for c in claimed):
        portal.verified, portal.problem = False, "announces no usable CA fingerprint"
        raise EnrolmentRefused(
            f"the portal announced as {portal.name!r} at {portal.address} gives no usable CA "
            f"fingerprint, so it cannot be checked; {TYPE_THE_URL}"
        )
    try:
        ca_pem = request(f"{portal.url}/api/ca", unverified_context(), timeout=timeout).decode()
    except (urllib.error.URLError, OSError, ValueError) as exc:
        portal.verified, portal.problem = False, "its enrolment endpoint does not answer"
        raise ConnectionFailed(
            f"the portal announced as {portal.name!r} does not answer at {portal.url} "
            f"({getattr(exc, 'reason', None) or exc}); {TYPE_THE_URL}"
        ) from None
    actual = fingerprint(ca_pem)
    if not actual or not actual.startswith(claimed):
        portal.verified, portal.problem = (
            False,
            "its CA does not match the fingerprint it announces",
        )
        raise EnrolmentRefused(
            f"the portal announced as {portal.name!r} at {portal.address} is not what it "
            "claims: the CA its enrolment endpoint serves does not match the fingerprint in "
            "its announcement (an impostor on this network, or a stale announcement). "
            f"Nothing was sent to it. Ask the admin for the portal's address and {TYPE_THE_URL}"
        )
    portal.verified, portal.problem = True, None
    return ca_pem


def fetch_nodes_online(portal: DiscoveredPortal, ca_pem: str, timeout: float = 3.0) -> int | None:
    """Nodes online, from the portal's public status.json (over TLS pinned to its CA)."""
    # The status URL in TXT is a claim: ask the verified endpoint at the resolved address.
    try:
        raw = request(f"{portal.url}/status.json", pinned_context(ca_pem), timeout=timeout)
        value = json.loads(raw).get("capacity", {}).get("nodes_online")
    except (urllib.error.URLError, OSError, ValueError, AttributeError):
        return None
    portal.nodes_online = int(value) if isinstance(value, int) else None
    return portal.nodes_online


def check_all(portals: list[DiscoveredPortal], timeout: float = 5.0) -> list[DiscoveredPortal]:
    """``verify`` and ``fetch_nodes_online`` each portal (in threads, so it takes one timeout);
    a failure is recorded on the record (``verified``, ``problem``), never raised."""

    def one(p: DiscoveredPortal) -> None:
        with contextlib.suppress(EnrolmentRefused, ConnectionFailed):
            fetch_nodes_online(p, verify(p, timeout), timeout)

    threads = [threading.Thread(target=one, args=(p,), daemon=True) for p in portals]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout * 2 + 1)
    return portals


def discover(
    timeout: float = DEFAULT_TIMEOUT,
    interfaces: Iterable[str] | None = None,
    check: bool = True,
) -> list[DiscoveredPortal]:
    """Blocking ``browse`` (+ ``check_all``): for the CLI and the volunteer agent."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        portals = asyncio.run(browse(timeout, interfaces))
    else:  # called from inside an event loop: browse in a loop of its own
        box: list[list[DiscoveredPortal]] = []
        thread = threading.Thread(
            target=lambda: box.append(asyncio.run(browse(timeout, interfaces))), daemon=True
        )
        thread.start()
        thread.join()
        portals = box[0] if box else []
    return check_all(portals) if check else portals


def nothing_found_message(timeout: float, type_the_url: str = TYPE_THE_URL) -> str:
    return (
        f"no Grid Portal announced itself on this network within {timeout:g} s (the portal "
        "may run with --no-announce, or this network carries no multicast: containers, "
        f"guest Wi-Fi, VPNs); {type_the_url}"
    )


def pairing_code(ca_pem: str, requester_public_key_der: bytes) -> str:
    """Six digits both sides show, from SHA-256(CA public key || requester public key).

    As Bluetooth's numeric comparison: the admin reads the code on the requesting machine and
    compares it with what ``grid-portal requests`` shows. A man in the middle would have to
    present its own CA to the requester or its own key to the portal, and either changes the
    code.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    ca = x509.load_pem_x509_certificate(ca_pem.encode())
    ca_key = ca.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    digest = hashlib.sha256(ca_key + requester_public_key_der).digest()
    number = int.from_bytes(digest[:8], "big") % 10**PAIRING_DIGITS
    return f"{number:0{PAIRING_DIGITS}d}"


def csr_public_key_der(csr_pem: str) -> bytes:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    csr = x509.load_pem_x509_csr(csr_pem.encode())
    return csr.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def format_code(code: str) -> str:
    """``123456`` -> ``123 456``, easier to read aloud."""
    return f"{code[:3]} {code[3:]}" if len(code) == PAIRING_DIGITS else code
