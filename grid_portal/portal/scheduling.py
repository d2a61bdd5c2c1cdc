"""The portal plugin's workflow side: placement, fair share, task records and held outputs.

``PortalPlugin`` owns one ``Scheduling`` and forwards three Dask hooks to it (``update_graph``,
``transition``, ``add_worker``) plus the ``grid_*`` handlers listed in ``handlers()``. Kept
apart from ``plugin.py`` so that file stays about nodes and jobs, and so this side can grow
without touching it.

Order inside ``update_graph`` matters: Dask calls plugins after it created the new tasks and
set their priorities, and before it moves them; so restrictions (placement, quota holds) and
fair-share priorities set here are the ones Dask uses for its very first decision.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dask.utils import key_split

from grid_portal.errors import NotFound, UsageError
from grid_portal.model import Node
from grid_portal.portal.fairshare import FairShare
from grid_portal.portal.placement import WHERE_ANNOTATION, Placement
from grid_portal.portal.replicas import Replicas
from grid_portal.portal.tasklog import (
    HOLD_ANNOTATION,
    STAGE_ANNOTATION,
    OutputHolds,
    TaskLog,
    item_paths,
    summarize_stages,
)
from grid_portal.protocol import ADMIN, JOB_ANNOTATION, JOB_OWNER_ANNOTATION  # noqa: F401 - names of the wire contract
from grid_portal.requirements import ExpressionError, match_report

if TYPE_CHECKING:
    from distributed import Scheduler

    from grid_portal.portal.plugin import PortalPlugin

logger = logging.getLogger("grid_portal.portal")

# Dask's default work-stealing interval (1 s in distributed 2026.8) leaves fast nodes idle
# while slow ones hold a queue: volunteers differ in speed far more than a cluster's machines.
# 50 ms brought a 200-task sweep on nodes of speeds 2, 1 and 0.5 from 1.26x to about 1.11x its
# lower bound (bench/bench_makespan.py). The portal's scheduler process sets it at start
# (grid-portal.portal.scheduler-dask in grid-portal.yaml), not this class: a plugin must not
# change Dask's settings for every scheduler and client of the process it is made in.
SAMPLE_WORKERS = 16  # nodes Dask scores for an independent task on a large grid (sample_workers)

OUTPUT_FORWARDER = "grid-task-output"  # grid_portal.jobs.task_output.TaskOutputForwarder.name
# Pipelines (grid_portal.jobs.graph sets them): a task that follows item i of
# another stage names that stage's key prefix; a task whose failure fails its whole job.
EACH_ANNOTATION = "grid_each"
FAIL_ANNOTATION = "grid_fail"


class Scheduling:
    def __init__(self, plugin: PortalPlugin, ledger_path: Path | None) -> None:
        self.plugin = plugin
        self.placement = Placement()
        self.fairshare = FairShare(ledger_path)
        self.tasklog = TaskLog(ledger_path)
        self.holds = OutputHolds()
        # Copies of a task on different nodes, compared before use (replicas: N).
        self.replicas = Replicas(plugin, self.placement)

    def handlers(self) -> dict[str, Any]:
        return {
            "grid_match": self.handle_match,
            "grid_job_tasks": self.handle_job_tasks,
            "grid_job_logs": self.handle_job_logs,
            "grid_task_output": self.handle_task_output,
            "grid_workflow_outputs": self.handle_workflow_outputs,
            "grid_workflow_release": self.handle_workflow_release,
            "grid_fairshare": self.handle_fairshare,
            "grid_fairshare_set": self.handle_fairshare_set,
        }

    # -- Dask hooks ---------------------------------------------------------------------------
    def update_graph(
        self,
        scheduler: Scheduler,
        client: str,
        tasks: list[Any],
        annotations: dict[str, dict[Any, Any]],
    ) -> None:
        identity = self.plugin._identity_of_client(client)
        default_user = identity.name if identity is not None else "unknown"
        owners = annotations.get(JOB_OWNER_ANNOTATION, {})
        trusted = identity is not None and identity.role == ADMIN  # the portal resubmitting

        def user_of(key: Any) -> str:
            owner = owners.get(key) if trusted else None
            return str(owner) if owner else default_user

        where = annotations.get(WHERE_ANNOTATION, {})
        if where:
            self.placement.update_graph(scheduler, tasks, where)
        self.fairshare.update_graph(scheduler, self.placement, tasks, user_of)
        follows = annotations.get(EACH_ANNOTATION, {})
        if follows:
            follow_items(scheduler, self.fairshare, follows)
        self.replicas.update_graph(scheduler, tasks, annotations)
        sample_workers(scheduler, tasks)  # placement cost stays low at hundreds of nodes
        held = annotations.get(HOLD_ANNOTATION, {})
        if held:
            jobs = annotations.get(JOB_ANNOTATION, {})
            stages = annotations.get(STAGE_ANNOTATION, {})
            by_job: dict[tuple[str, str], list[Any]] = {}
            for key, flag in held.items():
                job_id = jobs.get(key)
                if flag and job_id and key in scheduler.tasks:
                    by_job.setdefault((str(job_id), str(stages.get(key, ""))), []).append(key)
            for (job_id, stage), keys in by_job.items():
                record = self.plugin.jobs.jobs.get(job_id)
                if record is not None and record.owner == user_of(keys[0]):
                    self.holds.add(scheduler, job_id, stage, keys)
        self.holds.expire(scheduler, self._finished_at)

    def _finished_at(self, job_id: str) -> float | None:
        record = self.plugin.jobs.jobs.get(job_id)
        return record.finished if record is not None else None

    def transition(
        self, scheduler: Scheduler, key: Any, start: str, finish: str, kwargs: dict[str, Any]
    ) -> None:
        self.fairshare.transition(scheduler, self.placement, key, start, finish, kwargs)
        job_id = self.plugin.jobs.task_jobs.get(key)
        if job_id is not None:
            self._record(scheduler, job_id, key, start, finish, kwargs)
        self.replicas.transition(scheduler, key, start, finish, kwargs)
        if finish == "forgotten":
            self.placement.forget(key)
        elif finish == "erred" and job_id is not None:
            ts = scheduler.tasks.get(key)
            if ts is not None and (ts.annotations or {}).get(FAIL_ANNOTATION) == "job":
                self._fail_job_soon(scheduler, job_id, key, getattr(ts, "exception_text", ""))

    def _fail_job_soon(self, scheduler: Scheduler, job_id: str, key: Any, error: str) -> None:
        """A task of a ``fail: job`` stage failed: fail its job and cancel the rest of it,
        once Dask has finished this transition."""
        stage = key[0].rsplit("-", 1)[0] if isinstance(key, tuple) else str(key)
        item = f" (item {key[1]})" if isinstance(key, tuple) and len(key) > 1 else ""
        reason = f"stage {stage!r} says fail: job, and its task{item} failed: {error or 'an error'}"

        def fail() -> None:
            record = self.plugin.jobs.jobs.get(job_id)
            if record is None or record.state.value == "cancelled":
                return
            keys = self.plugin.jobs.fail(job_id, reason[:2000])
            self.holds.release(scheduler, job_id)
            wanted = [k for k in keys if k in scheduler.tasks and scheduler.tasks[k].who_wants]
            if wanted:
                client = next(iter(scheduler.tasks[wanted[0]].who_wants)).client_key
                scheduler.stimulus_cancel(
                    wanted, client=client, force=True, reason="grid-job-failed", msg=reason
                )

        try:
            import asyncio

            asyncio.get_running_loop().call_soon(fail)
        except RuntimeError:
            fail()

    def _record(
        self,
        scheduler: Scheduler,
        job_id: str,
        key: Any,
        start: str,
        finish: str,
        kwargs: dict[str, Any],
    ) -> None:
        log = self.tasklog
        ts = scheduler.tasks.get(key)
        if start == "released" and finish not in ("memory", "erred", "forgotten"):
            # Entering the queue: new, or to be computed again (a node holding it left).
            stage = (ts.annotations or {}).get(STAGE_ANNOTATION) if ts is not None else None
            log.seen(job_id, key, str(stage or key_split(key)))
        if finish == "processing":
            ws = ts.processing_on if ts is not None else None
            log.started(key, str(ws.name) if ws is not None else None)
        elif start == "processing" and finish in ("released", "waiting", "no-worker"):
            log.requeued(key)
        elif finish in ("memory", "erred"):
            address = kwargs.get("worker")
            ws = scheduler.workers.get(address) if address else None
            node = str(ws.name) if ws is not None else None
            error = getattr(ts, "exception_text", None) if finish == "erred" else None
            moved = self._moved(ts, node) if ts is not None and node else None
            log.finished(
                key, finish == "memory", node, kwargs.get("startstops") or (), error, moved
            )
        elif finish == "forgotten":
            log.forgotten(key)

    def _moved(self, ts: Any, node: str) -> tuple[int, list[str]]:
        """Bytes of a task's inputs that were made on other nodes than ``node`` (so moved to
        it), and those nodes: an item's path through a pipeline, for the ledger."""
        moved, sources = 0, []
        for dts in ts.dependencies or ():
            made_on = self.tasklog.node_of(dts.key)
            if made_on is not None and made_on != node:
                moved += int(dts.get_nbytes())
                if made_on not in sources:
                    sources.append(made_on)
        return moved, sources

    def add_worker(self, scheduler: Scheduler, address: str) -> None:
        if OUTPUT_FORWARDER not in scheduler.worker_plugins:
            # Sent with the registration reply (built after this hook): the joining node and
            # every later one forward their shell tasks' output to grid_task_output.
            from distributed.protocol.pickle import dumps

            from grid_portal.jobs.task_output import TaskOutputForwarder

            scheduler.worker_plugins[OUTPUT_FORWARDER] = dumps(TaskOutputForwarder())
        record = self.plugin.registry.by_address(address)
        node = Node.from_dict(record.to_dict()) if record is not None else None
        self.placement.add_worker(scheduler, address, node)
        self.replicas.add_worker(scheduler, address)

    def remove_worker(self, scheduler: Scheduler, address: str) -> None:
        self.placement.remove_worker(address)
        self.replicas.remove_worker(scheduler, address)

    # -- handlers -------------------------------------------------------------------------------
    def handle_match(
        self, comm: Any = None, where: str | None = None, resources: dict[str, float] | None = None
    ) -> dict[str, Any]:
        """Which connected nodes could run a task with this requirement and these resources."""
        nodes = [Node.from_dict(d) for d in self.plugin.registry.list()]
        try:
            return match_report(nodes, where, resources or {})
        except ExpressionError as exc:
            return {"error": str(exc), "matching": [], "online": 0, "closest": []}

    def _visible(self, comm: Any, job_id: str) -> Any:
        record = self.plugin.jobs.jobs.get(job_id)
        if record is None or not self.plugin._may_see(comm, record.owner):
            return None
        return record

    def handle_job_tasks(self, comm: Any = None, job_id: str = "") -> dict[str, Any] | None:
        """A job with its per-stage progress and, for each task, where and when it ran."""
        record = self._visible(comm, job_id)
        if record is None:
            return None
        tasks = self.tasklog.tasks(job_id)
        return {
            "job": record.to_dict(),
            "stages": summarize_stages(tasks),
            "tasks": tasks,
            "items": item_paths(tasks),
        }

    def handle_job_logs(
        self, comm: Any = None, job_id: str = "", stage: str | None = None, item: int | None = None
    ) -> dict[str, Any] | None:
        if self._visible(comm, job_id) is None:
            return None
        return {"tasks": self.tasklog.logs(job_id, stage, item)}

    def handle_task_output(
        self, comm: Any = None, key: str = "", stdout: str = "", stderr: str = ""
    ) -> dict[str, Any]:
        """What a shell task printed, sent by the node that ran it (and only by that node)."""
        identity = self.plugin._caller(comm)
        if comm is not None and (identity is None or identity.role != "node"):
            return {"ok": False}
        node = identity.name if identity is not None else None
        return {"ok": self.tasklog.output(key, stdout, stderr, node=node)}

    def handle_workflow_outputs(self, comm: Any = None, job_id: str = "") -> dict[str, Any]:
        record = self._visible(comm, job_id)
        if record is None:
            raise NotFound(f"no job {job_id!r} of yours; see `grid-portal jobs`")
        if record.checks_pending:
            raise UsageError(
                f"job {job_id} is still comparing the replicas of its tasks; fetch its "
                "outputs once it is done"
            )
        assert self.plugin.scheduler is not None
        outputs = self.holds.outputs(self.plugin.scheduler, job_id)
        if outputs is None:
            raise NotFound(
                f"job {job_id} keeps no outputs: it is not a workflow, it was "
                "cancelled, or its outputs were already fetched or expired"
            )
        return {"outputs": outputs}

    def handle_workflow_release(self, comm: Any = None, job_id: str = "") -> dict[str, Any]:
        if self._visible(comm, job_id) is None or self.plugin.scheduler is None:
            return {"released": False}
        return {"released": self.holds.release(self.plugin.scheduler, job_id)}

    def handle_fairshare(self, comm: Any = None) -> dict[str, Any]:
        """Usage, priority factor and quota of each user (everyone sees everyone's: fairness
        is easier to trust when it can be checked)."""
        report = self.fairshare.report()
        report["virtual_time"] = self.fairshare.virtual_time()
        report["time"] = time.time()
        return report

    def handle_fairshare_set(
        self,
        comm: Any = None,
        half_life: float | None = None,
        user: str | None = None,
        quota: float | None = None,
        clear_quota: bool = False,
    ) -> dict[str, Any]:
        """Set the half-life or a user's quota: the portal's admin and a class's teachers
        (grid_portal/protocol.py refuses everyone else)."""
        try:
            if half_life is not None:
                self.fairshare.set_half_life(float(half_life))
            if user:
                self.fairshare.set_quota(user, None if clear_quota else quota)
        except (TypeError, ValueError) as exc:
            raise UsageError(str(exc)) from None
        return self.handle_fairshare(comm)


def follow_items(scheduler: Scheduler, fairshare: FairShare, follows: dict[Any, Any]) -> None:
    """Queue each new task of a streamed ``each`` stage in the place of the item it follows.

    Fair share tags a user's tasks in the order they arrive, and a workflow arrives stage by
    stage: left alone, item 0's second stage would queue behind every item's first stage on
    a node that runs both, and nothing would finish until the first stage had. Giving task
    ``(stage, i)`` the tag of ``(each, i)`` orders a node's queue item by item (depth first),
    so items flow through the stages as soon as their inputs exist. The user's place in the
    fair-share order still advances by every task (``FairShare.assign`` ran first).
    """
    for key, prefix in follows.items():
        if not (isinstance(key, tuple) and len(key) == 2):
            continue
        ts = scheduler.tasks.get(key)
        upstream = scheduler.tasks.get((str(prefix), key[1]))
        if (
            ts is None
            or upstream is None
            or upstream not in (ts.dependencies or ())
            or ts.state not in ("released", "waiting")
            or not ts.priority
            or not upstream.priority
            or len(ts.priority) != 4  # tagged by fair share in this graph
            or len(upstream.priority) != 4
        ):
            continue
        tag = upstream.priority[0]
        ts.priority = (tag, *ts.priority[1:])
        live = fairshare.live.get(key)
        if live is not None:
            live.tag = tag


def sample_workers(scheduler: Scheduler, keys: Iterable[Any], k: int = SAMPLE_WORKERS) -> None:
    """Let Dask choose each new independent task's node among ``k`` sampled eligible nodes.

    A task with resources (every grid task has them) is not a "root" task for Dask: it is
    placed by scoring every eligible worker, which with 200 volunteers and 20,000 tasks
    submitted at once held the scheduler's event loop for 16-25 s (bench/bench_load.py), long
    enough for heartbeats to look missed and the API to stall. The best of a few random
    choices balances load nearly as well as the best of all ("the power of d choices", as
    the Sparrow scheduler uses), and the restriction is *loose*: when none of the sampled
    nodes can take the task Dask falls back to any node, and work stealing still moves queued
    tasks to idle nodes outside the sample. Tasks that need data keep Dask's own choice (the
    nodes that hold their inputs); tasks already restricted (``where``, replicas, quotas,
    ``workers=``) are left alone.
    """
    if len(scheduler.running) <= 2 * k:
        return
    eligible: dict[tuple[Any, ...], list[str]] = {}
    for key in keys:
        ts = scheduler.tasks.get(key)
        if (
            ts is None
            or ts.dependencies
            or ts.worker_restrictions
            or ts.host_restrictions
            or ts.state != "released"
        ):
            continue
        signature = tuple(sorted((ts.resource_restrictions or {}).items()))
        pool = eligible.get(signature)
        if pool is None:
            valid = scheduler.valid_workers(ts)
            workers = scheduler.running if valid is None else valid
            pool = eligible[signature] = [ws.address for ws in workers]
        if len(pool) > 2 * k:
            ts.worker_restrictions = set(random.sample(pool, k))
            ts.loose_restrictions = True
