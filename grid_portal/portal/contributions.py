"""What each volunteer gave: CPU-hours, GPU-hours, tasks and credit, kept in the ledger.

Credit works as in BOINC: the time a node gave is weighted by how fast it is, so an hour of a
fast core counts for more than an hour of a slow one. Each volunteer runs a short fixed CPU
micro-benchmark when it starts (``grid_portal.benchmark``) and reports the score in its startup
capacity (``capacity["cpu_benchmark"]``, 1.0 = the reference machine; absent means 1.0). Then

    credit = core-hours x score x CREDIT_PER_CORE_HOUR + GPU-hours x CREDIT_PER_GPU_HOUR

where core-hours are a task's compute time (the worker's own start/stop records) times the
cores it reserved (its ``CPU`` resource, 1 for a plain Dask task), and GPU-hours likewise. A
failed task counts in the hours (the machine did give that time) but earns no credit, as in
BOINC, where only valid results are credited. Scores are clamped to [0.05, 20]: a volunteer
could report a made-up score, as a BOINC client could; the clamp bounds what that gains.

The same module samples the grid's capacity once a minute, for the status page's last-day
chart. Tables (owned here): ``volunteers``, ``contributions`` (per volunteer per UTC day) and
``capacity_samples``. ``jobs`` is read, never written (``portal/jobs.py`` owns it).

``ContributionsPlugin`` is a second Dask scheduler plugin beside ``PortalPlugin``, so the
portal plugin needs no hook: it sees every task transition and worker arrival by itself.
"""

from __future__ import annotations

import csv
import io
import logging
import sqlite3
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from distributed.diagnostics.plugin import SchedulerPlugin
from tornado.ioloop import PeriodicCallback

from grid_portal.benchmark import BENCHMARK_FIELD, clamp_score
from grid_portal.model import CPU, GPU
from grid_portal.portal.ledger import connect, transaction
from grid_portal.settings import given_or

if TYPE_CHECKING:
    from distributed import Scheduler

    from grid_portal.portal.plugin import PortalPlugin

logger = logging.getLogger("grid_portal.portal")

CREDIT_PER_CORE_HOUR = 1.0  # one core-hour on the reference machine (benchmark score 1.0)
# GPUs are not benchmarked yet: an hour of any GPU counts as this many reference core-hours.
CREDIT_PER_GPU_HOUR = 10.0
SITE_LABEL = "site"  # a volunteer's --label site=NAME groups it on the status page
PUBLIC_LABEL = "public"  # --label public=yes shows the volunteer's name; hidden otherwise
_YES = ("yes", "true", "1", "on")
# Capacity samples are taken every grid-portal.portal.capacity-sample-interval and kept for
# capacity-sample-retention (the status page shows the last day): grid_portal/settings.py.
# Contribution counters reach the ledger every grid-portal.portal.contribution-flush-interval.

_SCHEMA = """
CREATE TABLE IF NOT EXISTS volunteers (
    id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL UNIQUE, site TEXT,
    public INTEGER NOT NULL DEFAULT 0, benchmark REAL, first_seen REAL NOT NULL,
    last_seen REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS contributions (
    name TEXT NOT NULL, day TEXT NOT NULL, cpu_seconds REAL NOT NULL DEFAULT 0,
    gpu_seconds REAL NOT NULL DEFAULT 0, tasks INTEGER NOT NULL DEFAULT 0,
    tasks_failed INTEGER NOT NULL DEFAULT 0, credit REAL NOT NULL DEFAULT 0,
    PRIMARY KEY (name, day)
);
CREATE TABLE IF NOT EXISTS capacity_samples (
    time REAL PRIMARY KEY, nodes_online INTEGER NOT NULL, nodes_total INTEGER NOT NULL,
    cores_total REAL NOT NULL, cores_free REAL NOT NULL, gpus_total REAL NOT NULL,
    gpus_free REAL NOT NULL, memory_total INTEGER NOT NULL, tasks_running INTEGER NOT NULL
);
"""

SAMPLE_FIELDS = (
    "nodes_online",
    "nodes_total",
    "cores_total",
    "cores_free",
    "gpus_total",
    "gpus_free",
    "memory_total",
    "tasks_running",
)
CSV_FIELDS = (
    "volunteer",
    "site",
    "cpu_hours",
    "gpu_hours",
    "tasks",
    "tasks_failed",
    "credit",
    "benchmark",
    "first_seen",
    "last_seen",
)


@dataclass
class Tally:
    """One volunteer's contribution on one UTC day."""

    cpu_seconds: float = 0.0  # core-seconds
    gpu_seconds: float = 0.0
    tasks: int = 0
    tasks_failed: int = 0
    credit: float = 0.0


@dataclass
class Volunteer:
    id: int
    name: str
    site: str | None
    public: bool
    benchmark: float | None  # the score it reported; None: never reported (counts as 1.0)
    first_seen: float
    last_seen: float


def credit_for(core_seconds: float, gpu_seconds: float, score: float | None) -> float:
    """Credit for compute time given by a node whose benchmark score is ``score``."""
    factor = clamp_score(score) if score is not None else 1.0
    return (
        core_seconds / 3600.0 * factor * CREDIT_PER_CORE_HOUR
        + gpu_seconds / 3600.0 * CREDIT_PER_GPU_HOUR
    )


def day_of(when: float) -> str:
    """The UTC date of a Unix time, ``YYYY-MM-DD``."""
    return datetime.fromtimestamp(when, timezone.utc).strftime("%Y-%m-%d")


def is_public(labels: Mapping[str, Any]) -> bool:
    return str(labels.get(PUBLIC_LABEL, "")).strip().lower() in _YES


class ContributionLedger:
    """Per-volunteer tallies and capacity samples, in memory and in the ledger file.

    The portal keeps the live copy; ``grid-portal ledger`` opens the same file read-mostly
    (creating the tables if an old ledger lacks them).
    """

    def __init__(
        self,
        path: Path | None,
        clock: Callable[[], float] = time.time,
        sample_retention: float | None = None,
    ) -> None:
        self.clock = clock
        self.sample_retention = given_or(sample_retention, "portal.capacity-sample-retention")
        self.conn: sqlite3.Connection | None = None
        self.volunteers: dict[str, Volunteer] = {}
        self.tallies: dict[tuple[str, str], Tally] = {}
        self.samples: deque[dict[str, float]] = deque()
        self._dirty: set[tuple[str, str]] = set()
        self._dirty_volunteers: set[str] = set()
        if path is not None:
            self.conn = connect(Path(path))
            self.conn.executescript(_SCHEMA)
            self._load()

    # -- persistence ------------------------------------------------------------------------
    def _load(self) -> None:
        assert self.conn is not None
        for row in self.conn.execute(
            "SELECT id, name, site, public, benchmark, first_seen, last_seen FROM volunteers"
        ):
            self.volunteers[row[1]] = Volunteer(
                row[0], row[1], row[2], bool(row[3]), row[4], row[5], row[6]
            )
        for name, day, cpu, gpu, tasks, failed, credit in self.conn.execute(
            "SELECT name, day, cpu_seconds, gpu_seconds, tasks, tasks_failed, credit "
            "FROM contributions"
        ):
            self.tallies[(name, day)] = Tally(cpu, gpu, tasks, failed, credit)
        since = self.clock() - self.sample_retention
        columns = ", ".join(("time", *SAMPLE_FIELDS))
        for row in self.conn.execute(
            f"SELECT {columns} FROM capacity_samples WHERE time >= ? ORDER BY time", (since,)
        ):
            self.samples.append(dict(zip(("time", *SAMPLE_FIELDS), row, strict=True)))

    def flush(self) -> None:
        """Write what changed since the last flush (one transaction)."""
        if self.conn is None or not (self._dirty or self._dirty_volunteers):
            return
        tallies = [(k, self.tallies[k]) for k in self._dirty]
        volunteers = [self.volunteers[n] for n in self._dirty_volunteers]
        self._dirty.clear()
        self._dirty_volunteers.clear()
        with transaction(self.conn):
            self.conn.executemany(
                "UPDATE volunteers SET site = ?, public = ?, benchmark = ?, last_seen = ? "
                "WHERE id = ?",
                [(v.site, int(v.public), v.benchmark, v.last_seen, v.id) for v in volunteers],
            )
            self.conn.executemany(
                "INSERT INTO contributions (name, day, cpu_seconds, gpu_seconds, tasks, "
                "tasks_failed, credit) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT(name, day) DO "
                "UPDATE SET cpu_seconds = excluded.cpu_seconds, gpu_seconds = "
                "excluded.gpu_seconds, tasks = excluded.tasks, tasks_failed = "
                "excluded.tasks_failed, credit = excluded.credit",
                [
                    (n, d, t.cpu_seconds, t.gpu_seconds, t.tasks, t.tasks_failed, t.credit)
                    for (n, d), t in tallies
                ],
            )

    # -- events -----------------------------------------------------------------------------
    def seen(
        self,
        name: str,
        labels: Mapping[str, Any] | None = None,
        capacity: Mapping[str, Any] | None = None,
        now: float | None = None,
    ) -> Volunteer:
        """A volunteer joined (or worked): remember its site, public choice and benchmark."""
        now = self.clock() if now is None else now
        labels = labels or {}
        raw_score = (capacity or {}).get(BENCHMARK_FIELD)
        score = clamp_score(raw_score) if raw_score is not None else None
        site = str(labels[SITE_LABEL])[:100] if labels.get(SITE_LABEL) else None
        public = is_public(labels)
        volunteer = self.volunteers.get(name)
        if volunteer is None:
            volunteer = Volunteer(0, name, site, public, score, now, now)
            volunteer.id = self._insert(volunteer)
            self.volunteers[name] = volunteer
            return volunteer
        if labels or capacity:  # a join tells us its current choices; a task alone does not
            volunteer.site, volunteer.public = site, public
            if score is not None:
                volunteer.benchmark = score
        volunteer.last_seen = now
        self._dirty_volunteers.add(name)
        return volunteer

    def _insert(self, v: Volunteer) -> int:
        if self.conn is None:
            return max((x.id for x in self.volunteers.values()), default=0) + 1
        with transaction(self.conn):
            cursor = self.conn.execute(
                "INSERT INTO volunteers (name, site, public, benchmark, first_seen, last_seen) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (v.name, v.site, int(v.public), v.benchmark, v.first_seen, v.last_seen),
            )
        return int(cursor.lastrowid or 0)

    def record_task(
        self,
        name: str,
        core_seconds: float,
        gpu_seconds: float = 0.0,
        ok: bool = True,
        now: float | None = None,
    ) -> None:
        """A task ran on ``name`` for this much compute time (already times its cores)."""
        now = self.clock() if now is None else now
        volunteer = self.volunteers.get(name) or self.seen(name, now=now)
        volunteer.last_seen = now
        self._dirty_volunteers.add(name)
        key = (name, day_of(now))
        tally = self.tallies.setdefault(key, Tally())
        tally.cpu_seconds += max(0.0, core_seconds)
        tally.gpu_seconds += max(0.0, gpu_seconds)
        if ok:
            tally.tasks += 1
            tally.credit += credit_for(core_seconds, gpu_seconds, volunteer.benchmark)
        else:
            tally.tasks_failed += 1
        self._dirty.add(key)

    def sample(self, capacity: Mapping[str, Any], now: float | None = None) -> dict[str, float]:
        """Keep one capacity sample (``NodeRegistry.capacity()``); drop those past retention."""
        now = self.clock() if now is None else now
        row = {"time": now, **{k: capacity.get(k, 0) or 0 for k in SAMPLE_FIELDS}}
        self.samples.append(row)
        cutoff = now - self.sample_retention
        while self.samples and self.samples[0]["time"] < cutoff:
            self.samples.popleft()
        if self.conn is not None:
            with transaction(self.conn):
                self.conn.execute(
                    f"INSERT OR REPLACE INTO capacity_samples (time, {', '.join(SAMPLE_FIELDS)}) "
                    f"VALUES ({', '.join('?' * (len(SAMPLE_FIELDS) + 1))})",
                    (now, *(row[k] for k in SAMPLE_FIELDS)),
                )
                self.conn.execute("DELETE FROM capacity_samples WHERE time < ?", (cutoff,))
        return row

    # -- queries ----------------------------------------------------------------------------
    def contributors(self, since_day: str | None = None) -> list[dict[str, Any]]:
        """Every volunteer's totals (from ``since_day`` on, if given), most credit first."""
        totals: dict[str, Tally] = {}
        for (name, day), t in self.tallies.items():
            if since_day is not None and day < since_day:
                continue
            total = totals.setdefault(name, Tally())
            total.cpu_seconds += t.cpu_seconds
            total.gpu_seconds += t.gpu_seconds
            total.tasks += t.tasks
            total.tasks_failed += t.tasks_failed
            total.credit += t.credit
        rows = []
        for name, total in totals.items():
            v = self.volunteers.get(name) or Volunteer(0, name, None, False, None, 0.0, 0.0)
            rows.append(
                {
                    "id": v.id,
                    "name": name,
                    "public": v.public,
                    "site": v.site,
                    "cpu_hours": total.cpu_seconds / 3600.0,
                    "gpu_hours": total.gpu_seconds / 3600.0,
                    "tasks": total.tasks,
                    "tasks_failed": total.tasks_failed,
                    "credit": total.credit,
                    "benchmark": v.benchmark if v.benchmark is not None else 1.0,
                    "first_seen": v.first_seen,
                    "last_seen": v.last_seen,
                }
            )
        rows.sort(key=lambda r: (-r["credit"], -r["cpu_hours"], r["id"]))
        return rows

    def history(self, since: float) -> list[dict[str, float]]:
        return [s for s in self.samples if s["time"] >= since]

    def jobs_per_day(self, days: int = 14, now: float | None = None) -> list[dict[str, Any]]:
        """Jobs finished on each of the last ``days`` UTC days (from the ledger's jobs table)."""
        now = self.clock() if now is None else now
        first = now - (days - 1) * 86400.0
        wanted = [day_of(first + i * 86400.0) for i in range(days)]
        counts: dict[str, dict[str, int]] = {d: {"jobs": 0, "failed": 0} for d in wanted}
        if self.conn is not None:
            try:
                rows = self.conn.execute(
                    "SELECT date(finished, 'unixepoch') AS day, count(*), "
                    "sum(CASE WHEN state = 'failed' THEN 1 ELSE 0 END) FROM jobs "
                    "WHERE finished IS NOT NULL AND date(finished, 'unixepoch') >= ? "
                    "GROUP BY day",
                    (wanted[0],),
                ).fetchall()
            except sqlite3.OperationalError:  # a ledger from before jobs were kept
                rows = []
            for day, count, failed in rows:
                if day in counts:
                    counts[day] = {"jobs": int(count), "failed": int(failed or 0)}
        return [{"day": d, **counts[d]} for d in wanted]


def public_rows(rows: Iterable[Mapping[str, Any]], reveal: bool = False) -> list[dict[str, Any]]:
    """Contribution rows as the public may see them: a volunteer's name only if it chose
    ``public=yes`` (or ``reveal``, for the portal's admin); otherwise "volunteer N", a number
    that says only in which order volunteers first joined."""
    shown = []
    for r in rows:
        named = bool(r.get("public")) or reveal
        shown.append(
            {
                "volunteer": r["name"] if named else f"volunteer {r['id']}",
                "named": named,
                "site": r.get("site"),
                "cpu_hours": round(float(r["cpu_hours"]), 6),
                "gpu_hours": round(float(r["gpu_hours"]), 6),
                "tasks": int(r["tasks"]),
                "tasks_failed": int(r["tasks_failed"]),
                "credit": round(float(r["credit"]), 6),
                "benchmark": round(float(r["benchmark"]), 3),
                "first_seen": _iso(r.get("first_seen")),
                "last_seen": _iso(r.get("last_seen")),
            }
        )
    return shown


def totals_of(rows: Iterable[Mapping[str, Any]]) -> dict[str, float]:
    rows = list(rows)
    return {
        "volunteers": len(rows),
        "cpu_hours": round(sum(float(r["cpu_hours"]) for r in rows), 6),
        "gpu_hours": round(sum(float(r["gpu_hours"]) for r in rows), 6),
        "tasks": sum(int(r["tasks"]) for r in rows),
        "credit": round(sum(float(r["credit"]) for r in rows), 6),
    }


def to_csv(rows: Iterable[Mapping[str, Any]]) -> str:
    """``public_rows`` as CSV, one volunteer a line."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_FIELDS)
    for r in rows:
        writer.writerow([_csv_cell(r.get(f)) for f in CSV_FIELDS])
    return out.getvalue()


def _csv_cell(value: Any) -> Any:
    if value is None:
        return ""
    # A text cell starting with = + - @ is a formula to spreadsheets: a site label such as
    # "=HYPERLINK(...)" must stay text when someone opens the export.
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value


def _iso(when: Any) -> str | None:
    if not when:
        return None
    return datetime.fromtimestamp(float(when), timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# -- the Dask side ------------------------------------------------------------------------------
def _compute_seconds(startstops: Any) -> float | None:
    """Seconds a task computed, from the worker's start/stop records; None if it never ran
    here (data moved or scattered, not computed)."""
    total, ran = 0.0, False
    for ss in startstops or ():
        if isinstance(ss, Mapping) and ss.get("action") == "compute":
            ran = True
            total += max(0.0, float(ss.get("stop", 0)) - float(ss.get("start", 0)))
    return total if ran else None


class ContributionsPlugin(SchedulerPlugin):
    """Counts every computed task for the node that ran it; samples capacity each minute."""

    name = "grid-contributions"

    def __init__(
        self,
        ledger_path: Path | None,
        portal: PortalPlugin,
        sample_interval: float | None = None,
        flush_interval: float | None = None,  # seconds; None: the configured one
    ) -> None:
        self.ledger = ContributionLedger(ledger_path)
        self.portal = portal
        self.sample_interval = given_or(sample_interval, "portal.capacity-sample-interval")
        self.flush_interval = given_or(flush_interval, "portal.contribution-flush-interval")
        self.scheduler: Scheduler | None = None
        self._last_sample = 0.0
        self._pc: PeriodicCallback | None = None

    async def start(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler
        for address in list(scheduler.workers):
            self.add_worker(scheduler, address)
        self._pc = PeriodicCallback(self.tick, self.flush_interval * 1000)
        self._pc.start()
        self.tick()

    async def close(self) -> None:
        if self._pc is not None:
            self._pc.stop()
        self.ledger.flush()

    def tick(self) -> None:
        now = time.time()
        if now - self._last_sample >= self.sample_interval:
            self._last_sample = now
            self.ledger.sample(self.portal.registry.capacity(), now)
        self.ledger.flush()

    def add_worker(self, scheduler: Scheduler, worker: str) -> None:
        ws = scheduler.workers.get(worker)
        if ws is None:
            return
        info = ws.extra.get("grid") or {}  # PortalPlugin.STARTUP_KEY: what the node reported
        self.ledger.seen(str(ws.name), info.get("labels") or {}, info.get("capacity") or {})

    def transition(
        self, key: Any, start: str, finish: str, *args: Any, stimulus_id: str = "", **kwargs: Any
    ) -> None:
        if start != "processing" or finish not in ("memory", "erred"):
            return
        seconds = _compute_seconds(kwargs.get("startstops"))
        scheduler = self.scheduler
        if seconds is None or scheduler is None:
            return
        ws = scheduler.workers.get(kwargs.get("worker"))
        if ws is None:
            return
        ts = scheduler.tasks.get(key)
        restrictions = (ts.resource_restrictions if ts is not None else None) or {}
        cpus = float(restrictions.get(CPU, 1.0))
        gpus = float(restrictions.get(GPU, 0.0))
        name, ok = str(ws.name), finish == "memory"

        def record(valid: bool = True) -> None:
            self.ledger.record_task(name, seconds * cpus, seconds * gpus, ok and valid)

        # A copy of a replicated task is credited once compared: an outvoted one is not.
        replicas = getattr(getattr(self.portal, "scheduling", None), "replicas", None)
        if not (ok and replicas is not None and replicas.defer_credit(key, record)):
            record()
