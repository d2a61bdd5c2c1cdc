"""One portal a volunteer serves: its enrolment, its sandboxed worker process, its share.

A Dask worker serves one scheduler, so the agent (agent.py) keeps one ``PortalLink`` per portal.
The link starts the worker as a child process (``grid_portal.node.worker``) inside the sandbox
and controls it over that process's stdin/stdout, a channel no one else can reach. It

- restarts the worker whenever it ended (a plain ``dask worker`` exits when its scheduler goes
  away; a volunteer must not), with back-off, until it is stopped or detached; a portal that
  refused the machine (its certificate revoked) is not asked again;
- tells the worker the state the agent's rules want (``push``: run, pause, move tasks);
- passes the worker's task-slot requests to the agent's arbiter and its grants back
  (``shares.py``, ``slotgate.py``);
- on stop, drains the worker (running tasks finish, nothing new starts), so nothing is lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from grid_portal.errors import GridError
from grid_portal.node.sandbox import SHARED_PLACES, SandboxPlan, import_path, prepare_scratch
from grid_portal.units import format_size

if TYPE_CHECKING:
    from grid_portal.node.agent import Credentials, Volunteer

logger = logging.getLogger("grid_portal.volunteer")

# How a sandboxed worker starts: ``python -I -c WORKER_BOOT grid_portal.node.worker PATH_JSON``
# (isolated mode ignores PYTHONPATH, so the agent passes the import path the worker needs; the
# module's name is there for `ps` and whoever looks for the worker by its command line).
WORKER_BOOT = (
    "import json, sys; sys.path[:0] = [p for p in json.loads(sys.argv[2]) if p not in sys.path]; "
    "from grid_portal.node.worker import main; sys.exit(main())"
)
# What a portal's refusal of this machine says (portal/plugin.py, guard.py): not worth retrying.
REFUSALS = ("revoked",)


class PortalLink:
    """Keeps one sandboxed worker connected to one portal, for the agent ``agent``."""

    def __init__(
        self,
        agent: Volunteer,
        creds: Credentials,
        plan: SandboxPlan,
        share: float = 1.0,
        url: str | None = None,
        label: str | None = None,
    ) -> None:
        self.agent = agent
        self.creds = creds
        self.plan = plan
        self.share = share
        self.url = url  # the portal's HTTPS address (to re-measure the network), if known
        self.label = label or creds.scheduler  # how the volunteer names this portal
        self.stop_requested = asyncio.Event()
        self.force_requested = asyncio.Event()  # a second stop: do not wait for tasks
        self.joined = asyncio.Event()
        self.stop_reason = "stopped by the volunteer"
        self.problem: str | None = None  # why the portal is not served now, in words
        self.given_up = False  # the portal refused this machine: not asked again
        self.proc: asyncio.subprocess.Process | None = None
        self.address: str | None = None
        self.arbitrated = False  # whether the worker asks for a slot before each task
        # A peer portal this machine's home portal (that link's key) lends it to, by the name
        # the home portal gives the peer; None: a portal the volunteer attached itself.
        self.lent_by: str | None = None
        self.peer: str | None = None
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._ids = itertools.count(1)
        self._pushed: tuple[str | None, str | None, bool] | None = None
        self._push_lock = asyncio.Lock()
        self._stops = 0

    @property
    def key(self) -> str:
        return self.label

    # -- the main loop ----------------------------------------------------------------------
    async def run(self) -> None:
        network = asyncio.ensure_future(self._network_loop())
        try:
            # Rejoining backs off from 1 s, doubling, to reconnect-max (the setting): the start
            # is not a setting, for the first retry after a short outage should be quick.
            delay = 1.0
            while not self.stop_requested.is_set():
                started = time.monotonic()
                refused = await self._run_worker_once()
                if self.stop_requested.is_set():
                    break
                if refused is not None:
                    self.problem, self.given_up = refused, True
                    logger.error("%s: %s", self.label, refused)
                    break
                if time.monotonic() - started > 60:
                    delay = 1.0
                logger.info("%s: rejoining in %.0f s", self.label, delay)
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self.stop_requested.wait(), delay)
                delay = min(delay * 2, self.agent.options.reconnect_max)
        finally:
            network.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await network
            await self._kill_worker()

    def request_stop(
        self, reason: str = "stopped by the volunteer", repeat_forces: bool = True
    ) -> None:
        """Drain and leave; asked a second time (a second Ctrl-C), stop at once."""
        if not repeat_forces and self.stop_requested.is_set():
            return
        self._stops += 1
        if not self.stop_requested.is_set():
            self.stop_reason = reason
        self.stop_requested.set()
        if self._stops > 1:
            self.force_requested.set()

    async def _network_loop(self) -> None:
        """Re-measure bandwidth and round trip to the portal now and then; the worker sends
        the figures in its telemetry, and the portal updates the node's capacity."""
        from grid_portal.node.agent import measure_network

        url = self.url
        if not url:
            return
        while True:
            await asyncio.sleep(self.agent.options.network_refresh)
            ca_pem = Path(self.creds.ca).read_text()
            measured = await asyncio.to_thread(measure_network, url, ca_pem)
            if measured.measured_at is not None:
                self._tell("network", network=asdict(measured))

    # -- the worker process -----------------------------------------------------------------
    def _worker_command(self) -> list[str]:
        if self.plan.level == "none":
            flags = ["-P"] if sys.version_info >= (3, 11) else []  # the scratch dir is not code
            return [*self.plan.prefix, sys.executable, *flags, "-m", "grid_portal.node.worker"]
        # Isolated (-I): no user site, no PYTHON* variables, no current directory on sys.path;
        # the import path the worker needs comes on its command line, from us.
        path = json.dumps(import_path())
        return [
            *(*self.plan.prefix, sys.executable, "-I", "-c", WORKER_BOOT),
            *("grid_portal.node.worker", path),
        ]

    def _worker_config(self, files: dict[str, str]) -> dict[str, Any]:
        local = str(self.plan.scratch / "work") if self.plan.level != "none" else None
        sandboxed, c = self.plan.level != "none", self.creds
        options = self.agent.options
        return {
            "scheduler": self.creds.scheduler,
            # Sandboxed, the certificates and the key go to the worker as PEM text, in memory:
            # no file of them is reachable from the sandbox, so tasks cannot read the key.
            "tls": {
                k: Path(path).read_text() if sandboxed else files[path]
                for k, path in (("ca", c.ca), ("cert", c.cert), ("key", c.key))
            },
            "jobs_directory": str(self.plan.scratch / "jobs") if sandboxed else None,
            "shared_places": list(SHARED_PLACES) if self.plan.level == "bubblewrap" else [],
            "name": self.creds.name,
            "nthreads": options.cpus,
            "memory_limit": options.memory,
            "resources": self.agent.offer().resources(),
            "info": {**self.agent.node_info(), "sandbox": self.plan.level},
            "gpus": options.gpus,
            "telemetry_interval": options.telemetry_interval,
            "death_timeout": options.death_timeout,
            "worker_dask": options.worker_dask,
            "idle_heartbeat_interval": options.idle_heartbeat_interval,
            "idle_after": options.idle_after,
            "job_linger": options.job_linger,
            "memory_pause": options.memory_pause,
            "local_directory": local or options.local_directory,
            "isolate_tasks": self.plan.isolates_tasks,
            "verbose": options.verbose,
            "arbitrated": self.arbitrated,
        }

    async def _run_worker_once(self) -> str | None:
        """Start the worker process and stay with it until it ends or we are asked to stop.
        Returns the portal's refusal, when it refused this machine."""
        cert_files = [self.creds.ca, self.creds.cert, self.creds.key]
        files = {f: f for f in cert_files}
        if self.plan.level != "none":
            prepare_scratch(self.plan)
        extra: dict[str, Any] = {}
        if self.plan.user is not None:
            extra = {"user": self.plan.user[0], "group": self.plan.user[1], "extra_groups": []}
        try:
            self.proc = proc = await asyncio.create_subprocess_exec(
                *self._worker_command(),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                env=dict(self.plan.env),
                cwd=str(self.plan.scratch) if self.plan.level != "none" else None,
                limit=2**20,
                **extra,
            )
        except OSError as exc:
            raise GridError(f"cannot start the worker process: {exc}") from None
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write((json.dumps(self._worker_config(files)) + "\n").encode())
        ready = asyncio.get_running_loop().create_future()
        refusal: list[str] = []
        reader = asyncio.ensure_future(self._read_events(proc, ready, refusal))
        exited = asyncio.ensure_future(proc.wait())
        stop = asyncio.ensure_future(self.stop_requested.wait())
        try:
            await asyncio.wait({ready, exited, stop}, return_when=asyncio.FIRST_COMPLETED)
            if ready.done():
                options = self.agent.options
                logger.info(
                    "joined %s (%s) as %s, offering %d CPUs, %s memory, %s",
                    self.label,
                    self.creds.scheduler,
                    self.creds.name,
                    options.cpus,
                    format_size(options.memory),
                    f"GPUs {options.gpus}" if options.gpus else "no GPU",
                )
                self.problem = None
                self.joined.set()
                self.agent.link_joined(self)
                await self.push_quietly(force=True)
                await asyncio.wait({exited, stop}, return_when=asyncio.FIRST_COMPLETED)
            if not exited.done():
                await self._leave_gracefully(exited)
            elif not self.stop_requested.is_set():
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(asyncio.shield(reader), 2)  # its last words
                if refusal:
                    self.problem = refusal[-1]
                    if any(word in refusal[-1] for word in REFUSALS):
                        return self._refused_text(refusal[-1])
                else:
                    self.problem = f"cannot reach the portal at {self.creds.scheduler}"
                logger.warning(
                    "%s: lost the portal; the worker closed (exit code %s)",
                    self.label,
                    proc.returncode,
                )
        finally:
            self.joined.clear()
            self.address = None
            self._pushed = None
            for task in (stop, reader):
                task.cancel()
            await self._kill_worker()
            for future in self._pending.values():
                if not future.done():
                    future.set_exception(ConnectionError("the worker process has ended"))
            self._pending.clear()
            self.agent.link_left(self)
        return None

    def _refused_text(self, reason: str) -> str:
        return (
            f"the portal refused this machine ({reason}); it is no longer served. Detach it "
            f"(grid-portal volunteer detach {self.label}), or attach it again with a new token "
            "from its admin; the other portals go on"
        )

    async def _read_events(
        self,
        proc: asyncio.subprocess.Process,
        ready: asyncio.Future[Any],
        refusal: list[str],
    ) -> None:
        assert proc.stdout is not None
        while True:
            line = await proc.stdout.readline()
            if not line:
                return
            try:
                message = json.loads(line)
            except ValueError:
                continue
            event = message.get("event")
            if event in ("want", "done"):
                self.agent.slot_event(self, message)
            elif event == "ready":
                self.address = message.get("address")
                if not ready.done():
                    ready.set_result(message)
            elif event == "refused":
                refusal.append(str(message.get("reason") or "refused")[:500])
            elif "id" in message:
                future = self._pending.pop(message["id"], None)
                if future is not None and not future.done():
                    future.set_result(message.get("reply") or {})

    async def ask(self, op: str, timeout: float = 10.0, **fields: Any) -> dict[str, Any]:
        """Send a command to the worker process and wait for its reply."""
        proc = self.proc
        if proc is None or proc.stdin is None or proc.returncode is not None:
            raise ConnectionError("no worker process")
        ident = next(self._ids)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[ident] = future
        proc.stdin.write((json.dumps({"id": ident, "op": op, **fields}) + "\n").encode())
        await proc.stdin.drain()
        try:
            return await asyncio.wait_for(future, timeout)
        finally:
            self._pending.pop(ident, None)

    def _tell(self, op: str, **fields: Any) -> None:
        """Send a command that has no reply; nothing if the worker has gone."""
        proc = self.proc
        if proc is not None and proc.stdin is not None and proc.returncode is None:
            with contextlib.suppress(ConnectionError, OSError):
                proc.stdin.write((json.dumps({"op": op, **fields}) + "\n").encode())

    def grant(self, ticket: int, move: bool = False) -> None:
        self._tell("grant", ticket=ticket, **({"move": True} if move else {}))

    async def set_arbitrated(self, on: bool) -> None:
        """Ask for a slot before each task (several portals) or not (this one alone)."""
        self.arbitrated = on
        if self.joined.is_set():
            with contextlib.suppress(ConnectionError, OSError, asyncio.TimeoutError):
                await self.ask("arbitrate", on=on)

    async def _leave_gracefully(self, exited: asyncio.Future[Any]) -> None:
        """Drain: let running tasks finish, then retire (results move to other nodes)."""
        timeout = self.agent.options.drain_timeout
        if self._stops < 2 and self.joined.is_set():
            logger.info(
                "leaving %s (%s): finishing running tasks first (Ctrl-C again to force)",
                self.label,
                self.stop_reason,
            )
            with contextlib.suppress(ConnectionError, OSError, asyncio.TimeoutError):
                await self.ask("drain", reason=self.stop_reason, drain_timeout=timeout)
            force = asyncio.ensure_future(self.force_requested.wait())
            try:
                await asyncio.wait(
                    {exited, force}, timeout=timeout + 30, return_when=asyncio.FIRST_COMPLETED
                )
            finally:
                force.cancel()
        if not exited.done():
            self._tell("close", reason="volunteer-stopped")
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(exited), 10)

    async def _kill_worker(self) -> None:
        proc = self.proc
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), 10)
        except asyncio.TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()

    # -- the agent's rules, applied to this worker ----------------------------------------------
    async def push(self, force: bool = False) -> None:
        """Tell the worker the state the agent wants, when that changed."""
        if self.stop_requested.is_set():
            return
        async with self._push_lock:
            if not self.joined.is_set():
                return
            desired = self.agent.desired_for(self)
            if desired == self._pushed and not force:
                return
            state, reason, move = desired
            await self.ask("policy", state=state, reason=reason, move=move)
            self._pushed = desired

    async def push_quietly(self, force: bool = False) -> None:
        """Push, leaving a failure to the next round of the rules loop (every few seconds)."""
        with contextlib.suppress(ConnectionError, OSError, asyncio.TimeoutError):
            await self.push(force=force)

    async def status(self, word: str, received: Callable[[str], dict[str, Any]]) -> dict[str, Any]:
        """This portal's part of ``volunteer status``; ``word`` is the agent's own state."""
        if self.stop_requested.is_set():
            word = "leaving"
        elif not self.joined.is_set():
            word = "refused" if self.given_up else "connecting"
        result: dict[str, Any] = {
            "portal": self.label,
            "url": self.url,
            "scheduler": self.creds.scheduler,
            "name": self.creds.name,
            "share": self.share,
            "lent_by": self.lent_by,  # a peer portal served for its home portal
            "state": word,
            "problem": self.problem,
            **received(self.key),
        }
        if self.joined.is_set():
            with contextlib.suppress(ConnectionError, OSError, asyncio.TimeoutError):
                worker = await self.ask("status", timeout=5)
                for key in (
                    "running_tasks",
                    "suspended_tasks",
                    "in_process_tasks",
                    "moved_tasks",
                    "address",
                    "memory_pressure",
                ):
                    result[key] = worker.get(key)
        return result


__all__ = ["WORKER_BOOT", "PortalLink"]
