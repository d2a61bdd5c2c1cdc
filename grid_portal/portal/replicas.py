"""Replicas: each task of a stage with ``replicas: N`` runs N times, each copy on another node,
and the portal compares the copies' results before anything uses them.

A volunteer's machine may be faulty (bad memory, an overclocked CPU) or its owner dishonest;
either returns wrong results that look right. Comparing copies from different nodes is the
answer of volunteer grids (BOINC's redundancy). Who compares matters: a node could lie about
the comparison, so the portal does it, on the results' serialized bytes as the nodes sent
them (fetched from the nodes like Dask's own ``gather``, never unpickled at the portal), and
it knows which node produced each copy from Dask's own records, not from the node.

How it rides on Dask (``grid_portal.jobs.graph`` submits the copies):
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
- with 3 or more copies a strict majority wins: the odd nodes are named in the
  job's record (``outvoted``) and in their copies' task records, their credit for the copy is
  withheld (``defer_credit``), and the job goes on; with no strict majority it fails as above.

``Grid.submit/map(replicas=N)`` and ``%%grid --replicas N`` (``grid_portal.replication``) add
one more task per item, annotated ``grid_agreed``: the researcher's key, which depends on every
copy and is parked like any task that needs copy 0. Once the copies are compared the portal
turns it into Dask's own ``Alias`` of a copy that holds the agreed value (dropping its other
dependencies) and lets it run on that copy's node; so the researcher's future gets the
majority's value even when copy 0 was the odd one. Its placeholder function raises if it
ever runs unchecked.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from grid_portal.payload import OpaqueResult
from grid_portal.portal.placement import NOWHERE, Placement, place_parked
from grid_portal.portal.tasklog import item_of
from grid_portal.protocol import (  # noqa: F401 - names of the wire contract
    AGREED_ANNOTATION,
    JOB_ANNOTATION,
    REPLICA_ANNOTATION,
    REPLICAS_ANNOTATION,
    original_key,
)

if TYPE_CHECKING:
    from distributed import Scheduler
    from distributed.scheduler import TaskState

    from grid_portal.portal.plugin import PortalPlugin

logger = logging.getLogger("grid_portal.portal")

UNSTARTED = ("released", "waiting", "no-worker", "queued")


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
        self.picks: set[Any] = set()  # tasks annotated grid_agreed, until they run
        # A copy's own worker restrictions as submitted (``workers=``: a cell's --where): the
        # nodes its slices are drawn from, instead of every node.
        self.own_workers: dict[Any, set[Any]] = {}
        # Copy 0's key -> the agreed copy's key, or the reason they disagreed; kept while copy
        # 0 lives, for a pick that arrives after its copies were compared (its own
        # update_graph may come after the copies finished).
        self.verdicts: dict[Any, tuple[Any, str | None]] = {}
        self.credits: dict[Any, list[Callable[[bool], None]]] = {}  # copy key -> deferred

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
                group = self.groups.get(original_key(key, int(j)))
                if group is None or group.job_id != str(job_id):
                    continue
                group.members[int(j)] = key
            else:
                continue
            self.group_of[key] = group
            ts = scheduler.tasks[key]
            if ts.worker_restrictions and NOWHERE not in ts.worker_restrictions:
                self.own_workers[key] = set(ts.worker_restrictions)
            touched[group.key] = group
            scheduler.client_desires_keys(keys=[key], client=self._client(group.job_id))
        for group in touched.values():
            self._place(scheduler, group)
            if self._complete(scheduler, group):  # its last copy came after the others ran
                self._start_check(scheduler, group)
        picks = annotations.get(AGREED_ANNOTATION, {})
        late: list[tuple[Any, Any, str | None]] = []
        for key in keys:
            if picks.get(key) and (ts := scheduler.tasks.get(key)) is not None:
                self.picks.add(key)
                decided = [self.verdicts[d.key] for d in ts.dependencies if d.key in self.verdicts]
                if decided and ts.state in UNSTARTED:
                    late.append((key, *decided[0]))
        for key, winner, reason in late:
            self._late_pick(scheduler, key, winner, reason)
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
        if key in self.picks and finish in ("memory", "erred", "forgotten"):
            self.picks.discard(key)
        if finish == "forgotten":
            self.verdicts.pop(key, None)
        group = self.group_of.get(key)
        if group is None:
            return
        if finish == "memory":
            if self._complete(scheduler, group):
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
        for key in self.picks:  # a checked pick waits for its copy's node: let it go anywhere
            ts = scheduler.tasks.get(key)
            if ts is not None and key not in self.gates and ts.state in UNSTARTED:
                ts.worker_restrictions = None
                if ts.state == "no-worker":
                    stuck.append(key)
        if stuck:
            self._kick(scheduler, stuck)

    def _complete(self, scheduler: Scheduler, group: Group) -> bool:
        """Every copy is known (copies come in separate graphs) and in memory."""
        return len(group.members) == group.size and all(
            (ts := scheduler.tasks.get(k)) is not None and ts.state == "memory"
            for k in self._all_keys(group)
        )

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
        base = (
            set(self.placement._matching(scheduler, text))
            if text is not None
            else set(scheduler.workers)
        )
        own = self.own_workers.get(key)
        if own is not None:
            base &= {scheduler.aliases.get(w, w) for w in own}
        return base

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
            if self._complete(scheduler, group):
                self._start_check(scheduler, group)
            return
        digests = {k: _digest(reply["data"][k]) for k in keys}
        distinct_nodes = len(set(nodes.values())) == len(keys)
        top, votes = Counter(digests.values()).most_common(1)[0]
        if votes == len(keys) and distinct_nodes:
            self._verified(scheduler, group, keys[0])
        elif distinct_nodes and len(keys) >= 3 and 2 * votes > len(keys):
            # A strict majority wins; the odd nodes are named and not credited.
            winner = next(k for k in keys if digests[k] == top)
            agreeing = ", ".join(nodes[k] for k in keys if digests[k] == top)
            notes = {
                k: f"task {group.key!r}: {nodes[k]} returned {digests[k][:12]}, the majority "
                f"({agreeing}) returned {top[:12]}; {nodes[k]}'s copy was set aside"
                for k in keys
                if digests[k] != top
            }
            for k, note in notes.items():
                logger.warning("job %s: outvoted: %s", group.job_id, note)
                self.plugin.scheduling.tasklog.flag(k, f"outvoted: {note}")
                self.plugin.jobs.outvoted(group.job_id, note)
            self._verified(scheduler, group, winner, set(notes))
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
            which = "one" if len(keys) == 2 else "some"
            majority = "" if len(keys) == 2 else ", and no result has a strict majority"
            self._disagree(
                scheduler,
                group,
                f"the {group.size} copies of task {group.key!r} disagree ({listing}){majority}: "
                f"{which} of these nodes is faulty or dishonest; nothing used its result",
                nodes,
                digests,
            )

    @staticmethod
    def _node_of(scheduler: Scheduler, key: Any) -> str:
        ts = scheduler.tasks.get(key)
        holders = sorted(str(ws.name) for ws in (ts.who_has if ts is not None else ()) or ())
        return holders[0] if holders else "?"

    def _verified(
        self,
        scheduler: Scheduler,
        group: Group,
        winner: Any,
        outvoted: set[Any] = frozenset(),  # type: ignore[assignment]
    ) -> None:
        self.verdicts[group.key] = (winner, None)
        for key in self._all_keys(group):
            self._settle_credit(key, key not in outvoted)
        for key in group.gated:  # before _forget, so that the winning copy stays wanted
            ts = scheduler.tasks.get(key)
            if ts is None or ts.state not in UNSTARTED:
                continue
            if key in self.picks:
                self._point_at(scheduler, ts, winner)
            elif winner != group.key:  # a workflow task needing an outvoted copy 0
                self._swap_input(scheduler, ts, group.key, winner)
        if winner != group.key:  # kept workflow outputs: the agreed copy instead of copy 0
            self.plugin.scheduling.holds.substitute(scheduler, group.job_id, group.key, winner)
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
            if key in self.picks:  # run where the agreed copy is: no transfer, no new node
                holders = {ws.address for ws in (scheduler.tasks[winner].who_has or ())}
                if holders and winner in scheduler.tasks:
                    ts.worker_restrictions, ts.loose_restrictions = holders, False
            if ts.state == "no-worker":
                ready.append(key)
        if ready:
            self._kick(scheduler, ready)
        self.plugin.jobs.check_done(group.job_id)

    def _late_pick(self, scheduler: Scheduler, key: Any, winner: Any, reason: str | None) -> None:
        """A pick whose copies were compared before it arrived: point it at the agreed copy,
        or cancel it with the reason they disagreed."""
        ts = scheduler.tasks[key]
        if reason is None and winner in scheduler.tasks:
            self._point_at(scheduler, ts, winner)
            holders = {ws.address for ws in (scheduler.tasks[winner].who_has or ())}
            if holders:
                ts.worker_restrictions, ts.loose_restrictions = holders, False
            return
        ts.worker_restrictions, ts.loose_restrictions = {NOWHERE}, False
        why = reason or "its copies were compared, but the agreed copy is gone"

        scheduler.loop.add_callback(_cancel, scheduler, [key], why)

    @staticmethod
    def _point_at(scheduler: Scheduler, ts: TaskState, winner: Any) -> None:
        """Make a pick Dask's own ``Alias`` of the agreed copy; its other copies are no longer
        its dependencies (they are let go with the group)."""
        from dask._task_spec import Alias

        for dts in list(ts.dependencies):
            if dts.key == winner:
                continue
            ts.dependencies.discard(dts)
            dts.dependents.discard(ts)
            if dts.waiters:
                dts.waiters.discard(ts)
            if ts.waiting_on:
                ts.waiting_on.discard(dts)
        ts.run_spec = Alias(ts.key, winner)
        ts.resource_restrictions = {}

    @staticmethod
    def _swap_input(scheduler: Scheduler, ts: TaskState, old: Any, new: Any) -> None:
        """A parked task reads copy ``new`` where it read copy 0 (``old``), outvoted."""
        ots, nts = scheduler.tasks.get(old), scheduler.tasks.get(new)
        if ots is None or nts is None or ts.run_spec is None:
            return
        ts.run_spec = ts.run_spec.substitute({old: new})
        ts.dependencies.discard(ots)
        ots.dependents.discard(ts)
        if ots.waiters:
            ots.waiters.discard(ts)
        ts.add_dependency(nts)
        if nts.waiters is None:
            nts.waiters = set()
        nts.waiters.add(ts)

    # -- credit (portal/contributions.py asks) ---------------------------------------------
    def defer_credit(self, key: Any, settle: Callable[[bool], None]) -> bool:
        """Hold a finished copy's credit until the comparison: ``settle(valid)`` is called
        then (valid: its result agreed with the others or with the majority). False when
        ``key`` is no copy awaiting comparison (credit it now)."""
        if key not in self.group_of:
            return False
        self.credits.setdefault(key, []).append(settle)
        return True

    def _settle_credit(self, key: Any, valid: bool) -> None:
        for settle in self.credits.pop(key, ()):
            try:
                settle(valid)
            except Exception:  # noqa: BLE001 - credit must not break the comparison
                logger.exception("crediting %r", key)

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
        self.verdicts[group.key] = (None, reason)
        tasklog = self.plugin.scheduling.tasklog
        for key in self._all_keys(group):
            tasklog.flag(key, f"replicas disagree: {nodes[key]} returned {digests[key][:12]}")
            self._settle_credit(key, False)  # no valid result: no copy is credited
        self._forget(scheduler, group)
        self.plugin.jobs.check_done(group.job_id)
        keys = self.plugin.jobs.fail(group.job_id, reason)
        # Nothing more of this job runs; its held outputs are let go.
        self.plugin.scheduling.holds.release(scheduler, group.job_id)
        _cancel(scheduler, keys, reason)

    def _drop(self, scheduler: Scheduler, group: Group) -> None:
        if self.groups.get(group.key) is not group:
            return
        for key in self._all_keys(group):  # nothing was compared: credited as computed
            self._settle_credit(key, True)
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
            self.own_workers.pop(key, None)
        live = [k for k in keys if k in scheduler.tasks]
        client = self._client(group.job_id)
        if live and client in scheduler.clients:
            scheduler.client_releases_keys(
                keys=live, client=client, stimulus_id=f"grid-replicas-{time.time()}"
            )
        if not any(g.job_id == group.job_id for g in self.groups.values()):
            # Later, not now: this may run inside a cancel that still walks this client's keys.
            scheduler.loop.add_callback(self._drop_client, scheduler, group.job_id)

    def _drop_client(self, scheduler: Scheduler, job_id: str) -> None:
        client = self._client(job_id)
        cs = scheduler.clients.get(client)
        pending = any(g.job_id == job_id for g in self.groups.values())
        if cs is not None and not cs.wants_what and not pending:
            scheduler.clients.pop(client, None)

    def _kick(self, scheduler: Scheduler, keys: list[Any]) -> None:
        """Ask Dask to place tasks parked in ``no-worker`` (after our hook returns)."""
        scheduler.loop.add_callback(place_parked, scheduler, keys, "replicas")


def _cancel(scheduler: Scheduler, keys: Iterable[Any], reason: str) -> None:
    """Cancel what a client still wants of ``keys``, saying why (as a client's cancel)."""
    wanted = [k for k in keys if k in scheduler.tasks and scheduler.tasks[k].who_wants]
    clients = {
        cs.client_key
        for k in wanted
        for cs in scheduler.tasks[k].who_wants or ()
        if cs.client_key in scheduler.clients
    }
    if wanted and clients:
        scheduler.stimulus_cancel(
            wanted,
            client=sorted(clients)[0],
            force=True,
            reason="grid-replicas-disagree",
            msg=reason,
        )


def _digest(value: Any) -> str:
    """SHA-256 of a result as its node serialized it (the portal never unpickles it).

    Dask hands the scheduler ``Serialized`` objects: a header and frames. What identifies the
    value is the serializer and type in the header (recursively for collections, which Dask
    serializes item by item) and the frames' bytes once decompressed, taken as one stream so
    that how a node split or compressed them does not matter.
    """
    from distributed.protocol.serialize import Serialize

    h = hashlib.sha256()
    if type(value) is Serialize:  # not serialized at all (an inproc comm): the object itself
        value = value.data
    header = getattr(value, "header", None)
    frames = getattr(value, "frames", None)
    if isinstance(header, dict) and frames is not None:
        from distributed.protocol.compression import decompress

        h.update(_header_identity(header))
        for frame in decompress(header, frames):
            h.update(bytes(frame))
    elif isinstance(value, (bytes, bytearray, memoryview)):
        h.update(bytes(value))
    elif type(value) is OpaqueResult:  # came unserialized: its bytes, not its repr
        h.update(value.data)
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
