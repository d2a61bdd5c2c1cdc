"""The agent's slot arbiter: how one volunteer's cores are split among the portals it serves.

A Dask worker serves one scheduler and its thread count is fixed at registration, so a volunteer
serving several portals runs one worker per portal, each offering every lent core, and gates
its tasks here: before a task starts, its worker asks the agent for a slot (``want``); the
agent grants at most ``slots`` at a time over all portals (``done`` gives one back).

Among portals with tasks waiting, the next free slot goes to the one that has received the
least core time for its share (start-time fair queueing): its charged seconds, plus the time
its running tasks have run so far (at least one mean task each), divided by its share.
So under load from all, core time is split by share, and a portal with nothing queued takes
nothing: the others use every slot (work-conserving). A portal that comes back from idle starts
level with the busiest-served active portal, not with the credit of its idle hours.

A portal added with ``lend`` (a peer portal the volunteer's home portal lends it to) gets only
the slots the home portals leave: never while a home task waits, and never one of the slots the
home portals held in the last ``LEND_GRACE`` seconds (their *reserve*: a home portal's next task
comes a round trip after its last one ended, and must find its slot free). So a machine whose
home portal keeps one core of four busy lends the other three; one whose home portal has had
nothing for the grace lends them all. Home work always comes first: a home task that waits while
lent tasks hold the slots is what ``home_short`` says, and the lending side (lending.py) then
gives those slots back within its bound. A lent portal may also have a ``cap``: the most slots
it may hold at once here (its part of the quota the home portal set for it,
portal/lend_quota.py).

Pure logic: no I/O, a clock that can be given; the agent (agent.py) feeds it the workers'
events and sends the grants it returns.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

# Running tasks are charged at least the mean task time (seconds), this until one finished.
FIRST_TASK_ESTIMATE = 1.0
# How fast the mean task time follows new tasks (exponential moving average weight).
MEAN_WEIGHT = 0.2
# Seconds the home portals must have had no task here before a lent-to peer gets a slot: a home
# portal's next task comes a round trip after the last one ended, and must not find the peer's
# task in its way (measured: without it a peer's tasks were moved twice in one burst of work).
LEND_GRACE = 1.0

Grant = tuple[Hashable, int]  # (portal key, ticket)


@dataclass
class _Portal:
    share: float
    waiting: deque[int] = field(default_factory=deque)
    running: dict[int, float] = field(default_factory=dict)  # ticket -> granted at
    charged: float = 0.0  # slot-seconds of finished tasks, for fairness
    lend: bool = False  # a peer portal's: served only while no home portal has work
    cap: int | None = None  # most slots at once (a lent-to peer's part of its quota); None: all
    tasks: int = 0  # received: tasks finished and their core-seconds
    core_seconds: float = 0.0

    def active(self) -> bool:
        return bool(self.waiting or self.running)


class SlotArbiter:
    """Grants ``slots`` task slots among portals by share; see the module docstring."""

    def __init__(self, slots: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.slots = max(1, int(slots))
        self.clock = clock
        self._portals: dict[Hashable, _Portal] = {}
        # One mean over all portals: a portal that just came has no tasks of its own to go by.
        self.mean = FIRST_TASK_ESTIMATE
        self._measured = False
        # (when, home slots wanted then): the home portals' recent demand, for their reserve.
        self._home_marks: deque[tuple[float, int]] = deque()

    # -- the set of portals -----------------------------------------------------------------
    def add(self, key: Hashable, share: float, lend: bool = False) -> None:
        """Serve ``key`` with ``share``; ``lend``: a peer portal this machine's home portal
        lends it to, given a slot only while no home portal has tasks waiting or running."""
        if share <= 0:
            raise ValueError(f"a share must be more than 0, not {share!r}")
        portal = self._portals.get(key)
        if portal is None:
            self._portals[key] = _Portal(share=float(share), lend=lend)
        else:
            portal.share, portal.lend = float(share), lend

    def set_cap(self, key: Hashable, cap: int | None) -> list[Grant]:
        """At most ``cap`` slots at once for ``key`` (None: no limit of its own); running tasks
        over a lowered cap finish, no new ones start. Returns the grants a raised cap allows."""
        portal = self._portals.get(key)
        if portal is not None:
            portal.cap = None if cap is None else max(0, int(cap))
        return self._dispatch()

    def home_active(self) -> bool:
        """Whether a home (not lent-to) portal has tasks waiting or running."""
        return any(p.active() for p in self._portals.values() if not p.lend)

    def _home_demand(self) -> int:
        return sum(len(p.waiting) + len(p.running) for p in self._portals.values() if not p.lend)

    def _mark_home(self, before: int) -> None:
        # A sliding-window maximum: a mark no larger than a later one can never be the most.
        demand = max(before, self._home_demand())
        marks = self._home_marks
        while marks and marks[-1][1] <= demand:
            marks.pop()
        marks.append((self.clock(), demand))

    def home_reserve(self) -> int:
        """The slots kept for the home portals: the most they wanted in the last
        ``LEND_GRACE`` seconds (and now)."""
        now = self.clock()
        marks = self._home_marks
        while marks and now - marks[0][0] >= LEND_GRACE:
            marks.popleft()
        return min(self.slots, max(self._home_demand(), marks[0][1] if marks else 0))

    def lend_open(self) -> bool:
        """Whether every slot may be lent: no home task for ``LEND_GRACE`` s."""
        return self.home_reserve() == 0

    def _lent_running(self) -> int:
        return sum(len(p.running) for p in self._portals.values() if p.lend)

    def home_short(self) -> bool:
        """A home task waits while lent tasks hold slots: they must give them back."""
        home_waits = any(p.waiting for p in self._portals.values() if not p.lend)
        return home_waits and self._lent_running() > 0

    def lend_room(self, key: Hashable | None = None) -> int:
        """How many more slots lent portals (``key`` alone, within its cap) may take now."""
        if any(p.waiting for p in self._portals.values() if not p.lend):
            return 0
        room = max(0, self.slots - self.home_reserve() - self._lent_running())
        portal = self._portals.get(key) if key is not None else None
        if portal is not None and portal.cap is not None:
            room = min(room, max(0, portal.cap - len(portal.running)))
        return room

    def tick(self) -> list[Grant]:
        """Grants that time alone made possible (the home portals' grace ran out)."""
        return self._dispatch()

    def bounce(self, key: Hashable) -> list[int]:
        """Take ``key``'s waiting tasks out of the queue (they go back to their portal)."""
        portal = self._portals.get(key)
        if portal is None:
            return []
        tickets = list(portal.waiting)
        portal.waiting.clear()
        return tickets

    def remove(self, key: Hashable) -> list[Grant]:
        """Forget a portal (detached): its slots go to the others' waiting tasks."""
        self._portals.pop(key, None)
        return self._dispatch()

    def forget_tasks(self, key: Hashable) -> list[Grant]:
        """A portal's worker ended: its waiting and running tasks are gone with it."""
        portal = self._portals.get(key)
        if portal is not None:
            portal.waiting.clear()
            portal.running.clear()
        return self._dispatch()

    # -- a worker's events -------------------------------------------------------------------
    def want(self, key: Hashable, ticket: int) -> list[Grant]:
        """A task of ``key`` waits for a slot; returns the grants this makes possible."""
        portal = self._portals.get(key)
        if portal is None:
            return [(key, ticket)]  # not arbitrated (detaching): let it run
        if not portal.active():
            # Back from idle: level with the least-served active portal, no credit for idling.
            now = self.clock()
            others = [self._vtime(p, now, 0.0) for p in self._portals.values() if p.active()]
            if others:
                portal.charged = max(portal.charged, min(others) * portal.share)
        before = self._home_demand()
        portal.waiting.append(ticket)
        if not portal.lend:
            self._mark_home(before)
        return self._dispatch()

    def done(self, key: Hashable, ticket: int, seconds: float) -> list[Grant]:
        """A task of ``key`` ended after ``seconds`` of running; its slot is free again."""
        portal = self._portals.get(key)
        if portal is None:
            return self._dispatch()
        seconds = max(0.0, float(seconds))
        before = self._home_demand()
        portal.tasks += 1
        portal.core_seconds += seconds
        if ticket in portal.running:
            del portal.running[ticket]
            portal.charged += seconds
            weight = MEAN_WEIGHT if self._measured else 1.0  # the first one replaces the guess
            self.mean += weight * (seconds - self.mean)
            self._measured = True
        if not portal.lend:
            self._mark_home(before)  # its slot stays reserved for the grace
        return self._dispatch()

    # -- what each received ------------------------------------------------------------------
    def received(self, key: Hashable) -> dict[str, Any]:
        portal = self._portals.get(key)
        if portal is None:
            return {"tasks": 0, "core_seconds": 0.0, "running": 0, "waiting": 0, "cap": None}
        return {
            "tasks": portal.tasks,
            "core_seconds": round(portal.core_seconds, 3),
            "running": len(portal.running),
            "waiting": len(portal.waiting),
            "cap": portal.cap,
        }

    # -- granting ----------------------------------------------------------------------------
    def _vtime(self, portal: _Portal, now: float, least: float | None = None) -> float:
        """Core time received per share, running tasks counted at least ``least`` each (the
        mean task: so that one round of grants spreads; leveling counts only what ran)."""
        least = self.mean if least is None else least
        running = sum(max(least, now - t) for t in portal.running.values())
        return (portal.charged + running) / portal.share

    def _dispatch(self) -> list[Grant]:
        grants: list[Grant] = []
        now = self.clock()
        free = self.slots - sum(len(p.running) for p in self._portals.values())
        while free > 0:
            # Lent-to portals only get what the home portals leave (flocking: home first).
            candidates = [
                (k, p)
                for k, p in self._portals.items()
                if p.waiting and (not p.lend or self.lend_room(k) > 0)
            ]
            if not candidates:
                break
            # Ties (frequent with tasks of one length) go to the one furthest below its share.
            key, portal = min(
                candidates,
                key=lambda kp: (self._vtime(kp[1], now), (len(kp[1].running) + 1) / kp[1].share),
            )
            ticket = portal.waiting.popleft()
            portal.running[ticket] = now
            grants.append((key, ticket))
            free -= 1
        return grants


__all__ = ["FIRST_TASK_ESTIMATE", "LEND_GRACE", "Grant", "SlotArbiter"]
