"""``GET jobs/{id}/tasks``: one of your jobs as a live task stream, for the sidebar.

What Dask's dashboard shows as its task stream and progress bars, limited to the caller's own
job: each task's node, stage, state and when it ran, and per-stage counts; for a pipeline
(stages that map over another stage's items), each item's current stage, its node and its
path through the stages. It comes from the
portal's task records (``Grid.job_tasks``, handler ``grid_job_tasks``), which the portal only
answers for the caller's own jobs (staff: any), and this handler narrows staff to their own
jobs too, as ``GET jobs/{id}`` does: someone else's job is 404, as if unknown.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from jupyter_server.auth.decorator import authorized
from tornado import web

from grid_portal.jupyter.handlers import ApiError, GridHandler

if TYPE_CHECKING:
    from grid_portal.client import Grid

MAX_TASKS = 2000  # the most recent ones: a sidebar lane cannot show more
MAX_ITEMS = 500  # a pipeline's items: those still under way first
TASK_FIELDS = ("key", "stage", "item", "node", "state", "started", "finished", "attempts")


def stream_view(data: dict[str, Any], now: float) -> dict[str, Any]:
    """The portal's ``job_tasks`` answer cut to what the task stream draws."""
    tasks = data.get("tasks") or []
    # Running and queued tasks first, then the latest finished: the bars people look at.
    tasks = sorted(tasks, key=lambda t: t.get("finished") or now, reverse=True)[:MAX_TASKS]
    # A pipeline's items (an older portal sends none): where each is now, items still
    # under way first, then the rest in order.
    items = data.get("items") or []
    shown = sorted(items, key=lambda i: (i.get("state") == "done", i.get("item")))[:MAX_ITEMS]
    return {
        "job": data["job"],
        "now": now,
        "stages": data.get("stages") or [],
        "tasks": [{k: t.get(k) for k in TASK_FIELDS} for t in tasks],
        "truncated": len(data.get("tasks") or []) > MAX_TASKS,
        "items": shown,
        "items_truncated": len(items) > MAX_ITEMS,
    }


class JobTasksHandler(GridHandler):
    @web.authenticated
    @authorized
    async def get(self, job_id: str) -> None:
        me = await self.user()

        def stream(grid: Grid) -> dict[str, Any] | None:
            data = grid.job_tasks(job_id)
            if data is None or data["job"].get("owner") != me:
                return None  # someone else's job is as good as unknown to this user
            return stream_view(data, time.time())

        body = await self.run(stream)
        if body is None:
            raise ApiError(404, f"no job {job_id!r} of yours; GET jobs lists them")
        self.write_json(body)
