"""The portals a volunteer serves, as its state dir keeps them.

The state dir holds one enrolment per portal, each in a directory named by the pin of that
portal's CA (``<state dir>/<pin>/``: ``node.json``, ``ca.pem``, ``node.pem``, ``node-key.pem``
0600; see ``agent.enrol``), and ``portals.json`` (0600): the set a volunteer started with no
portal on its command line serves, with each portal's share. ``grid-portal volunteer
attach``/``detach`` change that set, and a running agent's too.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from grid_portal.errors import UsageError

logger = logging.getLogger("grid_portal.volunteer")

PORTALS_FILE = "portals.json"
DEFAULT_SHARE = 1.0


@dataclass
class PortalEntry:
    """One portal of the set: where it is, its share, and which enrolment serves it."""

    url: str
    pin: str
    share: float = DEFAULT_SHARE

    @property
    def label(self) -> str:
        return portal_label(self.url)


def portal_label(url: str) -> str:
    """How the volunteer names a portal: its host and port (``grid.example.org:8788``)."""
    from grid_portal.enrolment import portal_base

    return urlsplit(portal_base(url)).netloc or url


def parse_share(value: Any, where: str = "--share") -> float:
    """A portal's share: a number above 0 (2 means twice the cores of a portal with 1)."""
    try:
        share = float(value)
    except (TypeError, ValueError):
        share = 0.0
    if not share > 0 or share != share or share == float("inf"):
        raise UsageError(
            f"{where} {value!r}: give a number above 0, like --share 2 (twice the CPU time of a "
            "portal with share 1)"
        )
    return share


def share_percents(portals: list[dict[str, Any]]) -> list[float | None]:
    """Each served portal's part of the machine in percent, as ``volunteer status`` and the
    sidebar show it (entries of the agent's status): its share of the shares of the portals
    served for themselves. None for a peer portal lent to (``--lend-to-peers``): it has no
    share, it gets what its home portal leaves."""
    own = [float(p.get("share") or 0) for p in portals if not p.get("lent_by")]
    total = sum(own) or 1.0
    return [None if p.get("lent_by") else 100 * float(p.get("share") or 0) / total for p in portals]


def load_portals(state_dir: Path) -> list[PortalEntry]:
    path = state_dir / PORTALS_FILE
    try:
        rows = json.loads(path.read_text())
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as exc:
        raise UsageError(
            f"cannot read {path} ({exc}); remove it and attach the portals again"
        ) from None
    return [PortalEntry(str(r["url"]), str(r["pin"]), float(r.get("share", 1.0))) for r in rows]


def save_portals(state_dir: Path, entries: list[PortalEntry]) -> None:
    from grid_portal.keys import write_private

    state_dir.mkdir(parents=True, exist_ok=True)
    write_private(state_dir / PORTALS_FILE, json.dumps([asdict(e) for e in entries], indent=2))


def remember(state_dir: Path, entry: PortalEntry) -> list[PortalEntry]:
    """Add ``entry`` to the saved set (replacing the same portal's earlier entry)."""
    entries = [e for e in load_portals(state_dir) if e.label != entry.label and e.pin != entry.pin]
    entries.append(entry)
    save_portals(state_dir, entries)
    return entries


def forget(state_dir: Path, which: str) -> PortalEntry | None:
    """Take a portal (URL or name) out of the saved set; its enrolment stays for later."""
    wanted = which.strip().rstrip("/")
    entries = load_portals(state_dir)
    keep = [e for e in entries if wanted not in (e.url, e.label, _safe_label(e.url))]
    save_portals(state_dir, keep)
    gone = [e for e in entries if e not in keep]
    return gone[0] if gone else None


def _safe_label(url: str) -> str | None:
    try:
        return portal_label(url)
    except UsageError:
        return None


def enrolment_dir(state_dir: Path, pin: str) -> Path:
    if not pin or any(c not in "0123456789abcdef" for c in pin):
        raise UsageError(f"{pin!r} does not name an enrolment (a hexadecimal CA pin)")
    return state_dir / pin


def load_enrolment(request: dict[str, Any]) -> Any:
    """The saved enrolment an attach request names (state dir and pin)."""
    from grid_portal.node.agent import Credentials

    node_dir = enrolment_dir(Path(str(request.get("state_dir") or "")), str(request.get("pin")))
    try:
        return Credentials(**json.loads((node_dir / "node.json").read_text()))
    except (OSError, ValueError, TypeError):
        raise UsageError(
            f"no enrolment in {node_dir}; attach with --token to enrol this machine first"
        ) from None


def ca_changed(url: str, ca_pem: str) -> str | None:
    """Whether the portal at ``url`` now shows another CA than the one this machine enrolled
    with: the message to show, or None (same CA, or the portal cannot be reached now)."""
    import urllib.error

    from grid_portal.enrolment import fingerprint, portal_base, request, unverified_context

    base = portal_base(url)
    try:
        theirs = request(f"{base}/api/ca", unverified_context(), timeout=5).decode()
    except (urllib.error.URLError, OSError, ValueError):
        return None
    if fingerprint(theirs) == fingerprint(ca_pem):
        return None
    return (
        f"the portal at {base} now has another CA than the one this machine enrolled with (a "
        "new portal at that address, or its CA was replaced); it is not served. Ask its admin "
        f"for a new token and run: grid-portal volunteer attach {base} --token NEW_TOKEN"
    )


__all__ = [
    "DEFAULT_SHARE",
    "PORTALS_FILE",
    "PortalEntry",
    "ca_changed",
    "enrolment_dir",
    "forget",
    "load_enrolment",
    "load_portals",
    "parse_share",
    "portal_label",
    "remember",
    "save_portals",
    "share_percents",
]
