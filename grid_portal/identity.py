"""Who is on the other end of a connection, read from the TLS session (never from a message).

Both sides need this: the portal to decide what a caller may do, a volunteer's worker to answer
only the portal and other nodes. It lives outside ``portal/`` because ``node/`` may not import
``portal/``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from grid_portal.protocol import ROLES


@dataclass(frozen=True)
class Identity:
    """Who is on the other end of a TLS connection, as our CA certified it."""

    role: str
    name: str
    serial: int

    @property
    def serial_hex(self) -> str:
        """The serial as hex. Serials are 159-bit random numbers, too big for msgpack: send this
        over Dask comms, not `serial`."""
        return f"{self.serial:x}"


def identity_from_peercert(peercert: dict[str, Any] | None) -> Identity | None:
    """The identity in a ``ssl.SSLSocket.getpeercert()`` dict, or None if it carries none.

    The dict's ``subject`` is a tuple of RDNs, each a tuple of ``(key, value)`` pairs, e.g.
    ``((("organizationName", "Grid Portal"),), (("commonName", "lab-pc-3"),))``, and the serial
    is ``serialNumber``, an upper-case hex string. Only a certificate with exactly one role
    (OU) that we know and one name (CN) gives an identity.
    """
    if not peercert:
        return None
    roles: list[str] = []
    names: list[str] = []
    for rdn in peercert.get("subject", ()):
        for key, value in rdn:
            if key == "organizationalUnitName":
                roles.append(value)
            elif key == "commonName":
                names.append(value)
    if len(roles) != 1 or len(names) != 1 or roles[0] not in ROLES:
        return None
    try:
        serial = int(peercert["serialNumber"], 16)
    except (KeyError, TypeError, ValueError):
        return None
    return Identity(role=roles[0], name=names[0], serial=serial)


def peer_identity(comm: Any) -> Identity | None:
    """The identity of the peer on a Dask comm; None for non-TLS comms (inproc, tcp)."""
    extra = getattr(comm, "extra_info", None) or {}
    return identity_from_peercert(extra.get("peercert"))


def is_in_process(comm: Any) -> bool:
    """An ``inproc://`` comm: the other end is code in this very process (Dask's own test
    harness, or the scheduler talking to itself), which is as trusted as the process."""
    return str(getattr(comm, "peer_address", "")).startswith("inproc://")
