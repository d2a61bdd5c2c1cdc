"""Default deny at Dask's own doors: every call is checked against ``grid_portal.protocol``.

A Dask server (the portal's scheduler, a volunteer's worker) dispatches two kinds of input:

- request/reply handlers (``server.handlers``, looked up by ``Server._handle_comm`` with
  ``self.handlers[op]``): `install` swaps in a `GuardedHandlers` dict whose lookups return the
  handler wrapped in a check of the caller's role, read from the TLS session;
- stream ops (``server.stream_handlers``, read in ``Server.handle_stream``): `install` wraps
  ``handle_stream`` so that its comm yields only the messages the peer's role may send, with
  the ``worker`` / ``client`` fields taken out. Dask calls a stream handler with
  ``merge(extra, msg)``, so a field in the message would override what the connection says;
  without it the connection's own value is used. That binds every stream message to its
  connection.

Both sides add their own checks (ownership of keys and jobs, who runs a task) through a
`Gate`. A refused call is logged and answered with `NotAllowed`; a refused stream message is
logged and dropped. Nothing here imports the portal's code: volunteers use it too.
"""

from __future__ import annotations

import inspect
import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from grid_portal.errors import GridError, NotAllowed
from grid_portal.identity import Identity, is_in_process, peer_identity
from grid_portal.protocol import ADMIN, DELEGATE, SCHEDULER, Rule, allowed

logger = logging.getLogger("grid_portal.guard")

# Code in this very process (Dask's in-process test harness, or a server calling itself over
# inproc://) is as trusted as the process.
IN_PROCESS = Identity(role=ADMIN, name="(this process)", serial=0)

# For developers: a file to which every decision is appended as "side kind role op verdict",
# to find what a new Dask version calls. Nothing is refused while it is set.
AUDIT_ENV = "GRID_PORTAL_PROTOCOL_AUDIT"

# Message fields that name a connection; they must come from the connection itself.
BOUND_FIELDS = ("worker", "client")

# Dask's fire_and_forget keeps a task alive after its submitter leaves by naming this
# pseudo-client; the one value a client may put in its own "client" field (a %%grid --bg cell
# relies on it). Which keys it keeps is still checked (portal/access.py).
FIRE_AND_FORGET = "fire-and-forget"

# How often the same refusal is logged at most (an attacker's loop must not flood the log).
LOG_EVERY = 10.0

CallCheck = Callable[[Identity, str, dict[str, Any]], "str | None"]
StreamCheck = Callable[[Identity, str, dict[str, Any], dict[str, Any]], "str | None"]


def caller_identity(comm: Any) -> Identity | None:
    """Who is calling over ``comm``: its certificate's identity, `IN_PROCESS` for inproc."""
    if comm is None:
        return None
    identity = peer_identity(comm)
    if identity is None and is_in_process(comm):
        return IN_PROCESS
    return identity


@dataclass
class Gate:
    """One server's door: its tables and its side's own checks.

    ``check_call(identity, op, msg)`` and ``check_stream(identity, op, msg, extra)`` return
    a reason to refuse, or None; they may also narrow ``msg`` in place (a key list to the
    caller's own keys). ``is_revoked(identity)`` is asked on every call.
    """

    side: str
    handlers: Mapping[str, Rule]
    stream_ops: Mapping[str, Rule]
    check_call: CallCheck | None = None
    check_stream: StreamCheck | None = None
    is_revoked: Callable[[Identity], bool] | None = None
    # The role that may call handlers the table does not list (the portal's admin: Dask's
    # run_on_scheduler, restart...); None: unlisted handlers are nobody's.
    unlisted_to: str | None = None
    refusals: int = 0
    _last_logged: dict[tuple[str, str], float] = field(default_factory=dict)
    _audit: Any = None

    def __post_init__(self) -> None:
        path = os.environ.get(AUDIT_ENV)
        if path:
            self._audit = open(path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115

    def verdict(
        self,
        kind: str,
        identity: Identity | None,
        op: str,
        msg: dict[str, Any],
        extra: dict[str, Any] | None = None,
    ) -> str | None:
        """Why ``identity`` may not do ``op`` now, or None if it may."""
        table = self.handlers if kind == "call" else self.stream_ops
        role = identity.role if identity is not None else None
        reason: str | None
        if identity is None:
            reason = "the peer presented no certificate of this grid"
        elif self.is_revoked is not None and self.is_revoked(identity):
            reason = (
                f"the credential {identity.name!r} works only while its job runs, and that job "
                "has ended"
                if identity.role == DELEGATE
                else f"the certificate of {identity.role} {identity.name!r} was revoked by the "
                "portal's admin"
            )
        elif (
            identity is IN_PROCESS
            or kind == "call"
            and op not in table
            and role is not None
            and role == self.unlisted_to
        ):
            reason = None
        elif kind == "call" and op not in table and self.unlisted_to is not None:
            reason = f"{op!r} is reserved for the portal's {self.unlisted_to}"
        elif not allowed(table, op, role):
            rule = table.get(op)
            refusal = rule.refusal if rule is not None and rule.refusal else ""
            reason = refusal or f"{op!r} is not open to a {role} certificate"
        elif kind == "call" and self.check_call is not None:
            reason = self.check_call(identity, op, msg)
        elif kind == "stream" and self.check_stream is not None:
            reason = self.check_stream(identity, op, msg, extra or {})
        else:
            reason = None
        if self._audit is not None:
            self._audit.write(f"{self.side} {kind} {role} {op} {'refused' if reason else 'ok'}\n")
            return None
        if reason is not None:
            self.refusals += 1
            self._log(identity, op, reason)
        return reason

    def _log(self, identity: Identity | None, op: str, reason: str) -> None:
        who = f"{identity.role} {identity.name!r}" if identity is not None else "an unknown peer"
        now = time.monotonic()
        if now - self._last_logged.get((who, op), -LOG_EVERY) >= LOG_EVERY:
            self._last_logged[(who, op)] = now
            logger.warning("%s refused %s from %s: %s", self.side, op, who, reason)


class GuardedHandlers(dict):
    """``server.handlers`` whose lookups return each handler behind its gate.

    Dask's ``_handle_comm`` reads ``self.handlers[op]`` for every request, so checking at
    lookup covers handlers added later too (extensions, plugins). The wrapped handler takes the
    comm first and keeps the original's other parameters, since Dask inspects the signature to
    decide what to pass (``comm``, ``serializers``).
    """

    def __init__(self, handlers: Mapping[str, Any], gate: Gate) -> None:
        super().__init__(handlers)
        self.gate = gate
        self._wrapped: dict[str, tuple[Any, Any]] = {}

    def __getitem__(self, op: str) -> Any:
        raw = super().__getitem__(op)
        cached = self._wrapped.get(op)
        if cached is None or cached[0] is not raw:
            cached = (raw, _guarded(op, raw, self.gate))
            self._wrapped[op] = cached
        return cached[1]

    def raw(self, op: str) -> Any:
        """The handler itself, unguarded (for code that wraps a handler of its own)."""
        return super().__getitem__(op)


def _guarded(op: str, handler: Any, gate: Gate) -> Any:
    signature = inspect.signature(handler)
    params = list(signature.parameters.values())
    expects_comm = bool(params) and params[0].name == "comm"
    rest = params[1:] if expects_comm else params

    async def guarded(comm: Any, **msg: Any) -> Any:
        reason = gate.verdict("call", caller_identity(comm), op, msg)
        if reason is not None:
            # The two ops that start a stream send no reply (reply=False): answer as Dask's
            # own side would, so that the peer shows why.
            if op == "register-client":  # a Client raises the "error" of its stream-start
                await comm.write([{"op": "stream-start", "error": f"refused: {reason}"}])
                return None
            if op == "register-worker":  # a Worker raises on a status that is not "OK"
                await comm.write({"status": "error", "message": reason, "time": time.time()})
                return None
            return refusal_message(op, reason)
        try:
            result = handler(comm, **msg) if expects_comm else handler(**msg)
            return await result if inspect.isawaitable(result) else result
        except GridError as exc:
            # A typed answer for the caller's own mistake (NotFound, UsageError...): raised
            # again on the caller's side, with no traceback in this server's log.
            return error_reply(exc)

    comm_param = inspect.Parameter("comm", inspect.Parameter.POSITIONAL_OR_KEYWORD)
    guarded.__signature__ = signature.replace(parameters=[comm_param, *rest])  # type: ignore[attr-defined]
    guarded.__name__ = f"guarded_{getattr(handler, '__name__', op)}"
    return guarded


def refusal_message(op: str, reason: str) -> dict[str, Any]:
    """The reply that makes the caller's ``rpc`` raise `NotAllowed` with ``reason``."""
    return error_reply(NotAllowed(f"{op}: {reason}"))


def error_reply(exc: Exception) -> dict[str, Any]:
    """The reply that makes the caller's ``rpc`` raise ``exc`` (Dask's own error format)."""
    from distributed.core import error_message

    try:
        raise exc
    except Exception as raised:  # noqa: BLE001 - error_message reads the active exception
        return error_message(raised, status="uncaught-error")


class _FilteredComm:
    """A stream's comm that yields only what the peer may send, bound to the connection."""

    def __init__(self, comm: Any, gate: Gate, extra: dict[str, Any]) -> None:
        self._comm = comm
        self._gate = gate
        self._extra = extra
        self._identity = caller_identity(comm)
        # The portal's scheduler directing a worker names other workers in its messages
        # ("remove-worker"); from anyone else those fields would speak for another party.
        self._strip = self._identity is None or self._identity.role != SCHEDULER

    def __getattr__(self, name: str) -> Any:
        return getattr(self._comm, name)

    async def read(self, *args: Any, **kwargs: Any) -> Any:
        msgs = await self._comm.read(*args, **kwargs)
        if not isinstance(msgs, (tuple, list)):
            msgs = (msgs,)
        kept = []
        for msg in msgs:
            if not isinstance(msg, dict):
                kept.append(msg)  # "OK" and the like: Dask's own framing
                continue
            op = msg.get("op")
            if op == "close-stream":
                kept.append(msg)
                continue
            if self._strip:
                forgetting = op == "client-desires-keys" and msg.get("client") == FIRE_AND_FORGET
                for name in BOUND_FIELDS:
                    msg.pop(name, None)
                if forgetting:  # Dask's own pseudo-client; the keys are still checked
                    msg["client"] = FIRE_AND_FORGET
            if self._gate.verdict("stream", self._identity, str(op), msg, self._extra) is None:
                kept.append(msg)
        return kept


class _MessagePickle:
    """Stands for ``distributed.protocol.pickle`` inside ``distributed.protocol.core``: the same
    module, except that ``loads`` (of ``__Pickled__`` sub-frames, which Dask opens while it
    reads a message, before any handler or gate has seen its op) is a restricted one."""

    def __init__(self, real: Any, loads: Callable[..., Any]) -> None:
        self.real = real
        self._loads = loads

    def loads(self, data: Any, *, buffers: Any = ()) -> Any:
        return self._loads(data, buffers=buffers)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


def restrict_message_pickles(loads: Callable[..., Any]) -> None:
    """Every ``ToPickle`` field of every message this process reads goes through ``loads``
    (``loads(data, buffers=...)``, raising to refuse; Dask then drops that connection).
    Explicit ``pickle.loads`` calls of Dask's handlers, and what this process sends, are as
    before."""
    import distributed.protocol.core as core

    current = core.pickle
    real = current.real if isinstance(current, _MessagePickle) else current
    core.pickle = _MessagePickle(real, loads)  # type: ignore[assignment]


def install(server: Any, gate: Gate) -> None:
    """Put ``server`` (a Dask Scheduler or Worker) behind ``gate``. Idempotent."""
    if isinstance(server.handlers, GuardedHandlers):
        server.handlers.gate = gate
        return
    server.handlers = GuardedHandlers(server.handlers, gate)
    original = server.handle_stream

    async def handle_stream(comm: Any, extra: dict[str, Any] | None = None) -> None:
        await original(_FilteredComm(comm, gate, extra or {}), extra)

    server.handle_stream = handle_stream
    # "connection_stream" (a stream on a connection the peer opened) was bound to the old
    # method; it is refused by the tables anyway, but keep it pointing at the guarded one.
    if "connection_stream" in server.handlers:
        dict.__setitem__(server.handlers, "connection_stream", handle_stream)
