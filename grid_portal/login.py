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
import os
from pathlib import Path

from grid_portal import portals
from grid_portal.connection import Connection, user_connection_path
from grid_portal.enrolment import fetch_pinned_ca, portal_base, post_json
from grid_portal.envcheck import local_versions
from grid_portal.errors import EnrolmentRefused
from grid_portal.keys import make_key_and_csr, parse_token, write_private


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
    key_pem, csr_pem = make_key_and_csr(wanted)
    reply = post_json(
        f"{base}/api/enrol",
        ca_pem,
        {"token": token, "csr": csr_pem, "name": wanted, "versions": local_versions()},
        what="log you in",
    )
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
    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    (folder / "ca.pem").write_text(ca_pem)
    (folder / "client.pem").write_text(reply["cert"])
    write_private(folder / "client-key.pem", key_pem)
    connection = Connection(
        scheduler=reply["scheduler"],
        http=base,
        ca=str(folder / "ca.pem"),
        cert=str(folder / "client.pem"),
        key=str(folder / "client-key.pem"),
        name=reply["name"],
        role=reply.get("role", "client"),
    )
    connection.save(output)
    if keep:
        portals.save(connection, portal_name or portals.name_for(base))
    return output
