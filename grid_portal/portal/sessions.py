"""Every task is a job: a Dask client's plain work forms its session job.

Work sent through ``Grid.submit``/``map``/``compute``, ``with grid.job(...)``, ``%%grid`` cells
and workflows carries a ``grid_job`` annotation. Plain Dask work does not: ``client.submit``,
``client.map`` and collections (``x.compute()``, ``dask.persist``, joblib's dask backend) from
``Client(GridCluster())``, or from any client that does not name a job. The portal makes such
tasks the *session job* of the client connection that sent them:

- one per client connection (a fresh one after the session job was cancelled, so that
  cancelling stops what runs without refusing what the researcher sends next);
- owned by the connection's TLS identity (never by anything in the message);
- kind ``"dask"``, open while the client is connected and closed when it leaves (the plugin's
  ``remove_client`` closes open jobs; see ``JobBook.close_session``);
- written into each task's ``annotations`` too, before the scheduler sends it anywhere, so a
  node gives the session one fresh sandbox (``grid_portal/node/taskproc.py``), not one per task,
  and counts, lists, fair-shares and cancels it like any job.

Pure bookkeeping on the scheduler's event loop: no I/O, no unpickling.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from grid_portal.model import JobState
from grid_portal.protocol import (
    JOB_ANNOTATION,
    JOB_KIND_ANNOTATION,
    JOB_NAME_ANNOTATION,
    JOB_OPEN_ANNOTATION,
)

if TYPE_CHECKING:
    from distributed import Scheduler

    from grid_portal.portal.jobs import JobBook

SESSION_KIND = "dask"
SESSION_PREFIX = "dask-"


class DaskSessions:
    """The session job of each connected client (client id -> job id)."""

    def __init__(self, jobs: JobBook) -> None:
        self.jobs = jobs
        self._current: dict[str, str] = {}
        self._generation: dict[str, int] = {}

    def job_of(self, scheduler: Scheduler, client: str) -> str:
        """The client's current session job id: a new one if the last was cancelled."""
        for gone in [c for c in self._current if c not in scheduler.clients]:
            self._current.pop(gone, None)
            self._generation.pop(gone, None)
        job_id = self._current.get(client)
        record = self.jobs.jobs.get(job_id) if job_id is not None else None
        if job_id is None or (record is not None and record.state is JobState.CANCELLED):
            generation = self._generation.get(client, 0) + 1
            self._generation[client] = generation
            digest = hashlib.sha256(f"{client}/{generation}".encode()).hexdigest()[:10]
            job_id = self._current[client] = SESSION_PREFIX + digest
        return job_id

    def annotate(
        self,
        scheduler: Scheduler,
        client: str,
        tasks: list[Any],
        annotations: Mapping[str, dict[Any, Any]],
    ) -> dict[str, dict[Any, Any]]:
        """Give the tasks of this graph that name no job the client's session job, in the
        scheduler's task states and in the annotations the plugin goes on to read."""
        named = annotations.get(JOB_ANNOTATION) or {}
        plain = []
        for key in tasks:
            if key in named or key in self.jobs.task_jobs:
                continue
            ts = scheduler.tasks.get(key)
            if ts is None or (ts.annotations or {}).get(JOB_ANNOTATION):
                continue
            if ts.state in ("memory", "erred", "forgotten") or ts.run_spec is None:
                continue  # already done (someone's earlier result), or data (scatter)
            plain.append(ts)
        if not plain:
            return dict(annotations)
        job_id = self.job_of(scheduler, client)
        session = {
            JOB_ANNOTATION: job_id,
            JOB_NAME_ANNOTATION: f"Dask session {client}"[:120],
            JOB_KIND_ANNOTATION: SESSION_KIND,
            JOB_OPEN_ANNOTATION: True,
        }
        result = {name: dict(values) for name, values in annotations.items()}
        for ts in plain:
            if ts.annotations is None:
                ts.annotations = {}
            ts.annotations.update(session)
            for name, value in session.items():
                result.setdefault(name, {})[ts.key] = value
        return result


__all__ = ["DaskSessions", "SESSION_KIND"]
