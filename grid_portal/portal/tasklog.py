"""Task records: where each task of a job ran, when, how it ended, and what a shell task printed.

The job book (``jobs.py``) keeps one row per job; this module owns the ``job_tasks`` table of
the ledger, one row per task, so ``grid-portal job ID`` can show per-stage progress and where
each task ran, also after a portal restart. Rows change on every transition; they are kept in
memory and written in batches (at most once a second, and before every query), as the job
book does.

It also keeps the *held outputs* of workflows: a workflow's last stages must outlive the
client that submitted them (``grid-portal submit`` returns at once), so the portal asks Dask
to keep those keys on behalf of a pseudo-client, as Dask's own published datasets do, until
the owner fetches them or they expire.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from grid_portal.portal.ledger import connect, transaction
from grid_portal.protocol import HOLD_ANNOTATION, STAGE_ANNOTATION  # noqa: F401 - names of the wire contract
from grid_portal.settings import given_or

if TYPE_CHECKING:
    from distributed import Scheduler

# Not settings: the first three bound what researchers' tasks and queries may make the portal
# hold (memory, ledger rows, one reply's size), whatever they send; the flush keeps a task's
# state in the ledger within a second of the portal hearing of it, which `grid-portal job`
# and a restarted portal's recovery rely on.
MAX_LOG_CHARS = 64 * 1024  # per stream and task: the tail is what people read
MAX_ROWS = 10_000  # one query answers at most this many tasks
RECENT = 10_000  # finished task records kept in memory for output that arrives late
FLUSH_INTERVAL = 1.0


_SCHEMA = """
CREATE TABLE IF NOT EXISTS job_tasks (
    job_id TEXT NOT NULL, key TEXT NOT NULL, stage TEXT NOT NULL, item INTEGER,
    state TEXT NOT NULL, node TEXT, submitted REAL NOT NULL, started REAL, finished REAL,
    attempts INTEGER NOT NULL DEFAULT 0, error TEXT, stdout TEXT, stderr TEXT,
    moved INTEGER, moved_from TEXT,
    PRIMARY KEY (job_id, key)
);
"""
# Columns added after the table first shipped: a ledger made before them gains them on start.
_ADDED_COLUMNS = (("moved", "INTEGER"), ("moved_from", "TEXT"))

_COLUMNS = (
    "job_id",
    "key",
    "stage",
    "item",
    "state",
    "node",
    "submitted",
    "started",
    "finished",
    "attempts",
    "error",
    "stdout",
    "stderr",
    "moved",
    "moved_from",
)

# Task states as people read them. "running" means Dask gave the task to that node; it may
# still wait there behind other tasks.
QUEUED, RUNNING, DONE, FAILED, CANCELLED = "queued", "running", "done", "failed", "cancelled"


@dataclass
class TaskRecord:
    job_id: str
    key: str
    stage: str
    item: int | None
    state: str = QUEUED
    node: str | None = None
    submitted: float = 0.0
    started: float | None = None
    finished: float | None = None
    attempts: int = 0
    error: str | None = None
    stdout: str | None = None
    stderr: str | None = None
    # Pipelines: the item's path. Bytes of inputs that had to move to ``node`` (made on
    # another node), and the nodes they came from (comma-separated); None until it ran.
    moved: int | None = None
    moved_from: str | None = None

    def row(self) -> tuple[Any, ...]:
        return tuple(getattr(self, c) for c in _COLUMNS)

    def to_dict(self, logs: bool = False) -> dict[str, Any]:
        data = {c: getattr(self, c) for c in _COLUMNS if c not in ("stdout", "stderr")}
        if logs:
            data["stdout"], data["stderr"] = self.stdout or "", self.stderr or ""
        return data


def _tail(text: Any) -> str:
    text = text if isinstance(text, str) else str(text or "")
    return text if len(text) <= MAX_LOG_CHARS else "...\n" + text[-MAX_LOG_CHARS:]


def item_of(key: Any) -> int | None:
    """The map index of a task: the integer of a ``(name, i)`` key."""
    if isinstance(key, tuple) and len(key) == 2 and isinstance(key[1], int):
        return key[1]
    return None


class TaskLog:
    def __init__(self, ledger_path: Path | None) -> None:
        self.live: dict[Any, TaskRecord] = {}  # tasks not yet finished, by Dask key
        self.by_text: dict[str, Any] = {}  # str(key) -> key, for task output
        self.recent: dict[str, TaskRecord] = {}  # finished lately, by str(key)
        self.dirty: dict[tuple[str, str], TaskRecord] = {}
        self._last_flush = 0.0
        self._flush_scheduled = False
        self.conn = None
        if ledger_path is not None:
            self.conn = connect(ledger_path)
            self.conn.executescript(_SCHEMA)
            _add_columns(self.conn)
            with transaction(self.conn):  # tasks cut short by a restart (they died with it)
                self.conn.execute(
                    "UPDATE job_tasks SET state = ?, finished = ?, error = COALESCE(error, ?) "
                    "WHERE state IN (?, ?)",
                    (CANCELLED, time.time(), "the portal restarted while it ran", QUEUED, RUNNING),
                )
        self._memory: dict[str, dict[str, TaskRecord]] = {}  # without a ledger (tests)

    # -- events -----------------------------------------------------------------------------
    def seen(self, job_id: str, key: Any, stage: str, now: float | None = None) -> None:
        if key in self.live:
            return
        record = TaskRecord(
            job_id=job_id,
            key=str(key),
            stage=stage,
            item=item_of(key),
            submitted=time.time() if now is None else now,
        )
        self.live[key] = record
        self.by_text[record.key] = key
        self._touch(record)

    def started(self, key: Any, node: str | None) -> None:
        record = self.live.get(key)
        if record is None:
            return
        record.state, record.node = RUNNING, node or record.node
        # When it went to its node, so a live task stream can draw it; replaced by when it
        # really computed once it finishes (Dask's startstops).
        record.started = time.time()
        record.attempts += 1
        self._touch(record)

    def requeued(self, key: Any) -> None:
        """Back from a node to the queue (the node left, or it is retried)."""
        record = self.live.get(key)
        if record is not None and record.state == RUNNING:
            record.state = QUEUED
            self._touch(record)

    def finished(
        self,
        key: Any,
        ok: bool,
        node: str | None = None,
        startstops: Iterable[Mapping[str, Any]] = (),
        error: str | None = None,
        moved: tuple[int, list[str]] | None = None,
    ) -> None:
        record = self.live.pop(key, None)
        if record is None:
            return
        self.by_text.pop(record.key, None)
        self._finish(record)
        now = time.time()
        computes = [s for s in startstops or () if s.get("action") == "compute"]
        record.state = DONE if ok else FAILED
        record.node = node or record.node
        record.started = min((s["start"] for s in computes), default=record.started or now)
        record.finished = max((s["stop"] for s in computes), default=now)
        record.error = None if ok else (error or "the task failed")[:2000]
        if moved is not None:
            record.moved, record.moved_from = moved[0], ",".join(moved[1]) or None
        self._touch(record)

    def node_of(self, key: Any) -> str | None:
        """The node a finished task's result was made on (None: unknown, or not a job's)."""
        record = self.recent.get(str(key))
        return record.node if record is not None else None

    def forgotten(self, key: Any) -> None:
        record = self.live.pop(key, None)
        if record is None:
            return
        self.by_text.pop(record.key, None)
        record.state = CANCELLED
        record.finished = time.time()
        self._touch(record)

    def flag(self, key: Any, error: str) -> None:
        """Mark a task failed after the fact: its replicas disagreed (portal/replicas.py)."""
        record = self.live.get(key) or self.recent.get(str(key))
        if record is None:
            return
        record.state, record.error = FAILED, error[:2000]
        self._touch(record)

    def output(self, key_text: str, stdout: Any, stderr: Any, node: str | None = None) -> bool:
        """A shell task's output, sent by the node that ran it (``node``; None: anyone).

        It may arrive just before or just after Dask reports the task finished.
        """
        key = self.by_text.get(key_text)
        record = self.live.get(key) if key is not None else self.recent.get(key_text)
        if record is None or (node is not None and record.node != node):
            return False
        record.stdout, record.stderr = _tail(stdout), _tail(stderr)
        self._touch(record)
        return True

    def _finish(self, record: TaskRecord) -> None:
        """Keep a finished record reachable a while, for output that arrives after it."""
        self.recent[record.key] = record
        while len(self.recent) > RECENT:
            self.recent.pop(next(iter(self.recent)))

    def _touch(self, record: TaskRecord) -> None:
        self.dirty[(record.job_id, record.key)] = record
        if self.conn is None:
            self._memory.setdefault(record.job_id, {})[record.key] = record
            self.dirty.clear()
            return
        if time.time() - self._last_flush >= FLUSH_INTERVAL:
            self.flush()
        elif not self._flush_scheduled:
            try:
                import asyncio

                loop = asyncio.get_running_loop()
            except RuntimeError:
                return
            self._flush_scheduled = True
            loop.call_later(FLUSH_INTERVAL, self.flush)

    def flush(self) -> None:
        self._flush_scheduled = False
        self._last_flush = time.time()
        if self.conn is None or not self.dirty:
            return
        rows = [r.row() for r in self.dirty.values()]
        self.dirty.clear()
        with transaction(self.conn):
            self.conn.executemany(
                f"INSERT OR REPLACE INTO job_tasks ({', '.join(_COLUMNS)}) "
                f"VALUES ({', '.join('?' * len(_COLUMNS))})",
                rows,
            )

    # -- queries ----------------------------------------------------------------------------
    def _records(self, job_id: str, where: str = "", args: tuple[Any, ...] = ()) -> list[Any]:
        self.flush()
        if self.conn is None:
            return list(self._memory.get(job_id, {}).values())
        return self.conn.execute(
            f"SELECT {', '.join(_COLUMNS)} FROM job_tasks WHERE job_id = ? {where} "
            f"ORDER BY submitted, stage, item, key LIMIT {MAX_ROWS}",
            (job_id, *args),
        ).fetchall()

    def tasks(self, job_id: str, logs: bool = False) -> list[dict[str, Any]]:
        rows = self._records(job_id)
        records = [r if isinstance(r, TaskRecord) else TaskRecord(*r) for r in rows]
        return [r.to_dict(logs=logs) for r in records]

    def stages(self, job_id: str) -> list[dict[str, Any]]:
        """Per-stage progress: counts by state and the nodes used, in submission order."""
        return summarize_stages(self.tasks(job_id))

    def logs(
        self, job_id: str, stage: str | None = None, item: int | None = None
    ) -> list[dict[str, Any]]:
        out = []
        for task in self.tasks(job_id, logs=True):
            if stage is not None and task["stage"] != stage:
                continue
            if item is not None and task["item"] != item:
                continue
            if task["stdout"] or task["stderr"]:
                out.append(task)
        return out


def _add_columns(conn: Any) -> None:
    have = {row[1] for row in conn.execute("PRAGMA table_info(job_tasks)")}
    for name, kind in _ADDED_COLUMNS:
        if name not in have:
            conn.execute(f"ALTER TABLE job_tasks ADD COLUMN {name} {kind}")


def item_paths(tasks: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Each map item's path through the stages, for jobs whose stages share items (pipelines).

    One entry per item that has tasks in two stages or more: ``{"item", "stage", "state",
    "node", "path": [{"stage", "state", "node", "started", "finished", "moved"}, ...]}``,
    where ``stage``/``state``/``node`` say where the item is now: its first task not done
    (running, queued, failed or cancelled), or its last one when all are done.
    """
    by_item: dict[int, list[Mapping[str, Any]]] = {}
    for task in tasks:
        stage = str(task["stage"])
        if task.get("item") is None or stage.endswith("-collect") or "-replica" in stage:
            continue
        by_item.setdefault(int(task["item"]), []).append(task)
    out = []
    for item in sorted(by_item):
        steps = sorted(by_item[item], key=lambda t: (t["submitted"], t.get("started") or 0.0))
        if len(steps) < 2:
            continue
        current = next((t for t in steps if t["state"] != DONE), steps[-1])
        out.append(
            {
                "item": item,
                "stage": current["stage"],
                "state": current["state"],
                "node": current.get("node"),
                "path": [
                    {
                        "stage": t["stage"],
                        "state": t["state"],
                        "node": t.get("node"),
                        "started": t.get("started"),
                        "finished": t.get("finished"),
                        "moved": t.get("moved"),
                    }
                    for t in steps
                ],
            }
        )
    return out


def summarize_stages(tasks: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    stages: dict[str, dict[str, Any]] = {}
    for task in tasks:
        stage = stages.setdefault(
            task["stage"],
            {
                "stage": task["stage"],
                "tasks": 0,
                QUEUED: 0,
                RUNNING: 0,
                DONE: 0,
                FAILED: 0,
                CANCELLED: 0,
                "nodes": [],
            },
        )
        stage["tasks"] += 1
        stage[task["state"]] = stage.get(task["state"], 0) + 1
        if task.get("node") and task["node"] not in stage["nodes"]:
            stage["nodes"].append(task["node"])
    return list(stages.values())


def read_tasks(ledger_path: Path, job_id: str) -> list[dict[str, Any]]:
    """A job's task records straight from a ledger file (read only; the portal may be down)."""
    import sqlite3

    uri = f"file:{ledger_path}?mode=ro"
    conn = sqlite3.connect(uri, uri=True, timeout=30)
    try:
        exists = conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type='table' AND name='job_tasks'"
        ).fetchone()
        if not exists:
            return []
        have = {row[1] for row in conn.execute("PRAGMA table_info(job_tasks)")}
        columns = ", ".join(c if c in have else "NULL" for c in _COLUMNS)  # an older ledger
        rows = conn.execute(
            f"SELECT {columns} FROM job_tasks WHERE job_id = ? "
            f"ORDER BY submitted, stage, item, key LIMIT {MAX_ROWS}",
            (job_id,),
        ).fetchall()
    finally:
        conn.close()
    return [TaskRecord(*r).to_dict(logs=True) for r in rows]


# -- held workflow outputs ------------------------------------------------------------------


@dataclass
class _Hold:
    client: str
    outputs: dict[str, list[Any]]
    since: float


class OutputHolds:
    """Results the portal keeps (in the nodes' memory, through Dask) until their owner fetches them."""

    def __init__(self, ttl: float | None = None) -> None:
        # Held outputs are dropped this long after their job finished (grid-portal.portal.
        # held-output-ttl, grid_portal/settings.py, unless given).
        self.ttl = given_or(ttl, "portal.held-output-ttl")
        self.holds: dict[str, _Hold] = {}
        self._last_expiry = 0.0

    def add(self, scheduler: Scheduler, job_id: str, stage: str, keys: list[Any]) -> None:
        hold = self.holds.get(job_id)
        if hold is None:
            hold = self.holds[job_id] = _Hold(f"grid-hold-{job_id}", {}, time.time())
        hold.outputs.setdefault(stage, []).extend(keys)
        scheduler.client_desires_keys(keys=keys, client=hold.client)

    def substitute(self, scheduler: Scheduler, job_id: str, old: Any, new: Any) -> None:
        """Hold ``new`` in place of ``old`` (a replica outvoted copy 0: portal/replicas.py)."""
        hold = self.holds.get(job_id)
        if hold is None or not any(old in keys for keys in hold.outputs.values()):
            return
        for keys in hold.outputs.values():
            keys[:] = [new if k == old else k for k in keys]
        scheduler.client_desires_keys(keys=[new], client=hold.client)
        scheduler.client_releases_keys(
            keys=[old], client=hold.client, stimulus_id=f"grid-hold-swap-{time.time()}"
        )

    def outputs(self, scheduler: Scheduler, job_id: str) -> dict[str, list[Any]] | None:
        hold = self.holds.get(job_id)
        if hold is None:
            return None
        if not any(k in scheduler.tasks for ks in hold.outputs.values() for k in ks):
            self.release(scheduler, job_id)  # cancelled: Dask forgot them
            return None
        return {s: list(k) for s, k in hold.outputs.items()}

    def release(self, scheduler: Scheduler, job_id: str) -> bool:
        hold = self.holds.pop(job_id, None)
        if hold is None:
            return False
        keys = [k for ks in hold.outputs.values() for k in ks if k in scheduler.tasks]
        if keys:
            scheduler.client_releases_keys(
                keys=keys, client=hold.client, stimulus_id=f"grid-release-{time.time()}"
            )
        scheduler.clients.pop(hold.client, None)
        return True

    def expire(self, scheduler: Scheduler, finished_at: Callable[[str], float | None]) -> None:
        """Drop holds of jobs that finished more than ``ttl`` ago (checked once a minute)."""
        now = time.time()
        if now - self._last_expiry < 60:
            return
        self._last_expiry = now
        for job_id, hold in list(self.holds.items()):
            finished = finished_at(job_id)
            gone = not any(k in scheduler.tasks for ks in hold.outputs.values() for k in ks)
            if gone or (finished is not None and now - finished > self.ttl):
                self.release(scheduler, job_id)  # expired, or cancelled (keys forgotten)
