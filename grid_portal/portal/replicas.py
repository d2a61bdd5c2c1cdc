"""Replicas: each task of a stage with ``replicas: N`` runs N times, each copy on another node,
and the portal compares the copies' results before anything uses them.

A volunteer's machine may be faulty (bad memory, an overclocked CPU) or its owner dishonest;
either returns wrong results that look right. Comparing copies from different nodes is the
answer of volunteer grids (BOINC's redundancy). Who compares matters: a node could lie about
the comparison, so the portal does it, on the results' serialized bytes as the nodes sent
them (fetched from the nodes like Dask's own ``gather``, never unpickled at the portal), and
it knows which node produced each copy from Dask's own records, not from the node.

How it rides on Dask (``grid_portal.jobs.workflow`` submits the copies):
- copy 0 has the stage's own key, ``("<stage>-<job>", i)``, annotated ``grid_replicas: N``;
  copy j has ``("<stage>-<job>-replica<j>", i)``, annotated ``grid_replica: j``.
- different nodes: each copy not yet started is restricted (Dask worker restrictions) to its
  own slice of the nodes that may run it, minus the nodes its siblings run or ran on; slices
  are recomputed when nodes join or leave, and a copy with no node left waits for one.
- nothing uses an unchecked result: tasks that need a copy 0 are parked in Dask's
  ``no-worker`` state (an address no worker has) until the comparison passed, and the job
  cannot finish while comparisons are pending (``JobBook.check_started``).
- the copies are kept (a pseudo-client wants them) until compared, then let go.
- on disagreement the job fails at once with a reason naming the task and the nodes, the
  task records in the ledger say so, and the job's remaining tasks are cancelled.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from grid_portal.portal.placement import NOWHERE, Placement
from grid_portal.portal.tasklog import item_of
from grid_portal.protocol import JOB_ANNOTATION, REPLICA_ANNOTATION, REPLICAS_ANNOTATION  # noqa: F401 - names of the wire contract

if TYPE_CHECKING:
    from distributed import Scheduler
    from distributed.scheduler import TaskState

    from grid_portal.portal.plugin import PortalPlugin

logger = logging.getLogger("grid_portal.portal")

REPLICA_SUFFIX = "-replica"
UNSTARTED = ("released", "waiting", "no-worker", "queued")


def copy_key(key: Any, j: int) -> Any:
    """The key of copy ``j`` of the task whose copy 0 has ``key`` (workflow.py's convention)."""
    if j == 0:
        return key
    if isinstance(key, tuple):
        return (f"{key[0]}{REPLICA_SUFFIX}{j}", *key[1:])
    return f"{key}{REPLICA_SUFFIX}{j}"


def _original_key(key: Any, j: int) -> Any:
    suffix = f"{REPLICA_SUFFIX}{j}"
    if isinstance(key, tuple) and isinstance(key[0], str) and key[0].endswith(suffix):
        return (key[0][: -len(suffix)], *key[1:])
    if isinstance(key, str) and key.endswith(suffix):
        return key[: -len(suffix)]
    return None


@dataclass
class Group:
    """The copies of one task."""

    job_id: str
    key: Any  # copy 0's key
    size: int
    members: dict[int, Any] = field(default_factory=dict)  # copy index -> key
    gated: set[Any] = field(default_factory=set)  # tasks waiting for this check
    checking: bool = False


class Replicas:
    def __init__(self, plugin: PortalPlugin, placement: Placement) -> None:
        self.plugin = plugin
        self.placement = placement
        self.groups: dict[Any, Group] = {}  # copy 0's key -> its group (until checked)
        self.group_of: dict[Any, Group] = {}  # every copy's key -> its group
        self.gates: dict[Any, set[Any]] = {}  # a parked task -> copy-0 keys it waits for
        self._tasks: set[asyncio.Task[None]] = set()

    @staticmethod
    def _client(job_id: str) -> str:
        return f"grid-replicas-{job_id}"

    # -- Dask events ----------------------------------------------------------------------
    def update_graph(
        self, scheduler: Scheduler, keys: Iterable[Any], annotations: Mapping[str, Mapping]
    ) -> None:
        sizes = annotations.get(REPLICAS_ANNOTATION, {})
        copies = annotations.get(REPLICA_ANNOTATION, {})
        jobs = annotations.get(JOB_ANNOTATION, {})
        keys = list(keys)
        touched: dict[Any, Group] = {}
        for key in keys:
            if key not in scheduler.tasks or key in self.group_of:
                continue
            size, j = sizes.get(key), copies.get(key)
            job_id = jobs.get(key)
            if job_id is None:
                continue
            if size and int(size) > 1:
                group = Group(str(job_id), key, int(size), {0: key})
                self.groups[key] = group
                self.plugin.jobs.check_started(group.job_id)
            elif j:
                group = self.groups.get(_original_key(key, int(j)))
                if group is None or group.job_id != str(job_id):
                    continue
                group.members[int(j)] = key
            else:
                continue
            self.group_of[key] = group
            touched[group.key] = group
            scheduler.client_desires_keys(keys=[key], client=self._client(group.job_id))
        for group in touched.values():
            self._place(scheduler, group)
        # Park what needs an unchecked copy 0 (stages come one update_graph after another).
        for key in keys:
            ts = scheduler.tasks.get(key)
            if ts is None:
                continue
            waiting_for = {d.key for d in ts.dependencies if d.key in self.groups and d.key != key}
            if waiting_for:
                self.gates[key] = waiting_for
                for dep in waiting_for:
                    self.groups[dep].gated.add(key)
                ts.worker_restrictions, ts.loose_restrictions = {NOWHERE}, False

    def transition(
        self, scheduler: Scheduler, key: Any, start: str, finish: str, kwargs: Mapping
    ) -> None:
        group = self.group_of.get(key)
        if group is None:
            return
        if finish == "memory":
            if all(
                (ts := scheduler.tasks.get(k)) is not None and ts.state == "memory"
                for k in self._all_keys(group)
            ):
                self._start_check(scheduler, group)
        elif finish in ("erred", "forgotten"):
            # A copy failed (the job fails with its error) or was dropped (cancelled): there
            # is nothing to compare.
            self._drop(scheduler, group)
        elif start == "processing" and finish in UNSTARTED:
            self._place(scheduler, group)  # its node left: choose among the others again

    def add_worker(self, scheduler: Scheduler, address: str) -> None:
        for group in list(self.groups.values()):
            self._place(scheduler, group)
        for key in self.gates:  # Placement.add_worker may have widened a parked `where` task
            ts = scheduler.tasks.get(key)
            if ts is not None and ts.state in UNSTARTED:
                ts.worker_restrictions, ts.loose_restrictions = {NOWHERE}, False

    def remove_worker(self, scheduler: Scheduler, address: str) -> None:
        stuck = []
        for group in list(self.groups.values()):
            self._place(scheduler, group)
            stuck += [
                k
                for k in self._all_keys(group)
                if (ts := scheduler.tasks.get(k)) is not None and ts.state == "no-worker"
            ]
        if stuck:
            self._kick(scheduler, stuck)

    # -- different nodes --------------------------------------------------------------------
    def _all_keys(self, group: Group) -> list[Any]:
        return [group.members[j] for j in sorted(group.members)]

    def _place(self, scheduler: Scheduler, group: Group) -> None:
        """Restrict each copy not yet started to its own slice of the allowed nodes."""
        used: set[str] = set()
        free: list[int] = []
        for j in range(group.size):
            ts = scheduler.tasks.get(group.members.get(j, object()))
            if ts is None or ts.state in UNSTARTED:
                free.append(j)
            elif ts.processing_on is not None:
                used.add(ts.processing_on.address)
            else:
                used.update(ws.address for ws in ts.who_has or ())
        item = item_of(group.key) or 0
        for rank, j in enumerate(free):
            key = group.members.get(j)
            ts = scheduler.tasks.get(key) if key is not None else None
            if ts is None or ts.state not in UNSTARTED or key in self.gates:
                continue
            allowed = sorted(self._base(scheduler, key) - used)
            mine = set(allowed[(rank + item) % len(free) :: len(free)]) if allowed else set()
            ts.worker_restrictions = mine or {NOWHERE}
            ts.loose_restrictions = False

    def _base(self, scheduler: Scheduler, key: Any) -> set[str]:
        text = self.placement.where_of.get(key)
        if text is not None:
            return set(self.placement._matching(scheduler, text))
        return set(scheduler.workers)

    # -- comparing ----------------------------------------------------------------------------
    def _start_check(self, scheduler: Scheduler, group: Group) -> None:
        if group.checking:
            return
        group.checking = True
        task = asyncio.get_running_loop().create_task(self._check(scheduler, group))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _check(self, scheduler: Scheduler, group: Group) -> None:
        keys = self._all_keys(group)
        try:
            nodes = {k: self._node_of(scheduler, k) for k in keys}
            reply = await scheduler.gather(keys=keys)
        except Exception as exc:  # noqa: BLE001 - a node left meanwhile: check when recomputed
            logger.info("replicas of %s not compared yet: %s", group.key, exc)
            reply = {"status": "error"}
        group.checking = False
        if self.groups.get(group.key) is not group:
            return  # dropped meanwhile (cancelled)
        if reply.get("status") != "OK":
            # A copy's node left before we fetched it: Dask computes it again, and its return
            # to memory starts the comparison again.
            if all(
                (ts := scheduler.tasks.get(k)) is not None and ts.state == "memory" for k in keys
            ):
                self._start_check(scheduler, group)
            return
        digests = {k: _digest(reply["data"][k]) for k in keys}
        distinct_nodes = len(set(nodes.values())) == len(keys)
        if len(set(digests.values())) == 1 and distinct_nodes:
            self._verified(scheduler, group)
        elif not distinct_nodes:
            self._disagree(
                scheduler,
                group,
                f"the {group.size} copies of task {group.key!r} could not be placed on "
                f"different nodes (they ran on {', '.join(sorted(set(nodes.values())))}), "
                "so its result is unchecked; run the job when more nodes are online",
                nodes,
                digests,
            )
        else:
            listing = "; ".join(f"{nodes[k]} returned {digests[k][:12]}" for k in keys)
            self._disagree(
                scheduler,
                group,
                f"the {group.size} copies of task {group.key!r} disagree ({listing}): one "
                "of these nodes is faulty or dishonest; nothing used its result",
                nodes,
                digests,
            )

    @staticmethod
    def _node_of(scheduler: Scheduler, key: Any) -> str:
        ts = scheduler.tasks.get(key)
        holders = sorted(str(ws.name) for ws in (ts.who_has if ts is not None else ()) or ())
        return holders[0] if holders else "?"

    def _verified(self, scheduler: Scheduler, group: Group) -> None:
        self._forget(scheduler, group)
        ready = []
        for key in group.gated:
            waiting = self.gates.get(key)
            if waiting is None:
                continue
            waiting.discard(group.key)
            if waiting:
                continue
            del self.gates[key]
            ts = scheduler.tasks.get(key)
            if ts is None:
                continue
            self._unpark(scheduler, ts)
            if ts.state == "no-worker":
                ready.append(key)
        if ready:
            self._kick(scheduler, ready)
        self.plugin.jobs.check_done(group.job_id)

    def _unpark(self, scheduler: Scheduler, ts: TaskState) -> None:
        """Back to the restrictions the task would have had: its copy slice, its `where`, or
        none at all."""
        group = self.group_of.get(ts.key)
        if group is not None:
            self._place(scheduler, group)
            return
        text = self.placement.where_of.get(ts.key)
        if text is not None and ts.key not in self.placement.held:
            self.placement._restrict(ts, self.placement._matching(scheduler, text))
        elif ts.key not in self.placement.held:
            ts.worker_restrictions = None

    def _disagree(
        self,
        scheduler: Scheduler,
        group: Group,
        reason: str,
        nodes: Mapping[Any, str],
        digests: Mapping[Any, str],
    ) -> None:
        logger.warning("job %s: %s", group.job_id, reason)
        tasklog = self.plugin.scheduling.tasklog
        for key in self._all_keys(group):
            tasklog.flag(key, f"replicas disagree: {nodes[key]} returned {digests[key][:12]}")
        self._forget(scheduler, group)
        self.plugin.jobs.check_done(group.job_id)
        keys = self.plugin.jobs.fail(group.job_id, reason)
        # Nothing more of this job runs; its held outputs are let go.
        self.plugin.scheduling.holds.release(scheduler, group.job_id)
        wanted = [k for k in keys if k in scheduler.tasks and scheduler.tasks[k].who_wants]
        if wanted:
            client = next(iter(scheduler.tasks[wanted[0]].who_wants)).client_key
            scheduler.stimulus_cancel(
                wanted, client=client, force=True, reason="grid-replicas-disagree", msg=reason
            )

    def _drop(self, scheduler: Scheduler, group: Group) -> None:
        if self.groups.get(group.key) is not group:
            return
        self._forget(scheduler, group)
        for key in group.gated:
            waiting = self.gates.get(key)
            if waiting is not None:
                waiting.discard(group.key)
                if not waiting:
                    del self.gates[key]
        self.plugin.jobs.check_done(group.job_id)

    def _forget(self, scheduler: Scheduler, group: Group) -> None:
        self.groups.pop(group.key, None)
        keys = self._all_keys(group)
        for key in keys:
            self.group_of.pop(key, None)
        live = [k for k in keys if k in scheduler.tasks]
        client = self._client(group.job_id)
        if live and client in scheduler.clients:
            scheduler.client_releases_keys(
                keys=live, client=client, stimulus_id=f"grid-replicas-{time.time()}"
            )
        if not any(g.job_id == group.job_id for g in self.groups.values()):
            scheduler.clients.pop(client, None)

    def _kick(self, scheduler: Scheduler, keys: list[Any]) -> None:
        """Ask Dask to place tasks parked in ``no-worker`` (after our hook returns)."""

        def move() -> None:
            recs = {
                k: "processing"
                for k in keys
                if (ts := scheduler.tasks.get(k)) is not None and ts.state == "no-worker"
            }
            if recs:
                scheduler.transitions(recs, stimulus_id=f"grid-replicas-{time.time()}")

        scheduler.loop.add_callback(move)


def _digest(value: Any) -> str:
    """SHA-256 of a result as its node serialized it (the portal never unpickles it).

    Dask hands the scheduler ``Serialized`` objects: a header and frames. What identifies the
    value is the serializer and type in the header (recursively for collections, which Dask
    serializes item by item) and the frames' bytes once decompressed, taken as one stream so
    that how a node split or compressed them does not matter.
    """
    h = hashlib.sha256()
    header = getattr(value, "header", None)
    frames = getattr(value, "frames", None)
    if isinstance(header, dict) and frames is not None:
        from distributed.protocol.compression import decompress

        h.update(_header_identity(header))
        for frame in decompress(header, frames):
            h.update(bytes(frame))
    elif isinstance(value, (bytes, bytearray, memoryview)):
        h.update(bytes(value))
    else:  # plain data that came inline
        h.update(repr(value).encode())
    return h.hexdigest()


def _header_identity(header: Mapping[str, Any]) -> bytes:
    parts = [
        str(header.get("serializer", "")).encode(),
        _as_bytes(header.get("type-serialized") or b""),
        b"collection" if header.get("is-collection") else b"",
    ]
    for sub in header.get("sub-headers") or ():
        if isinstance(sub, Mapping):
            parts.append(b"[" + _header_identity(sub) + b"]")
    return b"\0".join(parts)


def _as_bytes(value: Any) -> bytes:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    return str(value).encode()
