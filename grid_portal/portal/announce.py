"""The portal announces itself on the LAN: DNS-SD ``_gridportal._tcp.local.`` over mDNS.

Volunteers, researchers and Jupyter servers browse for it (``grid_portal/discovery.py``) and
join with a click and a pairing code instead of a typed URL and token. The TXT record carries
the portal's name, version, enrolment URL, status URL and the full SHA-256 fingerprint of its
CA; a browser trusts none of it until the enrolment endpoint's CA hashes to that fingerprint.

Announced only on the interfaces the portal serves: the ``--host`` address, or for
``0.0.0.0`` this machine's non-loopback IPv4 addresses, listed explicitly. A portal on
loopback serves no one else and is not announced; ``--no-announce`` keeps any portal quiet;
the embedded portal never announces (it is not given an announcer).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

from grid_portal import __version__
from grid_portal.discovery import (
    SERVICE_TYPE,
    TXT_CA,
    TXT_ENROL,
    TXT_NAME,
    TXT_STATUS,
    TXT_VERSION,
    lan_addresses,
)

logger = logging.getLogger("grid_portal.portal.announce")

MAX_LABEL = 63  # a DNS label, in bytes


def announce_addresses(host: str) -> list[str]:
    """The IPv4 addresses to announce on for a portal listening on ``host``."""
    if host in ("0.0.0.0", "", "::"):
        return lan_addresses()
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:  # a host name: what it resolves to here
        try:
            ip = ipaddress.ip_address(socket.gethostbyname(host))
        except (OSError, ValueError):
            return []
    if ip.version != 4 or ip.is_loopback or ip.is_unspecified:
        return []
    return [str(ip)]


def default_name() -> str:
    return f"Grid Portal on {socket.gethostname().split('.')[0]}"


def _label(text: str) -> str:
    """At most 63 bytes of UTF-8, cut on a character boundary; dots would split the label."""
    text = " ".join(text.replace(".", " ").split()) or "Grid Portal"
    data = text.encode()[:MAX_LABEL]
    return data.decode("utf-8", "ignore")


def _host_label() -> str:
    host = socket.gethostname().split(".")[0]
    cleaned = "".join(c if c.isalnum() or c == "-" else "-" for c in host).strip("-")
    return (cleaned or "grid-portal")[:MAX_LABEL]


def service_info(name: str, addresses: list[str], http_url: str, ca_fingerprint: str) -> Any:
    from zeroconf import ServiceInfo

    port = urlsplit(http_url).port or 443
    label = _label(name)
    shown = http_url.rstrip(
        "/"
    )  # what `grid-portal serve` prints (--contact-host, or a LAN address)
    return ServiceInfo(
        SERVICE_TYPE,
        f"{label}.{SERVICE_TYPE}",
        addresses=[socket.inet_aton(a) for a in addresses],
        port=port,
        properties={
            TXT_NAME: name[:200],
            TXT_VERSION: __version__,
            TXT_ENROL: shown,
            TXT_STATUS: f"{shown}/status",
            TXT_CA: ca_fingerprint,
        },
        server=f"{_host_label()}.local.",
    )


class Announcer:
    """One registered announcement; ``start`` and ``stop`` in the portal's event loop."""

    def __init__(self, name: str, addresses: list[str], http_url: str, ca_fingerprint: str):
        self.addresses = addresses
        self.info = service_info(name, addresses, http_url, ca_fingerprint)
        self._aiozc: Any = None

    async def start(self) -> None:
        from zeroconf import IPVersion
        from zeroconf.asyncio import AsyncZeroconf

        self._aiozc = AsyncZeroconf(interfaces=self.addresses, ip_version=IPVersion.V4Only)
        # Another portal with the same name on the LAN: take "name (2)" rather than fail.
        await self._aiozc.async_register_service(self.info, allow_name_change=True)
        logger.info(
            "announced as %r on %s (%s)", self.info.name, ", ".join(self.addresses), SERVICE_TYPE
        )

    async def stop(self) -> None:
        if self._aiozc is None:
            return
        aiozc, self._aiozc = self._aiozc, None
        with contextlib.suppress(Exception):  # a goodbye that cannot be sent is no error
            await aiozc.async_unregister_all_services()
        await aiozc.async_close()


def announcer(host: str, name: str | None = None) -> Callable[[Any], Awaitable[None]]:
    """A companion for ``PortalConfig.companions``: announce once the portal is up (its
    ``PortalInfo`` knows the HTTPS port and the CA), say goodbye when it stops."""

    async def announce(info: Any) -> None:
        addresses = announce_addresses(host)
        if not addresses:
            logger.info("not announcing on the LAN: %s serves this machine only", host)
            return
        running = Announcer(name or default_name(), addresses, info.http, info.ca_fingerprint)
        try:
            await running.start()
            await asyncio.Event().wait()  # until the portal stops (cancelled)
        except Exception as exc:  # noqa: BLE001 - a portal without mDNS still works
            logger.warning("could not announce the portal on the LAN: %s", exc)
        finally:
            await running.stop()

    return announce
