"""After a restart: the jobs the old portal was running are submitted again, or explained.

A killed portal loses everything Dask held: queued and running tasks, and results in the
nodes' memory. The ledger still has each job's record, and for some jobs what was asked:

- a **workflow** keeps its spec (``Grid.run_workflow`` registers it with the job), so the
  portal submits it again through the same graph code as ``run_workflow``
  (``grid_portal.jobs.graph.resubmit_workflow``): same job id, same owner, same task keys.
  Not when a stage reads files from the submitter's machine (``file.py`` stages, ``files``
  maps): the portal keeps no copy of those, and must never read its own files on a
  researcher's behalf;
- a ``%%grid --bg`` **cell** keeps its payload (code and pickled inputs, which the portal
  passes on without ever unpickling), so it runs again and its node keeps the result for
  ``%grid result ID`` as before (``grid_portal.jobs.graph.resubmit_kept_cell``);
- anything else (an interactive cell, ``Grid.submit``/``map``/``compute``) exists only as
  pickled code that its client sent once: it is marked ``interrupted`` with a reason.

Jobs to resubmit are reopened (``queued``) when the plugin is built, before anyone can ask, so
no client ever sees them ``interrupted`` for a moment; they are submitted once the scheduler
listens, by a Dask client of the portal's own admin identity (trusted to submit on behalf of
the owner: the ``grid_job_owner`` annotation), on a thread of its own because that client
blocks. The portal never imports the researcher's ``Grid`` client or the kernel side of jobs:
``jobs/graph.py`` builds the graph of a kept job for both sides, and the client is
``GridDaskClient`` (tasks as opaque payloads, as the graph guard wants them from anyone).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from grid_portal.portal.jobs import JobBook
from grid_portal.protocol import JOB_OWNER_ANNOTATION as OWNER_ANNOTATION  # noqa: F401 - names of the wire contract

logger = logging.getLogger("grid_portal.portal")

# Not a setting: the portal's own client reaches its own scheduler, in the same process, over
# loopback; this only bounds a scheduler that is stopping.
CONNECT_TIMEOUT = 20.0  # seconds for the portal's own client to reach its scheduler

GONE = (
    "the portal restarted while this job ran, and it keeps no copy of a {kind} job's code "
    "(only workflows and %%grid --bg cells are resubmitted); submit it again"
)


@dataclass
class Resubmission:
    job_id: str
    owner: str
    name: str
    kind: str  # "workflow" | "cell"
    spec: dict[str, Any]


def plan(record: Any) -> tuple[Resubmission | None, str | None]:
    """What to do with one interrupted job: (a resubmission, None) or (None, the reason)."""
    spec = record.spec if isinstance(record.spec, dict) else None
    if record.kind == "workflow" and spec is not None:
        from grid_portal.jobs.graph import why_not_resubmittable

        reason = why_not_resubmittable(spec)
        if reason is None:
            return Resubmission(record.id, record.owner, record.name, "workflow", spec), None
        return None, f"the portal restarted while this job ran and could not resubmit it: {reason}"
    if record.kind == "cell" and spec is not None and isinstance(spec.get("cell"), dict):
        reason = _cell_problem(spec["cell"])
        if reason is None:
            return Resubmission(record.id, record.owner, record.name, "cell", spec), None
        return None, f"the portal restarted while this job ran and could not resubmit it: {reason}"
    return None, GONE.format(kind=record.kind)


def _cell_problem(cell: dict[str, Any]) -> str | None:
    try:
        base64.b64decode(str(cell["payload"]), validate=True)
    except (KeyError, ValueError, binascii.Error):
        return "its stored cell is damaged; run the cell again"
    if not isinstance(cell.get("request"), dict) or not isinstance(cell.get("options"), dict):
        return "its stored cell is damaged; run the cell again"
    return None


class Recovery:
    """The resubmissions one portal start owes; built with the plugin, run once it listens."""

    def __init__(self, jobs: JobBook) -> None:
        self.jobs = jobs
        self.pending: list[Resubmission] = []
        self.done: dict[str, str | None] = {}  # job id -> None (resubmitted) or why not
        for job_id in jobs.interrupted:
            record = jobs.jobs.get(job_id)
            if record is None:
                continue
            resubmission, reason = plan(record)
            if resubmission is None:
                jobs.interrupt(job_id, reason or GONE.format(kind=record.kind))
                self.done[job_id] = reason
            else:
                jobs.reopen(job_id)
                self.pending.append(resubmission)
        jobs.interrupted.clear()

    async def run(self, connection_file: Path) -> None:
        """Submit every pending job again (on a thread: a synchronous client blocks)."""
        if not self.pending:
            return
        pending, self.pending = self.pending, []
        loop = asyncio.get_running_loop()
        results = await loop.run_in_executor(None, _resubmit_all, connection_file, pending)
        for job_id, error in results.items():
            self.done[job_id] = error
            if error is None:
                logger.info("resubmitted job %s after the restart", job_id)
                continue
            logger.warning("could not resubmit job %s: %s", job_id, error)
            record = self.jobs.jobs.get(job_id)
            if record is not None and not record.state.finished and not record.tasks_total:
                self.jobs.interrupt(
                    job_id,
                    f"the portal restarted while this job ran and could not resubmit it: {error}",
                )


def _resubmit_all(connection_file: Path, pending: list[Resubmission]) -> dict[str, str | None]:
    import dask
    from distributed import fire_and_forget

    from grid_portal.connection import Connection
    from grid_portal.daskclient import GridDaskClient
    from grid_portal.errors import GridError
    from grid_portal.jobs.graph import resubmit_kept_cell, resubmit_workflow

    results: dict[str, str | None] = {}
    try:
        connection = Connection.load(connection_file)
        client = GridDaskClient(
            connection.scheduler,
            security=connection.security(),
            timeout=CONNECT_TIMEOUT,
            set_as_default=False,
        )
    except (GridError, OSError, TimeoutError, ImportError) as exc:
        # Dask raises a refused stream-start as ImportError
        return {r.job_id: str(exc) or type(exc).__name__ for r in pending}
    try:
        for item in pending:
            try:
                # The admin identity may submit on the owner's behalf; the job, its fair
                # share and its held outputs stay the owner's.
                with dask.annotate(**{OWNER_ANNOTATION: item.owner}):
                    if item.kind == "workflow":
                        resubmit_workflow(client, item.job_id, item.spec)
                    else:
                        future = resubmit_kept_cell(
                            client, item.job_id, item.name, item.spec["cell"]
                        )
                        fire_and_forget(future)
                results[item.job_id] = None
            except Exception as exc:  # noqa: BLE001 - one bad job must not stop the others
                results[item.job_id] = str(exc) or type(exc).__name__
    finally:
        client.close()
    return results
