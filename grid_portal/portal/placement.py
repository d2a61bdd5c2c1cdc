"""Placement: tasks with a ``where`` requirement run only on nodes that match it.

The Grid client sends the requirement text as a Dask task annotation (``grid_where``). Dask
itself knows nothing of it; this module turns it into Dask's own worker restrictions, which
the scheduler and work stealing already honour:

- ``update_graph`` (before the scheduler transitions the new tasks): each new task with a
  requirement gets ``ts.worker_restrictions`` = the addresses of the connected nodes that match,
  and ``ts.loose_restrictions = False``. When none matches (the submitter chose to wait), the
  restriction is a single address no worker ever has, so the task waits in Dask's ``no-worker``
  state instead of running anywhere (an *empty* restriction set would mean "anywhere").
- ``add_worker`` (Dask calls plugins *before* it re-examines its ``no-worker`` tasks for the
  new worker): a node that matches is added to the restrictions of the waiting tasks with that
  requirement, so a task waiting for a GPU node starts as soon as one joins.

The same "nowhere" restriction lets the fair-share quotas hold a task back (``hold``) and let
it go later (``release``) without a second mechanism.

Which nodes meet a requirement, and how to word a refusal, live in ``grid_portal.requirements``
(the client, the portal and workflows share them).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from grid_portal.model import Node
from grid_portal.protocol import WHERE_ANNOTATION  # noqa: F401 - names of the wire contract
from grid_portal.requirements import Expression, compile_requirement, node_attributes

if TYPE_CHECKING:
    from distributed import Scheduler
    from distributed.scheduler import TaskState

logger = logging.getLogger("grid_portal.portal")

# An address no worker can have: restricting a task to it parks the task in ``no-worker``.
NOWHERE = "grid-portal://nowhere"


def place_parked(scheduler: Scheduler, keys: Iterable[Any], why: str) -> None:
    """Ask Dask to place those of ``keys`` still parked in ``no-worker`` whose restrictions
    were widened (a quota let them go, a replica's copy may now run anywhere): Dask looks at
    its ``no-worker`` tasks again only when a worker joins. Call it from the event loop, after
    a plugin hook returned (Dask's transitions do not nest)."""
    recs = {
        key: "processing"
        for key in keys
        if (ts := scheduler.tasks.get(key)) is not None and ts.state == "no-worker"
    }
    if recs:
        scheduler.transitions(recs, stimulus_id=f"grid-{why}-{time.time()}")


class Placement:
    """Worker restrictions for tasks with a requirement, kept current as nodes join."""

    def __init__(self) -> None:
        self.expressions: dict[str, Expression] = {}
        self.matching: dict[str, set[str]] = {}  # requirement -> matching worker addresses
        self.where_of: dict[Any, str] = {}  # task key -> requirement, until forgotten
        self.keys_of: dict[str, set[Any]] = {}  # requirement -> task keys
        self.attributes: dict[str, dict[str, Any]] = {}  # worker address -> node attributes
        self.held: set[Any] = set()  # keys parked by hold() (fair-share quotas)

    # -- Dask events ----------------------------------------------------------------------
    def add_worker(self, scheduler: Scheduler, address: str, node: Node | None) -> None:
        """A node joined: add it to the restrictions of waiting tasks whose requirement it meets."""
        attrs = node_attributes(node) if node is not None else {}
        self.attributes[address] = attrs
        for text, expr in self.expressions.items():
            matches = bool(attrs) and expr.matches(attrs)
            if matches:
                self.matching[text].add(address)
            else:  # an address can come back as a different node
                self.matching[text].discard(address)
            for key in self.keys_of.get(text, ()):
                ts = scheduler.tasks.get(key)
                if ts is None or key in self.held:
                    continue
                self._restrict(ts, self.matching[text])

    def remove_worker(self, address: str) -> None:
        self.attributes.pop(address, None)
        for addresses in self.matching.values():
            addresses.discard(address)

    def update_graph(
        self, scheduler: Scheduler, keys: Iterable[Any], where: Mapping[Any, str]
    ) -> list[Any]:
        """Restrict the new tasks that carry a requirement; returns the keys now parked."""
        parked = []
        for key in keys:
            text = where.get(key)
            if not text or key in self.where_of:
                continue
            ts = scheduler.tasks.get(key)
            if ts is None:
                continue
            try:
                addresses = self._matching(scheduler, str(text))
            except Exception as exc:  # noqa: BLE001 - the client checks first; never run it anywhere
                logger.warning("task %s has a bad requirement %r: %s", key, text, exc)
                addresses = set()
            self.where_of[key] = str(text)
            self.keys_of.setdefault(str(text), set()).add(key)
            self._restrict(ts, addresses)
            if not addresses:
                parked.append(key)
        return parked

    def forget(self, key: Any) -> None:
        """The task is gone from the scheduler."""
        self.held.discard(key)
        text = self.where_of.pop(key, None)
        if text is None:
            return
        keys = self.keys_of.get(text)
        if keys is not None:
            keys.discard(key)
            if not keys:  # nothing waits on this requirement any more
                del self.keys_of[text]
                self.expressions.pop(text, None)
                self.matching.pop(text, None)

    # -- holding tasks back (quotas) --------------------------------------------------------
    def hold(self, ts: TaskState) -> None:
        """Park a task in ``no-worker`` until ``release``, whatever nodes join."""
        self.held.add(ts.key)
        ts.worker_restrictions = {NOWHERE}
        ts.loose_restrictions = False

    def release(self, scheduler: Scheduler, ts: TaskState) -> None:
        """Undo ``hold``: back to the task's own requirement, or no restriction at all."""
        self.held.discard(ts.key)
        text = self.where_of.get(ts.key)
        if text is None:
            ts.worker_restrictions = None
        else:
            self._restrict(ts, self._matching(scheduler, text))

    # -- helpers ----------------------------------------------------------------------------
    def _matching(self, scheduler: Scheduler, text: str) -> set[str]:
        if text not in self.expressions:
            expr = compile_requirement(text)
            self.expressions[text] = expr
            self.matching[text] = {
                address
                for address, attrs in self.attributes.items()
                if address in scheduler.workers and attrs and expr.matches(attrs)
            }
        return self.matching[text]

    @staticmethod
    def _restrict(ts: TaskState, addresses: set[str]) -> None:
        ts.worker_restrictions = set(addresses) if addresses else {NOWHERE}
        ts.loose_restrictions = False
