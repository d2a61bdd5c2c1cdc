"""Small results that come back with their task's completion, without a second round trip.

A Dask client learns that a task finished (``key-in-memory``) and then asks for its value
(``gather``): the scheduler fetches it from the worker and hands it on, a second round trip
of four messages (about 3.5 ms of a ``%%grid`` cell's 15 here). For tasks annotated
``grid_push``, which the portal marks as it accepts them (``PUSH_FORWARDED``), the node instead
sends the pickled result to the portal on its existing stream,
just ahead of Dask's own ``task-finished``; the portal forwards it, unopened, to the clients
that asked for that task and only to them; the client hands it to whoever waits for it. A
result larger than ``PUSH_LIMIT`` (or one that fails to pickle) is simply not pushed: the
waiting side then gathers it as usual, so nothing depends on the push arriving.

The three sides share only the names below (the node may not import portal code); each side's
part lives with it: ``node/plugin.py`` sends, ``portal/plugin.py`` forwards, ``Grid`` receives
through :class:`PushedResults`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from grid_portal.protocol import PUSH_ANNOTATION, PUSH_LIMIT, PUSH_OP  # noqa: F401 - names of the wire contract

# What the portal sets that annotation to when it accepts the task (its update_graph): a node
# pushes only for tasks so marked. A portal too old to know the message never marks them, and
# an unknown message would make Dask close the node's stream.
PUSH_FORWARDED = "portal-forwards"


class PushedResults:
    """The client's side: callbacks waiting for pushed results, by task key.

    ``attach`` registers the receiver as a stream handler of a ``distributed.Client``: Dask
    offers no public hook for messages of our own on the scheduler's stream to the client, so
    this uses the client's handler table; a client without one never receives pushes and
    everything is gathered as before.
    """

    def __init__(self) -> None:
        self._waiting: dict[str, Callable[[bytes], None]] = {}
        self._lock = threading.Lock()

    def attach(self, client: Any) -> bool:
        handlers = getattr(client, "_stream_handlers", None)
        if not isinstance(handlers, dict):
            return False
        handlers[PUSH_OP] = self._receive
        return True

    def expect(self, key: str, callback: Callable[[bytes], None]) -> None:
        """Call ``callback(data)`` (in the client's event loop) if ``key``'s result is pushed."""
        with self._lock:
            self._waiting[key] = callback

    def forget(self, key: str) -> None:
        with self._lock:
            self._waiting.pop(key, None)

    def _receive(self, key: Any = None, data: Any = None, **_: Any) -> None:
        with self._lock:
            callback = self._waiting.pop(key, None) if isinstance(key, str) else None
        if callback is not None and isinstance(data, bytes):
            callback(data)
