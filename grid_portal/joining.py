"""The requester's side of a join request (no token): shared by ``grid-portal volunteer`` and
``grid-portal login``. The portal's side is ``grid_portal/portal/join_requests.py``.

The machine sends its CSR (its key never leaves), shows the pairing code, and polls until the
portal's admin approves (the reply is what a token enrolment gives: certificate, CA, scheduler
address), denies or lets the request expire (EnrolmentRefused, nothing enrolled).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from grid_portal.discovery import (
    TYPE_THE_URL,
    csr_public_key_der,
    format_code,
    pairing_code,
)
from grid_portal.enrolment import post_json
from grid_portal.envcheck import local_versions
from grid_portal.errors import ConnectionFailed, EnrolmentRefused

POLL_WAIT = 15.0  # seconds the portal holds one poll open
GIVE_UP_AFTER = 15 * 60.0  # at least; the portal expires requests (ten minutes unless configured)


@dataclass
class PendingJoin:
    """A join request the portal took: what the requester shows and what it polls with."""

    base: str
    ca_pem: str
    id: str
    code: str  # the pairing code both sides show
    secret: str = field(repr=False)  # polls with it; never shown or logged
    expires_at: float = 0.0


def send_join_request(base: str, ca_pem: str, csr_pem: str, name: str, role: str) -> PendingJoin:
    """Send a join request; the portal's pairing code must be the one this side computes."""
    mine = pairing_code(ca_pem, csr_public_key_der(csr_pem))
    reply = post_json(
        f"{base}/api/join",
        ca_pem,
        {"csr": csr_pem, "name": name, "role": role, "versions": local_versions()},
        what="take a join request",
    )
    if reply.get("code") != mine:
        # The portal computed another code from the same CA and CSR: not the portal we
        # checked, or a broken one. Stop here; the admin would see a code we do not show.
        raise EnrolmentRefused(
            f"the portal at {base} answered with a pairing code that does not match this "
            f"machine's; nothing was enrolled. {TYPE_THE_URL}"
        )
    return PendingJoin(
        base,
        ca_pem,
        str(reply["id"]),
        mine,
        str(reply["secret"]),
        float(reply.get("expires_at") or 0.0),
    )


def poll_join(pending: PendingJoin, wait: float = POLL_WAIT) -> dict[str, Any] | None:
    """One poll (held open up to ``wait`` s): the enrolment reply once approved, None while
    pending; EnrolmentRefused once denied or expired, each with the way in by URL."""
    answer = post_json(
        f"{pending.base}/api/join/poll",
        pending.ca_pem,
        {"secret": pending.secret, "wait": wait},
        what="answer about the join request",
        timeout=wait + 15,
    )
    state = answer.get("state")
    if state == "enrolled":
        return answer
    if state == "denied":
        raise EnrolmentRefused(
            f"the portal's admin denied join request {pending.id}; nothing was enrolled. "
            "Ask the admin (and check the pairing code together), or join with a token: "
            f"{TYPE_THE_URL}"
        )
    if state == "expired":
        raise EnrolmentRefused(
            f"join request {pending.id} expired before the portal's admin approved it; "
            f"nothing was enrolled. Ask anew, or {TYPE_THE_URL}"
        )
    return None


def request_join(
    base: str,
    ca_pem: str,
    csr_pem: str,
    name: str,
    role: str,
    say: Callable[[str], None] = print,
    portal_name: str | None = None,
) -> dict[str, Any]:
    """Send a join request and wait for the admin's answer; returns the enrolment reply."""
    pending = send_join_request(base, ca_pem, csr_pem, name, role)
    what = "this machine" if role == "node" else "you"
    say(
        f"Asked {portal_name or base} to let {what} join as {name!r}.\n"
        f"  pairing code: {format_code(pending.code)}\n"
        f"The portal's admin runs `grid-portal requests`, checks that request {pending.id} "
        f"shows this same code, and approves it: `grid-portal requests approve {pending.id}`.\n"
        f"Waiting for the answer (the request expires in {_expires_in(pending)}; Ctrl-C to give "
        "up)..."
    )
    left = pending.expires_at - time.time()
    deadline = time.monotonic() + max(GIVE_UP_AFTER, min(left, 7 * 86400.0) + 5 * 60.0)
    failures = 0
    while time.monotonic() < deadline:
        try:
            answer = poll_join(pending)
        except ConnectionFailed:
            failures += 1  # a portal restart or a dropped packet: keep asking a while
            if failures > 10:
                raise
            time.sleep(2)
            continue
        failures = 0
        if answer is not None:
            return answer
    raise EnrolmentRefused(
        f"no answer to join request {pending.id}; nothing was enrolled. {TYPE_THE_URL}"
    )


def _expires_in(pending: PendingJoin) -> str:
    """When the portal lets the request expire, in minutes, from its ``expires_at`` (the
    portal's setting); an older portal's reply, or clocks far apart, give the usual ten."""
    left = pending.expires_at - time.time()
    minutes = max(1, round(left / 60)) if 0 < left <= 7 * 86400 else 10
    return f"{minutes} minute{'s' if minutes != 1 else ''}"


class ResearcherJoin:
    """A researcher's join request driven step by step (the Jupyter server's sidebar flow):
    ``start`` sends it, ``poll`` asks once, and the approved enrolment is saved where
    ``Grid()`` looks first (``login.save_connection``). The key stays in memory until then."""

    def __init__(self, base: str, ca_pem: str, name: str, output: Any = None) -> None:
        from grid_portal.keys import make_key_and_csr

        self.base, self.ca_pem, self.name, self.output = base, ca_pem, name, output
        self._key_pem, self.csr_pem = make_key_and_csr(name)
        self.pending: PendingJoin | None = None

    def start(self) -> PendingJoin:
        self.pending = send_join_request(self.base, self.ca_pem, self.csr_pem, self.name, "client")
        return self.pending

    def poll(self, wait: float = POLL_WAIT) -> Any:
        """None while pending; the saved connection file's path once enrolled."""
        assert self.pending is not None, "start() first"
        reply = poll_join(self.pending, wait)
        return None if reply is None else self.save(reply)

    def save(self, reply: dict[str, Any]) -> Any:
        from pathlib import Path

        from grid_portal.enrolment import fingerprint
        from grid_portal.keys import PIN_HEX_CHARS
        from grid_portal.login import save_connection

        pin = fingerprint(self.ca_pem)[:PIN_HEX_CHARS]
        output = Path(self.output) if self.output else None
        return save_connection(self.base, pin, self.ca_pem, self._key_pem, reply, output)


def login_by_request(
    base: str,
    ca_pem: str,
    name: str | None = None,
    output: Any = None,
    say: Callable[[str], None] = print,
    portal_name: str | None = None,
) -> Any:
    """``grid-portal login`` without a token: a researcher's join request; writes the same
    connection file a token login writes and returns its path."""
    import getpass

    join = ResearcherJoin(base, ca_pem, name or getpass.getuser(), output)
    reply = request_join(
        base, ca_pem, join.csr_pem, join.name, "client", say=say, portal_name=portal_name
    )
    return join.save(reply)
