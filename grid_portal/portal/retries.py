"""Retries that count lost nodes: a task given ``retries=N`` runs at most N + 1 times, whether
its tries ended in an error or in its node vanishing.

Dask counts the two apart: ``retries`` covers errors only, and a task whose worker dies is run
again up to ``distributed.scheduler.allowed-failures`` times (3) for every task alike, then
fails with ``KilledWorker``, whose text counts that limit and names an address. On a grid of
volunteers, whose machines come and go, a researcher who says ``retries=0`` means "once", and
wants to be told which node was lost. So work that says how many retries it has (the
``grid_retries`` annotation, set by ``Grid.submit/map/compute(retries=)``, ``%%grid --retries``
and a workflow stage's ``retries``) has its lost nodes counted against those same retries (the
number Dask decrements on errors); work that says nothing keeps Dask's behaviour.

Dask's ``SchedulerPlugin.remove_worker`` hook runs after the lost node's tasks were already
sent elsewhere, so this wraps the scheduler's ``remove_worker`` (as the plugin wraps
``register-worker``): before Dask moves the tasks, a task with retries left spends one and is
kept from Dask's own count; one with none left fails with ``NodeLost`` naming the node.
"""

from __future__ import annotations

import logging
import pickle
from typing import TYPE_CHECKING, Any

from grid_portal.errors import NodeLost
from grid_portal.protocol import RETRIES_ANNOTATION

if TYPE_CHECKING:
    from distributed import Scheduler
    from distributed.scheduler import TaskState, WorkerState

logger = logging.getLogger("grid_portal.portal")


def install(scheduler: Scheduler) -> None:
    """Count lost nodes against the retries of the tasks that say how many they have.
    Idempotent."""
    remove_worker = scheduler.remove_worker
    if getattr(remove_worker, "grid_retries", False):
        return

    async def counting_remove_worker(
        address: str, *, stimulus_id: str, expected: bool = False, **kwargs: Any
    ) -> Any:
        ws = scheduler.workers.get(scheduler.coerce_address(address))
        if ws is not None and not expected:  # expected: it left politely, its tasks finished
            lost_node(scheduler, ws, stimulus_id)
        return await remove_worker(address, stimulus_id=stimulus_id, expected=expected, **kwargs)

    counting_remove_worker.grid_retries = True  # type: ignore[attr-defined]
    scheduler.remove_worker = counting_remove_worker  # type: ignore[method-assign]


def lost_node(scheduler: Scheduler, ws: WorkerState, stimulus_id: str) -> None:
    """``ws`` is gone while running its tasks: each task that said how many retries it has
    spends one, or fails now if it has none left."""
    recommendations: dict[Any, str] = {}
    for ts in list(ws.processing):
        given = (ts.annotations or {}).get(RETRIES_ANNOTATION)
        if given is None:
            continue  # Dask's own rule: run again elsewhere, up to allowed-failures
        if ts.retries > 0:
            ts.retries -= 1
            # Dask adds one for this loss; keep its own limit from ever failing the task.
            ts.suspicious = -1
            logger.info("node %s lost while running %s: running it again", ws.name, ts.key)
            continue
        error = _node_lost(ts, ws, given)
        logger.info("node %s lost while running %s: no retries left", ws.name, ts.key)
        recommendations.update(
            scheduler.transition(
                ts.key,
                "erred",
                stimulus_id=stimulus_id,
                worker=ws.address,
                cause=ts.key,
                exception=pickle.dumps(error),
                exception_text=str(error),
            )
        )
    if recommendations:
        scheduler.transitions(recommendations, stimulus_id=stimulus_id)


def _node_lost(ts: TaskState, ws: WorkerState, given: Any) -> NodeLost:
    tries = int(given) + 1 if isinstance(given, int) else 1
    ran = "once" if tries == 1 else f"{tries} times"
    return NodeLost(
        f"node {ws.name!r} was lost while running this task, which had no retries left "
        f"(retries={given}: it ran {ran}); run it again, or give it more retries",
        node=str(ws.name),
    )
