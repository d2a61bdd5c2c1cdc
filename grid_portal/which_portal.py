"""Which portal a client connects to: the order in which ``Grid()`` looks for a connection.

The first that exists wins:

1. the ``address`` argument: a connection file's path;
2. ``GRID_PORTAL_ADDRESS``: the same;
3. ``~/.config/grid-portal/connection.json`` (``grid-portal login`` writes it);
4. under JupyterHub (``JUPYTERHUB_API_TOKEN`` and ``GRID_PORTAL_URL`` set): this Hub user's
   connection to the class portal, enrolling first (``grid_portal.hubconnect``);
5. the connection file of a ``grid-portal serve`` on this machine, if that portal is alive;
6. the embedded portal's file in the runtime dir, if that portal is alive;
7. otherwise (None) the caller starts the embedded portal (loopback only, plus one local
   volunteer).

This is apart from ``grid_portal.connection`` because the Hub step needs ``hubconnect``,
which itself reads and writes connection files: in one module the two would import each other.
"""

from __future__ import annotations

import os
from pathlib import Path

from grid_portal.connection import (
    CONNECTION_FILE,
    ENV_ADDRESS,
    Connection,
    default_data_dir,
    embedded_connection_path,
    pid_alive,
    user_connection_path,
)
from grid_portal.errors import ConnectionFailed
from grid_portal.hubconnect import connect_via_hub


def find_connection(address: str | os.PathLike[str] | None = None) -> Connection | None:
    """The configured connection, or None when the embedded portal should be used."""
    explicit = address if address is not None else os.environ.get(ENV_ADDRESS)
    if explicit:
        text = str(explicit)
        if text.startswith(("tls://", "tcp://", "https://", "http://")):
            raise ConnectionFailed(
                f"{text!r} is an address, but connecting needs this user's certificate: pass "
                "the connection file that `grid-portal serve` (in its data dir) or "
                "`grid-portal login` wrote"
            )
        return Connection.load(Path(text).expanduser())
    user = user_connection_path()
    if user.exists():
        return Connection.load(user)
    # In a JupyterHub user's server, enrol with the class portal as the Hub user.
    hub = connect_via_hub()
    if hub is not None:
        return hub
    local = default_data_dir() / CONNECTION_FILE
    if local.exists():
        conn = Connection.load(local)
        if pid_alive(conn.pid):
            return conn
    embedded = embedded_connection_path()
    if embedded.exists():
        conn = Connection.load(embedded)
        if pid_alive(conn.pid):
            return conn
    return None
