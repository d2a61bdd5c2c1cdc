"""The job book: every job's progress, kept by the portal and written to the ledger.

Jobs are recognised from Dask's own task annotations: the Grid client wraps what it submits
in ``dask.annotate(grid_job=ID, grid_job_name=..., grid_job_kind=...)``, and the scheduler
plugin sees those annotations in ``update_graph`` and every state change in ``transition``.
So a job costs no extra round trip, and a plain Dask graph sent through ``Grid.compute`` is a
job like any other.

Counters change on every task transition; they are kept in memory and written to SQLite at
most once a second per job (and at once when a job finishes), so 10,000 tiny tasks do not
mean 10,000 writes.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from grid_portal.model import Job, JobState
from grid_portal.portal.ledger import connect, transaction, write_later
from grid_portal.settings import given_or
from grid_portal.units import counted

# A job's birth, start and end are written this soon after they happen: not in the middle of
# the scheduler's handling of a graph, where a write would delay the task's dispatch, and
# once for all the changes of that moment (20 jobs arriving together: one transaction). Any
# answer about jobs writes what is pending first (PortalPlugin), so whatever a client has been
# told about a job survives a kill -9 of the portal.
FLUSH_DELAY = 0.02  # seconds
MAX_RESULT_BYTES = 64 * 2**20
# How long kept results live (grid-portal.portal.result-ttl) and how often those whose ttl has
# passed are deleted from the ledger (grid-portal.portal.result-expiry-interval, ``grid-portal
# serve --result-expiry-interval``) are settings (grid_portal/settings.py). An expired result is
# never served (fetch_result checks its expiry); the interval only bounds how long its bytes
# (up to MAX_RESULT_BYTES each) stay in the ledger file afterwards. Also run once at each start.
# A job's kept spec (a workflow's, or a --bg cell's payload in base64): what the portal needs
# to resubmit it after a restart, and no more.
MAX_SPEC_BYTES = 16 * 2**20

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY, name TEXT NOT NULL, owner TEXT NOT NULL, kind TEXT NOT NULL,
    state TEXT NOT NULL, submitted REAL NOT NULL, started REAL, finished REAL,
    tasks_total INTEGER NOT NULL DEFAULT 0, tasks_done INTEGER NOT NULL DEFAULT 0,
    tasks_failed INTEGER NOT NULL DEFAULT 0, nodes TEXT NOT NULL DEFAULT '[]', error TEXT,
    spec TEXT, result BLOB, result_expires REAL
);
CREATE INDEX IF NOT EXISTS jobs_owner ON jobs (owner, submitted);
"""
# Columns added after the first release: (name, SQL type), added to an older ledger at start.
_ADDED_COLUMNS = (("outvoted", "TEXT"),)  # nodes a replica majority outvoted
MAX_OUTVOTED = 100  # notes kept per job (one per outvoted copy); the count goes on
MAX_SWEEP_ITEMS = 10**9  # items one sweep task may claim to carry (or announce)


def _weight(value: Any) -> int:
    """How many items a task says it carries (the client's word, about its own job only)."""
    if isinstance(value, bool) or not isinstance(value, int):
        return 1
    return min(max(1, value), MAX_SWEEP_ITEMS)


def spec_problem(spec: Any) -> str | None:
    """Why a job's spec cannot be kept in the ledger (not JSON, or too large); None if it can."""
    if spec is None:
        return None
    if not isinstance(spec, dict):
        return "a job's spec must be a mapping"
    try:
        size = len(json.dumps(spec))
    except (TypeError, ValueError, RecursionError) as exc:
        return f"a job's spec must be plain JSON data ({exc})"
    if size > MAX_SPEC_BYTES:
        return f"the job's spec is {size:,} bytes; the portal keeps at most {MAX_SPEC_BYTES:,}"
    return None


@dataclass
class JobRecord(Job):
    """A job as the portal keeps it: ``model.Job`` (what clients are told), a new one queued
    from now, and what only the portal needs."""

    state: JobState = JobState.QUEUED
    submitted: float = field(default_factory=time.time)
    spec: dict[str, Any] | None = None
    version: int = 0
    open: bool = True  # more tasks may still come (an interactive session)
    keys: set[Any] = field(default_factory=set)
    counted: set[Any] = field(default_factory=set)  # keys already counted done or failed
    abandoned: int = 0  # tasks whose client let go of them before they finished
    checks_pending: int = 0  # replica comparisons not yet made (portal/replicas.py)
    # Batching: a batch task of a sweep counts as the items it runs (key -> items, when > 1),
    # and a sweep's probe announces the items still to come, counted in tasks_total already.
    weights: dict[Any, int] = field(default_factory=dict)
    reserved: int = 0

    def to_dict(self) -> dict[str, Any]:
        """What a client is told: the fields of ``model.Job`` (its one definition), as plain
        data; the rest of the record stays at the portal."""
        data = {}
        for f in fields(Job):
            value = getattr(self, f.name)
            data[f.name] = list(value) if isinstance(value, list) else value
        data["state"] = self.state.value
        return data


class JobBook:
    def __init__(
        self,
        ledger_path: Path | None,
        result_ttl: float | None = None,
        result_expiry_interval: float | None = None,
    ) -> None:
        self.jobs: dict[str, JobRecord] = {}
        self.task_jobs: dict[Any, str] = {}  # task key -> job id, for tasks still wanted
        self.version = 0
        # Seconds; left out: the configured ones (grid-portal.portal.*).
        self.result_ttl = given_or(result_ttl, "portal.result-ttl")
        self.result_expiry_interval = given_or(
            result_expiry_interval, "portal.result-expiry-interval"
        )
        self._expiry: Any = None  # the PeriodicCallback of start_expiry
        self.conn = None
        self.on_change: Any = None  # called after every change, to wake long polls
        self._dirty: set[str] = set()  # ids of jobs changed since the last write
        self._flush_scheduled = False
        # Jobs this start found unfinished (cut short by the restart), oldest first: the
        # portal resubmits those whose spec allows (portal/recovery.py).
        self.interrupted: list[str] = []
        if ledger_path is not None:
            self.conn = connect(ledger_path)
            self.conn.executescript(_SCHEMA)
            have = {row[1] for row in self.conn.execute("PRAGMA table_info(jobs)")}
            for name, kind in _ADDED_COLUMNS:
                if name not in have:
                    self.conn.execute(f"ALTER TABLE jobs ADD COLUMN {name} {kind}")
            self._load()

    # -- persistence ------------------------------------------------------------------------
    def _load(self) -> None:
        """Jobs from before a restart: finished ones as they were; unfinished ones were cut
        short by the restart (their tasks died with the old scheduler)."""
        assert self.conn is not None
        rows = self.conn.execute(
            "SELECT id, name, owner, kind, state, submitted, started, finished, tasks_total, "
            "tasks_done, tasks_failed, nodes, error, spec, result IS NOT NULL, outvoted FROM jobs"
        ).fetchall()
        now = time.time()
        for row in rows:
            record = JobRecord(
                id=row[0],
                name=row[1],
                owner=row[2],
                kind=row[3],
                state=JobState(row[4]),
                submitted=row[5],
                started=row[6],
                finished=row[7],
                tasks_total=row[8],
                tasks_done=row[9],
                tasks_failed=row[10],
                nodes=json.loads(row[11] or "[]"),
                error=row[12],
                spec=json.loads(row[13]) if row[13] else None,
                has_result=bool(row[14]),
                outvoted=json.loads(row[15] or "[]"),
                open=False,
            )
            if not record.state.finished:
                record.state = JobState.INTERRUPTED
                record.error = "the portal restarted while this job ran; submit it again"
                record.finished = now
                self._dirty.add(record.id)
                self.interrupted.append(record.id)
            self.jobs[record.id] = record
        self.flush()

    def flush(self) -> None:
        self._flush_scheduled = False
        if self.conn is None or not self._dirty:
            return
        dirty = [self.jobs[i] for i in self._dirty if i in self.jobs]
        self._dirty.clear()
        with transaction(self.conn):
            for r in dirty:
                self.conn.execute(
                    "INSERT INTO jobs (id, name, owner, kind, state, submitted, started, "
                    "finished, tasks_total, tasks_done, tasks_failed, nodes, error, spec, outvoted) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                    "ON CONFLICT(id) DO UPDATE SET state=excluded.state, "
                    "started=excluded.started, finished=excluded.finished, "
                    "tasks_total=excluded.tasks_total, tasks_done=excluded.tasks_done, "
                    "tasks_failed=excluded.tasks_failed, nodes=excluded.nodes, "
                    "error=excluded.error, outvoted=excluded.outvoted",
                    (
                        r.id,
                        r.name,
                        r.owner,
                        r.kind,
                        r.state.value,
                        r.submitted,
                        r.started,
                        r.finished,
                        r.tasks_total,
                        r.tasks_done,
                        r.tasks_failed,
                        json.dumps(r.nodes),
                        r.error,
                        json.dumps(r.spec) if r.spec is not None else None,
                        json.dumps(r.outvoted) if r.outvoted else None,
                    ),
                )

    # -- changes ----------------------------------------------------------------------------
    def flush_soon(self) -> None:
        """Write within FLUSH_DELAY, from the event loop; at once where there is none."""
        if not self._flush_scheduled and self.conn is not None:
            self._flush_scheduled = write_later(self.flush, FLUSH_DELAY)

    def _touch(self, record: JobRecord) -> None:
        self.version += 1
        record.version = self.version
        self._dirty.add(record.id)
        if self.on_change is not None:
            self.on_change()

    def changes(self, since: int) -> list[dict[str, Any]]:
        return [r.to_dict() for r in self.jobs.values() if r.version > since]

    # -- events -----------------------------------------------------------------------------
    def ensure(
        self,
        job_id: str,
        owner: str,
        name: str | None = None,
        kind: str = "task",
        spec: dict[str, Any] | None = None,
        open: bool = False,
    ) -> JobRecord:
        record = self.jobs.get(job_id)
        if record is None:
            record = JobRecord(
                id=job_id, name=name or job_id, owner=owner, kind=kind, spec=spec, open=open
            )
            self.jobs[job_id] = record
            self._touch(record)
            # A job's existence is written at once (FLUSH_DELAY); counters may lag a second.
            # One the portal may have to run again after a restart (it has a spec) is written
            # before anything else happens.
            if spec is not None:
                self.flush()
            else:
                self.flush_soon()
        return record

    def add_tasks(
        self,
        job_id: str,
        keys: list[str],
        items: dict[Any, Any] | None = None,
        coming: int = 0,
    ) -> None:
        """``items``: keys of batch tasks and how many items each runs (a sweep);
        ``coming``: items a sweep announced with these tasks that later tasks will bring
        (counted in the total now, so the job is not done in between)."""
        record = self.jobs[job_id]
        new = [k for k in keys if k not in record.keys]
        if not new:
            return
        record.keys.update(new)
        total = 0
        for k in new:
            self.task_jobs[k] = job_id
            weight = _weight(items.get(k)) if items else 1
            if weight != 1:
                record.weights[k] = weight
            total += weight
        taken = min(record.reserved, total)  # items announced before: counted already
        record.reserved -= taken
        coming = min(max(0, int(coming or 0)), MAX_SWEEP_ITEMS)
        record.reserved += coming
        record.tasks_total += total - taken + coming
        if record.state.finished and record.state is not JobState.CANCELLED:
            record.state, record.finished = JobState.QUEUED, None  # a session took more work
        self._touch(record)

    def task_started(self, key: str, node: str | None, now: float | None = None) -> None:
        record = self._record_for(key)
        if record is None:
            return
        if record.started is None:
            record.started = time.time() if now is None else now
        if record.state is JobState.QUEUED:
            record.state = JobState.RUNNING
            self._touch(record)
            self.flush_soon()
        if node and node not in record.nodes:
            record.nodes.append(node)
        self._touch(record)

    def task_finished(
        self, key: str, ok: bool, error: str | None = None, failed_items: int = 0
    ) -> None:
        """``failed_items``: of a batch task that finished, how many items raised inside it
        (its node says so; at most the items it runs)."""
        job_id = self.task_jobs.get(key)
        record = self.jobs.get(job_id) if job_id else None
        if record is None or key in record.counted:
            return  # a result recomputed after a node was lost is not a second result
        record.counted.add(key)
        weight = record.weights.get(key, 1)
        if ok:
            failed = min(max(0, failed_items), weight)
            record.tasks_done += weight - failed
            if failed:
                record.tasks_failed += failed
                record.error = record.error or (
                    f"{failed} of the {weight} items of a batch raised; each item's "
                    "exception() says why"
                )
        else:
            record.tasks_failed += weight
            record.error = record.error or error
        self._maybe_finish(record)
        self._touch(record)

    def task_forgotten(self, key: str) -> None:
        """The client let go of a task before it finished (cancelled, or the client left)."""
        job_id = self.task_jobs.pop(key, None)
        record = self.jobs.get(job_id) if job_id else None
        if record is None or record.state.finished:
            return
        if record.reserved and not any(self.task_jobs.get(k) == job_id for k in record.keys):
            # A sweep's client let go of everything before the rest of the sweep came.
            record.tasks_total -= record.reserved
            record.reserved = 0
            self._maybe_finish(record)
            self._touch(record)
        if key in record.counted:
            return
        record.keys.discard(key)
        weight = record.weights.pop(key, 1)
        if record.tasks_done + record.tasks_failed < record.tasks_total:
            record.tasks_total = max(
                record.tasks_done + record.tasks_failed, record.tasks_total - weight
            )
        self._maybe_finish(record)
        self._touch(record)

    def _maybe_finish(self, record: JobRecord) -> None:
        if record.open or record.state.finished or record.checks_pending:
            return
        if record.tasks_done + record.tasks_failed >= record.tasks_total:
            if record.tasks_failed:
                record.state = JobState.FAILED
            elif record.abandoned:
                record.state = JobState.CANCELLED
                record.error = record.error or (
                    f"{counted(record.abandoned, 'task')} never finished: the client that "
                    "submitted the job let go of them or disconnected"
                )
            else:
                record.state = JobState.DONE
            record.finished = time.time()
            if record.started is None:
                record.started = record.finished
            self._touch(record)
            self.flush_soon()

    def close_session(self, job_id: str) -> None:
        record = self.jobs.get(job_id)
        if record is None or not record.open:
            return
        record.open = False
        outstanding = record.tasks_total - record.tasks_done - record.tasks_failed
        if outstanding > 0:
            record.tasks_total -= outstanding  # the client left: nobody wants those results
        self._maybe_finish(record)
        if not record.state.finished:
            record.state, record.finished = JobState.DONE, time.time()
        self._touch(record)

    def reopen(self, job_id: str) -> JobRecord:
        """A job cut short by a portal restart starts again from nothing, under its own id
        and owner (its tasks are about to be submitted again)."""
        record = self.jobs[job_id]
        record.state, record.error = JobState.QUEUED, None
        record.started = record.finished = None
        record.tasks_total = record.tasks_done = record.tasks_failed = 0
        record.nodes, record.keys, record.counted = [], set(), set()
        record.weights, record.reserved = {}, 0
        record.abandoned = record.checks_pending = 0
        self._touch(record)
        self.flush()
        return record

    def interrupt(self, job_id: str, reason: str) -> None:
        """Say why an interrupted job was not resubmitted."""
        record = self.jobs[job_id]
        record.state, record.error = JobState.INTERRUPTED, reason
        record.finished = record.finished or time.time()
        self._touch(record)
        self.flush()

    def check_started(self, job_id: str) -> None:
        """A comparison the job waits for before it may finish (replicas)."""
        record = self.jobs.get(job_id)
        if record is not None:
            record.checks_pending += 1

    def check_done(self, job_id: str) -> None:
        record = self.jobs.get(job_id)
        if record is None:
            return
        record.checks_pending = max(0, record.checks_pending - 1)
        self._maybe_finish(record)
        self._touch(record)

    def outvoted(self, job_id: str, note: str) -> None:
        """A copy of one of the job's tasks was outvoted by the others (portal/replicas.py)."""
        record = self.jobs.get(job_id)
        if record is None:
            return
        if len(record.outvoted) < MAX_OUTVOTED:
            record.outvoted.append(note[:1000])
        elif len(record.outvoted) == MAX_OUTVOTED:
            record.outvoted.append("... and more: see the job's task records (outvoted)")
        self._touch(record)

    def fail(self, job_id: str, reason: str) -> list[str]:
        """Mark the job failed now (replicas disagree); returns its unfinished tasks' keys."""
        record = self.jobs[job_id]
        keys = [k for k in record.keys if self.task_jobs.get(k) == job_id]
        if record.state.finished and record.state is not JobState.DONE:
            return keys
        record.state, record.error = JobState.FAILED, reason
        record.finished = time.time()
        record.started = record.started or record.finished
        record.open = False
        self._touch(record)
        self.flush()
        return keys

    def cancel(self, job_id: str, reason: str = "cancelled") -> list[str]:
        """Mark the job cancelled; returns the keys of its unfinished tasks to release."""
        record = self.jobs[job_id]
        if record.state.finished:
            return []
        record.state = JobState.CANCELLED
        record.error = reason
        record.finished = time.time()
        record.open = False
        keys = [k for k in record.keys if self.task_jobs.get(k) == job_id]
        self._touch(record)
        self.flush()
        return keys

    def _record_for(self, key: str) -> JobRecord | None:
        job_id = self.task_jobs.get(key)
        return self.jobs.get(job_id) if job_id else None

    # -- results kept for later (a %%grid --bg cell after a kernel restart) ---------------
    def store_result(self, job_id: str, data: bytes, ttl: float | None = None) -> None:
        if len(data) > MAX_RESULT_BYTES:
            raise ValueError(
                f"the result is {len(data)} bytes; the portal keeps at most {MAX_RESULT_BYTES}"
            )
        record = self.jobs[job_id]
        record.has_result = True
        self._touch(record)
        self.flush()
        if self.conn is not None:
            expires = time.time() + (self.result_ttl if ttl is None else ttl)
            with transaction(self.conn):
                self.conn.execute(
                    "UPDATE jobs SET result = ?, result_expires = ? WHERE id = ?",
                    (data, expires, job_id),
                )

    def fetch_result(self, job_id: str) -> bytes | None:
        if self.conn is None:
            return None
        row = self.conn.execute(
            "SELECT result, result_expires FROM jobs WHERE id = ?", (job_id,)
        ).fetchone()
        if row is None or row[0] is None or (row[1] is not None and row[1] < time.time()):
            return None
        return bytes(row[0])

    def expire_results(self, now: float | None = None) -> list[str]:
        """Delete kept results whose ttl has passed from the ledger; the ids of their jobs."""
        if self.conn is None:
            return []
        now = time.time() if now is None else now
        with transaction(self.conn):
            expired = [
                row[0]
                for row in self.conn.execute(
                    "SELECT id FROM jobs WHERE result_expires IS NOT NULL AND result_expires < ?",
                    (now,),
                )
            ]
            self.conn.execute(
                "UPDATE jobs SET result = NULL, result_expires = NULL "
                "WHERE result_expires IS NOT NULL AND result_expires < ?",
                (now,),
            )
        for job_id in expired:
            record = self.jobs.get(job_id)
            if record is not None and record.has_result:
                record.has_result = False
                self._touch(record)
        self.flush_soon()
        return expired

    def start_expiry(self) -> None:
        """Expire kept results now and then every ``result_expiry_interval`` seconds, on the
        running event loop (the portal plugin's start)."""
        from tornado.ioloop import PeriodicCallback

        if self.conn is None or self._expiry is not None:
            return
        self.expire_results()
        self._expiry = PeriodicCallback(self.expire_results, self.result_expiry_interval * 1000)
        self._expiry.start()

    def stop_expiry(self) -> None:
        if self._expiry is not None:
            self._expiry.stop()
            self._expiry = None

    # -- queries ----------------------------------------------------------------------------
    def list(self, owner: str | None = None) -> list[dict[str, Any]]:
        records = sorted(self.jobs.values(), key=lambda r: r.submitted)
        return [r.to_dict() for r in records if owner is None or r.owner == owner]

    def others(self, owner: str) -> dict[str, int]:
        counts = {"running": 0, "queued": 0}
        for r in self.jobs.values():
            if r.owner != owner and r.state.value in counts:
                counts[r.state.value] += 1
        return counts
