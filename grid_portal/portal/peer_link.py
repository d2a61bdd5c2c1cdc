"""``POST /api/peers/link``: a peer portal links to this one with a peer token (flocking).

Served by the enrolment process, which holds the CA and the tokens. The borrowing portal (A)
sends the peer token this portal's admin made, A's address and CA certificate, a lend token of
A's own (which this portal hands to its volunteers that lend to peers) and a certificate request.
This portal checks everything before the token is spent, then signs A a ``peer`` certificate
(A's identity here; its key never leaves A) and keeps A as a peer that borrows.
See portal/peering.py for the whole design.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from grid_portal.enrolment import fingerprint
from grid_portal.errors import EnrolmentRefused, GridError
from grid_portal.keys import MalformedToken, parse_token
from grid_portal.portal.http import EnrolHandler, _bracket, _serial_of
from grid_portal.portal.peering import (
    BORROWS,
    PEER_ROLE,
    Peer,
    PeerBook,
    check_peer_name,
)
from grid_portal.portal.security import check_csr

logger = logging.getLogger("grid_portal.portal.peering")

PEER_CERT_DAYS = 365


class PeerLinkHandler(EnrolHandler):
    """Rate-limited like enrolment (the same per-address window)."""

    def post(self) -> None:
        if self._turned_away():
            return
        try:
            body = json.loads(self.request.body or b"{}")
            fields = {k: str(body[k]) for k in ("token", "csr", "name", "url", "ca", "lend_token")}
        except (ValueError, KeyError, TypeError):
            self.write_json(
                {"error": "send JSON with 'token', 'csr', 'name', 'url', 'ca' and 'lend_token'"},
                400,
            )
            return
        try:
            reply = self._link(fields)
        except EnrolmentRefused as exc:
            logger.info("peer link refused from %s: %s", self.request.remote_ip, exc)
            self.write_json({"error": str(exc)}, 403)
            return
        except GridError as exc:
            self.write_json({"error": str(exc)}, 400)
            return
        self.write_json(reply)

    def _link(self, f: dict[str, str]) -> dict[str, Any]:
        portal = self.portal
        name = check_peer_name(f["name"])
        if not f["url"].startswith("https://"):
            raise EnrolmentRefused("the borrowing portal's address must be https://...")
        theirs = fingerprint(f["ca"])
        if not theirs:
            raise EnrolmentRefused("'ca' is not a certificate")
        try:
            _, pin = parse_token(f["lend_token"])
        except MalformedToken:
            raise EnrolmentRefused("'lend_token' is not a join token") from None
        if not theirs.startswith(pin):
            raise EnrolmentRefused("the lend token was not made by the CA sent with it")
        check_csr(f["csr"])
        book = PeerBook(portal.enrolments.conn)
        same = book.find(BORROWS, f["url"], theirs, name)
        if same is not None:
            raise EnrolmentRefused(
                f"this portal already lends to that portal (as {same.name!r}); to link again, "
                f"its admin here runs `grid-portal peers remove {same.name}` first"
            )
        # Only now is the token spent: a request that was bad anyway must not use it up.
        record = portal.tokens.redeem(f["token"])
        if record.role != PEER_ROLE:
            raise EnrolmentRefused(
                f"this token is for a {record.role}, not for a peer portal; ask this portal's "
                "admin for one made with `grid-portal token create --for peer`"
            )
        peer_name = portal.enrolments.unique_name(name, PEER_ROLE)
        cert = portal.ca.sign_csr(f["csr"], name=peer_name, role=PEER_ROLE, days=PEER_CERT_DAYS)
        portal.enrolments.record(peer_name, PEER_ROLE, _serial_of(cert))
        book.add(
            Peer(
                peer_name,
                BORROWS,
                f["url"],
                theirs,
                f["ca"],
                record.id,
                f["lend_token"],
                time.time(),
            )
        )
        host = portal.contact_host or self.request.host_name
        logger.info("peer portal %s (%s) now borrows from this portal", peer_name, f["url"])
        return {
            "name": peer_name,
            "cert": cert,
            "ca": portal.ca.cert_pem,
            "scheduler": f"tls://{_bracket(host)}:{portal.scheduler_port}",
        }


__all__ = ["PeerLinkHandler"]
