"""The portal's ledger: one SQLite file (WAL mode) in the data dir.

It holds what must survive a portal restart: who enrolled, and (with the workflows issue)
jobs, tasks and contributions. Each table is owned by one module; this one owns the
connection settings and the enrolment records.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

LEDGER_FILE = "ledger.sqlite"
PERSON_ROLES = ("client", "teacher", "admin")


def connect(path: Path) -> sqlite3.Connection:
    """A connection with the settings every part of the portal uses."""
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(str(path), timeout=30, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("PRAGMA busy_timeout=30000")
    return conn


@contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """BEGIN IMMEDIATE ... COMMIT: one writer at a time, across processes too."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def write_later(write: Callable[[], None], delay: float) -> bool:
    """Call ``write`` ``delay`` seconds from now on the running event loop, so that writes
    of a busy moment share one transaction and stay out of the scheduler's hot paths; where
    no loop runs (tests, tools), call it now. True when it was scheduled."""
    import asyncio

    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        write()
        return False
    loop.call_later(delay, write)
    return True


@dataclass
class Enrolment:
    name: str
    role: str
    serial: str
    enrolled_at: float
    revoked: bool


class EnrolmentBook:
    """Names and certificate serials of everyone who enrolled (volunteers and researchers)."""

    def __init__(self, path: Path) -> None:
        self.conn = connect(path)
        self.conn.execute(
            """CREATE TABLE IF NOT EXISTS enrolments (
                name TEXT NOT NULL, role TEXT NOT NULL, serial TEXT NOT NULL,
                enrolled_at REAL NOT NULL, revoked INTEGER NOT NULL DEFAULT 0,
                PRIMARY KEY (role, name))"""
        )

    def unique_name(self, wanted: str, role: str) -> str:
        """``wanted`` if free, else ``wanted-2``, ``wanted-3``...: two laptops called "laptop"
        must not collide in the registry."""
        # People (researchers, admins, teachers) share one namespace: job ownership compares
        # names, so a researcher must never be able to enrol under a teacher's name.
        roles = PERSON_ROLES if role in PERSON_ROLES else (role,)
        marks = ", ".join("?" * len(roles))
        taken = {
            row[0]
            for row in self.conn.execute(
                f"SELECT name FROM enrolments WHERE role IN ({marks}) AND (name = ? OR name LIKE ?)",
                (*roles, wanted, f"{wanted}-%"),
            )
        }
        if wanted not in taken:
            return wanted
        n = 2
        while f"{wanted}-{n}" in taken:
            n += 1
        return f"{wanted}-{n}"

    def record(self, name: str, role: str, serial: str) -> None:
        with transaction(self.conn):
            self.conn.execute(
                "INSERT OR REPLACE INTO enrolments (name, role, serial, enrolled_at, revoked) "
                "VALUES (?, ?, ?, ?, 0)",
                (name, role, serial, time.time()),
            )

    def renew(self, name: str, role: str, serial: str) -> bool:
        """Record a renewed certificate's serial, unless the enrolment was revoked (or never
        made): False then, and nothing changes. One statement, so a revocation is never
        undone by a renewal racing it."""
        with transaction(self.conn):
            cursor = self.conn.execute(
                "UPDATE enrolments SET serial = ? WHERE name = ? AND role = ? AND revoked = 0",
                (serial, name, role),
            )
        return cursor.rowcount > 0

    def get(self, name: str, role: str) -> Enrolment | None:
        row = self.conn.execute(
            "SELECT name, role, serial, enrolled_at, revoked FROM enrolments "
            "WHERE name = ? AND role = ?",
            (name, role),
        ).fetchone()
        return None if row is None else Enrolment(*row[:4], revoked=bool(row[4]))

    def revoke(self, name: str, role: str = "node") -> bool:
        """Revoke every certificate issued under this name; returns whether one existed."""
        with transaction(self.conn):
            cursor = self.conn.execute(
                "UPDATE enrolments SET revoked = 1 WHERE name = ? AND role = ?", (name, role)
            )
        return cursor.rowcount > 0

    def is_revoked(self, name: str, serial: str, role: str = "node") -> bool:
        row = self.conn.execute(
            "SELECT revoked FROM enrolments WHERE name = ? AND role = ? AND serial = ?",
            (name, role, serial),
        ).fetchone()
        revoked_name = self.conn.execute(
            "SELECT 1 FROM enrolments WHERE name = ? AND role = ? AND revoked = 1", (name, role)
        ).fetchone()
        return bool(row and row[0]) or revoked_name is not None

    def revoked(self) -> set[tuple[str, str]]:
        """(role, name) of every revoked enrolment: cheap enough to read every second."""
        rows = self.conn.execute("SELECT role, name FROM enrolments WHERE revoked = 1")
        return {(row[0], row[1]) for row in rows}

    def list(self) -> list[Enrolment]:
        rows = self.conn.execute(
            "SELECT name, role, serial, enrolled_at, revoked FROM enrolments ORDER BY enrolled_at"
        )
        return [Enrolment(*row[:4], revoked=bool(row[4])) for row in rows]
