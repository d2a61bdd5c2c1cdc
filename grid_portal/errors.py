"""Errors that users can cause and fix. Front ends show these as one clear line, no traceback."""

from __future__ import annotations


class GridError(Exception):
    """Base for every error whose message is meant for the user, not for a developer.

    The message names the problem and the fix. Front ends (CLI, magics, REST) print it as one
    line; anything that is not a GridError is a bug in our code and may show a traceback.
    """


class UsageError(GridError, ValueError):
    """Bad input from the user: a size, a duration, an option value, an expression."""


class ConnectionFailed(GridError, ConnectionError):
    """The portal cannot be reached, or refused us."""


class EnrolmentRefused(GridError):
    """The portal refused to enrol a volunteer: bad, expired or used-up token."""


class Unsatisfiable(GridError):
    """No node on the grid could ever run this request.

    The message is a complete sentence for a terminal; the fields say the same as data, so a
    face (magic, CLI, REST, sidebar) can word its own advice.

    Attributes
    ----------
    where : str or None
        The requirement expression asked for, if any.
    resources : dict
        The resources one task asked for (``{"CPU": 2, "GPU": 1, "MEMORY": bytes}``).
    online : int or None
        How many nodes were connected when asked; None when not known.
    matching : list of str
        The connected nodes that met the request (fewer than needed, e.g. for replicas).
    closest : list of dict
        The closest nodes that did not, each ``{"name": ..., "reasons": [one line each]}``.
    largest : dict
        The largest offer of any node, when the request was refused on size alone.
    """

    def __init__(
        self,
        message: str,
        *,
        where: str | None = None,
        resources: dict[str, float] | None = None,
        online: int | None = None,
        matching: list[str] | tuple[str, ...] = (),
        closest: list[dict] | tuple[dict, ...] = (),
        largest: dict[str, float] | None = None,
    ) -> None:
        super().__init__(message)
        self.where = where
        self.resources = dict(resources or {})
        self.online = online
        self.matching = list(matching)
        self.closest = [dict(c) for c in closest]
        self.largest = dict(largest or {})


class NotAllowed(GridError, PermissionError):
    """The portal (or a volunteer's worker) refused a call: the caller's certificate does not
    allow it, or what it names belongs to someone else."""


class NotFound(GridError, LookupError):
    """What was named (a job, a node, a result) does not exist, or is not the caller's to see:
    the two are one answer, so that nobody learns of others' work by asking."""


class NodeLost(GridError):
    """A task's node left the grid while running it and the task had no retries left (it said
    how many it had: ``retries=N``). ``node`` names the node."""

    def __init__(self, message: str, node: str = "") -> None:
        super().__init__(message)
        self.node = node


class UntrustedResult(GridError):
    """A result from a node the researcher does not trust carried something other than data
    (a function, a class, an object of another type); it was not opened. The message names
    the type and how to trust the node."""

    def __init__(self, message: str, type_name: str = "") -> None:
        super().__init__(message)
        self.type_name = type_name


class RemoteError(Exception):
    """An exception raised on a node, shown with the node's traceback text, when the original
    cannot (or may not) be rebuilt here."""

    def __init__(self, ename: str, evalue: str, lines: list[str] | tuple[str, ...] = ()) -> None:
        super().__init__(f"{ename}: {evalue}")
        self.ename, self.evalue, self.lines = ename, evalue, list(lines)

    def _render_traceback_(self) -> list[str]:
        return list(self.lines) or [str(self)]
