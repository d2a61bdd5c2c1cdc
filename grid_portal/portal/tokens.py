"""Join tokens: the one-line secret an admin gives a volunteer so the portal will enrol it.

A token reads ``gpt_<secret>_<pin>``. The secret proves the volunteer was invited; the pin is
the start of the portal CA's SHA-256 fingerprint, so on first contact the volunteer can check it
reached the right portal before trusting its CA (like kubeadm's discovery-token CA hash).

Only SHA-256 of the secret is stored, in the portal's SQLite ledger file (own table
``join_tokens``): a copy of the database does not let anyone join. The secret is 192 random
bits, so an unsalted fast hash is enough; nothing here ever logs the secret or the token text.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import math
import re
import secrets
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from grid_portal.errors import EnrolmentRefused, UsageError
from grid_portal.keys import (  # noqa: F401 - re-exported
    _NEW_TOKEN_HINT,
    PIN_HEX_CHARS,
    TOKEN_PREFIX,
    MalformedToken,
    parse_token,
)
from grid_portal.portal.security import make_private_dirs
from grid_portal.units import format_duration

logger = logging.getLogger(__name__)

SECRET_BYTES = 24  # 48 hex characters
BUSY_TIMEOUT_S = 10.0
MAX_NOTE_LENGTH = 200

_SCHEMA = """
CREATE TABLE IF NOT EXISTS join_tokens (
    id            TEXT PRIMARY KEY,      -- public handle, shown by `token list`, never secret
    secret_sha256 TEXT NOT NULL UNIQUE,  -- hex SHA-256 of the secret; the secret is not kept
    pin           TEXT NOT NULL,         -- CA pin the token was made for
    created_at    REAL NOT NULL,         -- Unix seconds
    expires_at    REAL NOT NULL,         -- Unix seconds
    uses_total    INTEGER,               -- NULL: unlimited
    uses_left     INTEGER,               -- NULL: unlimited
    note          TEXT NOT NULL DEFAULT '',
    role          TEXT NOT NULL DEFAULT 'node',  -- 'node', 'client', 'peer' or 'lent' (peering)
    revoked_at    REAL                   -- NULL: not revoked
)
"""


@dataclass(frozen=True)
class CreatedToken:
    """A fresh token. `text` is the only copy of the secret: show it once, never log it."""

    text: str = field(repr=False)
    id: str
    expires_at: float
    uses: int | None


@dataclass(frozen=True)
class TokenRecord:
    """What the portal keeps about a token: no secret, no hash."""

    id: str
    created_at: float
    expires_at: float
    uses_total: int | None
    uses_left: int | None
    note: str
    revoked_at: float | None = None
    role: str = "node"

    def state(self, now: float | None = None) -> str:
        """``"active"``, ``"revoked"``, ``"used up"`` or ``"expired"``, for `token list`."""
        now = time.time() if now is None else now
        if self.revoked_at is not None:
            return "revoked"
        if self.uses_left is not None and self.uses_left <= 0:
            return "used up"
        if self.expires_at <= now:
            return "expired"
        return "active"


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode("ascii")).hexdigest()


def _when(ts: float, now: float) -> str:
    stamp = datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return f"{stamp}, {format_duration(now - ts)} ago"


class TokenStore:
    """Join tokens in the portal's SQLite file. Safe across threads and processes.

    Each call opens its own connection (SQLite connections are per-thread), in WAL mode with a
    busy timeout, so the portal and a `grid-portal token` CLI can use the file at once.
    """

    def __init__(self, db_path: Path) -> None:
        self.db_path = Path(db_path)
        make_private_dirs(self.db_path.parent)
        with self._connect() as db:
            db.execute(_SCHEMA)

    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        # isolation_level=None: we issue BEGIN ourselves, so redeem can take the write lock
        # (BEGIN IMMEDIATE) before it reads.
        db = sqlite3.connect(self.db_path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
        try:
            db.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
            db.execute("PRAGMA journal_mode = WAL")
            yield db
        finally:
            db.close()

    # ---- admin side

    def create(
        self,
        ttl: float = 3600,
        uses: int | None = 1,
        note: str = "",
        *,
        pin: str,
        role: str = "node",
        now: float | None = None,
    ) -> CreatedToken:
        """A new token valid for `ttl` seconds and `uses` enrolments (None: unlimited).

        `pin` is ``ca_pin(ca.fingerprint())`` of the portal's CA. `now` (Unix seconds) is for
        tests.
        """
        if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not math.isfinite(ttl):
            raise UsageError(f"token lifetime {ttl!r}: give a number of seconds, like 3600")
        if ttl <= 0:
            raise UsageError(f"token lifetime {ttl!r} s: give a positive number of seconds")
        if uses is not None and (isinstance(uses, bool) or not isinstance(uses, int) or uses < 1):
            raise UsageError(
                f"token uses {uses!r}: give a whole number of at least 1, or none for unlimited"
            )
        if not isinstance(pin, str) or not re.fullmatch(rf"[0-9a-f]{{{PIN_HEX_CHARS}}}", pin):
            raise UsageError(
                f"CA pin {pin!r}: give ca_pin(ca.fingerprint()), {PIN_HEX_CHARS} lowercase hex"
            )
        if role not in ("node", "client", "peer", "lent"):
            raise UsageError(
                f"token role {role!r}: use 'node' (a volunteer), 'client' (a researcher) or "
                "'peer' (a peer portal, grid-portal peers add)"
            )
        note = str(note)
        if len(note) > MAX_NOTE_LENGTH or not note.isprintable():
            raise UsageError(
                f"token note: use at most {MAX_NOTE_LENGTH} printable characters on one line"
            )
        now = time.time() if now is None else now
        secret = secrets.token_hex(SECRET_BYTES)
        expires_at = now + float(ttl)
        with self._connect() as db:
            for _ in range(5):  # a clash of 32-bit ids is rare; just draw again
                token_id = secrets.token_hex(4)
                try:
                    db.execute(
                        "INSERT INTO join_tokens (id, secret_sha256, pin, created_at, expires_at,"
                        " uses_total, uses_left, note, role) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (token_id, _hash(secret), pin, now, expires_at, uses, uses, note, role),
                    )
                    break
                except sqlite3.IntegrityError:
                    continue
            else:  # pragma: no cover - five clashes in a row means something else is wrong
                raise RuntimeError("could not draw a unique join token id")
        logger.info("created join token %s (expires in %s, uses %s)", token_id, ttl, uses)
        return CreatedToken(
            text=f"{TOKEN_PREFIX}{secret}_{pin}", id=token_id, expires_at=expires_at, uses=uses
        )

    def list(self, include_revoked: bool = False) -> list[TokenRecord]:
        """Every token, oldest first, without secrets; revoked ones only if asked."""
        where = "" if include_revoked else "WHERE revoked_at IS NULL"
        with self._connect() as db:
            rows = db.execute(
                "SELECT id, created_at, expires_at, uses_total, uses_left, note, revoked_at, role "
                f"FROM join_tokens {where} ORDER BY created_at, id"
            ).fetchall()
        return [TokenRecord(*row) for row in rows]

    def revoke(self, token_id: str, now: float | None = None) -> None:
        """Stop token `token_id` from enrolling anyone else (volunteers already in stay in)."""
        now = time.time() if now is None else now
        with self._connect() as db:
            cur = db.execute(
                "UPDATE join_tokens SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL",
                (now, token_id),
            )
            if cur.rowcount == 0:
                known = db.execute("SELECT 1 FROM join_tokens WHERE id = ?", (token_id,)).fetchone()
                if known is None:
                    raise UsageError(
                        f"no join token has id {token_id!r}: `grid-portal token list` shows the ids"
                    )
                return  # already revoked: revoking twice is not an error
        logger.info("revoked join token %s", token_id)

    # ---- enrolment side

    def redeem(self, text: str, now: float | None = None) -> TokenRecord:
        """Spend one use of the token in `text`; returns its record after the use.

        Atomic across processes: the write lock is taken (BEGIN IMMEDIATE) before the checks,
        so two volunteers racing for the last use cannot both win. Raises `EnrolmentRefused`
        naming why: unknown, revoked, used up or expired.
        """
        secret, pin = parse_token(text)
        digest = _hash(secret)
        now = time.time() if now is None else now
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                record = self._check_and_spend(db, digest, pin, now)
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
        logger.info("join token %s redeemed (%s uses left)", record.id, record.uses_left)
        return record

    @staticmethod
    def _check_and_spend(db: sqlite3.Connection, digest: str, pin: str, now: float) -> TokenRecord:
        row = db.execute(
            "SELECT id, created_at, expires_at, uses_total, uses_left, note, revoked_at,"
            " secret_sha256, pin, role FROM join_tokens WHERE secret_sha256 = ?",
            (digest,),
        ).fetchone()
        # The lookup is by hash, so timing tells an attacker nothing about the secret; the
        # constant-time compare guards the equality itself all the same.
        if row is None or not hmac.compare_digest(row[7], digest) or row[8] != pin:
            raise EnrolmentRefused(
                "this join token is not known to this portal (mistyped, or made for another "
                f"portal); {_NEW_TOKEN_HINT}"
            )
        record = TokenRecord(*row[:7], role=row[9])
        if record.revoked_at is not None:
            raise EnrolmentRefused(
                f"this join token was revoked on {_when(record.revoked_at, now)}; {_NEW_TOKEN_HINT}"
            )
        if record.uses_left is not None and record.uses_left <= 0:
            raise EnrolmentRefused(
                f"this join token is used up (it allowed {record.uses_total} enrolment"
                f"{'s' if record.uses_total != 1 else ''}); {_NEW_TOKEN_HINT}"
            )
        if record.expires_at <= now:
            raise EnrolmentRefused(
                f"this join token expired on {_when(record.expires_at, now)}; {_NEW_TOKEN_HINT}"
            )
        if record.uses_left is None:
            return record
        db.execute("UPDATE join_tokens SET uses_left = uses_left - 1 WHERE id = ?", (record.id,))
        return TokenRecord(
            record.id,
            record.created_at,
            record.expires_at,
            record.uses_total,
            record.uses_left - 1,
            record.note,
            record.revoked_at,
            record.role,
        )
