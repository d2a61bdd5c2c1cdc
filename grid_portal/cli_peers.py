"""``grid-portal peers add / list / remove``: portal peering (flocking), on the portal's machine.

Run by the portal's admin where the portal's data dir is (its CA, tokens and ledger are read and
written there): this portal borrows the idle volunteers of another portal that agreed to lend
them (its admin gave a peer token). The design is in grid_portal/portal/peering.py and
docs/federation.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import time
from pathlib import Path
from typing import Any

from grid_portal.errors import ConnectionFailed, EnrolmentRefused, GridError, UsageError
from grid_portal.units import counted

PEERS_DIR = "peers"  # in the data dir: our key and certificate at each lending peer (0600)
LEND_TOKEN_TTL = 10 * 365 * 24 * 3600.0  # lives as long as the peering; revoked on remove

DESCRIPTION = """\
Portal peering: borrow the idle volunteers of another portal (flocking).

On the lending portal (B), its admin makes a peer token:
  grid-portal token create --for peer
On this portal (A), its admin links to B with it:
  grid-portal peers add https://b.example.org:8788 --token gpt_... [--as b]

B's volunteers that opted in (grid-portal volunteer --lend-to-peers) then also serve this
portal while B has nothing queued for them, and give the work back when B's own work comes.
Here they are nodes named NAME@b, labelled site=b (Grid.submit(..., where='site == "b"')).
Each portal keeps its own CA: this one enrols B's volunteers with a lend token it sends B,
and never holds B's keys. `peers list` shows every peer with the core-hours each way;
`peers remove b` ends it (lent workers leave within a heartbeat). Run on the portal's machine.
"""


def add_parsers(sub: Any) -> None:
    p = sub.add_parser(
        "peers",
        help="portal peering: borrow a peer portal's idle volunteers",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    psub = p.add_subparsers(dest="peers_command", metavar="ACTION")
    a = psub.add_parser(
        "add",
        help="link to a portal that lends its idle volunteers (its admin gives a peer token)",
        description="Link this portal to the portal at URL with the peer token its admin made "
        "(`grid-portal token create --for peer` there). Its volunteers that lend to peers "
        "join this portal as nodes NAME@PEER, labelled site=PEER.",
    )
    a.add_argument("url", help="the lending portal's HTTPS address")
    a.add_argument("--token", required=True, help="the peer token from its admin")
    a.add_argument(
        "--as",
        dest="peer_name",
        help="the peer's name here: the site label of its nodes (default: its host)",
    )
    a.add_argument(
        "--url",
        dest="own_url",
        help="this portal's HTTPS address as the peer's volunteers reach it (default: the one "
        "`grid-portal serve` printed)",
    )
    a.add_argument(
        "--name",
        dest="own_name",
        help="this portal's name at the peer (default: its host)",
    )
    a.add_argument("--data-dir", type=Path, help="this portal's data dir")
    a.set_defaults(func=cmd_peers_add)
    lst = psub.add_parser(
        "list",
        help="the peers, with the core-hours each way",
        description="Every peer: those that lend this portal their volunteers and those this "
        "portal lends to, with the work exchanged (this portal's own ledger).",
    )
    lst.add_argument("--json", action="store_true", help="as JSON")
    lst.add_argument(
        "--ask",
        action="store_true",
        help="also ask each lending peer what it counted (over the peer link)",
    )
    lst.add_argument("--data-dir", type=Path, help="this portal's data dir")
    lst.set_defaults(func=cmd_peers_list)
    r = psub.add_parser(
        "remove",
        help="end a peering (lent workers leave within a heartbeat)",
        description="End the peering with NAME, both ways it exists: a peer that lends to "
        "this portal can no longer enrol volunteers here and its lent nodes are cut off; a "
        "peer this portal lends to is no longer served by its volunteers.",
    )
    r.add_argument("name", help="the peer's name in `grid-portal peers list`")
    r.add_argument("--data-dir", type=Path, help="this portal's data dir")
    r.set_defaults(func=cmd_peers_remove)
    p.set_defaults(func=lambda args: p.print_help() or 2)


# -- local state ------------------------------------------------------------------------------
def _portal(args: argparse.Namespace) -> tuple[Path, Any]:
    from grid_portal.cli_certs import data_dir_of
    from grid_portal.portal.ledger import LEDGER_FILE
    from grid_portal.portal.peering import PeerBook

    data_dir = data_dir_of(args)
    if not (data_dir / "ca" / "ca.pem").exists() or not (data_dir / LEDGER_FILE).exists():
        raise GridError(
            f"no portal in {data_dir}: run this on the portal's machine, after `grid-portal "
            "serve` started once, or pass the portal's --data-dir"
        )
    return data_dir, PeerBook(data_dir / LEDGER_FILE)


def _own_url(data_dir: Path, given: str | None) -> str:
    from grid_portal.enrolment import portal_base

    if given:
        return portal_base(given)
    try:
        info = json.loads((data_dir / "portal.json").read_text())
        return portal_base(str(info.get("http") or info["local_http"]))
    except (OSError, ValueError, KeyError):
        raise UsageError(
            "cannot tell this portal's HTTPS address (is it running?); give it with --url"
        ) from None


# -- add ----------------------------------------------------------------------------------------
def cmd_peers_add(args: argparse.Namespace) -> int:
    from grid_portal.enrolment import fetch_pinned_ca, fingerprint, portal_base, post_json
    from grid_portal.keys import MalformedToken, make_key_and_csr, parse_token, write_private
    from grid_portal.portal.ledger import LEDGER_FILE
    from grid_portal.portal.peering import LENDS, LENT_ROLE, Peer, check_peer_name
    from grid_portal.portal.security import CertificateAuthority, ca_pin
    from grid_portal.portal.tokens import TokenStore
    from grid_portal.portals import name_for

    data_dir, book = _portal(args)
    try:
        _, pin = parse_token(args.token)
    except MalformedToken as exc:
        raise UsageError(f"--token: {exc}") from None
    base = portal_base(args.url)
    name = check_peer_name(args.peer_name or name_for(base))
    own_url = _own_url(data_dir, args.own_url)
    own_name = check_peer_name(args.own_name or name_for(own_url))
    try:
        their_ca = fetch_pinned_ca(base, pin)
    except ConnectionFailed:
        raise ConnectionFailed(
            f"cannot reach the peer portal at {base}; is it running, and is the address the "
            "one its `grid-portal serve` printed? Nothing changed here"
        ) from None
    except EnrolmentRefused:
        raise EnrolmentRefused(
            f"the portal at {base} has another CA than the one this peer token was made for "
            "(it was set up again, or something else answers at that address): ask its admin "
            "for a new peer token. Nothing changed here"
        ) from None
    same = book.find(LENDS, base, fingerprint(their_ca), name)
    if same is not None:
        raise UsageError(
            f"this portal already borrows from {same.url} (as {same.name!r}); to link again, run "
            f"`grid-portal peers remove {same.name}` first"
        )
    ca = CertificateAuthority.load_or_create(data_dir / "ca")
    tokens = TokenStore(data_dir / LEDGER_FILE)
    lend = tokens.create(
        ttl=LEND_TOKEN_TTL,
        uses=None,
        note=f"lend token: volunteers of peer {name}",
        pin=ca_pin(ca.fingerprint()),
        role=LENT_ROLE,
    )
    key_pem, csr_pem = make_key_and_csr(own_name)
    body = {
        "token": args.token,
        "csr": csr_pem,
        "name": own_name,
        "url": own_url,
        "ca": ca.cert_pem,
        "lend_token": lend.text,
    }
    try:
        reply = post_json(f"{base}/api/peers/link", their_ca, body, what="link with this portal")
    except (EnrolmentRefused, ConnectionFailed) as exc:
        tokens.revoke(lend.id)  # never given out: no use keeping it
        raise type(exc)(f"{exc}. Nothing changed here") from None
    peer_dir = data_dir / PEERS_DIR / name
    write_private(peer_dir / "key.pem", key_pem)
    write_private(peer_dir / "cert.pem", str(reply["cert"]))
    write_private(peer_dir / "ca.pem", their_ca)
    write_private(
        peer_dir / "peer.json",
        json.dumps({"scheduler": reply.get("scheduler"), "name_there": reply.get("name")}),
    )
    book.add(Peer(name, LENDS, base, fingerprint(their_ca), their_ca, lend.id, None, time.time()))
    print(
        f"linked: {name} ({base}) lends this portal its idle volunteers that opted in "
        f"(grid-portal volunteer --lend-to-peers); they join as nodes NAME@{name}, labelled "
        f"site={name} (where='site == \"{name}\"'). This portal is {reply.get('name')!r} there."
    )
    return 0


# -- list ---------------------------------------------------------------------------------------
def cmd_peers_list(args: argparse.Namespace) -> int:
    from grid_portal.portal.peering import LENDS

    data_dir, book = _portal(args)
    rows = book.exchange()
    if args.ask:
        for row in rows:
            if row["direction"] == LENDS:
                row["their_count"] = ask_lender(data_dir, row["name"])
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("no peers: `grid-portal peers add URL --token T` links to a portal that lends")
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table("peer", "how", "address", "state", "core-h received", "core-h lent", "tasks")
    for row in rows:
        how = "lends to us" if row["direction"] == LENDS else "borrows from us"
        table.add_row(
            row["name"],
            how,
            row["url"],
            row["state"],
            f"{row['received_core_hours']:.3f}",
            f"{row['lent_core_hours']:.3f}",
            str(row["tasks"]),
        )
    Console().print(table)
    return 0


def ask_lender(data_dir: Path, name: str) -> dict[str, Any]:
    """What the lending peer counted as lent to us, asked with our peer certificate."""
    return _ask(data_dir / PEERS_DIR / name, "grid_peer_exchange")


def _ask(peer_dir: Path, op: str) -> dict[str, Any]:
    """Call ``op`` at the lending peer with our peer certificate; errors as one line."""
    try:
        scheduler = json.loads((peer_dir / "peer.json").read_text())["scheduler"]
    except (OSError, ValueError, KeyError):
        return {"error": "no peer link is kept for it"}
    try:
        return asyncio.run(_call(peer_dir, scheduler, op))
    except Exception as exc:  # noqa: BLE001 - shown as the peer's answer, one line
        return {"error": str(exc)[:300] or type(exc).__name__}


async def _call(peer_dir: Path, scheduler: str, op: str) -> dict[str, Any]:
    from distributed.core import rpc

    from grid_portal.tls import tls_security

    security = tls_security(peer_dir / "ca.pem", peer_dir / "cert.pem", peer_dir / "key.pem")
    async with rpc(scheduler, connection_args=security.get_connection_args("client")) as r:
        reply = await asyncio.wait_for(getattr(r, op)(), 20)
    if isinstance(reply, dict) and reply.get("status") == "error":
        return {"error": str(reply.get("message") or reply.get("exception"))[:300]}
    return reply


# -- remove -------------------------------------------------------------------------------------
def cmd_peers_remove(args: argparse.Namespace) -> int:
    from grid_portal.portal.ledger import LEDGER_FILE, EnrolmentBook
    from grid_portal.portal.peering import BORROWS, LENDS, PEER_ROLE, site_of
    from grid_portal.portal.tokens import TokenStore

    data_dir, book = _portal(args)
    found = [p for p in book.list() if p.name == args.name]
    if not found:
        known = ", ".join(sorted({p.name for p in book.list()})) or "none"
        raise UsageError(
            f"no peer named {args.name!r} (peers: {known}); see `grid-portal peers list`"
        )
    tokens = TokenStore(data_dir / LEDGER_FILE)
    enrolments = EnrolmentBook(data_dir / LEDGER_FILE)
    for peer in found:
        tokens.revoke(peer.token_id)
        if peer.direction == LENDS:
            # Its lent nodes are cut off (the scheduler drops them within a second).
            cut = [
                e.name
                for e in enrolments.list()
                if e.role == "node" and not e.revoked and site_of(e.name) == peer.name
            ]
            for node in cut:
                enrolments.revoke(node, "node")
            told = _ask(data_dir / PEERS_DIR / peer.name, "grid_peer_unlink")
            shutil.rmtree(data_dir / PEERS_DIR / peer.name, ignore_errors=True)
            print(
                f"removed {peer.name}: it lends no more; {counted(len(cut), 'lent node')} cut off"
            )
            if "error" in told:
                print(
                    f"  {peer.name} was not told ({told['error']}); its volunteers are refused "
                    f"here all the same. Its admin may run `grid-portal peers remove NAME` there"
                )
        elif peer.direction == BORROWS:
            enrolments.revoke(peer.name, PEER_ROLE)
            print(f"removed {peer.name}: this portal's volunteers leave it at their next heartbeat")
        book.remove(peer.name, peer.direction)
    return 0


__all__ = ["add_parsers", "ask_lender"]
