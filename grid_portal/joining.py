"""The requester's side of a join request (no token): shared by ``grid-portal volunteer`` and
``grid-portal login``. The portal's side is ``grid_portal/portal/join_requests.py``.

The machine sends its CSR (its key never leaves), shows the pairing code, and polls until the
portal's admin approves (the reply is what a token enrolment gives: certificate, CA, scheduler
address), denies or lets the request expire (EnrolmentRefused, nothing enrolled).
"""

from __future__ import annotations

import time
from collections.abc import Callable
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
GIVE_UP_AFTER = 15 * 60.0  # the portal expires requests after 10 minutes anyway


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
    what = "this machine" if role == "node" else "you"
    say(
        f"Asked {portal_name or base} to let {what} join as {name!r}.\n"
        f"  pairing code: {format_code(mine)}\n"
        f"The portal's admin runs `grid-portal requests`, checks that request {reply['id']} "
        f"shows this same code, and approves it: `grid-portal requests approve {reply['id']}`.\n"
        "Waiting for the answer (the request expires in 10 minutes; Ctrl-C to give up)..."
    )
    deadline = time.monotonic() + GIVE_UP_AFTER
    failures = 0
    while time.monotonic() < deadline:
        try:
            answer = post_json(
                f"{base}/api/join/poll",
                ca_pem,
                {"secret": reply["secret"], "wait": POLL_WAIT},
                what="answer about the join request",
                timeout=POLL_WAIT + 15,
            )
        except ConnectionFailed:
            failures += 1  # a portal restart or a dropped packet: keep asking a while
            if failures > 10:
                raise
            time.sleep(2)
            continue
        failures = 0
        state = answer.get("state")
        if state == "enrolled":
            return answer
        if state == "denied":
            raise EnrolmentRefused(
                f"the portal's admin denied join request {reply['id']}; nothing was enrolled. "
                "Ask the admin (and check the pairing code together), or join with a token: "
                f"{TYPE_THE_URL}"
            )
        if state == "expired":
            raise EnrolmentRefused(
                f"join request {reply['id']} expired before the portal's admin approved it; "
                f"nothing was enrolled. Run this again to ask anew, or {TYPE_THE_URL}"
            )
    raise EnrolmentRefused(
        f"no answer to join request {reply['id']}; nothing was enrolled. {TYPE_THE_URL}"
    )


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
    from pathlib import Path

    from grid_portal.enrolment import fingerprint
    from grid_portal.keys import PIN_HEX_CHARS, make_key_and_csr
    from grid_portal.login import save_connection

    wanted = name or getpass.getuser()
    key_pem, csr_pem = make_key_and_csr(wanted)
    reply = request_join(base, ca_pem, csr_pem, wanted, "client", say=say, portal_name=portal_name)
    pin = fingerprint(ca_pem)[:PIN_HEX_CHARS]
    return save_connection(base, pin, ca_pem, key_pem, reply, Path(output) if output else None)
