"""Fair share: people who share the grid get it in turn, weighted by what they used recently.

As in HTCondor, each user's usage is core-seconds that decay with a half-life (a day unless
configured), and a user's *priority factor* is their recent usage expressed as cores in
steady use (``usage * ln 2 / half_life``), never below 0.5. Shares of the grid are inversely
proportional to that factor: two people with no recent usage split the grid evenly; someone
who kept four cores busy all day gets an eighth of the share of a newcomer.

How that reaches Dask (no scheduler of our own): Dask gives every task a priority tuple and
runs lower tuples first, in the scheduler's queues and in each worker's ready queue (our
tasks carry ``resources=``, so Dask sends them to workers eagerly and they wait there, ordered
by the priority sent with them). The portal plugin's ``update_graph`` hook runs after Dask set
a new task's priority and before the task moves, so this module puts a fair-share *tag* in
front: ``(tag, *dask_priority)``. Tags come from stride scheduling: a user's tasks get
consecutive tags ``start, start + s, start + 2s, ...`` with stride ``s = task's cores *
priority factor``, starting no earlier than the grid's virtual time (the largest tag of a
finished task: how far the grid has got), so two users' queued tasks interleave in
proportion to their shares, and nobody banks credit while idle. Tags are fixed when a task is
submitted. (Virtual time follows finished tasks, not the smallest tag still queued: a task
waiting days for a GPU node must not hold it back.)

Why cores and not estimated core-seconds per task: tags cannot change once Dask sent a task
to a worker, and Dask's duration estimates change as it learns (its first guess for a new
kind of task is 0.5 s), so a user submitting before the estimate settled would be given a
lasting advantage or handicap. Counting task starts weighted by cores is how HTCondor shares
slots; run time still counts, through usage: a user whose tasks run longer accrues usage
faster, so their factor rises and their share falls.

Optional quotas (most cores one user may hold at once) park that user's ready tasks in Dask's
``no-worker`` state (``Placement.hold``) and let them go, best tag first, as the user's
running tasks finish.

Usage and settings live in the ledger (tables ``fairshare_usage`` and ``fairshare_settings``,
owned by this module), so priorities survive a portal restart.
"""

from __future__ import annotations

import heapq
import json
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from grid_portal import settings
from grid_portal.model import CPU
from grid_portal.portal.ledger import connect, transaction, write_later
from grid_portal.portal.placement import place_parked

if TYPE_CHECKING:
    from distributed import Scheduler
    from distributed.scheduler import TaskState

    from grid_portal.portal.placement import Placement

logger = logging.getLogger("grid_portal.portal")

MIN_FACTOR = 0.5  # HTCondor's floor on a user's priority: no one's share grows without bound
FLUSH_DELAY = 1.0  # usage is written at most once a second

_SCHEMA = """
CREATE TABLE IF NOT EXISTS fairshare_usage (
    user TEXT PRIMARY KEY, usage REAL NOT NULL, at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS fairshare_settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


@dataclass
class _Live:
    """A task submitted and not yet finished."""

    user: str
    tag: float
    end: float  # tag + stride: where the user's next task would start
    cpus: float


@dataclass
class _User:
    usage: float = 0.0  # decayed core-seconds as of ``at``
    at: float = 0.0
    next_tag: float = 0.0
    stale: bool = False  # a task left without finishing: recompute next_tag from live tasks
    running: float = 0.0  # cores of tasks Dask has assigned to a worker (quota accounting)
    admitting: float = 0.0  # cores released from hold, not yet seen processing
    parked: list[tuple[float, str, Any]] = field(default_factory=list)  # ready, held: heap
    keys: set[Any] = field(default_factory=set)  # live task keys


class FairShare:
    """Decaying per-user usage, stride tags for Dask priorities, and quotas."""

    def __init__(
        self,
        ledger_path: Path | None = None,
        half_life: float | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.clock = clock
        # The configured half-life (grid-portal.portal.fair-share-half-life), unless the admin
        # set one at run time: that one is kept in the ledger and read back by _load.
        self.half_life = settings.value("portal.fair-share-half-life")
        self.quotas: dict[str, float] = {}
        self.users: dict[str, _User] = {}
        self.live: dict[Any, _Live] = {}
        self._vtime = 0.0  # the largest tag of a finished task
        self._dirty: set[str] = set()
        self._flush_scheduled = False
        self.conn = None
        if ledger_path is not None:
            self.conn = connect(ledger_path)
            self.conn.executescript(_SCHEMA)
            self._load()
        if half_life is not None:
            self.set_half_life(half_life)

    # -- persistence ------------------------------------------------------------------------
    def _load(self) -> None:
        assert self.conn is not None
        for user, usage, at in self.conn.execute("SELECT user, usage, at FROM fairshare_usage"):
            self.users[user] = _User(usage=usage, at=at)
        settings = dict(self.conn.execute("SELECT key, value FROM fairshare_settings"))
        if "half_life" in settings:
            self.half_life = float(json.loads(settings["half_life"]))
        if "quotas" in settings:
            self.quotas = {str(k): float(v) for k, v in json.loads(settings["quotas"]).items()}

    def flush(self) -> None:
        self._flush_scheduled = False
        if self.conn is None or not self._dirty:
            return
        rows = [(u, self.users[u].usage, self.users[u].at) for u in self._dirty]
        self._dirty.clear()
        with transaction(self.conn):
            self.conn.executemany(
                "INSERT INTO fairshare_usage (user, usage, at) VALUES (?, ?, ?) "
                "ON CONFLICT(user) DO UPDATE SET usage=excluded.usage, at=excluded.at",
                rows,
            )

    def _save_setting(self, key: str, value: Any) -> None:
        if self.conn is None:
            return
        with transaction(self.conn):
            self.conn.execute(
                "INSERT INTO fairshare_settings (key, value) VALUES (?, ?) "
                "ON CONFLICT(key) DO UPDATE SET value=excluded.value",
                (key, json.dumps(value)),
            )

    def _flush_soon(self) -> None:
        """Write usage within a second, without a write per finished task."""
        if not self._flush_scheduled and self.conn is not None:
            self._flush_scheduled = write_later(self.flush, FLUSH_DELAY)

    # -- settings -----------------------------------------------------------------------------
    def set_half_life(self, seconds: float) -> None:
        if not (isinstance(seconds, (int, float)) and math.isfinite(seconds) and seconds > 0):
            raise ValueError(f"the half-life must be a positive number of seconds, not {seconds!r}")
        now = self.clock()
        for user in self.users.values():  # decay so far is kept; from now on the new rate
            user.usage, user.at = self._decayed(user, now), now
        self._dirty.update(self.users)
        self.half_life = float(seconds)
        self._save_setting("half_life", self.half_life)
        self.flush()

    def set_quota(self, user: str, cores: float | None) -> None:
        """At most ``cores`` cores at once for ``user``; None removes the quota."""
        if cores is None:
            self.quotas.pop(user, None)
        else:
            if not (isinstance(cores, (int, float)) and math.isfinite(cores) and cores > 0):
                raise ValueError(f"a quota must be a positive number of cores, not {cores!r}")
            self.quotas[user] = float(cores)
        self._save_setting("quotas", self.quotas)

    # -- usage and priority -----------------------------------------------------------------
    def _decayed(self, user: _User, now: float) -> float:
        if user.usage == 0.0:
            return 0.0
        return user.usage * 0.5 ** (max(0.0, now - user.at) / self.half_life)

    def usage(self, user: str, now: float | None = None) -> float:
        """Decayed core-seconds."""
        record = self.users.get(user)
        return (
            0.0 if record is None else self._decayed(record, self.clock() if now is None else now)
        )

    def charge(self, user: str, core_seconds: float, now: float | None = None) -> None:
        if core_seconds <= 0:
            return
        now = self.clock() if now is None else now
        record = self.users.setdefault(user, _User(at=now))
        record.usage, record.at = self._decayed(record, now) + core_seconds, now
        self._dirty.add(user)
        self._flush_soon()

    def set_running_elsewhere(self, user: str, cpus: float) -> None:
        """Cores ``user`` holds outside our scheduler (a borrowing peer portal on our lent
        volunteers, portal/lend_quota.py): shown in the report beside our users'."""
        self.users.setdefault(user, _User(at=self.clock())).running = max(0.0, float(cpus))

    def factor(self, user: str, now: float | None = None) -> float:
        """The priority factor: recent usage as cores in steady use, at least 0.5.

        Shares are inversely proportional to it (lower is better, as in HTCondor).
        """
        return max(MIN_FACTOR, self.usage(user, now) * math.log(2) / self.half_life)

    # -- tags -------------------------------------------------------------------------------
    def virtual_time(self) -> float:
        """How far the grid has got: where a newcomer's first task goes."""
        return self._vtime

    def assign(
        self, user: str, tasks: Iterable[tuple[Any, float, float]], now: float | None = None
    ) -> dict[Any, float]:
        """Tags for a user's new tasks, given ``(key, cpus)`` in the order they should run
        among themselves."""
        now = self.clock() if now is None else now
        record = self.users.setdefault(user, _User(at=now))
        if record.stale:
            record.next_tag = max((self.live[k].end for k in record.keys), default=0.0)
            record.stale = False
        factor = self.factor(user, now)
        start = max(self.virtual_time(), record.next_tag)
        tags: dict[Any, float] = {}
        for key, cpus in tasks:
            if key in self.live:
                continue
            stride = max(cpus, 0.01) * factor
            self.live[key] = _Live(user, start, start + stride, cpus)
            record.keys.add(key)
            tags[key] = start
            start += stride
        record.next_tag = start
        return tags

    def finished(self, key: Any, core_seconds: float = 0.0, now: float | None = None) -> None:
        """A task completed (or failed after running): charge its user, move virtual time."""
        live = self.live.pop(key, None)
        if live is None:
            return
        record = self.users[live.user]
        record.keys.discard(key)
        self._vtime = max(self._vtime, live.tag)
        self.charge(live.user, core_seconds, now)

    def dropped(self, key: Any) -> None:
        """A task left without finishing (cancelled, released): its place is given back."""
        live = self.live.pop(key, None)
        if live is None:
            return
        record = self.users[live.user]
        record.keys.discard(key)
        record.stale = True

    # -- Dask ---------------------------------------------------------------------------------
    def update_graph(
        self,
        scheduler: Scheduler,
        placement: Placement,
        keys: Iterable[Any],
        user_of: Callable[[Any], str],
    ) -> None:
        """Prefix the fair-share tag to the priority of each task new in this graph.

        Dask sets a task's priority once, as a 3-tuple; a 4-tuple is one we already tagged (a
        key submitted again), which keeps its place.
        """
        batches: dict[str, list[TaskState]] = {}
        for key in keys:
            ts = scheduler.tasks.get(key)
            if ts is None or ts.priority is None or len(ts.priority) != 3:
                continue
            if ts.state not in ("released", "waiting"):
                continue  # already computed or running: nothing to order
            batches.setdefault(user_of(key), []).append(ts)
        now = self.clock()
        for user, batch in batches.items():
            batch.sort(key=lambda ts: ts.priority)
            tags = self.assign(
                user,
                ((ts.key, _cpus(ts)) for ts in batch),
                now,
            )
            quota = self.quotas.get(user)
            for ts in batch:
                if ts.key in tags:
                    ts.priority = (tags[ts.key], *ts.priority)
                    if quota is not None:
                        placement.hold(ts)

    def transition(
        self,
        scheduler: Scheduler,
        placement: Placement,
        key: Any,
        start: str,
        finish: str,
        kwargs: Mapping[str, Any],
    ) -> None:
        live = self.live.get(key)
        if live is None:
            return
        record = self.users[live.user]
        if finish == "processing":
            record.running += live.cpus
            if start == "no-worker":
                record.admitting = max(0.0, record.admitting - live.cpus)
        elif start == "processing":
            record.running = max(0.0, record.running - live.cpus)
        if finish == "no-worker" and key in placement.held:
            heapq.heappush(record.parked, (live.tag, repr(key), key))
        if finish in ("memory", "erred"):
            self.finished(key, live.cpus * _compute_seconds(kwargs))
        elif finish == "forgotten":
            # Only forgetting ends a task: "released" also happens on the way to a retry.
            self.dropped(key)
        if live.user in self.quotas and (start == "processing" or finish == "no-worker"):
            self._admit(scheduler, placement, live.user)

    def _admit(self, scheduler: Scheduler, placement: Placement, user: str) -> None:
        """Let the user's best parked tasks go while they stay within their quota."""
        record = self.users[user]
        quota = self.quotas.get(user)
        admitted: list[Any] = []
        while record.parked:
            tag, _, key = record.parked[0]
            live = self.live.get(key)
            ts = scheduler.tasks.get(key)
            if live is None or ts is None or ts.state != "no-worker" or key not in placement.held:
                heapq.heappop(record.parked)
                continue
            in_use = record.running + record.admitting
            # A task bigger than the quota still runs, alone, rather than never.
            if quota is not None and in_use > 0 and in_use + live.cpus > quota:
                break
            heapq.heappop(record.parked)
            placement.release(scheduler, ts)
            record.admitting += live.cpus
            admitted.append(key)
        if admitted:
            # Plugin hooks run inside Dask's transition loop: ask for the move afterwards.
            scheduler.loop.add_callback(self._move_to_processing, scheduler, user, admitted)

    def _move_to_processing(self, scheduler: Scheduler, user: str, keys: list[Any]) -> None:
        place_parked(scheduler, keys, "fairshare-admit")
        record = self.users.get(user)
        if record is None:
            return
        for key in keys:  # no node could take it (its requirement): it no longer counts
            ts = scheduler.tasks.get(key)
            live = self.live.get(key)
            if live is not None and (ts is None or ts.state != "processing"):
                record.admitting = max(0.0, record.admitting - live.cpus)

    # -- reports ------------------------------------------------------------------------------
    def report(self, now: float | None = None) -> dict[str, Any]:
        now = self.clock() if now is None else now
        users = {}
        for name in sorted(set(self.users) | set(self.quotas)):
            record = self.users.get(name, _User())
            users[name] = {
                "usage": self.usage(name, now),
                "factor": self.factor(name, now),
                "queued": len(record.keys),
                "running_cpus": record.running,
                "quota": self.quotas.get(name),
            }
        return {"half_life": self.half_life, "users": users}


def _cpus(ts: TaskState) -> float:
    return float((ts.resource_restrictions or {}).get(CPU, 1.0))


def _compute_seconds(kwargs: Mapping[str, Any]) -> float:
    """Seconds the task computed, from the worker's start/stop records."""
    total = 0.0
    for ss in kwargs.get("startstops") or ():
        if isinstance(ss, Mapping) and ss.get("action") == "compute":
            total += max(0.0, float(ss.get("stop", 0)) - float(ss.get("start", 0)))
    return total
