"""Fair share: decaying per-user usage orders queued work, so people who share the grid share it.

The unit tests drive ``FairShare`` with an explicit clock; the grid tests run real users
(client certificates) against a real 4-core grid (two volunteers with 2 CPUs each) and read
the order in which tasks really ran from the tasks' own start and end times. That two new
users' tasks take turns is tested in-process (tests/test_plugin_inprocess.py).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Portal, portal_with, researcher_connection
from gridtasks import wf_timed

from grid_portal import Grid, settings
from grid_portal.portal.fairshare import MIN_FACTOR, FairShare

# The packaged default (grid-portal.portal.fair-share-half-life: a day, as HTCondor's).
DEFAULT_HALF_LIFE = settings.value("portal.fair-share-half-life")

# -- unit tests -----------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_usage_decays_with_the_half_life() -> None:
    clock = Clock()
    fs = FairShare(half_life=10.0, clock=clock)
    fs.charge("alice", 100.0)
    assert fs.usage("alice") == pytest.approx(100.0)
    clock.now += 10
    assert fs.usage("alice") == pytest.approx(50.0)
    fs.charge("alice", 50.0)
    clock.now += 20
    assert fs.usage("alice") == pytest.approx(25.0)
    assert fs.usage("nobody") == 0.0


def test_priority_factor_is_recent_cores_in_use_with_a_floor() -> None:
    clock = Clock()
    fs = FairShare(half_life=100.0, clock=clock)
    assert fs.factor("new") == MIN_FACTOR
    # Four cores busy for a long time: usage settles at 4 * half_life / ln 2, factor at 4.
    fs.charge("busy", 4 * 100.0 / math.log(2))
    assert fs.factor("busy") == pytest.approx(4.0)


def _order(tags: dict[tuple[str, int], float]) -> list[str]:
    return [user for (user, _), _ in sorted(tags.items(), key=lambda kv: (kv[1], kv[0]))]


def test_two_new_users_interleave() -> None:
    fs = FairShare(clock=Clock())
    tags = fs.assign("alice", [(("alice", i), 1) for i in range(10)])
    tags |= fs.assign("bob", [(("bob", i), 1) for i in range(10)])
    order = _order(tags)
    for i in range(0, 20, 2):  # every pair of slots has one task of each
        assert sorted(order[i : i + 2]) == ["alice", "bob"]


def test_a_heavy_user_yields_in_proportion_to_usage() -> None:
    clock = Clock()
    fs = FairShare(half_life=100.0, clock=clock)
    fs.charge("heavy", 4 * 100.0 / math.log(2))  # factor 4, against the newcomer's 0.5
    tags = fs.assign("heavy", [(("heavy", i), 1) for i in range(40)])
    tags |= fs.assign("light", [(("light", i), 1) for i in range(40)])
    first = _order(tags)[:36]
    assert first.count("light") == 32 and first.count("heavy") == 4  # an 8:1 share


def test_nobody_banks_credit_while_idle() -> None:
    fs = FairShare(clock=Clock())
    tags = fs.assign("alice", [(("alice", i), 1) for i in range(10)])
    for i in range(6):
        fs.finished(("alice", i), 1.0)
    late = fs.assign("bob", [(("bob", 0), 1)])
    # Bob arrives now: he goes next, before Alice's queued tasks, but not before them all
    # the time Alice used the grid alone.
    assert tags[("alice", 5)] <= late[("bob", 0)] < tags[("alice", 6)]


def test_dropped_tasks_give_their_place_back() -> None:
    fs = FairShare(clock=Clock())
    fs.assign("alice", [(("alice", i), 1) for i in range(100)])
    for i in range(100):
        fs.dropped(("alice", i))
    tags = fs.assign("alice", [(("alice", "again"), 1)])
    assert tags[("alice", "again")] == fs.virtual_time() == 0.0


def test_usage_and_settings_survive_a_restart(tmp_path: Path) -> None:
    clock = Clock()
    ledger = tmp_path / "ledger.sqlite"
    fs = FairShare(ledger, clock=clock)
    fs.set_half_life(3600.0)
    fs.set_quota("alice", 8)
    fs.charge("alice", 720.0)
    fs.flush()
    again = FairShare(ledger, clock=clock)
    assert again.half_life == 3600.0
    assert again.quotas == {"alice": 8.0}
    assert again.usage("alice") == pytest.approx(720.0)
    clock.now += 3600
    assert again.usage("alice") == pytest.approx(360.0)


def test_bad_settings_are_refused() -> None:
    fs = FairShare()
    for bad in (0, -1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="half-life"):
            fs.set_half_life(bad)
        with pytest.raises(ValueError, match="quota"):
            fs.set_quota("alice", bad)
    assert fs.half_life == DEFAULT_HALF_LIFE and fs.quotas == {}


# -- on a real grid -------------------------------------------------------------------------

TASK_SECONDS = 0.25
GRID_CORES = 4


@pytest.fixture(scope="module")
def grid4(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Portal]:
    tmp = tmp_path_factory.mktemp("fairshare")
    nodes = [(name, "--cpus", "2", "--memory", "1GB", "--oversubscribe") for name in ("v1", "v2")]
    with portal_with(tmp, *nodes) as portal:
        yield portal


def _user(portal: Portal, tmp: Path, name: str) -> Grid:
    return Grid(researcher_connection(portal, tmp, name), start_embedded=False)


def _completions(*users: tuple[str, list[dict]]) -> list[str]:
    """Who finished each task, in the order tasks finished."""
    ends = sorted((r["end"], who) for who, results in users for r in results)
    return [who for _, who in ends]


def test_a_user_who_used_a_lot_yields_to_one_who_has_not(grid4: Portal, tmp_path: Path) -> None:
    carol, dave = _user(grid4, tmp_path, "carol"), _user(grid4, tmp_path, "dave")
    with grid4.grid() as admin:
        reply = admin._call("grid_fairshare_set", half_life=2.0)
        assert reply["half_life"] == 2.0
        try:
            carol.gather(carol.map(wf_timed, range(40), [TASK_SECONDS] * 40))
            factor = admin._call("grid_fairshare")["users"]["carol"]["factor"]
            assert factor > 1.0  # Dave, who has used nothing, has 0.5
            fc = carol.map(wf_timed, range(20), [TASK_SECONDS] * 20)
            fd = dave.map(wf_timed, range(20), [TASK_SECONDS] * 20)
            order = _completions(("carol", carol.gather(fc)), ("dave", dave.gather(fd)))
        finally:
            admin._call("grid_fairshare_set", half_life=DEFAULT_HALF_LIFE)
            carol.close()
            dave.close()
    carol_done = order[: max(i for i, who in enumerate(order) if who == "dave")].count("carol")
    # Dave had the larger share: when his 20 tasks were done, Carol had done far fewer.
    assert carol_done <= 12, "".join(order)


def test_a_quota_caps_the_cores_a_user_holds_at_once(grid4: Portal, tmp_path: Path) -> None:
    erin = _user(grid4, tmp_path, "erin")
    with grid4.grid() as admin:
        assert (
            admin._call("grid_fairshare_set", user="erin", quota=1)["users"]["erin"]["quota"] == 1
        )
        try:
            results = erin.gather(erin.map(wf_timed, range(6), [TASK_SECONDS] * 6))
        finally:
            admin._call("grid_fairshare_set", user="erin", clear_quota=True)
            erin.close()
    spans = sorted((r["start"], r["end"]) for r in results)
    for (_, end), (start, _) in zip(spans, spans[1:], strict=False):
        assert start >= end - 0.01, f"two of erin's tasks ran at once: {spans}"
