"""Does any node meet a requirement, and how to say no: the closest nodes and what they lack.

The portal answers ``grid_match`` with :func:`match_report`; the client turns an empty report
into ``Unsatisfiable`` (whose fields carry the report, so each face words its own advice), with
:func:`describe_refusal` as the default wording.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from grid_portal.model import CPU, GPU, MEMORY, Node, NodeState
from grid_portal.requirements.matching import compile_requirement, node_attributes
from grid_portal.units import counted, format_size


def _shortfalls(node: Node, resources: Mapping[str, float]) -> list[str]:
    """What the node's offer lacks for one task with these resources."""
    lines = []
    offer = node.offer
    cpus = resources.get(CPU, 0.0)
    if cpus > offer.cpus:
        lines.append(f"offers {offer.cpus} CPUs, needs {cpus:g}")
    gpus = resources.get(GPU, 0.0)
    if gpus > len(offer.gpus):
        lines.append(f"offers {len(offer.gpus)} GPUs, needs {gpus:g}")
    memory = resources.get(MEMORY, 0.0)
    if memory > offer.memory:
        lines.append(f"offers {format_size(offer.memory)} memory, needs {format_size(memory)}")
    return lines


def match_report(
    nodes: Iterable[Node],
    where: str | None,
    resources: Mapping[str, float] | None = None,
    closest: int = 3,
) -> dict[str, Any]:
    """Which connected nodes could run a task with this requirement and these resources.

    Returns ``{"matching": [names], "online": n, "closest": [{"name", "reasons"}]}``: the
    closest non-matching nodes are those with the fewest reasons, each reason one line such as
    ``gpu.memory is 12.0 GB, needs >= 16.0 GB``. Raises ExpressionError for a bad requirement.
    """
    expr = compile_requirement(where) if where else None
    resources = resources or {}
    matching: list[str] = []
    misses: list[tuple[int, str, list[str]]] = []
    online = 0
    for node in nodes:
        if node.state is NodeState.OFFLINE:
            continue
        online += 1
        reasons = expr.explain(node_attributes(node)) if expr is not None else []
        reasons += _shortfalls(node, resources)
        if reasons:
            misses.append((len(reasons), node.name, reasons))
        else:
            matching.append(node.name)
    misses.sort(key=lambda m: (m[0], m[1]))
    return {
        "matching": sorted(matching),
        "online": online,
        "closest": [{"name": name, "reasons": reasons} for _, name, reasons in misses[:closest]],
    }


def describe_refusal(what: str, report: Mapping[str, Any]) -> str:
    """One message for ``Unsatisfiable``: the request, the closest nodes and what they lack."""
    if not report.get("online"):
        return (
            f"no node is connected to the grid, so none meets {what}. Start a volunteer, or "
            "pass wait=True (--wait-for-nodes) to wait for one."
        )
    parts = [
        f"{c['name']}: {'; '.join(c['reasons'])}" for c in report.get("closest", ()) if c["reasons"]
    ]
    closest = " | ".join(parts)
    online = int(report["online"])
    nobody = (
        "the one connected node does not meet"
        if online == 1
        else f"none of the {counted(online, 'connected node')} meets"
    )
    return (
        f"{nobody} {what}. Closest: {closest}. "
        "Change the requirement, or pass wait=True (--wait-for-nodes) to wait for such a node."
    )
