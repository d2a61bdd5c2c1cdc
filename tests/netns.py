"""Simulated hosts on one machine: Linux network namespaces joined by a veth pair.

The portal side keeps ``HOST_IP`` on the root namespace; a volunteer runs inside the namespace
at ``GUEST_IP`` (``ip netns exec NAME ...``). Cutting the guest's link end simulates a pulled
cable. Every namespace and link is removed again, also when a test fails. Traffic only ever goes
between these two addresses, which exist on this machine alone.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass


def _ip(*args: str, netns: str | None = None) -> None:
    command = ["ip", *args] if netns is None else ["ip", "netns", "exec", netns, "ip", *args]
    subprocess.run(command, check=True, capture_output=True, text=True)


def why_namespaces_unavailable() -> str | None:
    """None when we can make namespaces here; else the reason, for the skip message."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "network namespaces need root (CI runs as root)"
    if shutil.which("ip") is None:
        return "the `ip` command (Debian's iproute2) is not installed"
    probe = f"gpprobe{os.getpid()}"
    result = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if result.returncode != 0:
        return f"cannot create a network namespace here: {result.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


@dataclass
class GuestHost:
    name: str
    host_ip: str
    guest_ip: str
    host_link: str
    guest_link: str

    @property
    def prefix(self) -> tuple[str, ...]:
        """Put this before a command to run it on the guest host."""
        return ("ip", "netns", "exec", self.name)

    def cut(self) -> None:
        _ip("link", "set", self.guest_link, "down", netns=self.name)

    def restore(self) -> None:
        _ip("link", "set", self.guest_link, "up", netns=self.name)


@contextmanager
def guest_host() -> Iterator[GuestHost]:
    # A subnet per test process, so two test runs on one machine never share addresses.
    n = os.getpid() % 200 + 20
    tag = f"{os.getpid() % 100000}"
    host = GuestHost(
        name=f"gp{tag}",
        host_ip=f"10.200.{n}.1",
        guest_ip=f"10.200.{n}.2",
        host_link=f"gph{tag}",
        guest_link=f"gpg{tag}",
    )
    try:
        _ip("netns", "add", host.name)
        _ip("link", "add", host.host_link, "type", "veth", "peer", "name", host.guest_link)
        _ip("link", "set", host.guest_link, "netns", host.name)
        _ip("addr", "add", f"{host.host_ip}/24", "dev", host.host_link)
        _ip("link", "set", host.host_link, "up")
        _ip("addr", "add", f"{host.guest_ip}/24", "dev", host.guest_link, netns=host.name)
        _ip("link", "set", host.guest_link, "up", netns=host.name)
        _ip("link", "set", "lo", "up", netns=host.name)
        yield host
    finally:
        subprocess.run(["ip", "link", "del", host.host_link], capture_output=True)
        subprocess.run(["ip", "netns", "del", host.name], capture_output=True)
