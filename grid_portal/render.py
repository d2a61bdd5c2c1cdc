"""Text views of grid state for terminals and plain IPython: rich tables and one-line totals."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from grid_portal.model import Capacity, Node, NodeState
from grid_portal.units import format_duration, format_size

if TYPE_CHECKING:
    from rich.table import Table

STATE_STYLE = {
    NodeState.ONLINE: "green",
    NodeState.BUSY: "cyan",
    NodeState.PAUSED: "yellow",
    NodeState.DRAINING: "magenta",
    NodeState.OFFLINE: "dim",
}


def nodes_table(nodes: list[Node]) -> Table:
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=f"{sum(n.online for n in nodes)} of {len(nodes)} nodes online")
    for column in ("node", "state", "CPUs", "CPU load", "memory", "GPUs", "tasks", "labels"):
        table.add_column(column, justify="right" if column in ("CPUs", "tasks") else "left")
    now = time.time()
    for n in sorted(nodes, key=lambda n: (not n.online, n.name)):
        t = n.telemetry
        state = n.state.value + (
            f": {n.reason}" if n.reason and n.state is not NodeState.BUSY else ""
        )
        if n.state is NodeState.OFFLINE and n.last_seen:
            state = f"offline, seen {format_duration(now - n.last_seen)} ago"
        gpus = ", ".join(g.name for g in n.capacity.gpus if g.index in n.offer.gpus) or "-"
        table.add_row(
            escape(n.name),  # what a node reports is text, never rich markup ("[/]")
            f"[{STATE_STYLE[n.state]}]{escape(state)}[/]",
            f"{n.cpus_in_use:g}/{n.offer.cpus}",
            "-" if t is None else f"{t.cpu_percent:.0f}%",
            format_size(n.offer.memory),
            escape(gpus),
            "-" if t is None else str(t.running_tasks),
            escape(" ".join(f"{k}={v}" for k, v in n.labels.items()) or "-"),
        )
    return table


def capacity_text(c: Capacity) -> str:
    return (
        f"{c.nodes_online} nodes online ({c.nodes_total} known), "
        f"cores {c.cores_free:g} free / {c.cores_total}, "
        f"GPUs {c.gpus_free:g} free / {c.gpus_total}, "
        f"memory {format_size(c.memory_free)} free / {format_size(c.memory_total)}, "
        f"{c.tasks_running} tasks running"
    )
