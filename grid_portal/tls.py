"""A Dask ``Security`` for mutual TLS with the portal's own CA.

Kernels, the Jupyter server, volunteers and the portal all connect with it, so it lives outside
``portal/``: a client that read a connection file must not import portal code to use it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from grid_portal.errors import UsageError

if TYPE_CHECKING:
    import distributed


def _pem_or_path(value: str | bytes | os.PathLike[str], what: str) -> str:
    """PEM text or a file path, as a string in the form Dask's Security tells apart."""
    if isinstance(value, bytes):
        value = value.decode("ascii")
    if isinstance(value, str) and "-----BEGIN" in value:
        # Dask recognises in-memory PEM by a newline; every PEM block has one after BEGIN.
        return value if value.endswith("\n") else value + "\n"
    path = Path(value)
    if not path.is_file():
        raise UsageError(f"{what} file {str(path)!r} does not exist: give a path to a PEM file")
    return str(path)


def tls_security(
    ca_pem_or_path: str | bytes | os.PathLike[str],
    cert_pem_or_path: str | bytes | os.PathLike[str],
    key_pem_or_path: str | bytes | os.PathLike[str],
) -> distributed.Security:
    """A Dask ``Security`` for mutual TLS with our CA, the same certificate for every role.

    Each argument is a path or the PEM text. Prefer paths for keys on disk (mode 0600): PEM
    text in memory is written by Dask to a short-lived private temporary file per context.
    """
    from distributed import Security

    ca = _pem_or_path(ca_pem_or_path, "CA certificate")
    cert = _pem_or_path(cert_pem_or_path, "certificate")
    key = _pem_or_path(key_pem_or_path, "private key")
    return Security(
        tls_ca_file=ca,
        tls_client_cert=cert,
        tls_client_key=key,
        tls_scheduler_cert=cert,
        tls_scheduler_key=key,
        tls_worker_cert=cert,
        tls_worker_key=key,
        require_encryption=True,
    )
