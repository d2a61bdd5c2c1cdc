"""The client side of enrolment, shared by volunteers, researchers and JupyterHub users.

First contact with a portal: fetch its CA certificate without verification, check it against
the pin from the join token (or the Hub's configuration), and from then on talk to the portal
only over TLS verified against that CA. Nothing secret is sent before the pin matched.
"""

from __future__ import annotations

import hashlib
import json
import ssl
import urllib.error
import urllib.request
from typing import Any

from grid_portal.errors import ConnectionFailed, EnrolmentRefused, UsageError

TIMEOUT = 10.0


def portal_base(url: str) -> str:
    """``portal:8788`` -> ``https://portal:8788``; plain http is refused (tokens travel)."""
    url = url.strip().rstrip("/")
    if url.startswith("http://"):
        raise UsageError(
            f"{url}: the portal speaks HTTPS only; use https://{url[len('http://') :]}"
        )
    return url if url.startswith("https://") else "https://" + url


def fingerprint(pem: str) -> str:
    """SHA-256 of a certificate's DER, lowercase hex ("" if it is not a certificate)."""
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    try:
        cert = x509.load_pem_x509_certificate(pem.encode())
    except ValueError:
        return ""
    return hashlib.sha256(cert.public_bytes(Encoding.DER)).hexdigest()


def unverified_context() -> ssl.SSLContext:
    # Only ever used to fetch the CA certificate, which is then checked against the pin.
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def pinned_context(ca_pem: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cadata=ca_pem)
    # The CA itself is pinned, so any certificate it signed is the portal; the host name the
    # user typed (an IP, a .local name) need not be in the certificate.
    ctx.check_hostname = False
    return ctx


def request(
    url: str,
    ctx: ssl.SSLContext,
    data: dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = TIMEOUT,
) -> bytes:
    body = None if data is None else json.dumps(data).encode()
    req = urllib.request.Request(url, data=body, headers=dict(headers or {}))
    if body is not None:
        req.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(req, context=ctx, timeout=timeout) as response:
        return response.read()


def reason(exc: BaseException) -> str:
    return str(getattr(exc, "reason", None) or exc)


def fetch_pinned_ca(base: str, pin: str) -> str:
    """The portal's CA certificate, after checking it against ``pin``."""
    try:
        ca_pem = request(f"{base}/api/ca", unverified_context()).decode()
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise ConnectionFailed(
            f"cannot reach the portal at {base} ({reason(exc)}); check the URL that "
            "`grid-portal serve` printed, and that the portal is running"
        ) from None
    if not fingerprint(ca_pem).startswith(pin):
        raise EnrolmentRefused(
            f"the server at {base} is not the portal this token belongs to (its CA does not "
            "match the token's pin); check the URL, or ask for a new token"
        )
    return ca_pem


def post_json(
    url: str,
    ca_pem: str,
    body: dict[str, Any],
    what: str,
    headers: dict[str, str] | None = None,
    timeout: float = TIMEOUT,
) -> dict[str, Any]:
    """POST to the portal; refusals become EnrolmentRefused with the portal's own words."""
    try:
        raw = request(url, pinned_context(ca_pem), body, headers=headers, timeout=timeout)
    except urllib.error.HTTPError as exc:
        try:
            message = json.loads(exc.read()).get("error") or str(exc)
        except (ValueError, AttributeError):
            message = str(exc)
        if exc.code in (400, 401, 403, 429):
            raise EnrolmentRefused(f"the portal refused to {what}: {message}") from None
        raise ConnectionFailed(f"the portal could not {what}: {message}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise ConnectionFailed(f"cannot reach the portal at {url}: {reason(exc)}") from None
    try:
        reply = json.loads(raw)
    except ValueError:
        raise ConnectionFailed(f"the portal's answer at {url} was not JSON") from None
    if not isinstance(reply, dict):
        raise ConnectionFailed(f"the portal's answer at {url} was not a JSON object")
    return reply


def enrol_with_token(
    base: str, ca_pem: str, token: str, name: str, what: str
) -> tuple[str, dict[str, Any]]:
    """Enrol with a join token at the portal ``base`` whose CA is ``ca_pem`` (already checked
    against the token's pin): a new key and a CSR for ``name``, sent with this Python's
    versions, so that the portal can refuse a machine that could not run its work. Returns
    the private key (PEM) and the portal's reply (certificate, name, role, scheduler, CA)."""
    from grid_portal.envcheck import local_versions
    from grid_portal.keys import make_key_and_csr

    key_pem, csr_pem = make_key_and_csr(name)
    body = {"token": token, "csr": csr_pem, "name": name, "versions": local_versions()}
    return key_pem, post_json(f"{base}/api/enrol", ca_pem, body, what=what)
