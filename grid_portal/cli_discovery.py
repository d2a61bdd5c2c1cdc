"""``grid-portal discover``, ``grid-portal requests``, and joining with no URL or no token.

- ``discover [--json] [--timeout S]``: the portals announced on this LAN, each checked (its
  enrolment endpoint's CA must hash to the announced fingerprint) with its nodes online.
- ``requests [--json] [--all]``, ``requests approve ID``, ``requests deny ID``: the portal's
  admin answers join requests (file-based on the data dir, like ``grid-portal token``).
- ``volunteer`` / ``login`` with no URL: browse, choose, check, then join (with ``--token``
  as before, or by a join request the admin approves after comparing the pairing code).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from grid_portal.errors import GridError, UsageError


# -- options other commands get -------------------------------------------------------------
def add_serve_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--no-announce",
        action="store_true",
        help="do not announce this portal on the LAN (DNS-SD); volunteers then type its URL",
    )
    p.add_argument(
        "--announce-name", help="the name announced on the LAN (default: Grid Portal on HOST)"
    )


def serve_companions(args: argparse.Namespace, config: Any) -> None:
    """``grid-portal serve`` announces itself unless --no-announce (never when --embedded)."""
    if getattr(args, "embedded", False) or getattr(args, "no_announce", False):
        return
    from grid_portal.portal.announce import announcer

    config.companions.append(announcer(config.host, args.announce_name))


def add_join_options(
    p: argparse.ArgumentParser, portal_action: Any = "store", portal_help: str = ""
) -> None:
    """For ``volunteer`` and ``login``: choosing among the portals found on the LAN.
    (``volunteer`` passes an action that also takes ``--portal https://...``: cli_volunteer.)"""
    g = p.add_argument_group("with no PORTAL_URL: portals found on the LAN")
    g.add_argument(
        "--portal",
        dest="portal_choice",
        action=portal_action,
        metavar="NAME",
        help="join the discovered portal of this name (as `grid-portal discover` lists it)"
        + portal_help,
    )
    g.add_argument("--yes", action="store_true", help="join the one portal found without asking")
    g.add_argument(
        "--discover-timeout",
        type=float,
        default=None,
        metavar="S",
        help="how long to look for portals (default 3 s)",
    )


# -- choosing a portal ----------------------------------------------------------------------
def _interactive() -> bool:
    return sys.stdin.isatty() and sys.stdout.isatty()


def _listing(portals: list[Any]) -> str:
    lines = []
    for p in portals:
        nodes = "" if p.nodes_online is None else f", {p.nodes_online} nodes online"
        problem = f" [{p.problem}]" if p.problem else ""
        lines.append(f"  {p.name}  ({p.url}{nodes}){problem}")
    return "\n".join(lines)


def choose_portal(args: argparse.Namespace, command: str) -> tuple[Any, str]:
    """Browse, pick one portal, check it: (DiscoveredPortal, its CA certificate PEM)."""
    from grid_portal.discovery import DEFAULT_TIMEOUT, discover, nothing_found_message, verify

    timeout = args.discover_timeout or DEFAULT_TIMEOUT
    print(f"Looking for Grid Portals on this network ({timeout:g} s)...", flush=True)
    found = discover(timeout=timeout)
    if not found:
        raise GridError(nothing_found_message(timeout))
    if args.portal_choice:
        wanted = args.portal_choice.strip().lower()
        matches = [p for p in found if wanted in (p.name.lower(), p.instance.lower())]
        if not matches:
            raise UsageError(
                f"no portal named {args.portal_choice!r} was found; found:\n{_listing(found)}"
            )
        if len(matches) > 1:
            raise UsageError(
                f"{len(matches)} portals are named {args.portal_choice!r}: they cannot be told "
                f"apart by name, so type the URL of the one you mean:\n{_listing(matches)}"
            )
        chosen = matches[0]
    else:
        usable = [p for p in found if p.verified]
        if not usable:
            # Every announcement failed its check: say why, with the typed-URL way.
            verify(found[0])  # raises the full message for the first one
            raise GridError(nothing_found_message(timeout))  # pragma: no cover
        skipped = [p for p in found if not p.verified]
        if skipped:
            print(f"Not trusted (left out):\n{_listing(skipped)}", flush=True)
        if len(usable) == 1 and args.yes:
            chosen = usable[0]
        elif _interactive():
            chosen = _prompt(usable)
        elif len(usable) == 1:
            raise UsageError(
                f"found one portal:\n{_listing(usable)}\nadd --yes to join it, or "
                f"--portal {json.dumps(usable[0].name)}"
            )
        else:
            raise UsageError(
                f"found {len(usable)} portals:\n{_listing(usable)}\nsay which: "
                f'grid-portal {command} --portal "NAME" (or type its URL: grid-portal '
                f"{command} https://...)"
            )
    ca_pem = verify(chosen)  # again, right before use: the check is what we rely on
    print(f"Found {chosen.name} at {chosen.url} (CA checked).", flush=True)
    return chosen, ca_pem


def _prompt(portals: list[Any]) -> Any:
    print("Portals on this network:")
    for i, p in enumerate(portals, 1):
        nodes = "?" if p.nodes_online is None else str(p.nodes_online)
        print(f"  {i}. {p.name}  {p.url}  ({nodes} nodes online)")
    while True:
        default = " [1]" if len(portals) == 1 else ""
        answer = input(f"Join which one (1-{len(portals)}){default}? ").strip()
        if not answer and len(portals) == 1:
            return portals[0]
        if answer.isdigit() and 1 <= int(answer) <= len(portals):
            return portals[int(answer) - 1]
        print(f"  type a number from 1 to {len(portals)}, or Ctrl-C")


def _first_contact_ca(url: str) -> str:
    """A typed URL and no token: nothing to pin the CA to; the pairing code is the check."""
    from grid_portal.enrolment import portal_base, reason, request, unverified_context
    from grid_portal.errors import ConnectionFailed

    base = portal_base(url)
    try:
        return request(f"{base}/api/ca", unverified_context()).decode()
    except OSError as exc:
        raise ConnectionFailed(
            f"cannot reach the portal at {base} ({reason(exc)}); check the URL that "
            "`grid-portal serve` printed, and that the portal is running"
        ) from None


def volunteer_credentials(
    args: argparse.Namespace,
    settings: dict[str, Any],
    name: str,
    state_dir: Path,
    check: Any,
    name_given: bool,
) -> Any:
    """What ``agent.enrol`` gives, for every way in: URL or LAN, token or join request.
    Sets ``settings["portal"]`` to the URL used."""
    from grid_portal.node.agent import enrol
    from grid_portal.node.lan_join import enrol_by_request

    chosen = None
    if settings["portal"]:
        ca_pem = None
    else:
        chosen, ca_pem = choose_portal(args, "volunteer")
        settings["portal"] = chosen.url
    if settings["token"]:
        # The token's pin is checked against the CA too (agent.enrol), as always.
        return enrol(
            settings["portal"],
            settings["token"],
            name,
            state_dir,
            check=check,
            name_given=name_given,
        )
    if ca_pem is None:
        ca_pem = _first_contact_ca(settings["portal"])
    return enrol_by_request(
        settings["portal"],
        ca_pem,
        name,
        state_dir,
        check=check,
        name_given=name_given,
        say=lambda text: print(text, flush=True),
        portal_name=chosen.name if chosen else None,
    )


def cmd_login_lan(args: argparse.Namespace) -> int:
    """``grid-portal login`` with no URL or no token."""
    from grid_portal.enrolment import portal_base
    from grid_portal.joining import login_by_request

    if args.portal:
        base, ca_pem, label = portal_base(args.portal), _first_contact_ca(args.portal), None
    else:
        chosen, ca_pem = choose_portal(args, "login")
        base, label = chosen.url, chosen.name
    path = login_by_request(
        base,
        ca_pem,
        name=args.name,
        output=args.output,
        say=lambda text: print(text, flush=True),
        portal_name=label,
    )
    print(f"Logged in. Connection file: {path}")
    print("Grid() and grid-portal commands now use this portal.")
    return 0


# -- grid-portal discover / requests ---------------------------------------------------------
def register(sub: Any) -> None:
    p = sub.add_parser(
        "discover",
        help="list the Grid Portals announced on this network",
        description="Browse the LAN for portals (DNS-SD, _gridportal._tcp), check each one "
        "(the CA its enrolment endpoint serves must match the announced fingerprint) and "
        "list them with their nodes online.",
    )
    p.add_argument("--json", action="store_true", help="records as JSON")
    p.add_argument("--timeout", type=float, default=None, metavar="S", help="default 3 s")
    p.set_defaults(func=cmd_discover)

    p = sub.add_parser(
        "requests",
        help="join requests waiting for the admin; `requests approve ID` / `deny ID`",
        description="Machines and people that asked to join without a token. Approve one "
        "only when the pairing code it shows is the code listed here. Run on the portal's "
        "machine, against its data dir.",
    )
    p.add_argument("action", nargs="?", choices=["approve", "deny"], help="answer one")
    p.add_argument("id", nargs="?", help="the request's id, as listed")
    p.add_argument("--all", action="store_true", help="also requests answered or expired")
    p.add_argument("--json", action="store_true", help="records as JSON")
    p.add_argument("--data-dir", type=Path, help="the portal's data dir")
    p.set_defaults(func=cmd_requests)


def cmd_discover(args: argparse.Namespace) -> int:
    from grid_portal.discovery import DEFAULT_TIMEOUT, discover, nothing_found_message

    timeout = args.timeout or DEFAULT_TIMEOUT
    found = discover(timeout=timeout)
    if args.json:
        print(json.dumps([p.to_dict() for p in found], indent=2))
        return 0
    if not found:
        print(nothing_found_message(timeout))
        return 1
    from rich.console import Console
    from rich.table import Table

    table = Table("name", "nodes online", "address", "version", "checked")
    for p in found:
        table.add_row(
            p.name,
            "?" if p.nodes_online is None else str(p.nodes_online),
            p.url,
            p.version,
            "yes" if p.verified else f"NO: {p.problem}",
        )
    Console().print(table)
    return 0


def _requests_store(args: argparse.Namespace) -> Any:
    from grid_portal.cli_certs import portal_ledger
    from grid_portal.portal.join_requests import JoinRequests

    return JoinRequests(portal_ledger(args))


def cmd_requests(args: argparse.Namespace) -> int:
    from grid_portal.discovery import format_code

    store = _requests_store(args)
    if args.action:
        if not args.id:
            raise UsageError(f"say which: grid-portal requests {args.action} ID")
        record = store.decide(args.id, approve=args.action == "approve")
        if args.action == "approve":
            print(
                f"approved {record.id}: {record.name} joins as "
                f"{'a volunteer' if record.role == 'node' else 'a researcher'} as soon as it "
                "asks again (within seconds)"
            )
        else:
            print(f"denied {record.id}: nothing is enrolled")
        return 0
    records = store.list(everything=args.all)
    if args.json:
        print(json.dumps([r.to_dict() for r in records], indent=2))
        return 0
    if not records:
        print("no join requests waiting")
        return 0
    from datetime import datetime

    from rich.console import Console
    from rich.table import Table

    table = Table("id", "pairing code", "name", "as", "from", "asked", "state")
    for r in records:
        table.add_row(
            r.id,
            format_code(r.code),
            r.name,
            "volunteer" if r.role == "node" else "researcher",
            r.address,
            datetime.fromtimestamp(r.created_at).strftime("%H:%M:%S"),
            r.current_state(),
        )
    Console().print(table)
    print(
        "Approve only a request whose pairing code is the one shown on the machine in front "
        "of you: grid-portal requests approve ID (or deny ID)."
    )
    return 0
