"""A ``%%grid --map`` cell over several portals (a Grid made with ``portals=``).

A cell's run is tied to one Dask client (its futures, its output stream, results pushed with
their completion), so the values are split over the portals that have a node for the cell, in
proportion to their free cores, in order: one ``CellRun`` per portal on that portal's own
Grid, all under one job id. Waiting relays each portal's runs in turn, their output numbered
by the values' places in the whole sweep; the outcomes come back in the values' order, so the
cell's variables are lists in that order as with one portal. Unlike ``Grid.map`` over several
portals, values sent to a portal stay there (a cell streams from the client that sent it).
"""

from __future__ import annotations

from typing import Any

from grid_portal.errors import Unsatisfiable
from grid_portal.federated import eligible, share
from grid_portal.jobs.cell import CellRun, RunOptions


def cell_run(
    grid: Any,
    payload: bytes,
    options: RunOptions,
    map_values: list[bytes] | None,
    labels: list[str] | None,
) -> Any:
    """The run for this cell: a plain ``CellRun``, or over several portals a --map cell's
    ``FederatedCellRun``."""
    if map_values is None or len(grid.portals) < 2:
        return CellRun(grid, payload, options, map_values, labels)
    return FederatedCellRun(grid, payload, options, map_values, labels)


class _Renumbered:
    """A sink for one portal's runs: their numbers become the values' places in the sweep."""

    def __init__(self, sink: Any, places: list[int]) -> None:
        self.sink, self.places = sink, places

    def started(self, index: int, node: str) -> None:
        self.sink.started(self.places[index], node)

    def stream(self, index: int, name: str, text: str) -> None:
        self.sink.stream(self.places[index], name, text)

    def display(self, index: int, data: dict[str, Any], metadata: dict[str, Any]) -> None:
        self.sink.display(self.places[index], data, metadata)

    def finished(self, index: int, outcome: dict[str, Any] | None) -> None:
        self.sink.finished(self.places[index], outcome)

    def tick(self) -> None:
        self.sink.tick()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.sink, name)


class _Trust:
    """What ``run.grid.trusts_job(run.job_id)`` asks, over every portal that ran a part."""

    def __init__(self, run: FederatedCellRun) -> None:
        self.run = run

    def trusts_job(self, job_id: str) -> bool:
        return all(part.grid.trusts_job(part.job_id) for _, part, _ in self.run.parts)


class FederatedCellRun:
    """One ``--map`` cell over several portals: one ``CellRun`` per portal (``parts``:
    ``(portal, run, places)``), with ``CellRun``'s ``submit``, ``wait``, ``cancel``,
    ``job_id``, ``count`` and ``cancelled``."""

    def __init__(
        self,
        grid: Any,
        payload: bytes,
        options: RunOptions,
        map_values: list[bytes],
        labels: list[str] | None,
    ) -> None:
        self.members = grid.portals
        self.payload, self.options, self.labels = payload, options, labels
        self.map_values = map_values
        self.count = len(map_values)
        self.parts: list[tuple[str, CellRun, list[int]]] = []
        self.job_id = ""
        self.grid = _Trust(self)

    @property
    def cancelled(self) -> bool:
        return any(part.cancelled for _, part, _ in self.parts)

    def submit(self) -> FederatedCellRun:
        """Split the values over the portals with a node for the cell and send each part."""
        opts = self.options
        wanted = {"cpus": opts.cpus, "gpus": opts.gpus, "memory": opts.memory, "where": opts.where}
        capacities = {}
        for name, member in self.members.items():
            try:
                capacities[name] = member.capacity()
            except OSError:
                continue  # a portal that does not answer takes no part
        fits, refusals = eligible(self.members, capacities, wanted)
        if not fits:
            online = sum(c.nodes_online for c in capacities.values())
            raise Unsatisfiable(
                "no portal has a node for this cell; " + " | ".join(refusals), online=online
            )
        counts = share(self.count, {n: max(c.cores_free, 0.5) for n, c in fits})
        first = 0
        for name, _ in fits:
            places = list(range(first, first + counts[name]))
            first += counts[name]
            if not places:
                continue
            labels = [self.labels[i] for i in places] if self.labels is not None else None
            values = [self.map_values[i] for i in places]
            part = CellRun(
                self.members[name], self.payload, self.options, values, labels, self.job_id or None
            )
            self.job_id = part.job_id  # one job id at every portal
            part.submit()
            self.parts.append((name, part, places))
        return self

    def wait(
        self, sink: Any, tick: float = 0.25, status_every: float | None = None
    ) -> list[dict[str, Any]]:
        """Relay each portal's runs in turn; the outcomes in the values' order. Like a loop,
        the sweep stops at its first error (the parts not waited for yet are cancelled)."""
        outcomes: list[dict[str, Any] | None] = [None] * self.count
        for at, (_, part, places) in enumerate(self.parts):
            done = part.wait(_Renumbered(sink, places), tick, status_every)
            for place, outcome in zip(places, part.outcomes, strict=True):
                outcomes[place] = outcome
            if any(o.get("error") for o in done) and self.count > 1:
                for _, later, _ in self.parts[at + 1 :]:
                    later.cancel("an earlier value of the sweep failed", confirm=0)
                break
        return [o for o in outcomes if o is not None]

    def cancel(self, reason: str, confirm: float = 5.0) -> str:
        said = [part.cancel(reason, confirm) for _, part, _ in self.parts if not part.done()]
        return said[0] if said else "nothing was running"
