"""Joining without a token: a join request that the portal's admin approves or denies.

A machine that found the portal (on the LAN, or by a typed URL) but holds no token sends its
CSR, the name it wants and the role it asks for (``node``: a volunteer; ``client``: a
researcher) to ``POST /api/join``. The portal keeps the request, pending, in its ledger (table
``join_requests``) until it expires (``grid-portal.portal.join-request-ttl``, ten minutes unless
configured). The admin lists pending requests with
``grid-portal requests`` and approves or denies one by its id; the requester polls
``POST /api/join/poll`` with the secret it was given (long-poll, a few seconds at a time) and,
once approved, receives its certificate exactly as a token enrolment would give it.

Both sides show the same six-digit pairing code, derived from the portal CA's public key and
the requester's public key (``grid_portal.discovery.pairing_code``): the admin approves only
when the code on the machine in front of them is the code listed, so a request sent by someone
else, or through an impostor portal, is not approved by mistake.

Bounded: at most ``MAX_PENDING`` pending requests in all and ``MAX_PENDING_PER_ADDRESS`` per
address, and the HTTP handler rate-limits new requests per address.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import secrets
import sqlite3
import time
from collections import defaultdict, deque
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from grid_portal import settings
from grid_portal.discovery import csr_public_key_der, pairing_code
from grid_portal.errors import EnrolmentRefused, GridError, UsageError
from grid_portal.portal.ledger import connect, transaction
from grid_portal.protocol import enrolment_cert_days

logger = logging.getLogger("grid_portal.portal.join_requests")

MAX_PENDING = 32
MAX_PENDING_PER_ADDRESS = 3
REQUESTS_PER_MINUTE = 6  # new requests per address
MAX_POLL_WAIT = 20.0  # seconds one poll may be held open
ROLES_ASKED = ("node", "client")
PENDING, APPROVED, DENIED, ENROLLED, EXPIRED = (
    "pending",
    "approved",
    "denied",
    "enrolled",
    "expired",
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS join_requests (
    id            TEXT PRIMARY KEY,  -- short public handle the admin types
    secret_sha256 TEXT NOT NULL UNIQUE,  -- the requester polls with the secret; kept hashed
    name          TEXT NOT NULL,     -- the name asked for
    role          TEXT NOT NULL,     -- 'node' or 'client'
    csr           TEXT NOT NULL,
    code          TEXT NOT NULL,     -- the pairing code both sides show
    address       TEXT NOT NULL,     -- where the request came from
    created_at    REAL NOT NULL,
    expires_at    REAL NOT NULL,
    state         TEXT NOT NULL,     -- pending, approved, denied, enrolled
    decided_at    REAL,
    enrolled_name TEXT,
    cert          TEXT               -- once enrolled: the certificate, for a repeated poll
)
"""


@dataclass
class JoinRequest:
    id: str
    name: str
    role: str
    code: str
    address: str
    created_at: float
    expires_at: float
    state: str
    decided_at: float | None = None
    enrolled_name: str | None = None

    def current_state(self, now: float | None = None) -> str:
        now = time.time() if now is None else now
        if self.state in (PENDING, APPROVED) and self.expires_at <= now:
            return EXPIRED
        return self.state

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "state": self.current_state()}


_COLUMNS = "id, name, role, code, address, created_at, expires_at, state, decided_at, enrolled_name"


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class JoinRequests:
    """Pending join requests in the portal's ledger; safe across processes (the portal and
    the admin's ``grid-portal requests`` share the file)."""

    def __init__(self, db_path: Path) -> None:
        self.db_path = Path(db_path)
        self.conn = connect(self.db_path)
        self.conn.execute(_SCHEMA)

    def _row(self, where: str, *args: Any) -> JoinRequest | None:
        row = self.conn.execute(f"SELECT {_COLUMNS} FROM join_requests WHERE {where}", args)
        found = row.fetchone()
        return None if found is None else JoinRequest(*found)

    def get(self, request_id: str) -> JoinRequest | None:
        return self._row("id = ?", request_id.strip().lower())

    # ---- requester side (the portal's HTTP handler)

    def create(
        self, name: str, role: str, csr: str, ca_pem: str, address: str, now: float | None = None
    ) -> tuple[JoinRequest, str]:
        """A new pending request and the secret its sender polls with."""
        if role not in ROLES_ASKED:
            raise UsageError(f"role {role!r}: ask for 'node' (a volunteer) or 'client'")
        now = time.time() if now is None else now
        code = pairing_code(ca_pem, csr_public_key_der(csr))
        secret = secrets.token_hex(24)
        with transaction(self.conn):
            # Forget what expired long ago; requests decided stay listed for an hour.
            self.conn.execute(
                "DELETE FROM join_requests WHERE expires_at < ? AND state != ?",
                (now - 3600, ENROLLED),
            )
            pending = self.conn.execute(
                "SELECT address FROM join_requests WHERE state = ? AND expires_at > ?",
                (PENDING, now),
            ).fetchall()
            if len(pending) >= MAX_PENDING:
                raise EnrolmentRefused(
                    "the portal has too many join requests waiting; try again in a few minutes"
                )
            if sum(1 for (a,) in pending if a == address) >= MAX_PENDING_PER_ADDRESS:
                raise EnrolmentRefused(
                    "this address already has join requests waiting; wait for the admin's "
                    "answer, or for them to expire"
                )
            for _ in range(5):
                request_id = secrets.token_hex(3)
                try:
                    self.conn.execute(
                        "INSERT INTO join_requests (id, secret_sha256, name, role, csr, code, "
                        "address, created_at, expires_at, state) VALUES (?,?,?,?,?,?,?,?,?,?)",
                        (
                            request_id,
                            _hash(secret),
                            name,
                            role,
                            csr,
                            code,
                            address,
                            now,
                            now + settings.value("portal.join-request-ttl"),
                            PENDING,
                        ),
                    )
                    break
                except sqlite3.IntegrityError:
                    continue
            else:  # pragma: no cover - five clashes in a row
                raise RuntimeError("could not draw a unique join request id")
        record = self._row("id = ?", request_id)
        assert record is not None
        logger.info("join request %s from %s: %s as %s", request_id, address, name, role)
        return record, secret

    def by_secret(self, secret: str) -> tuple[JoinRequest, str, str | None] | None:
        """(request, csr, cert once enrolled) for the requester's secret."""
        row = self.conn.execute(
            f"SELECT {_COLUMNS}, csr, cert FROM join_requests WHERE secret_sha256 = ?",
            (_hash(secret),),
        ).fetchone()
        return None if row is None else (JoinRequest(*row[:10]), row[10], row[11])

    def mark_enrolled(self, request_id: str, name: str, cert: str) -> bool:
        """approved -> enrolled, once (two racing polls sign at most one certificate)."""
        with transaction(self.conn):
            cur = self.conn.execute(
                "UPDATE join_requests SET state = ?, enrolled_name = ?, cert = ? "
                "WHERE id = ? AND state = ?",
                (ENROLLED, name, cert, request_id, APPROVED),
            )
        return cur.rowcount == 1

    # ---- admin side (`grid-portal requests`)

    def list(self, everything: bool = False, now: float | None = None) -> list[JoinRequest]:
        now = time.time() if now is None else now
        rows = [
            JoinRequest(*r)
            for r in self.conn.execute(
                f"SELECT {_COLUMNS} FROM join_requests ORDER BY created_at, id"
            )
        ]
        if everything:
            return rows
        return [r for r in rows if r.current_state(now) == PENDING]

    def decide(self, request_id: str, approve: bool, now: float | None = None) -> JoinRequest:
        now = time.time() if now is None else now
        request_id = request_id.strip().lower()
        with transaction(self.conn):
            record = self._row("id = ?", request_id)
            if record is None:
                raise UsageError(
                    f"no join request has id {request_id!r}: `grid-portal requests` lists them"
                )
            state = record.current_state(now)
            if state != PENDING:
                raise UsageError(f"join request {request_id} is {state}; nothing to decide")
            self.conn.execute(
                "UPDATE join_requests SET state = ?, decided_at = ? WHERE id = ?",
                (APPROVED if approve else DENIED, now, request_id),
            )
        logger.info("join request %s %s", request_id, "approved" if approve else "denied")
        decided = self._row("id = ?", request_id)
        assert decided is not None
        return decided


# -- HTTP ------------------------------------------------------------------------------------


def _handlers() -> tuple[type, type]:
    # Imported here: portal/http.py imports this module for its routes.
    from grid_portal.portal.http import MAX_BODY, BaseHandler, _bracket, _safe_name, _serial_of
    from grid_portal.portal.security import check_csr

    recent: dict[str, deque[float]] = defaultdict(deque)

    def store(handler: Any) -> JoinRequests:
        portal = handler.portal
        book = getattr(portal, "_join_requests", None)
        if book is None:
            book = JoinRequests(portal.tokens.db_path)
            portal._join_requests = book
        return book

    class JoinHandler(BaseHandler):
        """``POST /api/join``: {csr, name, role, versions} -> 202 {id, secret, code, ...}."""

        def post(self) -> None:
            ip = self.request.remote_ip or "?"
            now = time.monotonic()
            window = recent[ip]
            while window and now - window[0] > 60:
                window.popleft()
            if len(window) >= REQUESTS_PER_MINUTE:
                self.write_json({"error": "too many join requests; wait a minute"}, 429)
                return
            window.append(now)
            if len(self.request.body) > MAX_BODY:
                self.write_json({"error": "request too large"}, 413)
                return
            try:
                body = json.loads(self.request.body or b"{}")
                csr = str(body["csr"])
                wanted = _safe_name(str(body.get("name") or "node")[:63])
                role = str(body.get("role") or "node")
            except (ValueError, KeyError, TypeError, AttributeError):
                self.write_json({"error": "send JSON with 'csr', 'name' and 'role'"}, 400)
                return
            if self.refused_versions(body):
                return
            try:
                check_csr(csr)
                record, secret = store(self).create(wanted, role, csr, self.portal.ca.cert_pem, ip)
            except EnrolmentRefused as exc:
                self.write_json({"error": str(exc)}, 429)
                return
            except GridError as exc:
                self.write_json({"error": str(exc)}, 400)
                return
            self.write_json(
                {
                    "id": record.id,
                    "secret": secret,
                    "code": record.code,
                    "expires_at": record.expires_at,
                    "state": PENDING,
                },
                202,
            )

    class JoinPollHandler(BaseHandler):
        """``POST /api/join/poll``: {secret, wait} -> the request's state; once approved, the
        certificate (signed here, once) and the scheduler's address, as ``/api/enrol``."""

        async def post(self) -> None:
            try:
                body = json.loads(self.request.body or b"{}")
                secret = str(body["secret"])[:100]
                wait = min(max(float(body.get("wait", 0)), 0.0), MAX_POLL_WAIT)
            except (ValueError, KeyError, TypeError, AttributeError):
                self.write_json({"error": "send JSON with 'secret'"}, 400)
                return
            book = store(self)
            deadline = time.monotonic() + wait
            while True:
                found = book.by_secret(secret)
                if found is None:
                    self.write_json({"error": "no such join request"}, 404)
                    return
                record, csr, cert = found
                state = record.current_state()
                if state != PENDING or time.monotonic() >= deadline:
                    break
                await asyncio.sleep(0.5)
            if state == APPROVED:
                cert = self._sign(book, record, csr)
                state = ENROLLED if cert else book.by_secret(secret)[0].current_state()  # type: ignore[index]
            if state == ENROLLED:
                found = book.by_secret(secret)
                assert found is not None
                record, _, cert = found
                host = self.portal.contact_host or self.request.host_name
                self.write_json(
                    {
                        "state": ENROLLED,
                        "name": record.enrolled_name,
                        "role": record.role,
                        "cert": cert,
                        "ca": self.portal.ca.cert_pem,
                        "scheduler": f"tls://{_bracket(host)}:{self.portal.scheduler_port}",
                    }
                )
                return
            self.write_json({"state": state, "id": record.id, "expires_at": record.expires_at})

        def _sign(self, book: JoinRequests, record: JoinRequest, csr: str) -> str | None:
            enrolments = self.portal.enrolments
            name = enrolments.unique_name(record.name, record.role)
            days = enrolment_cert_days(record.role)
            cert = self.portal.ca.sign_csr(csr, name=name, role=record.role, days=days)
            if not book.mark_enrolled(record.id, name, cert):
                return None  # another poll won the race; its certificate stands
            enrolments.record(name, record.role, _serial_of(cert))
            logger.info("enrolled %s %s by join request %s", record.role, name, record.id)
            return cert

    return JoinHandler, JoinPollHandler


def join_routes(kwargs: dict[str, Any]) -> list[tuple[str, type, dict[str, Any]]]:
    """The tornado rules for ``portal/http.py``'s ``make_app``."""
    join, poll = _handlers()
    return [(r"/api/join", join, kwargs), (r"/api/join/poll", poll, kwargs)]


# -- the admin's answers over the Grid client (the sidebar) ------------------------------------


class JoinRequestHandlers:
    """``grid_join_requests`` and ``grid_join_decide``: the admin answers join requests through
    the Grid client as ``grid-portal requests`` does on the portal's machine (the JupyterLab
    sidebar, when the admin's Jupyter server is connected). Admin only (grid_portal/protocol.py).

    Deciding only marks the request in the ledger: the certificate is signed by the enrolment
    process when the requester polls next, so this process never holds the CA key.
    """

    def __init__(self, ledger_path: Path | None) -> None:
        self.ledger_path = ledger_path
        self._book: JoinRequests | None = None

    def handlers(self) -> dict[str, Any]:
        return {"grid_join_requests": self.handle_list, "grid_join_decide": self.handle_decide}

    def book(self) -> JoinRequests:
        if self.ledger_path is None:
            raise UsageError("this portal keeps no ledger, so it takes no join requests")
        if self._book is None:
            self._book = JoinRequests(self.ledger_path)
        return self._book

    def handle_list(self, comm: Any = None, everything: bool = False) -> list[dict[str, Any]]:
        if self.ledger_path is None:
            return []
        return [r.to_dict() for r in self.book().list(everything=bool(everything))]

    def handle_decide(
        self, comm: Any = None, request_id: str = "", approve: bool = False
    ) -> dict[str, Any]:
        from grid_portal.errors import NotFound

        book = self.book()
        wanted = str(request_id or "")
        if book.get(wanted) is None:
            raise NotFound(f"no join request has id {wanted!r}; the pending ones are listed")
        return book.decide(wanted, approve=bool(approve)).to_dict()
