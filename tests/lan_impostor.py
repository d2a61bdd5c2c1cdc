"""A second announcer on the LAN for discovery tests: it claims a real portal's enrolment
endpoint under a CA fingerprint of its own, as an impostor (or a stale announcement) would.
Run it in the namespace and on the address the portal announces on."""

from __future__ import annotations

import hashlib
import sys
import textwrap

NAME = "Impostor"
WRONG_FINGERPRINT = hashlib.sha256(b"not this portal's CA").hexdigest()

_SCRIPT = """
import asyncio, socket, sys
from zeroconf import IPVersion, ServiceInfo
from zeroconf.asyncio import AsyncZeroconf

async def main():
    ip, port, fp, name = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    info = ServiceInfo(
        "_gridportal._tcp.local.", f"{name}._gridportal._tcp.local.",
        addresses=[socket.inet_aton(ip)], port=port, server="impostor.local.",
        properties={"name": name, "version": "0", "enrol": f"https://{ip}:{port}",
                    "status": f"https://{ip}:{port}/status", "ca": fp},
    )
    zc = AsyncZeroconf(interfaces=[ip], ip_version=IPVersion.V4Only)
    await zc.async_register_service(info)
    print("announced", flush=True)
    await asyncio.sleep(600)

asyncio.run(main())
"""


def impostor_command(ip: str, port: int | str) -> list[str]:
    """The command that announces the impostor at ``ip``:``port`` (a real portal's endpoint)
    until killed; it prints ``announced`` once it is on the air."""
    script = textwrap.dedent(_SCRIPT)
    return [sys.executable, "-c", script, ip, str(port), WRONG_FINGERPRINT, NAME]
