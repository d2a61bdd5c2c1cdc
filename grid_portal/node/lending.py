"""Lending to peer portals (``grid-portal volunteer --lend-to-peers``): flocking, node side.

A home portal (one the volunteer attached itself) may lend its volunteers to peer portals
(portal/peering.py). A volunteer that opted in asks each home portal, once a heartbeat, which
peers it lends to now (``grid_peer_offers`` over the node's own mutual-TLS identity), and tells
it in the same call what it lent since it last asked (core-seconds and tasks per peer: the
home portal's ledger of the work given away). For each peer offered, the agent enrols with that
peer using the lend token the home portal passed on (the peer's own CA signs the node's
certificate; the home portal's keys never leave it) and serves it as one more portal that gets
only what the home portals leave:

- the arbiter (shares.py) gives the peer only the slots the home portals leave: never while a
  home task waits, never one the home portals used in the last second (``LEND_GRACE``). A
  machine whose home portal keeps one core of four busy lends the other three;
- a peer's worker with no slot left to take is ``FULL``: paused in Dask (the peer's scheduler
  sends it nothing new) while its running tasks go on; the tasks the peer had already sent it,
  queued in the worker or waiting at the slot gate, go back to the peer at once (Dask's
  ``reschedule``), which places them elsewhere;
- when a home task waits for a slot the peer's tasks hold, they may finish within
  ``lend_bound`` seconds, after which they are moved (ended here, run again elsewhere by the
  peer). So home work waits at most ``lend_bound`` for a core;
- the home portal counts each peer as one user of its fair share (portal/lend_quota.py): with
  each offer comes the peer's share among the peers lent to, and, when the home portal's admin
  gave the peer a quota, the most slots it may hold here now (the arbiter's ``cap``), held to
  as the slots the home portals leave are;
- when the home portal no longer offers a peer (the peering was removed, or its peer token
  revoked), the peer's worker leaves at once (running tasks get ``lend_bound`` to finish).

A peer that cannot be enrolled with (unreachable, refused) is said once and tried again later;
nothing of the home portals stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from grid_portal.errors import GridError
from grid_portal.node.plugin import FULL
from grid_portal.node.shares import LEND_GRACE

if TYPE_CHECKING:
    from grid_portal.node.agent import Volunteer
    from grid_portal.node.portal_link import PortalLink

logger = logging.getLogger("grid_portal.volunteer")

RETRY_AFTER = 30.0  # seconds before enrolling again with a peer that failed
OFFERS_TIMEOUT = 10.0
HOME_WORK = "its home portal has work"
QUOTA_ELSEWHERE = "its home portal's quota for this peer is used on other machines"
QUOTA_IN_USE = "its home portal's quota for this peer is in use here"
SLOTS_IN_USE = "lends only the cores its home portal leaves; all of them are in use"
USING = ("running", "waiting")  # what a volunteer tells its home portal a peer holds here


class Lending:
    """The agent's peer portals: which to serve, when, and what each received."""

    def __init__(self, agent: Volunteer) -> None:
        self.agent = agent
        self.short_since: float | None = None  # since when a home task waits for a lent slot
        self._bound_timer: asyncio.TimerHandle | None = None
        self._reopen_timer: asyncio.TimerHandle | None = None
        self._again = False
        self._reported: dict[str, dict[str, float]] = {}  # lent link key -> counts sent
        self._pending: dict[str, dict[str, dict[str, float]]] = {}  # home -> peer -> unsent
        self._failed: dict[str, float] = {}  # peer URL -> when to try again
        self._said: set[str] = set()
        self._rpcs: dict[str, Any] = {}
        self._following = False

    # -- which peers ----------------------------------------------------------------------
    async def run(self) -> None:
        interval = max(0.2, float(self.agent.options.telemetry_interval))
        try:
            while True:
                for home in self.homes():
                    if home.joined.is_set():
                        await self._poll(home)
                for link in self.lent():  # a home portal detached: its peers go too
                    if self.agent.links.get(link.lent_by or "") is None:
                        self.withdraw(link, "its home portal is no longer served")
                await asyncio.sleep(interval)
        finally:
            for r in self._rpcs.values():
                with contextlib.suppress(Exception):
                    await r.close_rpc()

    def homes(self) -> list[PortalLink]:
        return [link for link in self.agent.links.values() if link.lent_by is None]

    def lent(self, home: str | None = None) -> list[PortalLink]:
        return [
            link
            for link in self.agent.links.values()
            if link.lent_by is not None and (home is None or link.lent_by == home)
        ]

    async def _poll(self, home: PortalLink) -> None:
        for link in self.lent(home.key):
            self._collect(link)
        unsent = self._pending.get(home.key, {})
        # What each peer holds here now: the home portal splits its quota for the peer by it.
        using = {
            str(link.peer): {k: self.agent.arbiter.received(link.key)[k] for k in USING}
            for link in self.lent(home.key)
        }
        try:
            reply = await asyncio.wait_for(
                self._rpc(home).grid_peer_offers(lent=unsent, using=using), OFFERS_TIMEOUT
            )
        except Exception as exc:  # noqa: BLE001 - the home portal answers next heartbeat
            self._say_once(f"offers:{home.key}", f"{home.label}: cannot ask for peers ({exc})")
            return
        self._pending.pop(home.key, None)
        offers = {
            str(o.get("name")): o
            for o in (reply or {}).get("peers", [])
            if isinstance(o, dict) and o.get("url") and o.get("token")
        }
        for link in self.lent(home.key):
            if link.peer not in offers:
                self.withdraw(link, f"{home.label} no longer lends to it")
        served = {link.peer: link for link in self.lent(home.key)}
        for name, offer in offers.items():
            if name not in served:
                await self._attach(home, name, offer)
        for link in self.lent(home.key):
            if link.peer in offers:
                self._apply_terms(link, offers[str(link.peer)])

    def _apply_terms(self, link: PortalLink, offer: dict[str, Any]) -> None:
        """The home portal's terms for a peer (portal/lend_quota.py): its share among the peers
        lent to, the most slots it may hold here now (its quota's part; absent: no quota)."""
        arbiter = self.agent.arbiter
        try:
            share = float(offer.get("share") or 1.0)
            slots = offer.get("slots")
            cap = None if slots is None else max(0, int(slots))
        except (TypeError, ValueError):
            return
        if not (0 < share < float("inf")):
            share = 1.0
        before = arbiter.received(link.key)["cap"]
        arbiter.add(link.key, share, lend=True)
        self.agent.grant_all(arbiter.set_cap(link.key, cap))
        if cap != before:
            self._follow_soon()

    def _rpc(self, home: PortalLink) -> Any:
        from distributed.core import rpc

        r = self._rpcs.get(home.key)
        if r is None or r.address != home.creds.scheduler:
            args = home.creds.security().get_connection_args("client")
            r = self._rpcs[home.key] = rpc(home.creds.scheduler, connection_args=args)
        return r

    async def _attach(self, home: PortalLink, name: str, offer: dict[str, Any]) -> None:
        from grid_portal.node.agent import default_state_dir, enrol
        from grid_portal.node.portals import portal_label

        url, token = str(offer["url"]), str(offer["token"])
        if time.monotonic() < self._failed.get(url, 0.0):
            return
        try:
            label = portal_label(url)
        except GridError:
            return
        if label in self.agent.links:
            self._say_once(f"served:{label}", f"{label}: already served; not lent to it again")
            return
        # One enrolment per lend token: a new peering (a new token) enrols afresh.
        state_dir = self.agent.state_dir or default_state_dir()
        where = Path(state_dir) / "lent" / hashlib.sha256(token.encode()).hexdigest()[:16]
        try:
            creds = await asyncio.to_thread(
                enrol, url, token, self.agent.name, where, name_given=False
            )
            link = self.agent.add_link(creds, 1.0, url, label, lent_by=home.key, peer=name)
        except (GridError, OSError, ValueError) as exc:
            self._failed[url] = time.monotonic() + RETRY_AFTER
            text = f"peer {name} ({url}), lent by {home.label}: {exc}; tried again later"
            self._say_once(f"attach:{url}:{exc}", text)
            return
        self._failed.pop(url, None)
        logger.info(
            "lending to peer %s (%s) as %s, for %s, while %s has no work here",
            name,
            label,
            creds.name,
            home.label,
            home.label,
        )
        self._reported[link.key] = {"tasks": 0, "core_seconds": 0.0}

    def withdraw(self, link: PortalLink, why: str) -> None:
        """Stop serving a lent-to peer: its worker leaves now; running tasks get the bound."""
        self._collect(link)
        logger.info("leaving peer %s (%s): %s", link.peer, link.label, why)
        with contextlib.suppress(GridError):
            self.agent.detach(link.key)
        bound = self.agent.options.lend_bound
        asyncio.get_running_loop().call_later(bound, link.request_stop, why)  # then: force

    # -- what each received ---------------------------------------------------------------
    def _collect(self, link: PortalLink) -> None:
        """Move what ``link`` received since the last report into its home's unsent counts."""
        now = self.agent.arbiter.received(link.key)
        before = self._reported.get(link.key, {"tasks": 0, "core_seconds": 0.0})
        delta = {k: max(0.0, float(now[k]) - float(before[k])) for k in ("tasks", "core_seconds")}
        self._reported[link.key] = {k: float(now[k]) for k in ("tasks", "core_seconds")}
        if not (delta["tasks"] or delta["core_seconds"]) or link.lent_by is None:
            return
        peer = self._pending.setdefault(link.lent_by, {}).setdefault(
            str(link.peer), {"tasks": 0, "core_seconds": 0.0}
        )
        for key, value in delta.items():
            peer[key] += value

    # -- home work first ------------------------------------------------------------------
    def desired(self, link: PortalLink) -> tuple[str | None, str | None, bool]:
        """A lent-to peer's worker: run while it has room (the slots the home portals leave,
        within its quota's part); ``FULL`` (no new tasks, running ones go on) when it has
        none; paused when none of its tasks runs either. When a home task waits for a slot
        that the peer's tasks hold, those tasks get ``lend_bound`` to finish, then move."""
        arbiter = self.agent.arbiter
        taken = arbiter.received(link.key)
        running = taken["running"]
        if arbiter.home_short():
            since = self.short_since if self.short_since is not None else time.monotonic()
            if running and time.monotonic() - since >= self.agent.options.lend_bound:
                return "paused", HOME_WORK, True
            return FULL, HOME_WORK, False
        if arbiter.lend_room(link.key) > 0 or (arbiter.lend_open() and taken["cap"] is None):
            # Room, or the whole machine lent: A's tasks may queue here as on any worker.
            return None, None, False
        if taken["cap"] == 0 and not running:
            return FULL, QUOTA_ELSEWHERE, False
        if taken["cap"] is not None and arbiter.lend_room() > 0:
            return FULL, QUOTA_IN_USE, False
        return FULL, SLOTS_IN_USE if running else HOME_WORK, False

    def slots_changed(self) -> None:
        """After each slot event: home work came or went, or a lent task ended."""
        if not self.lent():
            return
        arbiter = self.agent.arbiter
        loop = asyncio.get_running_loop()
        short = arbiter.home_short()
        if short and self.short_since is None:
            self.short_since = time.monotonic()
            bound = self.agent.options.lend_bound
            self._bound_timer = loop.call_later(bound + 0.05, self._follow_soon)
        elif not short and self.short_since is not None:
            self.short_since = None
            if self._bound_timer is not None:
                self._bound_timer.cancel()
        if arbiter.home_reserve() > 0:
            # The home portals' reserve shrinks as their recent demand ages: look again then.
            if self._reopen_timer is not None:
                self._reopen_timer.cancel()
            self._reopen_timer = loop.call_later(LEND_GRACE + 0.05, self._reopen)
        self._follow_soon()

    def _reopen(self) -> None:
        self._reopen_timer = None
        self.agent.grant_all(self.agent.arbiter.tick())
        self.slots_changed()

    def _follow_soon(self) -> None:
        if self._following:
            self._again = True  # the round under way may have passed a link already
            return
        self._following = True
        asyncio.ensure_future(self._follow())

    async def _follow(self) -> None:
        """Tell each lent worker what it should do now; send back what waits at the slot
        gate while it may take nothing new (the peer places those tasks again, elsewhere)."""
        try:
            self._again = True
            while self._again:
                self._again = False
                for link in self.lent():
                    await link.push_quietly()
                    if self.desired(link)[0] in ("paused", FULL):
                        for ticket in self.agent.arbiter.bounce(link.key):
                            link.grant(ticket, move=True)
        finally:
            self._following = False

    def _say_once(self, key: str, text: str) -> None:
        if key not in self._said:
            self._said.add(key)
            logger.warning("%s", text)


__all__ = ["HOME_WORK", "Lending"]
