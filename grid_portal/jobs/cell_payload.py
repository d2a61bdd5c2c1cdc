"""What travels between the kernel and the node for a ``%%grid`` cell, and how it is packed.

Both sides import this module: the kernel packs a cell's code and inputs into one payload
(:func:`make_payload`, :func:`pack_inputs`) within :data:`MAX_CELL_BYTES`; the node's task
raises :class:`CellFailed` with the cell's outcome and keeps a ``--bg`` result as a
:func:`stored_blob`, which the kernel opens as data only (:func:`load_stored`). It imports no
Dask and no kernel-side module, so the node's processes load little.
"""

from __future__ import annotations

import pickle
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from grid_portal.errors import GridError, UntrustedResult, UsageError

if TYPE_CHECKING:
    from grid_portal.jobs.cell_analysis import CellCode

# Most a cell may send (code, pickled inputs and --map values together): past this, data
# belongs on the nodes (read there from a shared location), not in the portal's task graph.
MAX_CELL_BYTES = 200_000_000
STORED_FORMAT = "grid-cell/1"


class CellFailed(Exception):
    """Raised by the task on the node so that Dask (and the portal's job record) see a failed
    task; carries everything the kernel needs to show the failure as the cell's own."""

    def __init__(self, summary: str, outcome: dict[str, Any]) -> None:
        super().__init__(summary)
        self.outcome = outcome

    def __reduce__(self) -> tuple[Any, ...]:
        return (CellFailed, (str(self), self.outcome))


def pack_inputs(namespace: Mapping[str, Any], names: Iterable[str]) -> dict[str, bytes]:
    """cloudpickle each input on its own, so a failure can name the variable."""
    import cloudpickle

    packed = {}
    for name in names:
        value = namespace[name]
        try:
            packed[name] = cloudpickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as exc:  # noqa: BLE001 - any pickling failure means the same to the user
            raise UsageError(
                f"cannot send variable {name!r} ({type(value).__name__}) to the grid: "
                f"{one_line(exc)}. Create it inside the cell, or list only the variables the "
                "cell needs with --in a,b"
            ) from None
        check_cell_size(packed)  # stop at the variable that makes it too big
    return packed


def check_cell_size(inputs: Mapping[str, bytes], extra: int = 0) -> None:
    """Refuse a cell whose inputs (plus ``extra`` bytes: code, --map values) are larger than
    MAX_CELL_BYTES, naming the largest variables, before anything is sent."""
    from grid_portal.units import format_size

    total = sum(len(v) for v in inputs.values()) + extra
    if total <= MAX_CELL_BYTES:
        return
    largest = sorted(inputs.items(), key=lambda kv: -len(kv[1]))[:3]
    named = (
        ", ".join(f"{n} {format_size(len(v))}" for n, v in largest)
        or "its code, inputs and --map values together"
    )
    raise UsageError(
        f"this cell would send {format_size(total)} to the grid ({named}); at most "
        f"{format_size(MAX_CELL_BYTES)} travel with a cell. Read big data on the node, inside "
        "the cell (from a shared folder or URL), or leave variables out with --in a,b"
    )


def pack_value(value: Any, what: str) -> bytes:
    import cloudpickle

    try:
        return cloudpickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as exc:  # noqa: BLE001
        raise UsageError(f"cannot send {what} to the grid: {one_line(exc)}") from None


def make_payload(
    code: CellCode,
    inputs: dict[str, bytes],
    outputs: list[str] | None,
    map_name: str | None = None,
) -> bytes:
    """Everything every run of the cell shares, as one blob (plain pickle of plain data)."""
    wanted = outputs if outputs is not None else [n for n in code.writes if n != map_name]
    return pickle.dumps(
        {
            "source": code.source,
            "filename": code.filename,
            "inputs": inputs,
            "outputs": wanted,
            "explicit_outputs": outputs is not None,
            "deletes": list(code.deletes),
            "has_value": code.has_value,
            "map_name": map_name,
        },
        protocol=pickle.HIGHEST_PROTOCOL,
    )


def one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def stored_blob(outcomes: list[dict[str, Any]], labels: list[str] | None) -> bytes:
    return pickle.dumps(
        {"format": STORED_FORMAT, "outcomes": outcomes, "labels": labels},
        protocol=pickle.HIGHEST_PROTOCOL,
    )


def load_stored(data: bytes) -> tuple[list[dict[str, Any]], list[str] | None]:
    """A result kept at the portal (``%grid result`` after a kernel restart). Its node may
    have stored it, so it is opened as data only (the variables in it are opened later, by
    :func:`unpack`)."""
    from grid_portal.safe_pickle import loads_data

    try:
        blob = loads_data(data)
    except UntrustedResult:
        raise
    except Exception:  # noqa: BLE001
        blob = None
    if not isinstance(blob, dict) or blob.get("format") != STORED_FORMAT:
        raise GridError("the result kept at the portal is not a %%grid cell's result")
    return list(blob["outcomes"]), blob.get("labels")
