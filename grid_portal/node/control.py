"""The volunteer agent's local control socket: ``grid-portal volunteer pause|resume|drain|status``.

Only the machine's owner (the user running the agent) may use it:

- a Unix socket, ``<runtime dir>/grid-portal/<name>.sock``, in a directory of mode 0700 that we
  own (refused if it is a link, or someone else's), the socket itself mode 0600;
- and where the OS tells us who connected (Linux ``SO_PEERCRED``), a peer with another uid is
  answered with a refusal, even if it got past the permissions (root can).

Protocol: one JSON object per line. The client sends one request and reads one reply, then
both close. Requests: ``{"op": "pause", "reason": str?}``, ``{"op": "resume"}``,
``{"op": "drain"}``, ``{"op": "status"}``, ``{"op": "attach", "state_dir": str, "pin": str,
"url": str, "share": float, "label": str}`` (an enrolment the CLI saved in the agent's state
dir: no key travels here), ``{"op": "detach", "portal": str}``. Replies: ``{"ok": true, "status": {...}}`` or
``{"ok": false, "error": "..."}``. Requests and replies are small; anything over 64 KiB is
refused.

No Dask imports: the CLI side runs in ``grid-portal volunteer status``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import socket
import stat
import struct
import sys
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from grid_portal.errors import GridError, UsageError

logger = logging.getLogger("grid_portal.volunteer")

OPS = ("pause", "resume", "drain", "status", "attach", "detach")
MAX_MESSAGE = 64 * 1024
MAX_SOCKET_PATH = 100  # sun_path is 104-108 bytes, depending on the OS

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]

START_ONE = "start one with `grid-portal volunteer PORTAL_URL --token ...`"
NONE_RUNNING = f"no volunteer runs on this machine for this user; {START_ONE}"


class NoVolunteer(GridError):
    """No running volunteer agent answers on this machine (for this user)."""


# -- where -----------------------------------------------------------------------------------
def control_dir() -> Path:
    """``$XDG_RUNTIME_DIR/grid-portal`` (per-user, on a tmpfs), else one in the temp dir."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isdir(runtime):
        return Path(runtime) / "grid-portal"
    if sys.platform == "darwin":
        import platformdirs

        return Path(platformdirs.user_runtime_dir("grid-portal"))
    uid = os.getuid() if hasattr(os, "getuid") else 0
    return Path(tempfile.gettempdir()) / f"grid-portal-{uid}"


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)[:63] or "node"


def socket_path(name: str, directory: Path | None = None) -> Path:
    path = (directory or control_dir()) / f"{_safe_name(name)}.sock"
    if len(str(path)) > MAX_SOCKET_PATH:
        raise UsageError(
            f"the control socket path {path} is too long for a Unix socket; set "
            "XDG_RUNTIME_DIR to a shorter directory"
        )
    return path


def ensure_private_dir(path: Path) -> Path:
    """Create ``path`` with mode 0700, or check that an existing one is ours and private."""
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=0o700, parents=True)
    info = os.lstat(path)
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
        raise UsageError(f"{path} is not a directory (a link?); remove it and try again")
    if hasattr(os, "getuid") and info.st_uid != os.getuid():
        raise UsageError(f"{path} belongs to another user; remove it or set XDG_RUNTIME_DIR")
    if stat.S_IMODE(info.st_mode) != 0o700:
        os.chmod(path, 0o700)
    return path


def peer_uid(sock: socket.socket) -> int | None:
    """The uid of the process at the other end of a Unix socket, where the OS says (Linux)."""
    option = getattr(socket, "SO_PEERCRED", None)
    if option is None:
        return None
    creds = sock.getsockopt(socket.SOL_SOCKET, option, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return uid


# -- the agent's side --------------------------------------------------------------------------
class ControlServer:
    """Serves control requests for one agent; ``handler`` turns a request into a status."""

    def __init__(self, name: str, handler: Handler, directory: Path | None = None) -> None:
        self.directory = directory or control_dir()
        self.path = socket_path(name, self.directory)
        self.handler = handler
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        ensure_private_dir(self.directory)
        if self.path.exists() or self.path.is_symlink():
            if _answers(self.path):
                raise UsageError(
                    f"another volunteer agent named {self.path.stem!r} already runs on this "
                    f"machine (its control socket is {self.path}); stop it first, or choose "
                    "another --name"
                )
            self.path.unlink()  # left behind by an agent that died
        self._server = await asyncio.start_unix_server(
            self._serve, path=str(self.path), limit=MAX_MESSAGE
        )
        os.chmod(self.path, 0o600)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            sock = writer.get_extra_info("socket")
            uid = peer_uid(sock) if sock is not None else None
            if uid is not None and hasattr(os, "getuid") and uid != os.getuid():
                logger.warning("refused a control request from uid %d", uid)
                await _reply(writer, {"ok": False, "error": "only this volunteer's owner may"})
                return
            try:
                line = await asyncio.wait_for(reader.readline(), 10)
                request = json.loads(line)
                if not isinstance(request, dict) or request.get("op") not in OPS:
                    raise ValueError
            except (ValueError, asyncio.LimitOverrunError, asyncio.TimeoutError):
                await _reply(
                    writer, {"ok": False, "error": f"send one JSON object with op in {OPS}"}
                )
                return
            try:
                status = await self.handler(request)
                reply = {"ok": True, "status": status}
            except GridError as exc:
                reply = {"ok": False, "error": str(exc)}
            await _reply(writer, reply)
        except (ConnectionError, OSError):
            pass  # the client went away
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


async def _reply(writer: asyncio.StreamWriter, reply: dict[str, Any]) -> None:
    writer.write((json.dumps(reply) + "\n").encode())
    await writer.drain()


def _answers(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(2)
        try:
            s.connect(str(path))
        except OSError:
            return False
    return True


# -- the CLI's side ----------------------------------------------------------------------------
def running_agents(directory: Path | None = None) -> list[str]:
    """Names of the volunteer agents of this user that answer on this machine."""
    directory = directory or control_dir()
    try:
        candidates = sorted(directory.glob("*.sock"))
    except OSError:
        return []
    return [p.stem for p in candidates if _answers(p)]


def find_agent(name: str | None, directory: Path | None = None) -> Path:
    """The socket of the agent called ``name``, or of the only one running."""
    directory = directory or control_dir()
    if name:
        path = socket_path(name, directory)
        if not path.exists():
            running = running_agents(directory)
            raise NoVolunteer(
                f"no volunteer named {name!r} runs on this machine for this user"
                + (f" (running: {', '.join(running)})" if running else "")
                + f"; {START_ONE}"
            )
        return path
    running = running_agents(directory)
    if not running:
        raise NoVolunteer(NONE_RUNNING)
    if len(running) > 1:
        raise UsageError(
            f"several volunteers run here ({', '.join(running)}); choose one with --name"
        )
    return socket_path(running[0], directory)


def request(path: Path, op: str, timeout: float = 30.0, **fields: Any) -> dict[str, Any]:
    """Send one request to the agent at ``path``; return its status or raise its error."""
    message = json.dumps({"op": op, **fields}).encode() + b"\n"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            s.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError):
            raise NoVolunteer(f"the volunteer agent at {path} is not running (any more)") from None
        except PermissionError:
            raise NoVolunteer(
                f"not allowed to use {path}: only the user who runs that volunteer may"
            ) from None
        s.sendall(message)
        data = b""
        while not data.endswith(b"\n") and len(data) < MAX_MESSAGE:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    try:
        reply = json.loads(data)
    except ValueError:
        raise GridError(f"the volunteer agent at {path} gave no answer") from None
    if not reply.get("ok"):
        raise GridError(f"the volunteer agent refused: {reply.get('error')}")
    return dict(reply.get("status") or {})


__all__ = [
    "NONE_RUNNING",
    "OPS",
    "ControlServer",
    "NoVolunteer",
    "control_dir",
    "ensure_private_dir",
    "find_agent",
    "peer_uid",
    "request",
    "running_agents",
    "socket_path",
]
