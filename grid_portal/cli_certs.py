"""``grid-portal certs`` and ``grid-portal token revoke``: who holds a certificate, and cutting
anyone off.

Run on the portal's machine, against its data dir, like ``grid-portal token``. A revocation is
written to the ledger; the running portal reads it back within a second, refuses the
certificate on every new call and closes its live connections (grid_portal/portal/access.py).
"""

from __future__ import annotations

import argparse
from datetime import datetime
from pathlib import Path
from typing import Any

from grid_portal.errors import GridError, UsageError
from grid_portal.protocol import ROLES, SCHEDULER

PERSON_AND_NODE_ROLES = tuple(r for r in ROLES if r != SCHEDULER)


def add_parsers(sub: Any, token_sub: Any) -> None:
    """``certs list``, ``certs revoke`` and ``token revoke``."""
    p = sub.add_parser(
        "certs",
        help="certificates the portal issued; `certs revoke NAME` cuts one off",
        description="List who holds a certificate of this portal (volunteers, researchers, "
        "teachers, admins), or revoke one. A revoked certificate is refused on every call "
        "and its live connections are closed within a second; the holder needs a new join "
        "token to come back. Run on the portal's machine.",
    )
    csub = p.add_subparsers(dest="certs_command", metavar="ACTION")
    c = csub.add_parser("list", help="every enrolment, with its role and state")
    c.add_argument("--data-dir", type=Path, help="the portal's data dir")
    c.add_argument("--json", action="store_true", help="records as JSON")
    c.set_defaults(func=cmd_certs_list)
    c = csub.add_parser(
        "revoke",
        help="cut a volunteer, researcher, teacher or admin off",
        description="Revoke the certificates issued under NAME. Names are unique per role; "
        "when one name has several roles, say which with --role.",
    )
    c.add_argument("name", help="the name in `grid-portal certs list`")
    c.add_argument("--role", choices=PERSON_AND_NODE_ROLES, help="which of NAME's roles")
    c.add_argument("--data-dir", type=Path, help="the portal's data dir")
    c.set_defaults(func=cmd_certs_revoke)
    p.set_defaults(func=lambda args: p.print_help() or 2)

    t = token_sub.add_parser(
        "revoke",
        help="stop a join token from enrolling anyone else",
        description="Revoke a join token by the id `grid-portal token list` shows. Machines "
        "and people it already enrolled stay in: revoke them with `grid-portal certs revoke`.",
    )
    t.add_argument("id", help="the token's id")
    t.add_argument("--data-dir", type=Path, help="the portal's data dir")
    t.set_defaults(func=cmd_token_revoke)


def data_dir_of(args: argparse.Namespace) -> Path:
    """The portal's data dir: --data-dir, else the default one."""
    from grid_portal.connection import default_data_dir

    return (args.data_dir or default_data_dir()).expanduser()


def portal_ledger(args: argparse.Namespace) -> Path:
    """The ledger of the portal in the data dir (``data_dir_of``); where there is none, a
    GridError saying what to do. Every command that reads a portal's ledger starts here."""
    from grid_portal.portal.ledger import LEDGER_FILE

    data_dir = data_dir_of(args)
    path = data_dir / LEDGER_FILE
    if not path.is_file():
        raise GridError(
            f"no ledger in {data_dir}: no portal was started there; start one with "
            "`grid-portal serve`, or give the portal's --data-dir"
        )
    return path


def token_store(args: argparse.Namespace) -> tuple[Any, str]:
    """The portal's join tokens and its CA pin, for `grid-portal token ...`."""
    from grid_portal.portal.ledger import LEDGER_FILE
    from grid_portal.portal.security import CertificateAuthority, ca_pin
    from grid_portal.portal.tokens import TokenStore

    data_dir = data_dir_of(args)
    if not (data_dir / "ca" / "ca.pem").exists():
        raise GridError(
            f"no portal in {data_dir}: start one with `grid-portal serve` first, or pass the "
            "portal's --data-dir"
        )
    ca = CertificateAuthority.load_or_create(data_dir / "ca")
    return TokenStore(data_dir / LEDGER_FILE), ca_pin(ca.fingerprint())


def _book(args: argparse.Namespace) -> Any:
    from grid_portal.portal.ledger import EnrolmentBook

    return EnrolmentBook(portal_ledger(args))


def cmd_certs_list(args: argparse.Namespace) -> int:
    import json

    from rich.console import Console
    from rich.table import Table

    records = _book(args).list()
    if args.json:
        print(json.dumps([r.__dict__ for r in records], indent=2))
        return 0
    table = Table("name", "role", "serial", "enrolled", "state")
    for r in records:
        table.add_row(
            r.name,
            r.role,
            r.serial[:12],
            datetime.fromtimestamp(r.enrolled_at).strftime("%Y-%m-%d %H:%M"),
            "[red]revoked[/red]" if r.revoked else "valid",
        )
    Console().print(table)
    return 0


def cmd_certs_revoke(args: argparse.Namespace) -> int:
    book = _book(args)
    roles = [r.role for r in book.list() if r.name == args.name]
    if args.role:
        roles = [r for r in roles if r == args.role]
    if not roles:
        role_text = f" with role {args.role}" if args.role else ""
        raise UsageError(
            f"no certificate named {args.name!r}{role_text}: `grid-portal certs list` shows "
            "the names"
        )
    if len(roles) > 1:
        raise UsageError(
            f"{args.name!r} holds certificates as {' and '.join(roles)}: say which with "
            f"--role {roles[0]}"
        )
    book.revoke(args.name, roles[0])
    print(
        f"revoked {roles[0]} {args.name!r}: the portal refuses it from now on and closes its "
        "connections within a second"
    )
    return 0


def cmd_token_revoke(args: argparse.Namespace) -> int:
    store, _ = token_store(args)
    store.revoke(args.id)
    print(f"revoked join token {args.id}: it enrols nobody from now on")
    return 0
