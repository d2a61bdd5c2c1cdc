"""A volunteer joins without a token: by a join request the portal's admin approves.

The counterpart of ``agent.enrol`` (which spends a token): the same state-dir layout (one
folder per portal, named by the pin of its CA), so a machine that joined once by request
simply reuses its certificate on the next start, found on the LAN or by its URL.
"""

from __future__ import annotations

import json
import logging
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any

from grid_portal.enrolment import fingerprint, pinned_context, portal_base
from grid_portal.errors import UsageError
from grid_portal.joining import request_join
from grid_portal.keys import PIN_HEX_CHARS, make_key_and_csr
from grid_portal.node.agent import Credentials, _enrolled_as, save_credentials

logger = logging.getLogger("grid_portal.volunteer")


def saved_credentials(state_dir: Path, ca_pem: str) -> Credentials | None:
    saved = state_dir / fingerprint(ca_pem)[:PIN_HEX_CHARS] / "node.json"
    return Credentials(**json.loads(saved.read_text())) if saved.exists() else None


def enrol_by_request(
    portal_url: str,
    ca_pem: str,
    name: str,
    state_dir: Path,
    check: Callable[[str, ssl.SSLContext], Any] | None = None,
    name_given: bool = True,
    say: Callable[[str], None] = print,
    portal_name: str | None = None,
) -> Credentials:
    """Credentials for the portal whose CA is ``ca_pem`` (already checked by the caller: the
    announced fingerprint, or the pairing code the admin compares)."""
    base = portal_base(portal_url)
    pin = fingerprint(ca_pem)[:PIN_HEX_CHARS]
    node_dir = state_dir / pin
    creds = saved_credentials(state_dir, ca_pem)
    if creds is not None:
        if name_given and not _enrolled_as(creds, name):
            raise UsageError(
                f"this state dir ({state_dir}) already holds node {creds.name!r} of this "
                f"portal; leave out --name to run as {creds.name}, or give {name} a state dir "
                "of its own (--state-dir)"
            )
        logger.info("using this machine's earlier enrolment as %s", creds.name)
        if check is not None:
            check(base, pinned_context(ca_pem))
        return creds
    if check is not None:
        check(base, pinned_context(ca_pem))
    key_pem, csr_pem = make_key_and_csr(name)
    reply = request_join(base, ca_pem, csr_pem, name, "node", say=say, portal_name=portal_name)
    return save_credentials(node_dir, ca_pem, key_pem, reply, name)
