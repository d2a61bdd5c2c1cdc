"""The portals this person logged in to, each kept under its own name.

``grid-portal login URL --token T [--as NAME]`` writes the connection to
``~/.config/grid-portal/portals/NAME.json`` (and, as before, to ``connection.json``, which a
plain ``Grid()`` uses). Logging in to another portal adds a file beside it, so every portal's
connection is kept: ``Grid(portals=["school", "uni"])`` (or ``portals="all"``, or
``GRID_PORTAL_PORTALS``) then uses several at once (``grid_portal.federated``).

A name is the portal's host (``portal.school.example``; with ``-PORT`` when the port is not the
usual 8788) unless ``--as`` gives one. Names are plain file names: letters, digits, ``.``,
``-`` and ``_``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from urllib.parse import urlsplit

from grid_portal.connection import Connection, user_connection_path
from grid_portal.errors import UsageError

ENV_PORTALS = "GRID_PORTAL_PORTALS"  # "all", or portal names (or connection files), comma-separated
ALL = "all"
DEFAULT_HTTP_PORT = 8788
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")


def portals_dir() -> Path:
    return user_connection_path().parent / "portals"


def name_for(base_url: str) -> str:
    """The name a portal is saved under when ``--as`` gives none: its host (and port)."""
    parts = urlsplit(base_url)
    host = (parts.hostname or "portal").strip("[]").replace(":", "-")
    name = host if parts.port in (None, DEFAULT_HTTP_PORT) else f"{host}-{parts.port}"
    return re.sub(r"[^A-Za-z0-9._-]", "-", name)[:63]


def check_name(name: str) -> str:
    if not _NAME.match(name) or name == ALL:
        raise UsageError(
            f"{name!r} cannot name a portal: use letters, digits, '.', '-' and '_' (at most 63), "
            f"and not {ALL!r}"
        )
    return name


def save(connection: Connection, name: str) -> Path:
    """Keep ``connection`` under ``name`` (0600, like every connection file)."""
    path = portals_dir() / f"{check_name(name)}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)
    connection.save(path)
    return path


def saved() -> dict[str, Path]:
    """Every saved portal, by name, in name order."""
    folder = portals_dir()
    if not folder.is_dir():
        return {}
    return {p.stem: p for p in sorted(folder.glob("*.json"))}


def choose(portals: str | Sequence[str] | Mapping[str, str]) -> list[tuple[str, Path]]:
    """(name, connection file) for each portal asked for: ``"all"`` (every saved portal), a
    saved name, a connection file's path (named by its file name), or a mapping of names to
    either. Mistakes are one UsageError that lists what is saved."""
    if isinstance(portals, Mapping):
        return [(check_name(str(n)), choose([str(p)])[0][1]) for n, p in portals.items()]
    if isinstance(portals, str):
        portals = [p.strip() for p in portals.split(",") if p.strip()]
    known = saved()
    chosen: list[tuple[str, Path]] = []
    for entry in portals:
        entry = str(entry)
        if entry == ALL:
            chosen.extend(known.items())
        elif entry in known:
            chosen.append((entry, known[entry]))
        elif os.sep in entry or entry.endswith(".json"):
            path = Path(entry).expanduser()
            taken = sum(1 for n, _ in chosen if n == path.stem or n.startswith(path.stem + "-"))
            chosen.append((f"{path.stem}-{taken + 1}" if taken else path.stem, path))
        else:
            listed = ", ".join(known) or "none yet"
            raise UsageError(
                f"no portal is saved as {entry!r} (saved: {listed}); log in to it first: "
                f"grid-portal login URL --token TOKEN --as {entry}"
            )
    unique: dict[str, Path] = {}
    for name, path in chosen:
        unique.setdefault(name, path)
    if not unique:
        raise UsageError(
            "no portals to use: log in to each one first (grid-portal login URL --token TOKEN)"
        )
    return list(unique.items())
