"""Connection files: where a client's portal is and the certificate it connects with.

A connection file is JSON: the scheduler's ``tls://`` address, the portal's HTTPS URL, and the
paths of the CA certificate and of this user's certificate and key. It is written with mode
0600 because whoever can read it can run code on the grid as its owner.

Which file ``Grid()`` uses is decided in ``grid_portal.which_portal``.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import platformdirs
import psutil

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
        from grid_portal.tls import tls_security

        return tls_security(self.ca, self.cert, self.key)

    def save(self, path: Path) -> None:
        from grid_portal.keys import write_private

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
    """Whether a process with this pid runs. A zombie (ended, not yet reaped by the process
    that started it, e.g. an embedded portal a Jupyter server stopped) does not: its
    connection file names a portal that no longer answers."""
    if not pid:
        return False
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True
