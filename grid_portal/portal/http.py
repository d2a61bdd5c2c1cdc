"""The portal's own HTTPS endpoint: enrolment, a ping and a bandwidth probe.

Served over TLS with the portal's certificate. A volunteer that has never met this portal
checks the CA it fetches against the pin inside its join token before sending anything secret
(the idea kubeadm uses for its discovery hash), so the token never travels to an impostor.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field
from typing import Any

import tornado.web

from grid_portal import __version__
from grid_portal.envcheck import local_versions, refusal_for
from grid_portal.errors import EnrolmentRefused, GridError
from grid_portal.portal import peering
from grid_portal.portal.join_requests import join_routes  # joins with no token
from grid_portal.portal.ledger import EnrolmentBook
from grid_portal.portal.security import CertificateAuthority, check_csr
from grid_portal.portal.tokens import TokenStore
from grid_portal.protocol import enrolment_cert_days

logger = logging.getLogger("grid_portal.portal.http")

MAX_BANDWIDTH_PROBE = 16 * 2**20
MAX_BODY = 64 * 2**10  # an enrolment request is a few KB; refuse anything much larger


@dataclass
class PortalContext:
    ca: CertificateAuthority
    tokens: TokenStore
    enrolments: EnrolmentBook
    scheduler_port: int
    contact_host: str | None = None
    enrol_rate_per_minute: int = 30
    # More tornado rules (pattern, handler, kwargs): the status page, JupyterHub enrolment.
    extra_routes: list[Any] = field(default_factory=list)


class BaseHandler(tornado.web.RequestHandler):
    def initialize(self, portal: PortalContext) -> None:
        self.portal = portal

    def write_json(self, data: Any, status: int = 200) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(data))

    def refused_versions(self, body: dict[str, Any]) -> bool:
        """Refuse (403, saying why) a machine whose Python or Dask, as its request's
        ``versions`` say, cannot run this portal's work; True when it was refused."""
        refusal = refusal_for(body.get("versions"))
        if refusal is not None:
            self.write_json({"error": refusal}, 403)
        return refusal is not None

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        # Never a Python traceback to the network.
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps({"error": self._reason}))


class CAHandler(BaseHandler):
    def get(self) -> None:
        self.set_header("Content-Type", "application/x-pem-file")
        self.finish(self.portal.ca.cert_pem)


class PingHandler(BaseHandler):
    def get(self) -> None:
        # Volunteers compare these with their own before enrolling (grid_portal/envcheck.py).
        self.write_json(
            {"ok": True, "version": __version__, "time": time.time(), "versions": local_versions()}
        )


class BandwidthHandler(BaseHandler):
    """A short transfer to measure the node <-> portal bandwidth at enrolment."""

    def get(self) -> None:
        try:
            size = int(self.get_argument("bytes", str(2**20)))
        except ValueError:
            self.write_json({"error": "bytes must be an integer"}, 400)
            return
        size = max(0, min(size, MAX_BANDWIDTH_PROBE))
        self.set_header("Content-Type", "application/octet-stream")
        self.finish(os.urandom(size))


class EnrolHandler(BaseHandler):
    _recent: dict[str, deque[float]] = defaultdict(deque)

    def _rate_limited(self) -> bool:
        ip = self.request.remote_ip or "?"
        now = time.monotonic()
        window = self._recent[ip]
        while window and now - window[0] > 60:
            window.popleft()
        if len(window) >= self.portal.enrol_rate_per_minute:
            return True
        window.append(now)
        return False

    def _turned_away(self) -> bool:
        """Too many attempts from this address, or too large a request: answered here."""
        if self._rate_limited():
            self.write_json({"error": "too many enrolment attempts; wait a minute"}, 429)
            return True
        if len(self.request.body) > MAX_BODY:
            self.write_json({"error": "request too large"}, 413)
            return True
        return False

    def post(self) -> None:
        if self._turned_away():
            return
        try:
            body = json.loads(self.request.body or b"{}")
            token, csr = str(body["token"]), str(body["csr"])
            wanted = str(body.get("name") or "node")[:63]
        except (ValueError, KeyError, TypeError):
            self.write_json({"error": "send JSON with 'token', 'csr' and 'name'"}, 400)
            return
        # Before the token is spent: a machine that cannot work must not use it up.
        if self.refused_versions(body):
            return
        try:
            check_csr(csr)  # before the token is spent: a garbled CSR must not use it up
            record = self.portal.tokens.redeem(token)
            role = record.role
            if role in (peering.PEER_ROLE, peering.LENT_ROLE):
                role, name = _peer_enrolment(self.portal, role, record.id, _safe_name(wanted))
            else:
                name = self.portal.enrolments.unique_name(_safe_name(wanted), role)
            # People's certificates are short-lived; their Grid renews them (renewal.py).
            days = enrolment_cert_days(role)
            cert = self.portal.ca.sign_csr(csr, name=name, role=role, days=days)
        except EnrolmentRefused as exc:
            logger.info("enrolment refused from %s: %s", self.request.remote_ip, exc)
            self.write_json({"error": str(exc)}, 403)
            return
        except GridError as exc:
            self.write_json({"error": str(exc)}, 400)
            return
        serial = _serial_of(cert)
        self.portal.enrolments.record(name, role, serial)
        host = self.portal.contact_host or self.request.host_name
        logger.info("enrolled %s %s from %s", role, name, self.request.remote_ip)
        self.write_json(
            {
                "name": name,
                "role": role,
                "cert": cert,
                "ca": self.portal.ca.cert_pem,
                "scheduler": f"tls://{_bracket(host)}:{self.portal.scheduler_port}",
            }
        )


def _peer_enrolment(
    portal: PortalContext, role: str, token_id: str, wanted: str
) -> tuple[str, str]:
    """A lend token enrols a peer portal's volunteer as a node named ``wanted@peer``; a peer
    token enrols nobody (it links portals: portal/peer_link.py)."""
    if role == peering.PEER_ROLE:
        raise EnrolmentRefused(peering.PEER_TOKEN_AT_ENROL)
    book = peering.PeerBook(portal.enrolments.conn)
    return "node", peering.lent_enrolment(book, portal.enrolments, token_id, wanted)


def make_app(portal: PortalContext) -> tornado.web.Application:
    from grid_portal.portal.peer_link import PeerLinkHandler  # it builds on this module

    kwargs = {"portal": portal}
    return tornado.web.Application(
        [
            (r"/api/ca", CAHandler, kwargs),
            (r"/api/ping", PingHandler, kwargs),
            (r"/api/bandwidth", BandwidthHandler, kwargs),
            (r"/api/enrol", EnrolHandler, kwargs),
            (r"/api/peers/link", PeerLinkHandler, kwargs),
            *join_routes(kwargs),
            *portal.extra_routes,
        ],
        log_function=_quiet_log,
    )


def _quiet_log(handler: tornado.web.RequestHandler) -> None:
    # The default access log is fine, but keep query strings out of it: nothing secret is
    # sent in URLs today, and this keeps it that way if someone adds a parameter.
    logger.debug("%s %s %s", handler.get_status(), handler.request.method, handler.request.path)


def _safe_name(name: str) -> str:
    cleaned = "".join(c if c.isalnum() or c in "-_." else "-" for c in name).strip("-.")
    return cleaned or "node"


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def _serial_of(cert_pem: str) -> str:
    from cryptography import x509

    return format(x509.load_pem_x509_certificate(cert_pem.encode()).serial_number, "x")
