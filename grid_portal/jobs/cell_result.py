"""What came back from a ``%%grid`` cell, opened in the kernel: values, notes and errors.

:func:`unpack` turns the outcomes a node sent (one per run) into a :class:`CellResult`. What
the node pickled is opened as data only (``grid_portal.safe_pickle``) unless every node that
ran the job is trusted; rich output from an untrusted node is made inert; the cell's own
exception comes back with the node's traceback as what IPython shows.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from grid_portal.errors import GridError, RemoteError, UntrustedResult
from grid_portal.jobs.cell_payload import one_line


class RemoteCellError(RemoteError):
    """An exception raised by the cell on its node, when the original cannot (or, from a node
    the researcher does not trust, may not) be rebuilt here."""

    def __init__(self, ename: str, evalue: str, lines: Sequence[str]) -> None:
        super().__init__(ename, evalue, list(lines))


class CellTimedOut(GridError):
    """The cell ran past its ``--timeout``; the node stopped it."""

    def _render_traceback_(self) -> list[str]:
        return [f"CellTimedOut: {self}"]


@dataclass
class CellResult:
    """What a finished cell (or --map sweep) hands back to the notebook."""

    values: dict[str, Any] = field(default_factory=dict)  # to assign in the user namespace
    deleted: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # one line each, shown on stderr
    has_value: bool = False
    value: Any = None
    value_bundle: dict[str, Any] | None = None  # the value's repr, when it could not travel
    error: BaseException | None = None
    nodes: list[str] = field(default_factory=list)
    elapsed: float = 0.0


def unpack(
    outcomes: Sequence[dict[str, Any]],
    labels: Sequence[str] | None = None,
    trusted: Callable[[], bool] | None = None,
) -> CellResult:
    """Turn the outcomes of one cell (or of each --map value, in order) into a CellResult.

    What the node pickled (variables, the value, the exception) is opened as data only
    (``grid_portal.safe_pickle``) unless ``trusted()`` says every node that ran the job is
    trusted; a refused variable is a note naming its type, and the rest still loads."""
    opener = _Opener(trusted)
    result = CellResult()
    if not outcomes:
        return result
    mapped = labels is not None
    per_name: dict[str, list[Any]] = {}
    values: list[Any] = []
    for index, outcome in enumerate(outcomes):
        prefix = f"[{labels[index]}] " if mapped and labels else ""
        node = outcome.get("node")
        if node and node not in result.nodes:
            result.nodes.append(node)
        result.elapsed = max(result.elapsed, float(outcome.get("elapsed") or 0.0))
        for name, reason in (outcome.get("unsent") or {}).items():
            result.notes.append(
                f"{prefix}{name} was not sent back ({reason}); it stayed on the node"
            )
        for name in outcome.get("missing") or ():
            result.notes.append(f"{prefix}--out {name}: the cell did not set {name}")
        for name, data in (outcome.get("outputs") or {}).items():
            try:
                value = opener.open(data)
            except UntrustedResult as exc:
                result.notes.append(f"{prefix}{name} was not loaded: {exc}")
                continue
            except Exception as exc:  # noqa: BLE001 - e.g. a module not installed here
                result.notes.append(f"{prefix}{name} could not be loaded here: {one_line(exc)}")
                continue
            if mapped:
                per_name.setdefault(name, [None] * len(outcomes))[index] = value
            else:
                result.values[name] = value
        if not mapped:
            result.deleted = list(outcome.get("deleted") or ())
        result.has_value = result.has_value or bool(outcome.get("has_value"))
        value, bundle = None, outcome.get("value_bundle")
        if outcome.get("value") is not None:
            try:
                value = opener.open(outcome["value"])
                bundle = None
            except UntrustedResult as exc:
                result.notes.append(f"{prefix}the cell's value was not loaded: {exc}")
            except Exception as exc:  # noqa: BLE001
                result.notes.append(f"{prefix}the cell's value could not be loaded here: {exc}")
        values.append(value)
        if bundle is not None and not mapped:
            result.value_bundle = bundle if opener.trusted() else _inert(bundle)
        if outcome.get("error") and result.error is None:
            result.error = rebuild_error(outcome, prefix, opener)
    if mapped:
        result.values.update(per_name)
        result.value = values
    else:
        result.value = values[0]
    return result


class _Opener:
    """Opens what a node pickled: as data only, or with cloudpickle when ``trusted()`` (asked
    at most once, and only when something is not plain data)."""

    def __init__(self, trusted: Callable[[], bool] | None) -> None:
        self._trusted = trusted
        self._answer: bool | None = None

    def trusted(self) -> bool:
        if self._answer is None:
            self._answer = bool(self._trusted is not None and self._trusted())
        return self._answer

    def open(self, data: bytes) -> Any:
        from grid_portal.safe_pickle import loads_data

        try:
            return loads_data(data)
        except UntrustedResult:
            if not self.trusted():
                raise
        import cloudpickle

        return cloudpickle.loads(data)

    def open_exception(self, data: bytes) -> Any:
        from grid_portal.safe_pickle import loads_exception

        try:
            return loads_exception(data)
        except UntrustedResult:
            if not self.trusted():
                return None  # shown as a RemoteCellError with the node's traceback
        import cloudpickle

        return cloudpickle.loads(data)


def _inert(bundle: dict[str, Any]) -> dict[str, Any]:
    from grid_portal.sanitize import inert_bundle

    return inert_bundle(bundle)[0]


def rebuild_error(
    outcome: dict[str, Any], prefix: str = "", opener: _Opener | None = None
) -> BaseException:
    """The cell's own exception, with the node's traceback as what IPython shows."""
    opener = opener or _Opener(None)
    error = outcome["error"]
    node = outcome.get("node") or "its node"
    if error.get("timed_out"):
        return CellTimedOut(f"{prefix}{error['evalue']}")
    if error.get("grid"):
        return GridError(f"{prefix}{error['evalue']}")
    lines = [line.rstrip("\n") for line in error.get("lines") or ()]
    header = f"{prefix}Traceback from node {node} (most recent call last):"
    lines = [
        header if line.startswith("Traceback (most recent call last)") else line for line in lines
    ] or [f"{prefix}{error['ename']}: {error['evalue']}"]
    exc: BaseException | None = None
    if error.get("pickled") is not None:
        with contextlib.suppress(Exception):
            exc = opener.open_exception(error["pickled"])
    # SyntaxError and BaseExceptions (SystemExit...) get special handling in IPython that
    # would show our frames; a plain Exception carrying the remote traceback does not.
    if (
        isinstance(exc, Exception)
        and not isinstance(exc, SyntaxError)
        and _can_set_attr(exc, lines)
    ):
        return exc
    return RemoteCellError(error.get("ename", "Error"), error.get("evalue", ""), lines)


def _can_set_attr(exc: BaseException, lines: list[str]) -> bool:
    try:
        exc._render_traceback_ = lambda: list(lines)  # type: ignore[attr-defined]
    except (AttributeError, TypeError):
        return False
    return True
