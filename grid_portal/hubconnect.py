"""Under JupyterHub: connect to the class's portal as the Hub user, with nothing to set up.

JupyterHub puts the user's own API token in every server it starts (``JUPYTERHUB_API_TOKEN``;
kernels and terminals inherit it). The Hub's config (``configure_jupyterhub`` in
``grid_portal.portal.hub``, see docs/classroom.md) adds where the portal is and which CA it
has (``GRID_PORTAL_URL``, ``GRID_PORTAL_CA_PIN``). With those three set and no connection of
the user's own, ``grid_portal.which_portal.find_connection`` calls `connect_via_hub`, which

1. fetches the portal's CA and checks it against the pin before sending anything (the Hub
   token must never reach an impostor: it is the user's whole Hub identity);
2. makes a key (it never leaves this machine) and a certificate request;
3. sends the request to ``POST /api/hub/enrol`` with the Hub token; the portal asks the Hub
   whose token it is and signs a certificate in that user's name;
4. writes the certificate, key and a connection file (mode 0600) to
   ``~/.config/grid-portal/hub/<user>/`` and returns the connection. Later calls reuse it until it
   nears its end, or the portal's CA or the Hub user changed.

This module is light (no Dask, no portal code at import) because ``find_connection`` runs in
every front end.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from grid_portal.connection import Connection
from grid_portal.enrolment import (
    fingerprint,
    post_json,
    reason,
    request,
    unverified_context,
)
from grid_portal.errors import ConnectionFailed, EnrolmentRefused, UsageError

ENV_HUB_TOKEN = "JUPYTERHUB_API_TOKEN"
ENV_HUB_USER = "JUPYTERHUB_USER"
ENV_PORTAL_URL = "GRID_PORTAL_URL"
ENV_CA_PIN = "GRID_PORTAL_CA_PIN"
RENEW_BEFORE = timedelta(days=1)  # enrol again when the certificate has less than this left


@dataclass(frozen=True)
class HubEnvironment:
    token: str
    portal_url: str
    pin: str | None
    user: str | None


def hub_environment(environ: Mapping[str, str] | None = None) -> HubEnvironment | None:
    """The Hub's settings from the environment; None when this is not a Hub user's server."""
    env = os.environ if environ is None else environ
    token = env.get(ENV_HUB_TOKEN, "").strip()
    url = env.get(ENV_PORTAL_URL, "").strip()
    if not token or not url:
        return None
    pin = env.get(ENV_CA_PIN, "").strip().lower() or None
    return HubEnvironment(token=token, portal_url=url, pin=pin, user=env.get(ENV_HUB_USER) or None)


def hub_dir(user: str | None = None) -> Path:
    """Where a Hub user's certificate and connection file live.

    One folder per Hub user: with a spawner that runs every user's server with the same home
    (as JupyterHub's SimpleLocalProcessSpawner may), two users must not share one.
    """
    import platformdirs

    base = Path(platformdirs.user_config_dir("grid-portal")) / "hub"
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in user or "")
    return base / (safe.lstrip(".") or "_")


def connect_via_hub(environ: Mapping[str, str] | None = None) -> Connection | None:
    """This Hub user's connection to the class portal, enrolling first if need be.

    None when the Hub's variables are not set. Raises ConnectionFailed or EnrolmentRefused
    (one clear line) when the portal cannot be reached or refuses.
    """
    env = hub_environment(environ)
    if env is None:
        return None
    directory = hub_dir(env.user)
    with _locked(directory):  # the server extension and a kernel may both get here at once
        existing = usable_connection(directory / "connection.json", env)
        if existing is not None:
            return existing
        return enrol_with_hub(env, directory)


def usable_connection(path: Path, env: HubEnvironment) -> Connection | None:
    """The saved connection if it is for this portal, this CA and this user, and not ending."""
    if not path.exists():
        return None
    try:
        conn = Connection.load(path)
        ca_pem = Path(conn.ca).read_text()
        cert_pem = Path(conn.cert).read_bytes()
        if not Path(conn.key).exists():
            return None
    except (OSError, ConnectionFailed):
        return None
    if conn.http.rstrip("/") != portal_base(env.portal_url):
        return None
    if env.user and conn.name != env.user:
        return None
    if env.pin and not fingerprint(ca_pem).startswith(env.pin):
        return None  # the portal has a new CA: enrol again
    from cryptography import x509

    try:
        end = x509.load_pem_x509_certificate(cert_pem).not_valid_after_utc
    except ValueError:
        return None
    if end - datetime.now(timezone.utc) < RENEW_BEFORE:
        return None
    return conn


def enrol_with_hub(env: HubEnvironment, directory: Path) -> Connection:
    """Enrol with the portal as the Hub user that owns ``env.token``; save and return it."""
    from grid_portal.keys import make_key_and_csr, make_private_dirs, write_private

    base = portal_base(env.portal_url)
    if not env.pin:
        raise UsageError(
            f"{ENV_CA_PIN} is not set, so this server cannot check that {base} is the real "
            "portal before sending it your Hub token; the Hub's admin should configure the "
            "Hub with grid_portal.portal.hub.configure_jupyterhub (docs/classroom.md)"
        )
    try:
        ca_pem = request(f"{base}/api/ca", unverified_context()).decode()
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise ConnectionFailed(
            f"cannot reach the class portal at {base} ({reason(exc)}); is it running? "
            f"(the Hub's admin: check the grid-portal service and {ENV_PORTAL_URL})"
        ) from None
    if not fingerprint(ca_pem).startswith(env.pin):
        raise EnrolmentRefused(
            f"the server at {base} is not the class portal (its CA does not match "
            f"{ENV_CA_PIN}); nothing was sent to it. Tell the Hub's admin."
        )
    key_pem, csr_pem = make_key_and_csr(env.user or "jupyterhub-user")
    body: dict[str, Any] = {"csr": csr_pem}
    if env.user:
        body["name"] = env.user
    reply = _post_json(f"{base}/api/hub/enrol", ca_pem, env.token, body, "enrol this server")
    make_private_dirs(directory)
    serial = hashlib.sha256(reply["cert"].encode()).hexdigest()[:12]
    ca_path = directory / "ca.pem"
    cert_path = directory / f"client-{serial}.pem"
    key_path = directory / f"client-{serial}-key.pem"
    write_private(ca_path, reply["ca"])
    write_private(key_path, key_pem)
    write_private(cert_path, reply["cert"])
    conn = Connection(
        scheduler=reply["scheduler"],
        http=base,
        ca=str(ca_path),
        cert=str(cert_path),
        key=str(key_path),
        name=reply["name"],
        role=reply["role"],
    )
    conn.save(directory / "connection.json")
    for old in directory.glob("client-*.pem"):  # earlier enrolments' files
        if old not in (cert_path, key_path):
            old.unlink(missing_ok=True)
    return conn


def request_node_token(
    uses: int | None = None, ttl: float = 8 * 3600.0, environ: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """A teacher's join token for the lab's machines: ``{"token", "command", ...}``.

    ``command`` is the one line to run on each lab machine. Teachers only (the portal checks
    with the Hub).
    """
    env = hub_environment(environ)
    if env is None:
        raise UsageError(
            f"this is not a JupyterHub server with a class portal ({ENV_HUB_TOKEN} and "
            f"{ENV_PORTAL_URL} are not both set); on the portal's machine use "
            "`grid-portal token create` instead"
        )
    conn = connect_via_hub(environ)
    assert conn is not None
    ca_pem = Path(conn.ca).read_text()
    body = {"uses": uses, "ttl": ttl}
    return _post_json(
        f"{portal_base(env.portal_url)}/api/hub/token", ca_pem, env.token, body, "make a token"
    )


# -- plumbing ---------------------------------------------------------------------------------
def portal_base(url: str) -> str:
    url = url.strip().rstrip("/")
    if url.startswith("http://"):
        raise UsageError(f"{ENV_PORTAL_URL}={url}: the portal speaks HTTPS only; use https://")
    return url if url.startswith("https://") else "https://" + url


def _post_json(
    url: str, ca_pem: str, token: str, body: dict[str, Any], what: str
) -> dict[str, Any]:
    return post_json(url, ca_pem, body, what, headers={"Authorization": f"token {token}"})


def _locked(directory: Path) -> contextlib.AbstractContextManager[None]:
    """One enrolment at a time for this folder (not POSIX: no lock, and the worst case is one
    enrolment too many)."""
    from grid_portal.keys import file_lock, make_private_dirs

    make_private_dirs(directory)
    return file_lock(directory / ".lock")
