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
  refused on every call, its live connections dropped within a second (``Access.sweep``);
- it is issued (`issue`, the ``grid_delegate`` handler) only to the node that runs a task of
  that job at that moment, for a key the task process made, and signed by the enrolment
  process (which holds the CA key and checks that the owner's enrolment stands).

Pure bookkeeping on the scheduler's event loop: no I/O, no unpickling.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from grid_portal.errors import NotAllowed, UsageError
from grid_portal.identity import Identity
from grid_portal.protocol import (
    CLIENT,
    DELEGATE,
    JOB_ANNOTATION,
    NODE,
    TEACHER,
    delegate_name,
    delegation,
)

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


Signer = Callable[[str, str], Awaitable[str]]  # (csr, delegate name) -> certificate PEM


async def issue(
    scheduler: Scheduler,
    jobs: JobBook,
    signer: Signer | None,
    identity: Identity | None,
    key: Any,
    csr: Any,
) -> dict[str, str]:
    """A delegated credential for the job of task ``key``, asked by the node ``identity``:
    only while that task runs on that node's worker and its job runs (a node cannot obtain
    one for a job it does not run)."""
    if signer is None:
        raise NotAllowed("this portal does not issue delegated credentials")
    if identity is None or identity.role != NODE:
        raise NotAllowed("only the node that runs a job's task may ask for its credential")
    if not isinstance(csr, str) or not csr:
        raise UsageError("grid_delegate takes a task key and a certificate request (PEM text)")
    ts = scheduler.tasks.get(key) if isinstance(key, (str, bytes, int, float, tuple)) else None
    ws = ts.processing_on if ts is not None and ts.state == "processing" else None
    job_id = jobs.task_jobs.get(key) if ts is not None else None
    record = jobs.jobs.get(job_id) if job_id is not None else None
    if ws is None or str(ws.name) != identity.name or record is None or record.state.finished:
        raise NotAllowed("that task is not running on this node, or its job has ended")
    return {"cert": await signer(csr, delegate_name(record.owner, record.id))}


__all__ = ["Delegation", "confine", "delegation_of", "ended", "issue"]
