"""Is this machine's Python environment one the portal's researchers can send work to?

Dask ships functions and data between the researcher, the portal and the volunteers as pickles.
A function pickled by value (a notebook's function, a ``%%grid`` cell) carries bytecode, which
only the same Python minor version can run; Dask's own messages assume matching ``dask`` and
``distributed`` releases; ``cloudpickle`` must read what the other side wrote. So a volunteer
whose versions differ from the portal's would take tasks only to fail them all. We refuse at
enrolment instead, and say what to install.

The portal reports its versions in ``GET /api/ping`` (``"versions": {...}``); a portal that does
not yet do so is not checked (a warning says so). Light on purpose (metadata only, no Dask
import): the portal uses :func:`refusal_for` for its own check of an enrolment or a join request.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import platform
import ssl
import urllib.error
import urllib.request
from collections.abc import Mapping
from typing import Any

from grid_portal.errors import GridError

logger = logging.getLogger("grid_portal.volunteer")

COMPONENTS = ("python", "dask", "distributed", "cloudpickle")


class IncompatibleEnvironment(GridError):
    """This machine's Python packages cannot work with the portal's."""


def local_versions() -> dict[str, str]:
    """Versions of the components that must match the portal's, as installed here."""
    versions = {"python": platform.python_version()}
    for name in COMPONENTS[1:]:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "missing"
    return versions


def _release(version: str, parts: int) -> tuple[str, ...]:
    """The first ``parts`` dot-separated fields: '2026.8.0' -> ('2026', '8')."""
    return tuple(version.split("+")[0].split(".")[:parts])


# How much of each version must agree: Python's minor version (bytecode), dask's and
# distributed's release month (their wire protocol changes between releases; Dask itself warns
# on any mismatch), cloudpickle's major version (its format).
_MUST_AGREE = {"python": 2, "dask": 2, "distributed": 2, "cloudpickle": 1}


def incompatibilities(mine: Mapping[str, str], theirs: Mapping[str, str]) -> list[str]:
    """What differs, one phrase each: ``["distributed 2025.1.0 here, 2026.8.0 at the portal"]``.

    Components either side does not report are not compared.
    """
    problems = []
    for name, parts in _MUST_AGREE.items():
        a, b = mine.get(name), theirs.get(name)
        if not a or not b:
            continue
        if a == "missing" or _release(a, parts) != _release(b, parts):
            problems.append(f"{name} {a} here, {b} at the portal")
    return problems


def install_hint(theirs: Mapping[str, str], mine: Mapping[str, str] | None = None) -> str:
    """What to run to match the portal."""
    mine = local_versions() if mine is None else mine
    pins = [f"{n}=={theirs[n]}" for n in ("dask", "distributed") if theirs.get(n)]
    if theirs.get("cloudpickle"):
        major = _release(theirs["cloudpickle"], 1)[0]
        pins.append(f"cloudpickle>={major},<{int(major) + 1}" if major.isdigit() else "cloudpickle")
    hint = f"pip install {' '.join(repr(p) for p in pins)}" if pins else ""
    python = theirs.get("python")
    if python and any(p.startswith("python ") for p in incompatibilities(mine, theirs)):
        minor = ".".join(_release(python, 2))
        hint = f"use Python {minor} (for example a virtual environment: python{minor} -m venv)" + (
            f", then {hint}" if hint else ""
        )
    return hint


def check_versions(theirs: Mapping[str, str], mine: Mapping[str, str] | None = None) -> None:
    """Raise IncompatibleEnvironment, saying what to install, unless the versions agree."""
    mine = local_versions() if mine is None else mine
    problems = incompatibilities(mine, theirs)
    if problems:
        raise IncompatibleEnvironment(
            "this machine cannot run the portal's work: "
            + "; ".join(problems)
            + f". To match the portal, {install_hint(theirs, mine)}; then run this command again"
        )


def refusal_for(sent: Any) -> str | None:
    """The portal's side: why a machine that sent these versions (the ``versions`` field of an
    enrolment or a join request) cannot work here, worded for that machine; None when it can,
    or when it sent none (an agent from before the check)."""
    if not isinstance(sent, dict):
        return None
    try:  # the message speaks to the machine: "theirs" is the portal's
        check_versions(theirs=local_versions(), mine={str(k): str(v) for k, v in sent.items()})
    except IncompatibleEnvironment as exc:
        return str(exc)
    return None


def portal_versions(base_url: str, context: ssl.SSLContext, timeout: float = 10) -> dict[str, str]:
    """The versions in the portal's ``GET /api/ping`` reply; {} when it does not send them."""
    with urllib.request.urlopen(f"{base_url}/api/ping", context=context, timeout=timeout) as r:
        reply: Any = json.loads(r.read())
    versions = reply.get("versions") if isinstance(reply, dict) else None
    if not isinstance(versions, dict):
        return {}
    return {str(k): str(v) for k, v in versions.items() if k in COMPONENTS}


def check_portal(base_url: str, context: ssl.SSLContext) -> dict[str, str]:
    """Check this machine against the portal at ``base_url``; return the portal's versions.

    A portal that does not report versions passes, with a warning; one that cannot be reached
    is left to the enrolment that follows, which reports it properly.
    """
    try:
        theirs = portal_versions(base_url, context)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        logger.debug("could not ask the portal for its versions: %s", exc)
        return {}
    if not theirs:
        logger.warning(
            "the portal does not report its Python and Dask versions; if tasks fail to "
            "unpickle here, match its python, dask, distributed and cloudpickle versions"
        )
        return {}
    check_versions(theirs)
    return theirs


__all__ = [
    "COMPONENTS",
    "IncompatibleEnvironment",
    "check_portal",
    "check_versions",
    "incompatibilities",
    "install_hint",
    "local_versions",
    "portal_versions",
]
