"""One ``Grid`` over several portals: a researcher's sweep spread over the portals she uses.

Dask's client talks to one scheduler and futures belong to their client, so a Grid over
several portals holds one plain single-portal ``Grid`` per portal (its members) and this
module does what spans them:

- **connecting**: every portal at once (in threads); one that cannot be used (unreachable,
  certificate expired or revoked, its CA no longer the one trusted at login) gives one
  ``PortalWarning`` naming the portal and the fix, and the others are used;
- **nodes and capacity**: each portal's, marked with its name (``Node.portal``,
  ``Capacity.portals``);
- **submit**: to the first portal, most free cores first, that has a node for it; otherwise
  one Unsatisfiable that names every portal and why;
- **map**: the items are cut into chunks (about four per CPU slot of all portals, in order);
  each portal holds at most as many chunks as it has slots, and the rest wait here and go to
  whichever portal frees a slot first, so a sweep follows the portals' free capacity as it
  changes. A portal that loses its last node or its connection gives its unfinished chunks
  back and they run elsewhere. Each item's value is taken once, from the one chunk that
  holds it (a chunk taken back is cancelled and anything it still sends is ignored), and
  ``gather`` returns them in the items' order.

Everything else a federated Grid does (jobs, results, ``compute``, ``%%grid`` without
``--map``) is its first reachable portal's. This module imports no ``client.py`` (the Grid
hands it its members), so the two never import each other.
"""

from __future__ import annotations

import math
import queue
import threading
import time
import uuid
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from grid_portal.errors import ConnectionFailed, GridError, NotAllowed, Unsatisfiable, UsageError
from grid_portal.model import Capacity, Node

CHUNKS_PER_SLOT = 4  # a sweep is cut into about this many chunks per CPU slot of all portals
HEALTH_EVERY = 1.0  # seconds between looks at the portals that hold chunks
GONE_AFTER = 2.0  # seconds a portal may show no online node before its chunks move
CAPACITY_FRESH = 1.0  # seconds the portals' capacities serve for choosing where a task goes


class PortalWarning(UserWarning):
    """One portal of several cannot be used now; the others carry on."""


# -- connecting ----------------------------------------------------------------------------------
def connect(
    chosen: Sequence[tuple[str, Path]],
    make: Callable[[Path, bool], Any],
    *,
    stacklevel: int = 3,
) -> Federation:
    """Connect to every chosen portal at once; ``make(path, first)`` makes one member Grid.
    A portal that fails gives a PortalWarning; if all fail, ConnectionFailed says why each."""
    results: dict[str, Any] = {}

    def one(name: str, path: Path, first: bool) -> None:
        try:
            results[name] = make(path, first)
        except BaseException as exc:  # noqa: BLE001 - turned into one message per portal
            results[name] = exc

    threads = [
        threading.Thread(target=one, args=(name, path, i == 0), daemon=True)
        for i, (name, path) in enumerate(chosen)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    members: dict[str, Any] = {}
    problems: dict[str, str] = {}
    for name, path in chosen:
        outcome = results.get(name)
        if isinstance(outcome, BaseException):
            if isinstance(outcome, KeyboardInterrupt):
                raise outcome
            problems[name] = diagnose(name, path, outcome)
        else:
            members[name] = outcome
    if not members:
        failed = ConnectionFailed(
            "none of the portals can be used: " + "; ".join(problems.values())
        )
        failed.problems = problems  # type: ignore[attr-defined] - each portal's own line
        raise failed
    for message in problems.values():
        warnings.warn(message, PortalWarning, stacklevel=stacklevel)
    return Federation(members, problems)


def diagnose(name: str, path: Path, exc: BaseException) -> str:
    """One line for a portal that could not be used: what is wrong and what to do."""
    from grid_portal.connection import Connection

    try:
        connection = Connection.load(path)
    except GridError as bad:
        return f"portal {name!r}: {bad}"
    again = f"grid-portal login {connection.http} --token TOKEN --as {name}"
    expired = _expired(connection)
    if expired is not None:
        return (
            f"portal {name!r}: your certificate expired {expired}; ask its admin for a "
            f"researcher token and log in again ({again}). Using the other portals."
        )
    # Grid() reports a refused certificate as a ConnectionFailed raised while handling it.
    if isinstance(exc, NotAllowed) or isinstance(exc.__context__, NotAllowed):
        return (
            f"portal {name!r} refused your certificate (revoked, or no longer valid there): "
            f"ask its admin for a new token and log in again ({again}). Using the other portals."
        )
    if _ca_changed(connection):
        return (
            f"portal {name!r} now answers with another certificate authority than the one "
            f"trusted when you logged in: if its admin says the portal was set up again, log "
            f"in again ({again}); otherwise something else answers at {connection.http}. "
            "Using the other portals."
        )
    detail = str(exc).split("\n")[0][:200]
    return (
        f"portal {name!r} ({connection.scheduler}) cannot be reached ({detail}); is it "
        "running? Using the other portals."
    )


def _expired(connection: Any) -> str | None:
    """When this connection's certificate expired (text), or None while it is valid."""
    from grid_portal.renewal import lifetime_left

    try:
        left, _ = lifetime_left(Path(connection.cert).read_bytes())
    except (OSError, ValueError):
        return None
    if left > 0:
        return None
    return f"{-left / 3600:.1f} h ago" if -left < 86400 * 2 else f"{-left / 86400:.0f} days ago"


def _ca_changed(connection: Any) -> bool:
    """Whether the portal's HTTPS endpoint serves a CA other than the one saved at login
    (asked only after a connection failed, so a working portal pays nothing for it)."""
    from grid_portal.enrolment import fingerprint, request, unverified_context

    try:
        served = request(f"{connection.http}/api/ca", unverified_context(), timeout=5).decode()
        saved = Path(connection.ca).read_text()
    except Exception:  # noqa: BLE001 - unreachable too: said by the caller
        return False
    return fingerprint(served) != fingerprint(saved)


# -- the federation ----------------------------------------------------------------------------
class Federation:
    """Several member Grids, by portal name, in the order they were asked for."""

    def __init__(self, members: dict[str, Any], problems: dict[str, str] | None = None) -> None:
        self.members = members
        self.problems = dict(problems or {})  # portals that could not be used, and why
        self._capacities: tuple[float, dict[str, Capacity]] | None = None  # (when, by portal)

    @property
    def primary(self) -> Any:
        return next(iter(self.members.values()))

    def close(self) -> None:
        for member in self.members.values():
            try:
                member.close()
            except Exception:  # noqa: BLE001, S112 - closing the others still matters
                continue

    def _each(self, what: Callable[[Any], Any]) -> dict[str, Any]:
        """``what(member)`` for each portal that answers; one that does not is warned about
        (once per call) and left out."""
        out: dict[str, Any] = {}
        for name, member in self.members.items():
            try:
                out[name] = what(member)
            except (ConnectionFailed, OSError, TimeoutError) as exc:
                warnings.warn(
                    f"portal {name!r} did not answer ({exc}); showing the others",
                    PortalWarning,
                    stacklevel=4,
                )
        return out

    def nodes(self, as_dict: bool = False) -> list[Any]:
        """Every portal's nodes, grouped by portal (in the portals' order)."""
        listed = self._each(lambda m: m.nodes(as_dict=True))
        rows = [{**d, "portal": name} for name, data in listed.items() for d in data]
        return rows if as_dict else [Node.from_dict(d) for d in rows]

    def capacity(self) -> Capacity:
        return Capacity.total(self._each(lambda m: m.capacity()))

    # -- where work can go ---------------------------------------------------------------
    def eligible(
        self, options: dict[str, Any], first: bool = False
    ) -> tuple[list[tuple[str, Capacity]], list[str]]:
        """The portals with a node for work with these options, the most free cores first
        (with ``first``, only the first of them), and one line for each portal without one
        (``eligible`` below). Capacities up to CAPACITY_FRESH s old serve: a task submitted
        right after another pays no round trip to each portal for them."""
        now = time.monotonic()
        if self._capacities is None or now - self._capacities[0] > CAPACITY_FRESH:
            self._capacities = (now, self._each(lambda m: m.capacity()))
        capacities = self._capacities[1]
        fits, refusals = eligible(self.members, capacities, options, first)
        refusals[:0] = [f"{n}: {why}" for n, why in self.problems.items()]
        refusals += [f"{n}: did not answer" for n in self.members if n not in capacities]
        return fits, refusals

    def _refuse(self, refusals: list[str]) -> Unsatisfiable:
        return Unsatisfiable(
            "no portal has a node for this; "
            + " | ".join(refusals or ["no portal answered"])
            + ". Ask for less, or pass wait=True to wait for such a node."
        )

    # -- one task -----------------------------------------------------------------------------
    def submit(self, fn: Callable[..., Any], args: tuple[Any, ...], options: dict[str, Any]) -> Any:
        """To the portal with the most free cores among those with a node for it."""
        fits, refusals = self.eligible(options, first=True)
        if not fits:
            raise self._refuse(refusals)
        member = self.members[fits[0][0]]
        return member.submit(fn, *args, **options)

    # -- a sweep ------------------------------------------------------------------------------
    def map(
        self,
        fn: Callable[..., Any],
        iterables: Sequence[Iterable[Any]],
        options: dict[str, Any],
        batch: int | str | None,
    ) -> Sweep:
        """``fn`` over the items, spread over the portals by their free slots (see the module
        docstring); returns one item future per item, in order, at once."""
        if "key" in options:
            raise UsageError(
                "key= does not go with a Grid over several portals (its items are sent in "
                "chunks, wherever there is room); leave key out, or use one portal's Grid: "
                "grid.portals[NAME].map(...)"
            )
        columns = [list(it) for it in iterables]
        calls = list(zip(*columns, strict=False))
        cpus = float(options.get("cpus", 1) or 1)
        fits, refusals = self.eligible(options)
        if not fits and not options.get("wait"):
            raise self._refuse(refusals)
        slots = {n: int(c.cores_total // cpus) if c.nodes_online else 0 for n, c in fits}
        eligible = {n: s for n, s in slots.items() if s > 0}
        if int(options.get("replicas", 1) or 1) > 1:
            size = 1  # each item's copies are compared on their own
        elif isinstance(batch, int) and not isinstance(batch, bool) and batch >= 1:
            size = batch
        else:
            size = max(
                1, math.ceil(len(calls) / (max(1, sum(eligible.values())) * CHUNKS_PER_SLOT))
            )
        sweep = Sweep(self, getattr(fn, "__name__", "fn"), len(calls))
        chunks = [list(range(i, min(i + size, len(calls)))) for i in range(0, len(calls), size)]
        dispatcher = _Dispatcher(self, sweep, fn, calls, chunks, options, slots, cpus)
        sweep.dispatcher = dispatcher
        if calls:
            dispatcher.start()
        return sweep

    def gather(self, futures: Any) -> Any:
        if isinstance(futures, Item):
            return self.gather([futures])[0]
        if not isinstance(futures, list | tuple):
            return futures.result() if hasattr(futures, "result") else futures
        # One round trip per portal: each item's own future (once settled) and Dask futures
        # go to the member Grid whose client holds them.
        held = [f._wait(None) if isinstance(f, Item) else f for f in futures]
        by_member: dict[str, list[int]] = {}
        for i, f in enumerate(held):
            name = self._member_of(f)
            if name is not None:
                by_member.setdefault(name, []).append(i)
        out: list[Any] = list(held)
        for name, indexes in by_member.items():
            values = self.members[name].gather([held[i] for i in indexes])
            for i, value in zip(indexes, values, strict=True):
                out[i] = value
        return out

    def _member_of(self, future: Any) -> str | None:
        """The portal whose client holds a Dask future or a batched item's future."""
        sweep = getattr(future, "sweep", None)
        client = getattr(sweep.grid, "client", None) if sweep is not None else None
        client = client or getattr(future, "client", None)
        if client is None:
            return None
        return next((n for n, m in self.members.items() if m.client is client), None)


def eligible(
    members: dict[str, Any],
    capacities: dict[str, Capacity],
    options: dict[str, Any],
    first: bool = False,
) -> tuple[list[tuple[str, Capacity]], list[str]]:
    """Of the member Grids whose ``capacities`` are known, those with a node for work with
    these options (``cpus``, ``gpus``, ``memory``, ``where``; ``wait`` takes every one), the
    most free cores first, and one line for each of the others saying why not. With
    ``first``, the portals are asked in that order and only until one has a node."""
    fits: list[tuple[str, Capacity]] = []
    refusals: list[str] = []
    # sorted() keeps the portals' own order among equals.
    for name, capacity in sorted(capacities.items(), key=lambda nc: -nc[1].cores_free):
        if first and fits:
            break
        member = members[name]
        try:
            if not options.get("wait"):
                requirement = member.requirement(
                    options.get("cpus", 1), options.get("gpus", 0), options.get("memory")
                )
                member.check(requirement)
                if options.get("where"):
                    member.require(options["where"], requirement.resources())
        except Unsatisfiable as exc:
            refusals.append(f"{name}: {exc}")
            continue
        fits.append((name, capacity))
    return fits, refusals


# -- a federated sweep's items -------------------------------------------------------------
class Item:
    """One item of a sweep over several portals: ``result``, ``exception``, ``done``,
    ``cancel``, ``status`` and ``portal`` (where it ran), as a Dask future has them."""

    __slots__ = ("_event", "_future", "index", "key", "portal", "sweep")

    def __init__(self, sweep: Sweep, index: int) -> None:
        self.sweep, self.index = sweep, index
        self.key = f"{sweep.name}-{sweep.token}-item-{index}"
        self.portal: str | None = None
        self._future: Any = None  # the member portal's future that holds the value
        self._event = threading.Event()

    def _settle(self, future: Any, portal: str | None) -> None:
        self._future, self.portal = future, portal
        self._event.set()

    def done(self) -> bool:
        return self._event.is_set()

    @property
    def status(self) -> str:
        if not self._event.is_set():
            return "pending"
        if self._future is None:
            return "cancelled"
        return str(self._future.status)

    def _wait(self, timeout: float | None) -> Any:
        if not self._event.wait(timeout):
            raise TimeoutError(f"item {self.index} of the sweep is not done yet")
        if self._future is None:
            from distributed import CancelledError

            raise CancelledError(self.sweep.failure or self.key)
        return self._future

    def result(self, timeout: float | None = None) -> Any:
        return self._wait(timeout).result()

    def exception(self, timeout: float | None = None) -> BaseException | None:
        try:
            return self._wait(timeout).exception()
        except TimeoutError:
            raise
        except Exception as exc:  # noqa: BLE001 - cancelled: that is its exception
            return exc

    def cancel(self) -> None:
        self.sweep.cancel()

    def __repr__(self) -> str:
        return f"<Item {self.index}: {self.status} on {self.portal or '-'}>"


class Sweep(list):
    """The items of a sweep over several portals (a list, in input order), plus ``cancel()``,
    ``wait()`` and ``by_portal()`` (how many items ran where)."""

    def __init__(self, federation: Federation, name: str, count: int) -> None:
        super().__init__()
        self.name = "".join(c if c.isalnum() or c in "_." else "_" for c in name)[:40] or "item"
        self.token = uuid.uuid4().hex[:12]
        self.federation = federation
        self.failure: str | None = None
        self.moved = 0  # chunks taken back from a portal that stopped serving, sent elsewhere
        self.dispatcher: _Dispatcher | None = None
        self.extend(Item(self, i) for i in range(count))

    def cancel(self) -> None:
        if self.dispatcher is not None:
            self.dispatcher.stop("the sweep was cancelled")

    def wait(self, timeout: float | None = None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        for item in self:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            item._wait(left)

    def by_portal(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for item in self:
            if item.portal is not None:
                counts[item.portal] = counts.get(item.portal, 0) + 1
        return counts


# -- sending a sweep -------------------------------------------------------------------------
@dataclass
class _Chunk:
    number: int
    indexes: list[int]
    portal: str | None = None
    futures: list[Any] = field(default_factory=list)  # the member's futures, one per item
    sent: int = 0  # which sending of this chunk the futures belong to


class _Dispatcher:
    """A thread that sends a sweep's chunks to the portals with free slots, takes back the
    chunks of a portal that lost its nodes or its connection, and settles each item once."""

    def __init__(
        self,
        federation: Federation,
        sweep: Sweep,
        fn: Callable[..., Any],
        calls: list[tuple[Any, ...]],
        chunks: list[list[int]],
        options: dict[str, Any],
        slots: dict[str, int],
        cpus: float,
    ) -> None:
        self.federation, self.sweep, self.fn, self.calls = federation, sweep, fn, calls
        self.options, self.slots, self.cpus = options, dict(slots), cpus
        self.pending: deque[_Chunk] = deque(_Chunk(i, c) for i, c in enumerate(chunks))
        self.held: dict[str, dict[int, _Chunk]] = {n: {} for n in federation.members}
        self.events: queue.Queue[tuple[int, int]] = queue.Queue()
        self.jobs = {n: uuid.uuid4().hex[:12] for n in federation.members}  # a job per portal
        self.empty_since: dict[str, float] = {}
        self.left = len(chunks)
        self.stopped: str | None = None
        self.thread = threading.Thread(target=self.run, name=f"grid-fed-{sweep.token}", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self, why: str) -> None:
        self.stopped = why
        self.events.put((-1, -1))

    def run(self) -> None:
        checked = time.monotonic()
        try:
            while self.left and self.stopped is None:
                self.fill()
                try:
                    number, sent = self.events.get(timeout=HEALTH_EVERY)
                except queue.Empty:
                    number = -1
                if number >= 0:
                    self.finished(number, sent)
                if time.monotonic() - checked >= HEALTH_EVERY:
                    checked = time.monotonic()
                    self.check_portals()
        except BaseException as exc:  # noqa: BLE001 - every waiting item is told why
            self.stopped = f"the sweep stopped: {exc}"
        if self.stopped is not None:
            self.sweep.failure = self.stopped
            for chunks in self.held.values():
                for chunk in chunks.values():
                    self._cancel(chunk)
            for item in self.sweep:
                if not item.done():
                    item._settle(None, None)

    # -- sending --------------------------------------------------------------------------
    def fill(self) -> None:
        """Send waiting chunks to the portals with free slots, the freest first."""
        while self.pending:
            free = {n: self.slots.get(n, 0) - len(h) for n, h in self.held.items()}
            name = max(free, key=lambda n: free[n])
            if free[name] <= 0:
                return
            chunk = self.pending.popleft()
            try:
                self.send(name, chunk)
            except Unsatisfiable:
                self.slots[name] = 0  # no node there meets it any more: the others take it
                self.pending.appendleft(chunk)
            except (ConnectionFailed, OSError, TimeoutError):
                self.slots[name] = 0
                self.pending.appendleft(chunk)

    def send(self, name: str, chunk: _Chunk) -> None:
        member = self.federation.members[name]
        columns = [list(col) for col in zip(*(self.calls[i] for i in chunk.indexes), strict=True)]
        options = {k: v for k, v in self.options.items() if k != "batch"}
        with member.job(f"map {self.sweep.name}", job_id=self.jobs[name]):
            futures = member.map(self.fn, *columns, batch=max(1, len(chunk.indexes)), **options)
        chunk.portal, chunk.futures, chunk.sent = name, list(futures), chunk.sent + 1
        self.held[name][chunk.number] = chunk
        number, sent = chunk.number, chunk.sent
        # Every item of a chunk is in one task: its last item ends with it.
        futures[-1].add_done_callback(lambda _f: self.events.put((number, sent)))

    def finished(self, number: int, sent: int) -> None:
        chunk = next((h[number] for h in self.held.values() if number in h), None)
        if chunk is None or chunk.sent != sent:
            return  # taken back meanwhile: what it sends is not used
        status = chunk.futures[-1].status
        if status == "cancelled" and self.stopped is None:
            self.take_back(chunk)  # cancelled at its portal (a restart, an admin): again
            return
        del self.held[chunk.portal][number]
        for index, future in zip(chunk.indexes, chunk.futures, strict=True):
            self.sweep[index]._settle(future, chunk.portal)
        self.left -= 1

    # -- portals that stop serving ----------------------------------------------------------
    def check_portals(self) -> None:
        """A portal that holds chunks but has no online node (for GONE_AFTER s) or does not
        answer gives them back; one that was dropped and has nodes again gets slots again."""
        now = time.monotonic()
        for name, member in self.federation.members.items():
            if not self.held[name] and self.slots.get(name, 0) > 0:
                continue
            try:
                capacity = member.capacity()
                online = capacity.nodes_online > 0
            except (ConnectionFailed, OSError, TimeoutError):
                online, capacity = False, None
            if online and capacity is not None:
                self.empty_since.pop(name, None)
                self.slots[name] = max(1, int(capacity.cores_total // self.cpus))
                continue
            since = self.empty_since.setdefault(name, now)
            if capacity is None or now - since >= GONE_AFTER:
                self.slots[name] = 0
                for chunk in list(self.held[name].values()):
                    self.take_back(chunk)

    def take_back(self, chunk: _Chunk) -> None:
        name = chunk.portal
        if name is not None:
            self.held[name].pop(chunk.number, None)
        self._cancel(chunk)
        chunk.portal, chunk.futures = None, []
        chunk.sent += 1  # anything the old sending still reports is ignored
        self.sweep.moved += 1
        self.pending.appendleft(chunk)

    def _cancel(self, chunk: _Chunk) -> None:
        futures = list(chunk.futures)
        if not futures:
            return

        def cancel() -> None:
            tasks = [getattr(f, "task", None) or f for f in futures]
            for task in {id(t): t for t in tasks}.values():
                try:
                    task.cancel()
                except Exception:  # noqa: BLE001, S112 - a portal that is gone cancels nothing
                    continue

        # Off this thread: a portal that does not answer must not hold the others up.
        threading.Thread(target=cancel, daemon=True).start()


def share(count: int, weights: dict[str, float]) -> dict[str, int]:
    """``count`` items split over the names in proportion to ``weights`` (largest
    remainders get the odd ones), in the names' order."""
    total = sum(max(0.0, w) for w in weights.values())
    if not weights:
        return {}
    if total <= 0:
        weights, total = dict.fromkeys(weights, 1.0), float(len(weights))
    exact = {n: count * max(0.0, w) / total for n, w in weights.items()}
    parts = {n: int(x) for n, x in exact.items()}
    for n in sorted(exact, key=lambda n: parts[n] - exact[n])[: count - sum(parts.values())]:
        parts[n] += 1
    return parts
