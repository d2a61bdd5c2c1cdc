"""A researcher joins a portal found on the LAN from the sidebar: one join request at a time.

The Jupyter server does what ``grid-portal login`` with no URL does (``grid_portal.joining``),
step by step so that the sidebar can show each step: check the announced CA again (never
trust an announcement alone), send the join request with a key made here (it never leaves
this server), show the pairing code, then poll the portal until its admin approves, denies or
lets the request expire. Once approved, the enrolment is saved where ``Grid()`` looks first
(``~/.config/grid-portal/connection.json``) and the server's Grid reconnects to the new portal
(``GridPortal.reconnect``), so the sidebar switches to it without a restart; kernels started
from then on use it too.

The state is the sidebar's progress only (``status()``); it is not grid state. The portal's
ledger is the source of truth about the request.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from grid_portal.errors import ConnectionFailed, EnrolmentRefused, GridError

if TYPE_CHECKING:
    from grid_portal.discovery import DiscoveredPortal
    from grid_portal.joining import ResearcherJoin
    from grid_portal.jupyter.service import GridPortal

PENDING, CONNECTED, REFUSED, FAILED = "pending", "connected", "refused", "failed"
MAX_POLL_FAILURES = 10  # a portal restart or a dropped packet: keep asking a while


@dataclass
class JoinStatus:
    """What the sidebar shows: the portal asked, the request's id and pairing code, and how
    it stands (``pending`` until the admin answers; ``connected``; ``refused`` or ``failed``
    with the message saying what to do instead)."""

    portal: str
    url: str
    name: str
    state: str
    request: str | None = None
    code: str | None = None
    expires_at: float | None = None
    message: str | None = None
    started_at: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def in_jupyter(message: str) -> str:
    """A requester's message, its way in by URL worded for JupyterLab rather than a shell
    that runs ``grid-portal volunteer`` (the messages come from the CLI's join code)."""
    from grid_portal.discovery import TYPE_THE_URL, TYPE_THE_URL_IN_JUPYTER

    return message.replace(TYPE_THE_URL, TYPE_THE_URL_IN_JUPYTER)


class LanJoins:
    """The server's one join request in flight (a second one replaces a finished one only)."""

    def __init__(self, portal: GridPortal) -> None:
        self.portal = portal
        self.status: JoinStatus | None = None
        self._task: asyncio.Task[None] | None = None

    def busy(self) -> bool:
        return self.status is not None and self.status.state == PENDING

    async def start(self, found: DiscoveredPortal, name: str | None = None) -> JoinStatus:
        """Check the portal, send the request; the answer is awaited in the background."""
        from grid_portal.discovery import format_code, verify
        from grid_portal.joining import ResearcherJoin

        wanted = name or getpass.getuser()

        def send() -> tuple[ResearcherJoin, Any]:
            ca_pem = verify(found)  # again, right before use: the check is what we rely on
            join = ResearcherJoin(found.url, ca_pem, wanted)
            return join, join.start()

        try:
            join, pending = await self.portal.offload(send)
        except (ConnectionFailed, EnrolmentRefused) as exc:  # checked again, and refused
            raise type(exc)(in_jupyter(str(exc))) from None
        self.status = JoinStatus(
            portal=found.name,
            url=found.url,
            name=wanted,
            state=PENDING,
            request=pending.id,
            code=format_code(pending.code),
            expires_at=pending.expires_at,
            message=(
                f"Asked {found.name} to let you join as {wanted!r}. The portal's admin "
                f"approves request {pending.id} after checking that it shows this same code."
            ),
            started_at=time.time(),
        )
        self._task = asyncio.ensure_future(self._wait(join, self.status))
        return self.status

    async def _wait(self, join: ResearcherJoin, status: JoinStatus) -> None:
        failures = 0
        while status.state == PENDING:
            try:
                path = await self.portal.offload(join.poll)
            except ConnectionFailed as exc:
                failures += 1
                if failures > MAX_POLL_FAILURES:
                    status.state, status.message = FAILED, in_jupyter(str(exc))
                    return
                await asyncio.sleep(2)  # the portal is away: ask again, not in a tight loop
                continue
            except GridError as exc:  # denied, expired, refused
                status.state, status.message = REFUSED, in_jupyter(str(exc))
                return
            except Exception:  # noqa: BLE001 - the sidebar must not wait for ever
                self.portal.log.exception("Grid Portal: the join request failed")
                status.state = FAILED
                status.message = "the join failed; the Jupyter server's log has the details"
                return
            failures = 0
            if path is not None:
                await self.portal.reconnect()
                status.state = CONNECTED
                status.message = (
                    f"Joined {status.portal} as {status.name!r}: this server now uses it "
                    f"(connection file {path}). Restart running kernels to use it there too."
                )

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
