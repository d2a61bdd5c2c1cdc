"""Replicas for ``Grid.submit/map(replicas=N)`` and ``%%grid --replicas N``: results checked by majority.

The kernel's side of what ``grid_portal.portal.replicas`` does for workflow stages: each item
runs as N copies, each on a different node, and the **portal** compares the copies' results
(the SHA-256 of the bytes each node sent) before anything uses them. With 2 copies a
difference fails the item; with 3 or more a strict majority wins and the odd nodes are named
in the job's record (``Job.outvoted``) and not credited.

Per item this submits, inside the caller's job:

- copy 0, key ``B`` annotated ``grid_replicas: N``; copy j, key ``B-replica<j>`` (for a tuple
  key, the first part gets the suffix) annotated ``grid_replica: j``: the researcher's function
  and arguments, with the researcher's resources; the copies are let go here (the portal holds
  them until compared);
- the researcher's future, key ``K``, a task annotated ``grid_agreed`` that depends on every
  copy. The portal parks it until the copies are compared, then makes it Dask's own ``Alias``
  of a copy holding the agreed value, run on that copy's node. So ``future.result()`` is the
  agreed value, an error of a copy is the item's error, and cancelling the future (or the
  job) works as for any task. :func:`unchecked` is what it would run without the portal:
  it refuses, so an unchecked value never reaches the researcher.

No Dask import at module level (``grid_portal.jobs`` and the magics import this module).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from typing import Any

from grid_portal.errors import UsageError
from grid_portal.protocol import (
    AGREED_ANNOTATION,
    REPLICA_ANNOTATION,
    REPLICAS_ANNOTATION,
    STAGE_ANNOTATION,
    copy_key,
)
from grid_portal.units import counted

MAX_REPLICAS = 5  # as for workflow stages (grid_portal.jobs.spec.MAX_REPLICAS)


class ReplicasUnchecked(RuntimeError):
    """Raised by :func:`unchecked`: the copies of a replicated task were not compared."""


def unchecked(*copies: Any) -> Any:
    """The agreed-value task as submitted. The portal replaces it by an ``Alias`` of the
    agreed copy once the copies are compared; if it ever runs as is, no portal checked them."""
    raise ReplicasUnchecked(
        f"the {len(copies)} copies of this task were not compared by the portal (it does "
        "not support replicas); refusing to hand on an unchecked result"
    )


def check_replicas(replicas: Any) -> int:
    """``replicas`` as an int from 1 to MAX_REPLICAS, or UsageError."""
    if isinstance(replicas, bool) or not isinstance(replicas, int):
        raise UsageError(f"replicas must be a whole number from 1 to {MAX_REPLICAS}")
    if not 1 <= replicas <= MAX_REPLICAS:
        raise UsageError(
            f"replicas={replicas}: each copy runs on its own node; ask for 1 to {MAX_REPLICAS}"
        )
    return replicas


def refuse_too_few(grid: Any, replicas: int, where: str | None, resources: dict) -> None:
    """Unsatisfiable when fewer than ``replicas`` connected nodes could run a copy (the copies
    would wait for more nodes: pass ``wait=True`` for that)."""
    from grid_portal.errors import Unsatisfiable

    report = grid.match(where, resources)
    matching = list(report.get("matching") or ())
    if len(matching) >= replicas:
        return
    which = f"meet where {where!r} and " if where else ""
    have = f": {', '.join(matching)}" if matching else ""
    raise Unsatisfiable(
        f"cannot place {replicas} copies on {replicas} different nodes: only "
        f"{counted(len(matching), 'connected node')} {which}offer what a copy needs{have}. Ask for "
        f"fewer replicas, or pass wait=True (--wait) to wait for more nodes to join.",
        where=where,
        resources=resources,
        online=report.get("online"),
        matching=matching,
        closest=report.get("closest") or (),
    )


def submit_replicated(
    client: Any,
    fn: Callable[..., Any],
    calls: Sequence[tuple[tuple[Any, ...], dict[str, Any]]],
    replicas: int,
    resources: dict[str, float],
    keys: Sequence[Any] | None = None,
    stage: str | None = None,
    **options: Any,
) -> list[Any]:
    """Submit ``fn(*args, **kwargs)`` for each of ``calls`` as ``replicas`` copies and one
    agreed-value task; returns the agreed-value futures, in order.

    Call inside the job (``Grid.job``); ``options`` go to each copy's ``client.submit``
    (``retries``, ``workers``, ``allow_other_workers``, ``priority``...). ``keys``: the
    researcher's keys (default: new ones).
    """
    import dask

    name = stage or getattr(fn, "__name__", None) or "task"
    token = uuid.uuid4().hex[:12]
    if keys is None:
        keys = [(f"{name}-{token}", i) for i in range(len(calls))]
    bases = [_base_of(k) for k in keys]
    options.pop("pure", None)
    copies: list[list[Any]] = [[] for _ in keys]
    for j in range(replicas):
        marks: dict[str, Any] = {STAGE_ANNOTATION: name if j == 0 else f"{name}-replica{j}"}
        marks[REPLICAS_ANNOTATION if j == 0 else REPLICA_ANNOTATION] = replicas if j == 0 else j
        with dask.annotate(**marks):
            for i, (base, (args, kwargs)) in enumerate(zip(bases, calls, strict=True)):
                copies[i].append(
                    client.submit(
                        fn,
                        *args,
                        key=copy_key(base, j),
                        resources=resources,
                        pure=False,
                        **options,
                        **kwargs,
                    )
                )
    with dask.annotate(**{AGREED_ANNOTATION: True, STAGE_ANNOTATION: f"{name}-agreed"}):
        return [
            client.submit(unchecked, *item, key=key, pure=False)
            for key, item in zip(keys, copies, strict=True)
        ]


def _base_of(key: Any) -> Any:
    """Copy 0's key for the researcher's key ``key``."""
    if isinstance(key, tuple):
        return (f"{key[0]}-copy", *key[1:])
    return f"{key}-copy"


def run_replicated(
    grid: Any,
    fn: Callable[..., Any],
    calls: Sequence[tuple[tuple[Any, ...], dict[str, Any]]],
    replicas: int,
    resources: dict[str, float],
    wait: bool,
    where: str | None,
    options: dict[str, Any],
) -> list[Any]:
    """What ``Grid.submit/map(replicas=N)`` run inside their job: refuse (unless ``wait``)
    when fewer than N nodes could run a copy, then submit. ``options`` are the call's other
    keywords: Dask's own (``key``, ``retries``, ``priority``...) and the function's."""
    import inspect

    from distributed import Client

    if not wait:
        refuse_too_few(grid, replicas, where, resources)
    options = dict(options)
    keys = options.pop("key", None)
    if keys is not None and not isinstance(keys, list):
        keys = [keys]
    known = set(inspect.signature(Client.submit).parameters) - {"self", "func", "args", "kwargs"}
    dask_options = {k: options.pop(k) for k in list(options) if k in known}
    calls = [(args, {**options, **kwargs}) for args, kwargs in calls]
    return submit_replicated(
        grid.client,
        fn,
        calls,
        replicas,
        resources,
        keys=keys,
        stage=getattr(fn, "__name__", None),
        **dask_options,
    )
