"""A borrowing peer portal counts as one user here: its usage, its priority and its quota.

Flocking (portal/peering.py) lends our idle volunteers to peer portal A. A's work never enters
our scheduler (the volunteers run it on workers of A's), so our fair share would not see it.
This module gives A a place in it under one user name, ``peer:A`` (the CA signs no certificate
whose name starts with ``peer:``, security.py, so no person shares it):

- **usage**: the core-seconds our volunteers report lending to A are charged to ``peer:A`` in
  our fair-share ledger, so ``grid-portal fairshare`` lists A beside our users, with the same
  decaying usage and priority factor;
- **shares among peers**: when several peers borrow, each volunteer splits what it lends among
  them by their priority here (the share it is offered is ``1 / factor``), as our scheduler
  splits the grid among our users. Our own users still come first: a volunteer lends only what
  its home portals leave (node/shares.py);
- **quota**: ``grid-portal fairshare --quota peer:A=4`` means at most four of our cores work for
  A at once, over all our volunteers. The portal hands each volunteer its part (``allow``): what
  it runs for A now, plus what A has waiting there, plus one slot so that A's next task can
  reach it, out of what the other volunteers do not hold. The parts never add up to more than
  the quota; a volunteer that stops asking gives its part back after ``ALLOWANCE_TTL``.

Pure logic, no I/O; the scheduler's ``grid_peer_offers`` handler calls it once a heartbeat per
volunteer.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

PEER_USER_PREFIX = "peer:"
# Seconds a volunteer's part of a quota stays its own without the volunteer asking again
# (volunteers ask once a heartbeat, two seconds by default: several heartbeats of slack).
ALLOWANCE_TTL = 10.0
MAX_SLOTS_REPORTED = 4096  # a volunteer's report of its slots is at most this many


def peer_user(peer: str) -> str:
    """The fair-share user a borrowing peer portal counts as here."""
    return f"{PEER_USER_PREFIX}{peer}"


@dataclass
class _Held:
    slots: int | None  # its part of the quota; None: no quota
    running: int  # what it said it runs for the peer
    at: float


class LendAllowances:
    """Each lending volunteer's part of a borrowing peer's quota (see the module docstring)."""

    def __init__(self, ttl: float = ALLOWANCE_TTL, clock: Callable[[], float] = time.monotonic):
        self.ttl = ttl
        self.clock = clock
        self._held: dict[str, dict[str, _Held]] = {}  # peer -> volunteer -> its part

    def _fresh(self, peer: str, now: float) -> dict[str, _Held]:
        held = self._held.setdefault(peer, {})
        for node in [n for n, h in held.items() if now - h.at > self.ttl]:
            del held[node]
        return held

    def allow(
        self, peer: str, node: str, quota: float | None, running: Any = 0, waiting: Any = 0
    ) -> int | None:
        """The most slots ``node`` may give ``peer`` at once until it asks again (None: no
        quota, as many as its home portals leave)."""
        now = self.clock()
        held = self._fresh(peer, now)
        running, waiting = _count(running), _count(waiting)
        if quota is None:
            held[node] = _Held(None, running, now)
            return None
        others = sum(h.slots or 0 for n, h in held.items() if n != node)
        free = max(0, math.floor(quota) - others)
        slots = min(free, running + waiting + 1)
        held[node] = _Held(slots, running, now)
        return slots

    def running(self, peer: str) -> int:
        """What the volunteers said they run for ``peer`` now (their latest reports)."""
        return sum(h.running for h in self._fresh(peer, self.clock()).values())

    def forget(self, peer: str) -> None:
        self._held.pop(peer, None)


def _count(value: Any) -> int:
    """A volunteer's count of slots, as data: a whole number from 0 to MAX_SLOTS_REPORTED."""
    try:
        number = int(value)
    except (TypeError, ValueError, OverflowError):
        return 0
    return min(max(0, number), MAX_SLOTS_REPORTED)


def peer_share(factor: float) -> float:
    """The share a volunteer gives a peer among the peers it lends to: inversely proportional
    to the peer's priority factor here (lower is better, as for our users)."""
    return round(1.0 / max(factor, 1e-6), 6)


__all__ = ["ALLOWANCE_TTL", "PEER_USER_PREFIX", "LendAllowances", "peer_share", "peer_user"]
