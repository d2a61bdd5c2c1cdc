"""The agent's slot arbiter (node/shares.py): how a volunteer's slots are split among portals.

Pure logic with its own clock; the end-to-end check with real portals and a real volunteer is
tests/test_federation_volunteer.py.
"""

from __future__ import annotations

import heapq
from typing import Any

import pytest

from grid_portal.node.shares import SlotArbiter


class Machine:
    """Runs tasks of fixed length through an arbiter: each portal keeps ``queued`` tasks
    asking for a slot while it has work, as a worker with that many threads does."""

    def __init__(self, slots: int, shares: dict[str, float], length: float = 0.05) -> None:
        self.now = 0.0
        self.arbiter = SlotArbiter(slots, clock=lambda: self.now)
        for key, share in shares.items():
            self.arbiter.add(key, share)
        self.length = length
        self._ends: list[tuple[float, int, str]] = []
        self._tickets = 0
        self.peak: dict[str, int] = dict.fromkeys(shares, 0)

    def want(self, key: str) -> None:
        self._tickets += 1
        self._start(self.arbiter.want(key, self._tickets))

    def _start(self, grants: list[tuple[object, int]]) -> None:
        for key, ticket in grants:
            heapq.heappush(self._ends, (self.now + self.length, ticket, str(key)))
        for key in self.peak:
            self.peak[key] = max(self.peak[key], self.arbiter.received(key)["running"])

    def run(self, until: float, busy: set[str]) -> None:
        while self._ends and self._ends[0][0] <= until:
            self.now, ticket, key = heapq.heappop(self._ends)
            self._start(self.arbiter.done(key, ticket, self.length))
            if key in busy:
                self.want(key)
        self.now = until


def test_under_load_from_both_core_time_follows_the_shares() -> None:
    m = Machine(3, {"a": 2, "b": 1})
    for key in "ab":
        for _ in range(3):
            m.want(key)
    m.run(10.0, busy={"a", "b"})
    a, b = (m.arbiter.received(k)["core_seconds"] for k in "ab")
    assert a / b == pytest.approx(2.0, rel=0.05)


def test_an_idle_portal_leaves_every_slot_to_the_other() -> None:
    m = Machine(3, {"a": 2, "b": 1})
    for _ in range(3):
        m.want("b")
    m.run(2.0, busy={"b"})
    assert m.peak["b"] == 3 and m.arbiter.received("a")["tasks"] == 0


def test_a_portal_back_from_idle_gets_no_credit_for_its_idle_time() -> None:
    m = Machine(3, {"a": 1, "b": 1})
    for _ in range(3):
        m.want("b")
    m.run(5.0, busy={"b"})  # b alone for 5 s: 15 core-seconds
    before = {k: m.arbiter.received(k)["core_seconds"] for k in "ab"}
    for _ in range(3):
        m.want("a")
    m.run(7.0, busy={"a", "b"})
    got = {k: m.arbiter.received(k)["core_seconds"] - before[k] for k in "ab"}
    # Even shares from the moment a came back, not a catching up on b's 15 core-seconds.
    assert got["a"] == pytest.approx(got["b"], rel=0.15)


def test_a_detached_portal_frees_its_slots_at_once() -> None:
    m = Machine(2, {"a": 1, "b": 1})
    for key in "ab":
        for _ in range(2):
            m.want(key)
    # a asked first and holds both slots; b waits.
    assert m.arbiter.received("b")["waiting"] == 2
    grants = m.arbiter.remove("a")
    assert [key for key, _ in grants] == ["b", "b"]


def test_a_share_must_be_positive() -> None:
    with pytest.raises(ValueError, match="more than 0"):
        SlotArbiter(2).add("a", 0)


def test_a_seceded_task_gives_its_slot_back_until_it_rejoins() -> None:
    """The worker's gate (slotgate.py) with the agent's arbiter, one slot: a task that
    secedes to wait for a task it submitted lets that task run, then asks again."""
    import threading

    from grid_portal.node.slotgate import SlotGate

    arbiter = SlotArbiter(1)
    arbiter.add("a", 1)
    arbiter.add("b", 1)
    gates: dict[str, SlotGate] = {}

    def emit_for(key: str) -> Any:
        def emit(message: dict[str, Any]) -> None:  # the agent's part (agent.slot_event)
            if message["event"] == "want":
                grants = arbiter.want(key, message["ticket"])
            else:
                grants = arbiter.done(key, message["ticket"], message["seconds"])
            for portal, ticket in grants:
                gates[str(portal)].grant(ticket)

        return emit

    gates.update({k: SlotGate(emit_for(k), arbitrated=True) for k in "ab"})
    child_ran = threading.Event()

    def child() -> str:
        child_ran.set()
        return "child"

    def parent() -> str:
        runner = threading.Thread(target=gates["a"].run, args=(child,))
        runner.start()
        gates["a"].secede()
        assert child_ran.wait(10), "the sub-task never got the slot its parent held"
        runner.join(10)
        gates["a"].rejoin()
        return "parent"

    assert gates["a"].run(parent) == "parent"
    assert arbiter.received("a")["running"] == 0 and gates["a"].tasks == 2
