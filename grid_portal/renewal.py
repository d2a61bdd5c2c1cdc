"""Short-lived certificates for people, renewed by their own client while it may.

A researcher's or teacher's certificate lives `PERSON_CERT_DAYS` (two weeks), so a stolen or
forgotten one stops working by itself. A `Grid` renews its certificate once less than half of
that is left: it makes a new key here (the key never leaves this machine), sends a request
over its own mutual-TLS connection (``grid_renew``), and the portal signs it for the same name
and role, unless the certificate was revoked, which the portal's gate refuses before anything
is signed. The new files are written beside the old ones and the connection file is switched
to them in one atomic write, so a reader never sees a key and a certificate that do not match.
"""

from __future__ import annotations

import logging
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

from grid_portal.connection import Connection
from grid_portal.keys import make_key_and_csr, write_private
from grid_portal.protocol import PERSON_CERT_DAYS, PERSON_ROLES_RENEWED

logger = logging.getLogger("grid_portal.renewal")


class Renewing(Protocol):
    """What renewal needs of a client (a ``Grid``): its connection, and the portal's
    signature on a request. The client imports this module; naming what it needs of the client
    here, rather than the class, keeps that arrow one way."""

    connection: Connection

    def renew_certificate(self, csr: str) -> dict[str, Any]: ...


def lifetime_left(cert_pem: str | bytes) -> tuple[float, float]:
    """(seconds left, whole lifetime in seconds) of a PEM certificate."""
    from cryptography import x509

    data = cert_pem.encode() if isinstance(cert_pem, str) else cert_pem
    cert = x509.load_pem_x509_certificate(data)
    now = datetime.now(timezone.utc)
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    return (end - now).total_seconds(), (end - start).total_seconds()


def due(connection: Connection) -> bool:
    """Whether this connection's certificate is a person's, on disk, and half spent."""
    if connection.role not in PERSON_ROLES_RENEWED or not connection.source:
        return False
    path = Path(connection.cert)
    if "\n" in connection.cert or not path.is_file():
        return False  # PEM text in memory (a Hub enrolment): renewed by enrolling again
    left, whole = lifetime_left(path.read_text())
    return left < whole / 2


def renew(grid: Renewing) -> bool:
    """Renew ``grid``'s certificate if it is due; True when a new one was written."""
    connection = grid.connection
    if not due(connection):
        return False
    key_pem, csr_pem = make_key_and_csr(connection.name or "researcher")
    reply = grid.renew_certificate(csr_pem)  # NotAllowed once revoked
    cert_pem = reply["cert"]
    folder = Path(connection.cert).parent
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d%H%M%S")
    cert_path, key_path = folder / f"client-{stamp}.pem", folder / f"client-{stamp}-key.pem"
    write_private(key_path, key_pem)
    cert_path.write_text(cert_pem)
    old_cert, old_key = Path(connection.cert), Path(connection.key)
    renewed = Connection(**{**connection.__dict__, "cert": str(cert_path), "key": str(key_path)})
    renewed.save(Path(connection.source or ""))
    grid.connection = renewed
    for old in (old_cert, old_key):
        if old.parent == folder and old not in (cert_path, key_path):
            old.unlink(missing_ok=True)
    left, _ = lifetime_left(cert_pem)
    logger.info(
        "renewed the certificate of %s (valid %.0f more days)", connection.name, left / 86400
    )
    return True


def renew_quietly(grid: Renewing) -> None:
    """`renew` for a background thread: a failure is logged, never raised (the certificate in
    use stays valid for days; the next Grid tries again)."""
    try:
        renew(grid)
    except Exception as exc:  # noqa: BLE001 - renewal is best effort until the cert expires
        logger.warning("could not renew the certificate: %s", exc)


__all__ = ["PERSON_CERT_DAYS", "due", "lifetime_left", "renew", "renew_quietly"]
