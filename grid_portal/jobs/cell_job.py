"""A ``--bg`` cell's job after the cell returned: followed in a thread, its result kept.

``%%grid --bg`` hands the notebook a handle at once; this follows the job behind it. It
relays the job's output to a sink the front end gives (a widget, a terminal), keeps the result
at the portal so that it can be loaded after a kernel restart, and comes to one closing line
for the front end to show. A portal that restarted while the cell ran runs it again by itself
(``CellResubmitted``); the handle then waits for that job and loads what its node kept.

The front end's part is display only (``grid_portal.notebook.magics.BackgroundCell``).
"""

from __future__ import annotations

import functools
import threading
from typing import Any

from grid_portal.errors import GridError
from grid_portal.jobs.cell import CellResubmitted, CellRun, Sink, fetch_kept, replay
from grid_portal.jobs.cell_payload import load_stored, one_line, stored_blob
from grid_portal.jobs.cell_result import CellResult, unpack
from grid_portal.units import format_duration


class CellJob:
    """The job of a ``--bg`` cell, followed in a daemon thread from the moment it is made.

    ``state`` is "running", then "done", "failed", "cancelled" or "unknown" (the connection
    was lost: the job goes on at the portal). :meth:`ended` is called once, in that thread,
    with the closing line; a front end overrides it to show the line.
    """

    def __init__(self, grid: Any, run: CellRun, labels: list[str] | None, sink: Sink) -> None:
        self.grid = grid
        self.run = run
        self.job_id = run.job_id
        self.labels = labels
        self.sink = sink
        # Zero trust: what the nodes sent opens as code only if every node of the job is trusted.
        self.trusted = functools.partial(grid.trusts_job, self.job_id)
        self.outcomes: list[dict[str, Any]] | None = None
        self.error: BaseException | None = None
        self.finished = threading.Event()
        self.state = "running"
        self._thread = threading.Thread(target=self._follow, name=f"grid-bg-{self.job_id}")
        self._thread.daemon = True
        self._thread.start()

    def _follow(self) -> None:
        sink = self.sink
        try:
            try:
                outcomes = self.run.wait(sink)
            except CellResubmitted as exc:  # the portal restarted and ran it again
                sink.stream(0, "stderr", f"{exc}\n")
                outcomes = self._kept_outcomes()
            if any(o.get("cancelled") for o in outcomes):
                raise GridError(f"job {self.job_id} was cancelled; it has no result")
            self.outcomes = outcomes
            if not all(o.get("kept") for o in outcomes):
                # A --map sweep, or a portal that refused the node's store: keep it from here.
                blob = stored_blob(outcomes, self.labels)
                try:
                    self.grid.store_result(self.job_id, blob)
                    if self.labels is not None:  # a sweep's items, held till now: kept instead
                        self.grid.release_held(self.job_id)
                except GridError as exc:
                    sink.stream(0, "stderr", f"the portal did not keep this result: {exc}\n")
            result = unpack(outcomes, self.labels, self.trusted)
            self.state = "failed" if result.error is not None else "done"
            note = self._summary(result)
        except GridError as exc:
            self.error = exc
            self.state = "cancelled" if self.run.cancelled else "failed"
            note = f"✗ {exc}"
        except Exception as exc:  # noqa: BLE001 - e.g. the connection closed under us
            self.error = GridError(
                f"lost track of job {self.job_id} ({one_line(exc)}); it goes on at the "
                f"portal: %grid result {self.job_id} fetches its result"
            )
            self.state = "unknown"
            note = f"✗ {self.error}"
        self.finished.set()
        self.ended(note)

    def ended(self, note: str) -> None:
        """The job ended (``state`` says how); ``note`` is the line to show. Shows nothing."""

    def _kept_outcomes(self) -> list[dict[str, Any]]:
        """Wait for the job at the portal and load the result its node kept there."""
        job = self.grid.wait(self.job_id)
        outcomes, _ = load_kept(self.grid, self.job_id, job)
        replay(outcomes, self.sink)
        return outcomes

    def _summary(self, result: CellResult) -> str:
        where = ", ".join(result.nodes) or "the grid"
        ran = format_duration(result.elapsed)
        if result.error is not None:
            head = f"✗ job {self.job_id} failed after {ran} on {where}"
        else:
            head = f"✓ job {self.job_id} done in {ran} on {where}"
        names = ", ".join(sorted(result.values))
        load = f"`%grid result {self.job_id}` loads " + (names if names else "its result")
        return f"{head}; {load}"

    def done(self) -> bool:
        return self.finished.is_set()

    def wait(self) -> list[dict[str, Any]]:
        """Wait for the job in the kernel's main thread (a Ctrl-C only stops the waiting)."""
        while not self.finished.wait(0.25):
            pass
        if self.error is not None:
            raise self.error
        assert self.outcomes is not None
        return self.outcomes

    def cancel(self) -> str:
        return self.run.cancel("cancelled by its owner", confirm=0)

    def __repr__(self) -> str:
        return (
            f"<grid job {self.job_id}: {self.state}; `%grid result {self.job_id}` loads its "
            "result when it is done>"
        )


def load_kept(
    grid: Any, job_id: str, job: Any | None
) -> tuple[list[dict[str, Any]], list[str] | None]:
    """The outcomes (and ``--map`` labels) of a finished cell's result kept at the portal.

    ``job`` is the portal's record of the job, which says why there is no result if there is
    none (GridError, one line).
    """
    data = fetch_kept(grid, job_id)
    if data is None:
        raise GridError(no_result(job) if job is not None else f"no job {job_id}")
    return load_stored(data)


def no_result(job: Any) -> str:
    """Why a finished job has no cell result to load, as one line."""
    if job.state.value == "cancelled":
        return f"job {job.id} was cancelled ({job.error or 'no reason given'}); it has no result"
    if job.state.value == "interrupted":
        return f"job {job.id} was cut short: {job.error}"
    return (
        f"job {job.id} kept no result at the portal: only %%grid --bg cells keep theirs (for a "
        "week, unless the portal says otherwise)"
    )
