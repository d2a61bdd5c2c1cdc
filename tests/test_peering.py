"""Portal peering (flocking): portal B lends its idle volunteers to portal A.

Real processes, shared by the tests of this module (two portals and one volunteer of B that
lends to peers): A links to B with B's peer token; B's volunteer then also serves A, as node
``lender@b`` labelled ``site=b``, while B has nothing for it; B's own work takes it back within
the bound; both ledgers count the work exchanged alike; removing the peering or revoking B's
peer token ends the lent worker within a heartbeat; the CLI's bad inputs get one message each
while both grids go on. The tests run in the order written (each leaves the peering linked).
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import Portal, Volunteer, grid_portal_command, start_portal, start_volunteer, wait_for

BOUND = 2.0  # --lend-bound: how long A's running tasks may keep B's cores once B's work came
HEARTBEAT = 2.0  # the volunteer's telemetry interval (grid-portal.volunteer.telemetry-interval)


@dataclass
class World:
    a: Portal
    b: Portal
    lender: Volunteer
    tmp: Path

    def peers(self, portal: Portal, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            grid_portal_command("peers", *args, "--data-dir", str(portal.data_dir)),
            capture_output=True,
            text=True,
            timeout=90,
        )

    def link(self) -> None:
        out = self.peers(self.a, "add", self.b.http, "--token", peer_token(self.b), "--as", "b")
        assert out.returncode == 0, out.stderr
        assert "linked: b" in out.stdout

    def exchange(self, portal: Portal) -> dict[str, Any]:
        out = self.peers(portal, "list", "--json")
        assert out.returncode == 0, out.stderr
        rows = json.loads(out.stdout)
        assert len(rows) == 1, rows
        return rows[0]

    def lent_status(self) -> dict[str, Any]:
        out = subprocess.run(
            grid_portal_command("volunteer", "status", "--name", "lender", "--json"),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0, out.stderr
        status = json.loads(out.stdout)
        return {("a" if p.get("lent_by") else "b"): p for p in status["portals"]}


def peer_token(portal: Portal, *extra: str) -> str:
    return portal.token("--for", "peer", *extra)


def lent_nodes(portal: Portal) -> list[Any]:
    with portal.grid() as grid:
        return [n for n in grid.nodes() if n.online and n.name.endswith("@b")]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("peering")
    a = start_portal(tmp / "a")
    b = start_portal(tmp / "b")
    try:
        options = ["--lend-to-peers", "--lend-bound", f"{BOUND}s", "--cpus", "2"]
        lender = start_volunteer(b, tmp, "lender", *options, "--oversubscribe")
        yield World(a, b, lender, tmp)
    finally:
        a.stop()
        b.stop()


def test_b_lends_its_idle_volunteer_to_a_labelled_site_b(world: World) -> None:
    world.link()
    nodes = wait_for(lambda: lent_nodes(world.a), timeout=60, what="B's volunteer to join A")
    assert [n.name for n in nodes] == ["lender@b"]
    assert nodes[0].labels.get("site") == "b"
    from gridtasks import burn

    with world.a.grid() as grid:
        # A's researchers select it with `where`, on the site.
        assert grid.submit(burn, 0.01, where='site == "b"').result(timeout=60) == "lender@b"
        futures = grid.map(burn, [0.1] * 30, batch=1, where='site == "b"')
        assert set(grid.client.gather(futures)) == {"lender@b"}

    # Both ledgers: A counted the work from its scheduler, B from its volunteer's reports
    # (A's contributions reach its ledger within 5 s; B's with the next heartbeat). The work
    # was 3.01 s of busy CPU, so each count is complete once it is at least that.
    def both_counted() -> tuple[float, float] | None:
        got = world.exchange(world.a)["received_core_seconds"]
        gave = world.exchange(world.b)["lent_core_seconds"]
        return (got, gave) if got >= 3.0 and gave >= 3.0 else None

    got, gave = wait_for(both_counted, timeout=30, what="both ledgers to count the work")
    assert abs(got - gave) <= 0.2 * max(got, gave), f"A received {got} s, B lent {gave} s"
    a_row, b_row = world.exchange(world.a), world.exchange(world.b)
    assert a_row["direction"] == "lends" and b_row["direction"] == "borrows"
    # B's view, asked over the peer link with A's peer certificate, agrees with B's ledger.
    out = world.peers(world.a, "list", "--json", "--ask")
    asked = json.loads(out.stdout)[0]["their_count"]
    assert asked["lent"]["core_seconds"] >= gave, asked
    # The volunteer's own status says which portal lends it to A.
    text = subprocess.run(
        grid_portal_command("volunteer", "status", "--name", "lender"),
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    assert "lent by" in text and "share 1 (100%)" in text, text
    # Both status pages show the peer and the core-hours each way.
    for portal, words in ((world.a, "lends us"), (world.b, "borrows our")):
        page = _status_page(portal)
        assert "Peer portals" in page and words in page, page[-2000:]


def test_b_takes_its_volunteer_back_within_the_bound(world: World) -> None:
    from gridtasks import burn

    with world.a.grid() as grid_a, world.b.grid() as grid_b:
        # Four: two hold both cores, two wait queued in the lent worker.
        long = grid_a.map(burn, [30.0] * 4, batch=1, where='site == "b"')
        wait_for(
            lambda: world.lent_status()["a"]["running"] == 2,
            timeout=60,
            what="A's tasks to hold both lent cores",
        )
        started = time.monotonic()
        mine = grid_b.map(burn, [0.2] * 4, batch=1)
        assert len(grid_b.client.gather(mine)) == 4
        took = time.monotonic() - started
        # B waited at most the bound (A's tasks were moved), plus the pause's round trips.
        assert took < BOUND + 6.0, f"B's own work took {took:.1f} s on its own volunteer"
        # A's two tasks were moved back to A (to come back here now that B is idle again).
        status = world.lent_status()
        assert status["a"]["moved_tasks"] == 2, status["a"]
        # The two queued ones went back to A at once, not after B was idle again.
        assert "gave 2 queued tasks back to the portal" in world.lender.output()
        grid_a.client.cancel(long)
    # Idle again: the lent worker runs A's work again.
    with world.a.grid() as grid_a:
        assert grid_a.submit(burn, 0.01, where='site == "b"').result(timeout=60) == "lender@b"


def test_a_machine_lends_the_cores_its_home_portal_leaves(world: World) -> None:
    """While B runs one long task on the two-core lender, A's tasks run on the other core,
    one at a time; B's task is never held up."""
    import distributed
    from gridtasks import burn, wf_timed

    moved = world.lent_status()["a"]["moved_tasks"]  # by the tests before
    with world.a.grid() as grid_a, world.b.grid() as grid_b:
        home = grid_b.submit(burn, 60.0)
        wait_for(
            lambda: world.lent_status()["b"]["running"] == 1,
            timeout=60,
            what="B's task to hold one of the lender's cores",
        )
        futures = grid_a.map(wf_timed, range(3), seconds=0.3, batch=1, where='site == "b"')
        distributed.wait(futures, timeout=60)  # not after B's minute: beside it
        runs = grid_a.client.gather(futures)
        assert {r["node"] for r in runs} == {"lender@b"}
        assert _most_at_once(runs) == 1, runs  # one core left over, never B's
        status = world.lent_status()
        assert not home.done() and status["b"]["running"] == 1, status
        assert status["a"]["moved_tasks"] == moved, status["a"]  # none had to move
        grid_b.client.cancel(home)
    wait_for(lambda: world.lent_status()["b"]["running"] == 0, timeout=30, what="B's task to end")


def test_b_counts_a_as_one_user_with_its_usage_and_quota(world: World) -> None:
    """B's fair share sees A as one user, ``peer:NAME``: what B's volunteers lent A is its
    usage there, and B's admin's quota for it caps the cores A gets at once (here one of the
    lender's two)."""
    from gridtasks import wf_timed

    user = "peer:" + world.exchange(world.b)["name"]
    with world.b.grid() as grid_b:
        before = grid_b.fairshare()["users"].get(user, {}).get("usage", 0.0)
        grid_b.set_fairshare(user=user, quota=1)
        try:
            wait_for(
                lambda: world.lent_status()["a"]["cap"] == 1,
                timeout=3 * HEARTBEAT + 10,
                what="the lender to be given its part of A's quota",
            )
            with world.a.grid() as grid_a:
                futures = grid_a.map(wf_timed, range(4), seconds=0.5, batch=1, where='site == "b"')
                runs = grid_a.client.gather(futures)
            assert {r["node"] for r in runs} == {"lender@b"}
            assert _most_at_once(runs) == 1, runs  # two cores, one of them A's at a time

            # With the next heartbeat's report, B charged A (one user) what it was lent.
            def charged() -> dict[str, Any] | None:
                row = grid_b.fairshare()["users"].get(user)
                return row if row and row["usage"] >= before + 1.5 else None

            row = wait_for(charged, timeout=3 * HEARTBEAT + 10, what="B to charge A's usage")
            assert row["quota"] == 1 and row["factor"] >= 0.5, row
            # The admin's table shows A among B's users.
            out = subprocess.run(
                grid_portal_command("fairshare", "--portal", world.b.connection_file),
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert out.returncode == 0 and user in out.stdout, out
        finally:
            grid_b.set_fairshare(user=user, clear_quota=True)
    wait_for(
        lambda: world.lent_status()["a"]["cap"] is None,
        timeout=3 * HEARTBEAT + 10,
        what="the quota's end to reach the lender",
    )


def _most_at_once(runs: list[dict[str, Any]]) -> int:
    """The most of ``runs`` (each with start and end) that overlapped in time."""
    edges = sorted([(r["start"], 1) for r in runs] + [(r["end"], -1) for r in runs])
    most = now = 0
    for _, step in edges:
        now += step
        most = max(most, now)
    return most


def test_bad_input_one_message_each_and_both_grids_go_on(world: World) -> None:
    def refused(out: subprocess.CompletedProcess[str], words: str) -> None:
        assert out.returncode == 2, out
        assert words in out.stderr, out.stderr
        assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1

    # The same peer twice.
    out = world.peers(world.a, "add", world.b.http, "--token", peer_token(world.b), "--as", "b2")
    refused(out, "already borrows from")
    # An unreachable peer.
    gone = start_portal(world.tmp / "gone")
    token, address = peer_token(gone), gone.http
    gone.stop()
    refused(world.peers(world.a, "add", address, "--token", token), "cannot reach the peer portal")
    # A peer whose CA changed: the token was made for another CA than the one at the address.
    out = world.peers(world.a, "add", world.a.http, "--token", peer_token(world.b), "--as", "c")
    refused(out, "has another CA than the one this peer token was made for")
    # An expired and a revoked peer token (a third portal, so that no duplicate is involved).
    c = start_portal(world.tmp / "c")
    try:
        expired = peer_token(c, "--ttl", "1s")
        wait_for(lambda: _token_state(c, "expired"), timeout=10, what="the token to expire")
        out = world.peers(world.a, "add", c.http, "--token", expired, "--as", "c")
        refused(out, "expired")
        revoked = peer_token(c, "--note", "to revoke")
        _revoke_peer_tokens(c)
        refused(world.peers(world.a, "add", c.http, "--token", revoked, "--as", "c"), "revoked")
        # A volunteer's token is not a peer token.
        out = world.peers(world.a, "add", c.http, "--token", c.token(), "--as", "c")
        refused(out, "not for a peer portal")
    finally:
        c.stop()
    refused(world.peers(world.a, "remove", "nobody"), "no peer named 'nobody'")
    # A peer token does not enrol a volunteer.
    body = json.dumps({"token": peer_token(world.b), "csr": _csr(), "name": "x"}).encode()
    status, reply = world.b.enrol(body)
    assert status == 403 and "peer token" in reply["error"], reply
    # Nothing stopped: the peering and both grids still work.
    assert [n.name for n in lent_nodes(world.a)] == ["lender@b"]
    from gridtasks import burn

    with world.b.grid() as grid_b:
        assert grid_b.submit(burn, 0.01).result(timeout=60) == "lender"


def test_a_peer_certificate_may_only_ask_what_was_lent(world: World) -> None:
    """The peer role over a real TLS connection: its one handler, everything else refused."""
    import asyncio

    from distributed.core import rpc

    from grid_portal.tls import tls_security

    peer_dir = world.a.data_dir / "peers" / "b"
    security = tls_security(peer_dir / "ca.pem", peer_dir / "cert.pem", peer_dir / "key.pem")

    async def call(op: str) -> Any:
        async with rpc(
            world.b.scheduler, connection_args=security.get_connection_args("client")
        ) as r:
            return await getattr(r, op)()

    assert "lent" in asyncio.run(call("grid_peer_exchange"))
    for op in ("grid_nodes", "grid_peer_offers", "grid_jobs", "ncores"):
        with pytest.raises(Exception, match="not open to a peer certificate"):
            asyncio.run(call(op))


def test_removing_the_peer_or_revoking_its_token_ends_lent_workers(world: World) -> None:
    # `peers remove` at A: A cuts the lent node off, and tells B, which stops offering A.
    out = world.peers(world.a, "remove", "b")
    assert out.returncode == 0, out.stderr
    assert "1 lent node cut off" in out.stdout and "not told" not in out.stdout, out.stdout
    wait_for(lambda: not lent_nodes(world.a), timeout=HEARTBEAT + 1, what="lender@b to leave A")
    wait_for(lambda: "a" not in world.lent_status(), timeout=HEARTBEAT + 3, what="B to stop")
    assert world.peers(world.b, "list", "--json").stdout.strip() == "[]"
    # Linked again: the volunteer enrols afresh (its old certificate there is revoked).
    world.link()
    nodes = wait_for(lambda: lent_nodes(world.a), timeout=60, what="B's volunteer to rejoin A")
    assert nodes[0].labels.get("site") == "b"
    # B revokes the peer token it gave A: its volunteer leaves A within a heartbeat.
    _revoke_peer_tokens(world.b)
    wait_for(lambda: not lent_nodes(world.a), timeout=HEARTBEAT + 3, what="lender to leave A")
    assert world.exchange(world.b)["state"] == "revoked"
    assert world.lender.process.poll() is None
    assert "Traceback" not in world.lender.output()


def test_the_arbiter_lends_only_while_home_has_had_nothing_for_the_grace() -> None:
    """The agent's arbiter (no processes): a lent-to peer's tasks get slots only while the
    home portal has had no task for LEND_GRACE seconds; its waiting tasks can be sent back."""
    from grid_portal.node.shares import LEND_GRACE, SlotArbiter

    now = [100.0]
    arbiter = SlotArbiter(2, clock=lambda: now[0])
    arbiter.add("home", 1)
    arbiter.add("peer", 1, lend=True)
    assert arbiter.want("peer", 1) == [("peer", 1)]  # home idle from the start: lent
    assert arbiter.want("home", 1) == [("home", 1)]  # a free slot: home at once
    assert arbiter.want("peer", 2) == []  # home has work: the peer waits
    assert arbiter.done("home", 1, 0.5) == []  # home just ended: still the grace
    assert arbiter.want("peer", 3) == []
    now[0] += LEND_GRACE
    assert arbiter.tick() == [("peer", 2)]  # the grace is over: one free slot, the oldest
    assert arbiter.bounce("peer") == [3]  # what still waits can go back to the peer
    assert arbiter.received("peer")["waiting"] == 0
    # Three slots, home holds one: the peer gets the other two, not home's.
    arbiter = SlotArbiter(3, clock=lambda: now[0])
    arbiter.add("home", 1)
    arbiter.add("peer", 1, lend=True)
    assert arbiter.want("home", 1) == [("home", 1)]
    assert [arbiter.want("peer", t) for t in (1, 2, 3)] == [[("peer", 1)], [("peer", 2)], []]
    assert not arbiter.home_short()
    assert arbiter.want("home", 2) == []  # home's second task finds the peer in its slot
    assert arbiter.home_short() and arbiter.lend_room("peer") == 0
    assert arbiter.done("peer", 1, 1.0) == [("home", 2)]  # a freed slot goes home first
    assert arbiter.done("peer", 2, 1.0) == [("peer", 3)]  # home holds two: one is left
    assert arbiter.done("home", 2, 1.0) == []  # home's slot is kept for it for the grace
    assert arbiter.want("peer", 4) == []
    now[0] += LEND_GRACE
    assert arbiter.tick() == [("peer", 4)]  # the grace is over: home's spare slot is lent


def test_a_peers_quota_is_split_among_volunteers_and_never_exceeded() -> None:
    """B's parts of A's quota (no processes): the parts never add up to more than the quota,
    each is what the volunteer uses plus one, a silent volunteer's part comes back, and a
    volunteer's bad report is read as data."""
    from grid_portal.node.shares import SlotArbiter
    from grid_portal.portal.lend_quota import ALLOWANCE_TTL, LendAllowances, peer_share

    now = [0.0]
    parts = LendAllowances(clock=lambda: now[0])
    assert parts.allow("a", "v1", None, running=3) is None  # no quota: as much as home leaves
    assert parts.allow("a", "v1", 3, running=0, waiting=0) == 1  # one, so a task can come
    assert parts.allow("a", "v2", 3, running=0, waiting=5) == 2  # what is left of three
    assert parts.allow("a", "v3", 3, running=0, waiting=5) == 0  # nothing left
    assert parts.allow("a", "v1", 3, running=1, waiting=4) == 1  # v2 holds two
    assert parts.running("a") == 1
    now[0] += ALLOWANCE_TTL + 1  # v2 and v1 went silent: their parts come back
    assert parts.allow("a", "v3", 3, running=0, waiting=5) == 3
    assert parts.allow("a", "v4", 3, running="many", waiting=float("inf")) == 0
    assert parts.allow("a", "v5", 2.9, running=-4, waiting=None) == 0  # whole cores only
    assert peer_share(0.5) == 2 * peer_share(1.0)  # less recent use, a larger share
    # The volunteer's side: a cap of one slot for the peer, home idle.
    arbiter = SlotArbiter(2, clock=lambda: 100.0)
    arbiter.add("home", 1)
    arbiter.add("peer", 1, lend=True)
    assert arbiter.set_cap("peer", 1) == []
    assert arbiter.want("peer", 1) == [("peer", 1)]
    assert arbiter.want("peer", 2) == []  # the second core stays free: the cap
    assert arbiter.set_cap("peer", 2) == [("peer", 2)]  # a larger part lets it run
    assert arbiter.received("peer")["cap"] == 2


# -- helpers ---------------------------------------------------------------------------------
def _status_page(portal: Portal) -> str:
    import ssl
    import urllib.request

    context = ssl.create_default_context(cafile=str(portal.data_dir / "ca" / "ca.pem"))
    context.check_hostname = False
    with urllib.request.urlopen(f"{portal.http}/status", context=context, timeout=30) as r:
        return r.read().decode()


def _tokens(portal: Portal) -> Any:
    from grid_portal.portal.ledger import LEDGER_FILE
    from grid_portal.portal.tokens import TokenStore

    return TokenStore(portal.data_dir / LEDGER_FILE)


def _token_state(portal: Portal, state: str) -> bool:
    return any(t.state() == state for t in _tokens(portal).list() if t.role == "peer")


def _revoke_peer_tokens(portal: Portal) -> None:
    """``grid-portal token revoke ID`` for every peer token of ``portal`` not yet revoked."""
    for record in _tokens(portal).list():
        if record.role == "peer":
            out = subprocess.run(
                grid_portal_command(
                    "token", "revoke", record.id, "--data-dir", str(portal.data_dir)
                ),
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert out.returncode == 0, out.stderr


def _csr() -> str:
    from grid_portal.keys import make_key_and_csr

    return make_key_and_csr("x")[1]
