"""``grid-portal login``: a researcher's connection to a portal on another machine.

The portal's admin makes a token for people (``grid-portal token create --for client``); the
researcher runs ``grid-portal login https://portal:8788 --token ...`` once. This machine makes
its own key (it never leaves), the portal signs a certificate naming the researcher, and a
connection file is written (mode 0600) where ``Grid()`` looks first. A copy is kept under the
portal's name (``--as NAME``, else its host; ``grid_portal.portals``), so logging in to a
second portal keeps the first: ``Grid(portals=[...])`` uses several.
"""

from __future__ import annotations

import getpass
from pathlib import Path

from grid_portal import portals
from grid_portal.connection import Connection, user_connection_path
from grid_portal.enrolment import enrol_with_token, fetch_pinned_ca, portal_base
from grid_portal.errors import EnrolmentRefused
from grid_portal.keys import keep_credentials, parse_token


def login(
    portal_url: str,
    token: str,
    name: str | None = None,
    output: Path | None = None,
    portal_name: str | None = None,
) -> Path:
    """Enrol as a researcher; returns the connection file's path. ``portal_name``: the name the
    connection is kept under among this person's portals (default: the portal's host)."""
    if portal_name is not None:
        portals.check_name(portal_name)  # a mistake is refused before anything is asked
    _, pin = parse_token(token)
    base = portal_base(portal_url)
    ca_pem = fetch_pinned_ca(base, pin)
    wanted = name or getpass.getuser()
    key_pem, reply = enrol_with_token(base, ca_pem, token, wanted, "log you in")
    if reply.get("role") == "node":
        raise EnrolmentRefused(
            "that token is for volunteer machines; ask the portal's admin for a researcher "
            "token (`grid-portal token create --for client`)"
        )
    return save_connection(base, pin, ca_pem, key_pem, reply, output, portal_name)


def save_connection(
    base: str,
    pin: str,
    ca_pem: str,
    key_pem: str,
    reply: dict,
    output: Path | None = None,
    portal_name: str | None = None,
) -> Path:
    """Write a person's enrolment (the portal's ``reply``: certificate, name, role, scheduler)
    where ``Grid()`` looks first: the CA, certificate and key (0600) in a folder named by the
    CA's pin, and the connection file; unless ``output`` says where, also kept under the
    portal's name among this person's portals. Returns the connection file's path."""
    keep = output is None
    output = output or user_connection_path()
    folder = output.parent / "certs" / pin
    ca, cert, key = keep_credentials(folder, "client", ca_pem, reply["cert"], key_pem)
    connection = Connection(
        scheduler=reply["scheduler"],
        http=base,
        ca=str(ca),
        cert=str(cert),
        key=str(key),
        name=reply["name"],
        role=reply.get("role", "client"),
    )
    connection.save(output)
    if keep:
        portals.save(connection, portal_name or portals.name_for(base))
    return output
