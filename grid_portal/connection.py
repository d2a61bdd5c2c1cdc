"""How a client finds and authenticates to a portal: connection files.

A connection file is JSON: the scheduler's ``tls://`` address, the portal's HTTPS URL, and the
paths of the CA certificate and of this user's certificate and key. It is written with mode
0600 because whoever can read it can run code on the grid as its owner.

Where ``Grid()`` looks, in order (the first that exists wins):
1. the ``address`` argument: a connection file's path;
2. ``GRID_PORTAL_ADDRESS``: the same;
3. ``~/.config/grid-portal/connection.json`` (``grid-portal login`` writes it);
3b. under JupyterHub (``JUPYTERHUB_API_TOKEN`` and ``GRID_PORTAL_URL`` set): this Hub user's
   connection to the class portal, enrolling first (``grid_portal.hubconnect``);
4. the embedded portal's file in the runtime dir, if that portal is alive;
6. otherwise the embedded portal is started (loopback only, plus one local volunteer).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import platformdirs

from grid_portal.errors import ConnectionFailed

ENV_ADDRESS = "GRID_PORTAL_ADDRESS"
ENV_DATA_DIR = "GRID_PORTAL_DATA_DIR"
CONNECTION_FILE = "connection.json"
PORTAL_FILE = "portal.json"


def default_data_dir() -> Path:
    """Where ``grid-portal serve`` keeps its CA, ledger and connection file."""
    env = os.environ.get(ENV_DATA_DIR)
    return Path(env) if env else Path(platformdirs.user_data_dir("grid-portal")) / "portal"


def embedded_data_dir() -> Path:
    return Path(platformdirs.user_data_dir("grid-portal")) / "embedded"


def runtime_dir() -> Path:
    """The Jupyter runtime dir when Jupyter is installed (so kernels and the server agree)."""
    try:
        from jupyter_core.paths import jupyter_runtime_dir

        return Path(jupyter_runtime_dir())
    except ImportError:
        return Path(platformdirs.user_runtime_dir("grid-portal"))


def embedded_connection_path() -> Path:
    return runtime_dir() / "grid-portal-embedded.json"


def user_connection_path() -> Path:
    return Path(platformdirs.user_config_dir("grid-portal")) / CONNECTION_FILE


@dataclass
class Connection:
    scheduler: str
    http: str
    ca: str
    cert: str
    key: str
    name: str = ""
    role: str = "client"
    pid: int | None = None  # of the portal process, for embedded portals
    # The file this connection was read from (not saved in it): where a renewed certificate
    # is recorded (grid_portal/renewal.py).
    source: str | None = field(default=None, compare=False, repr=False)

    def security(self) -> Any:
        from grid_portal.portal.security import tls_security

        return tls_security(self.ca, self.cert, self.key)

    def save(self, path: Path) -> None:
        from grid_portal.portal.security import write_private

        data = asdict(self)
        data.pop("source", None)
        write_private(path, json.dumps(data, indent=2))

    @classmethod
    def load(cls, path: Path) -> Connection:
        try:
            data = json.loads(Path(path).read_text())
            fields = {k: data[k] for k in data if k in cls.__dataclass_fields__ and k != "source"}
            return cls(**fields, source=str(path))
        except FileNotFoundError:
            raise ConnectionFailed(
                f"no connection file at {path}: start a portal with `grid-portal serve`, "
                "or point GRID_PORTAL_ADDRESS at a connection file"
            ) from None
        except (ValueError, TypeError) as exc:
            raise ConnectionFailed(
                f"the connection file {path} is not valid ({exc}); remove it and reconnect"
            ) from None


def pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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
    from grid_portal.hubconnect import connect_via_hub

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
