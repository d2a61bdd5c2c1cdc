"""Portal peering (flocking): a portal lends its idle volunteers to a peer portal.

Two portals, each with its own CA; neither ever holds the other's keys. Portal B's admin makes a
peer token (``grid-portal token create --for peer``); portal A's admin runs ``grid-portal peers
add https://B --token T``. That one request (``POST /api/peers/link`` at B, over HTTPS with B's
CA checked against the token's pin) carries:

- A's address and CA certificate, and a **lend token** of A's own (role ``lent``, A's secret,
  shown to no person): B hands it to the volunteers that opted in to lending
  (``grid-portal volunteer --lend-to-peers``), so B vouches for its volunteers and A enrols
  them with its own CA;
- a certificate request: B signs A a ``peer`` certificate, A's identity at B. With it A may ask
  B's scheduler one thing, what B lent it (``grid_peer_exchange``); every other call is refused
  (default deny, ``protocol.py``).

A names every lent node ``<name>@<peer>`` (no node of its own can have an ``@``: enrolment
cleans names) and labels it ``site=<peer>`` (``site_labels``), whatever the node says.

The two directions are kept apart: at A the peer ``lends`` (A borrows its volunteers), at B the
peer ``borrows``. Each side counts the work exchanged on its own: A from its own scheduler's
task times (the contributions of the ``*@B`` nodes), B from its volunteers' reports of the core
time their lent workers held a slot (``record_lent``), so the two ledgers can be compared.

Ending it: ``peers remove`` at A revokes A's lend token and every ``*@B`` node certificate (the
scheduler drops them within a second); at B it stops the offers, and the volunteers leave A at
their next heartbeat. Revoking B's peer token (``grid-portal token revoke``) at B does the same
as ``peers remove`` there.
"""

from __future__ import annotations

import json
import logging
import math
import re
import sqlite3
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from grid_portal.errors import EnrolmentRefused, UsageError
from grid_portal.portal.lend_quota import LendAllowances, peer_share, peer_user

if TYPE_CHECKING:
    from grid_portal.portal.fairshare import FairShare

logger = logging.getLogger("grid_portal.portal.peering")

PEER_ROLE = "peer"  # a peer portal's certificate at the lending portal (protocol.PEER)
LENT_ROLE = "lent"  # a lend token's role: enrol a peer's volunteer as a node of that site
LENDS, BORROWS = "lends", "borrows"  # the peer lends us its volunteers / we lend it ours
SITE_LABEL = "site"
SITE_MARK = "@"  # lent nodes are named NAME@PEER; our own node names never hold one
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
# One report of a volunteer's lent work is at most this much (a report per heartbeat).
MAX_REPORTED_SECONDS = 7 * 24 * 3600.0
MAX_REPORTED_TASKS = 10_000_000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS peers (
    name TEXT NOT NULL,             -- the other portal, as this one names it (a site label)
    direction TEXT NOT NULL,        -- 'lends': it lends us volunteers; 'borrows': we lend it ours
    url TEXT NOT NULL,              -- its HTTPS address
    ca_fingerprint TEXT NOT NULL,   -- SHA-256 of its CA certificate
    ca_pem TEXT NOT NULL,
    token_id TEXT NOT NULL,         -- lends: our lend token; borrows: the peer token it used
    lend_token TEXT,                -- borrows: its lend token, handed to our lending volunteers
    added_at REAL NOT NULL,
    PRIMARY KEY (name, direction)
);
CREATE TABLE IF NOT EXISTS peer_lent (
    peer TEXT NOT NULL, node TEXT NOT NULL, tasks INTEGER NOT NULL DEFAULT 0,
    core_seconds REAL NOT NULL DEFAULT 0, PRIMARY KEY (peer, node)
);
"""


@dataclass
class Peer:
    name: str
    direction: str
    url: str
    ca_fingerprint: str
    ca_pem: str
    token_id: str
    lend_token: str | None
    added_at: float

    def public(self) -> dict[str, Any]:
        """What may be shown: no CA text, no token."""
        return {
            k: v for k, v in asdict(self).items() if k not in ("ca_pem", "lend_token", "token_id")
        }


def check_peer_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise UsageError(
            f"{name!r} cannot name a peer portal: use letters, digits, '.', '-' and '_' (at most "
            "63; it becomes the site label of its lent nodes)"
        )
    return name


def site_of(node_name: str) -> str | None:
    """The peer a lent node came from (``pc1@school`` -> ``school``); None for our own."""
    _, mark, site = str(node_name).rpartition(SITE_MARK)
    return site if mark and site else None


def site_labels(node_name: str, labels: dict[str, str]) -> dict[str, str]:
    """A node's labels as the portal keeps them: a lent node's ``site`` is its peer's name,
    whatever it claims (the label comes from how it enrolled, not from the node)."""
    site = site_of(node_name)
    if site is None:
        return labels
    return {**labels, SITE_LABEL: site}


def lent_node_name(wanted: str, peer: str) -> str:
    return f"{wanted}{SITE_MARK}{peer}"


class PeerBook:
    """The peers table of a portal's ledger (and what each lent or borrowed)."""

    def __init__(self, ledger: Path | sqlite3.Connection) -> None:
        from grid_portal.portal.ledger import connect

        self.conn = connect(Path(ledger)) if isinstance(ledger, (str, Path)) else ledger
        self.conn.executescript(_SCHEMA)

    def _rows(self, where: str = "", args: tuple[Any, ...] = ()) -> list[Peer]:
        rows = self.conn.execute(
            "SELECT name, direction, url, ca_fingerprint, ca_pem, token_id, lend_token, added_at "
            f"FROM peers {where} ORDER BY added_at",
            args,
        ).fetchall()
        return [Peer(*row) for row in rows]

    def list(self, direction: str | None = None) -> list[Peer]:
        if direction is None:
            return self._rows()
        return self._rows("WHERE direction = ?", (direction,))

    def find(self, direction: str, url: str, fingerprint: str, name: str) -> Peer | None:
        """A peer of that direction that is the same portal (address, CA or name)."""
        for peer in self.list(direction):
            if peer.url == url or peer.ca_fingerprint == fingerprint or peer.name == name:
                return peer
        return None

    def get(self, name: str, direction: str) -> Peer | None:
        rows = self._rows("WHERE name = ? AND direction = ?", (name, direction))
        return rows[0] if rows else None

    def by_token(self, token_id: str, direction: str) -> Peer | None:
        rows = self._rows("WHERE token_id = ? AND direction = ?", (token_id, direction))
        return rows[0] if rows else None

    def add(self, peer: Peer) -> None:
        from grid_portal.portal.ledger import transaction

        with transaction(self.conn):
            self.conn.execute(
                "INSERT INTO peers (name, direction, url, ca_fingerprint, ca_pem, token_id, "
                "lend_token, added_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    peer.name,
                    peer.direction,
                    peer.url,
                    peer.ca_fingerprint,
                    peer.ca_pem,
                    peer.token_id,
                    peer.lend_token,
                    peer.added_at,
                ),
            )

    def remove(self, name: str, direction: str) -> None:
        from grid_portal.portal.ledger import transaction

        with transaction(self.conn):
            self.conn.execute(
                "DELETE FROM peers WHERE name = ? AND direction = ?", (name, direction)
            )

    def token_revoked(self, token_id: str) -> bool:
        """Whether the join token ``token_id`` (a peer or lend token) was revoked."""
        try:
            row = self.conn.execute(
                "SELECT revoked_at FROM join_tokens WHERE id = ?", (token_id,)
            ).fetchone()
        except sqlite3.OperationalError:  # no tokens table: nothing was revoked
            return False
        return row is not None and row[0] is not None

    def borrowers(self) -> list[Peer]:
        """The peers our volunteers may serve now (their peer token not revoked)."""
        return [p for p in self.list(BORROWS) if not self.token_revoked(p.token_id)]

    # -- the work exchanged ---------------------------------------------------------------
    def record_lent(self, node: str, lent: Any) -> dict[str, float]:
        """A volunteer's report of what it lent since its last report, per peer name; returns
        the core-seconds recorded per peer."""
        if not isinstance(lent, dict):
            return {}
        known = {p.name for p in self.list(BORROWS)}
        rows = []
        for peer, figures in list(lent.items())[:64]:
            if peer not in known or not isinstance(figures, dict):
                continue
            seconds = _number(figures.get("core_seconds"), MAX_REPORTED_SECONDS)
            tasks = int(_number(figures.get("tasks"), MAX_REPORTED_TASKS))
            if seconds or tasks:
                rows.append((peer, node, tasks, seconds))
        if not rows:
            return {}
        from grid_portal.portal.ledger import transaction

        with transaction(self.conn):
            self.conn.executemany(
                "INSERT INTO peer_lent (peer, node, tasks, core_seconds) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (peer, node) DO UPDATE SET tasks = tasks + excluded.tasks, "
                "core_seconds = core_seconds + excluded.core_seconds",
                rows,
            )
        return {peer: seconds for peer, _, _, seconds in rows}

    def lent_to(self, peer: str) -> dict[str, float]:
        row = self.conn.execute(
            "SELECT COALESCE(SUM(tasks), 0), COALESCE(SUM(core_seconds), 0), COUNT(*) "
            "FROM peer_lent WHERE peer = ?",
            (peer,),
        ).fetchone()
        return {"tasks": int(row[0]), "core_seconds": round(float(row[1]), 3), "nodes": row[2]}

    def received_from(self, peer: str) -> dict[str, float]:
        """What the peer's lent nodes gave us, from our own contributions ledger."""
        pattern = "%" + SITE_MARK + _like_escape(peer)
        try:
            row = self.conn.execute(
                "SELECT COALESCE(SUM(tasks), 0), COALESCE(SUM(cpu_seconds), 0), "
                "COUNT(DISTINCT name) FROM contributions WHERE name LIKE ? ESCAPE '\\'",
                (pattern,),
            ).fetchone()
        except sqlite3.OperationalError:  # no contributions yet
            row = (0, 0.0, 0)
        return {"tasks": int(row[0]), "core_seconds": round(float(row[1]), 3), "nodes": row[2]}

    def exchange(self) -> list[dict[str, Any]]:
        """Every peer with the core-hours each way, for `peers list` and the status page."""
        result = []
        for peer in self.list():
            got = self.received_from(peer.name) if peer.direction == LENDS else None
            gave = self.lent_to(peer.name) if peer.direction == BORROWS else None
            revoked = peer.direction == BORROWS and self.token_revoked(peer.token_id)
            result.append(
                {
                    **peer.public(),
                    "state": "revoked" if revoked else "active",
                    "received_core_hours": round(got["core_seconds"] / 3600, 4) if got else 0.0,
                    "received_core_seconds": got["core_seconds"] if got else 0.0,
                    "lent_core_hours": round(gave["core_seconds"] / 3600, 4) if gave else 0.0,
                    "lent_core_seconds": gave["core_seconds"] if gave else 0.0,
                    "tasks": (got or gave or {}).get("tasks", 0),
                    "nodes": (got or gave or {}).get("nodes", 0),
                }
            )
        return result


def _number(value: Any, cap: float) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return 0.0
    return min(number, cap) if math.isfinite(number) and number > 0 else 0.0


def _like_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


# -- at enrolment (the enrolment process, portal/http.py) --------------------------------------
def lent_enrolment(book: PeerBook, enrolments: Any, token_id: str, wanted: str) -> str:
    """The name a peer's volunteer enrols as, with a lend token: ``wanted@peer`` (``wanted-2``
    before the mark when that is taken: the site after it must stay the peer's name)."""
    peer = book.by_token(token_id, LENDS)
    if peer is None:
        raise EnrolmentRefused(
            "this portal no longer borrows volunteers from the portal that sent you (its peering "
            "was removed); nothing to do on this machine"
        )
    name, n = lent_node_name(wanted, peer.name), 2
    while enrolments.get(name, "node") is not None:
        name, n = lent_node_name(f"{wanted}-{n}", peer.name), n + 1
    return name


PEER_TOKEN_AT_ENROL = (
    "this is a peer token, for another portal: its admin runs `grid-portal peers add URL "
    "--token TOKEN`; a volunteer needs a token made with `grid-portal token create`"
)


# -- the scheduler's handlers (the scheduler process) ----------------------------------------
class PeerHandlers:
    """``grid_peer_offers`` (a volunteer: the portals it may lend to; its report of what it
    lent) and ``grid_peer_exchange`` (a peer: what we lent it).

    With ``fairshare`` (the portal's), a borrowing peer counts as one user of it
    (portal/lend_quota.py): what was lent to it is charged to ``peer:NAME``, its priority sets
    its share among the peers a volunteer lends to, and its quota caps the cores it gets."""

    def __init__(self, ledger_path: Path | None, fairshare: FairShare | None = None) -> None:
        self.ledger_path = ledger_path
        self.fairshare = fairshare
        self.allowances = LendAllowances()
        self._book: PeerBook | None = None

    def handlers(self) -> dict[str, Any]:
        return {
            "grid_peer_offers": self.handle_offers,
            "grid_peer_exchange": self.handle_exchange,
            "grid_peer_unlink": self.handle_unlink,
        }

    def book(self) -> PeerBook:
        if self.ledger_path is None:
            raise UsageError("this portal keeps no ledger, so it has no peers")
        if self._book is None:
            self._book = PeerBook(self.ledger_path)
        return self._book

    def handle_offers(
        self, comm: Any = None, lent: Any = None, using: Any = None
    ) -> dict[str, Any]:
        """``lent``: per peer, what the volunteer lent since it last asked (tasks,
        core-seconds); ``using``: per peer, the slots it runs and has waiting now. Answers the
        peers it may lend to, each with its share and the most slots it may give it now."""
        from grid_portal.guard import caller_identity

        identity = caller_identity(comm)
        if self.ledger_path is None or identity is None:
            return {"peers": []}
        book = self.book()
        recorded = book.record_lent(identity.name, lent)
        using = using if isinstance(using, dict) else {}
        offers = []
        for p in book.borrowers():
            if not p.lend_token:
                continue
            offer = {"name": p.name, "url": p.url, "ca": p.ca_pem, "token": p.lend_token}
            now = using.get(p.name)
            now = now if isinstance(now, dict) else {}
            offer.update(self._share(p.name, identity.name, recorded.get(p.name, 0.0), now))
            offers.append(offer)
        return {"peers": offers}

    def _share(
        self, peer: str, node: str, lent_seconds: float, using: dict[str, Any]
    ) -> dict[str, Any]:
        """The peer as one user of our fair share: charge what was lent, then its share and
        this volunteer's part of its quota."""
        fairshare = self.fairshare
        if fairshare is None:
            return {"share": 1.0, "slots": None}
        user = peer_user(peer)
        fairshare.charge(user, lent_seconds)
        slots = self.allowances.allow(
            peer, node, fairshare.quotas.get(user), using.get("running"), using.get("waiting")
        )
        fairshare.set_running_elsewhere(user, self.allowances.running(peer))
        return {"share": peer_share(fairshare.factor(user)), "slots": slots}

    def handle_exchange(self, comm: Any = None) -> dict[str, Any]:
        from grid_portal.guard import caller_identity

        identity = caller_identity(comm)
        book = self.book()
        peer = book.get(identity.name, BORROWS) if identity is not None else None
        if peer is None or book.token_revoked(peer.token_id):
            raise UsageError("this portal does not lend to you (any more)")
        return {"name": peer.name, "lent": book.lent_to(peer.name)}

    def handle_unlink(self, comm: Any = None) -> dict[str, Any]:
        """The peer ended the peering (``peers remove`` there): we stop lending to it, and
        its peer certificate is revoked here."""
        from grid_portal.guard import caller_identity
        from grid_portal.portal.ledger import EnrolmentBook

        identity = caller_identity(comm)
        book = self.book()
        if identity is None or book.get(identity.name, BORROWS) is None:
            raise UsageError("this portal does not lend to you (any more)")
        book.remove(identity.name, BORROWS)
        assert self.ledger_path is not None
        EnrolmentBook(self.ledger_path).revoke(identity.name, PEER_ROLE)
        logger.info("peer portal %s ended the peering: no more lending to it", identity.name)
        return {"name": identity.name, "removed": True}


# -- the public status page ------------------------------------------------------------------
def public_peers(ledger_path: Path | None) -> list[dict[str, Any]]:
    """The peers and the core-hours each way, as the status page shows them (no addresses)."""
    if ledger_path is None or not Path(ledger_path).exists():
        return []
    book = PeerBook(ledger_path)
    try:
        return [
            {
                "peer": row["name"],
                "direction": row["direction"],
                "state": row["state"],
                "core_hours_received": row["received_core_hours"],
                "core_hours_lent": row["lent_core_hours"],
                "tasks": row["tasks"],
            }
            for row in book.exchange()
        ]
    finally:
        book.conn.close()


def peers_html(rows: list[dict[str, Any]]) -> str:
    """The status page's section on peers (every value escaped)."""
    import html

    if not rows:
        return ""
    e = html.escape
    how = {LENDS: "lends us its idle volunteers", BORROWS: "borrows our idle volunteers"}
    body = "".join(
        f"<tr><td>{e(str(r['peer']))}</td><td>{e(how.get(r['direction'], r['direction']))}</td>"
        f'<td>{e(str(r["state"]))}</td><td class="n">{r["core_hours_received"]:.3f}</td>'
        f'<td class="n">{r["core_hours_lent"]:.3f}</td><td class="n">{r["tasks"]:,}</td></tr>'
        for r in rows
    )
    return (
        '<h2 id="peers">Peer portals</h2><p class="muted">Portals that lend each other their '
        "idle volunteers; core-hours each way, as this portal counted them.</p>"
        '<table><tr><th>peer</th><th>how</th><th>state</th><th class="n">core-hours received'
        '</th><th class="n">core-hours lent</th><th class="n">tasks</th></tr>'
        f"{body}</table>"
    )


def dumps(rows: list[dict[str, Any]]) -> str:
    return json.dumps(rows, indent=2, sort_keys=True)


__all__ = [
    "BORROWS",
    "LENDS",
    "LENT_ROLE",
    "PEER_ROLE",
    "PEER_TOKEN_AT_ENROL",
    "Peer",
    "PeerBook",
    "PeerHandlers",
    "check_peer_name",
    "lent_enrolment",
    "lent_node_name",
    "site_labels",
    "site_of",
]
