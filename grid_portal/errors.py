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
    """No node on the grid could ever run this request."""
