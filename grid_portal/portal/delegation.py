"""Delegated credentials: a running job's own Dask client, confined to that job.

A task that calls ``get_client()`` (Dask's evolving workflows: submit, secede, gather, rejoin)
needs a Dask client, and its node's certificate may never act as one. The portal gives such a
job a credential of role ``delegate`` named ``<owner>/job/<job id>``
(``grid_portal.protocol.delegate_name``). What that credential may do is narrower than its
owner's certificate, and this module is the portal's side of it:

- the protocol's tables admit a delegate only as a Dask client (no grid handlers: no job
  lists, no cancelling jobs, no results kept elsewhere, no admin);
- every task it submits goes into its job, owned by the job's owner (`confine`), whatever its
  annotations say; a key that already belongs to another job stays that job's;
- it owns (gathers, cancels, asks about) only its job's keys (``Access.owns``);
- it is revoked as soon as its job is no longer running, or its owner is revoked (`ended`):
  refused on every call, its live connections dropped within a second (``Access.sweep``).

Pure bookkeeping on the scheduler's event loop: no I/O, no unpickling.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from grid_portal.identity import Identity
from grid_portal.protocol import CLIENT, DELEGATE, JOB_ANNOTATION, TEACHER, delegation

if TYPE_CHECKING:
    from distributed import Scheduler

    from grid_portal.portal.jobs import JobBook


@dataclass(frozen=True)
class Delegation:
    owner: str
    job_id: str


def delegation_of(identity: Identity | None) -> Delegation | None:
    """The job a delegate's identity speaks for; None for every other identity."""
    if identity is None or identity.role != DELEGATE:
        return None
    parsed = delegation(identity.name)
    return Delegation(*parsed) if parsed is not None else None


def ended(jobs: JobBook, delegated: Delegation, revoked: set[tuple[str, str]]) -> bool:
    """Whether the credential is spent: its job is gone, finished, cancelled or someone
    else's, or its owner's own certificate was revoked."""
    record = jobs.jobs.get(delegated.job_id)
    if record is None or record.state.finished or record.owner != delegated.owner:
        return True
    return (CLIENT, delegated.owner) in revoked or (TEACHER, delegated.owner) in revoked


def confine(
    scheduler: Scheduler,
    jobs: JobBook,
    tasks: list[Any],
    annotations: Mapping[str, dict[Any, Any]],
    delegated: Delegation,
) -> dict[str, dict[Any, Any]]:
    """The graph's job annotations, every new task in the delegate's job (in the annotations
    the plugin reads next and in the scheduler's task states, which the nodes receive)."""
    out = {name: dict(values) for name, values in annotations.items()}
    named = out.setdefault(JOB_ANNOTATION, {})
    for key in tasks:
        if jobs.task_jobs.get(key, delegated.job_id) != delegated.job_id:
            named.pop(key, None)  # another job's task: it stays that job's
            continue
        named[key] = delegated.job_id
        ts = scheduler.tasks.get(key)
        if ts is not None:
            ts.annotations = {**(ts.annotations or {}), JOB_ANNOTATION: delegated.job_id}
    return out


__all__ = ["Delegation", "confine", "delegation_of", "ended"]
