"""The volunteer's worker process: one Dask Worker with the NodePlugin, started by the agent.

``python -m grid_portal.node.worker``, inside the sandbox (see sandbox.py). The agent sends one
JSON line of configuration on stdin, then commands, one JSON line each; the worker answers on
stdout. These two pipes are the agent's private control channel: right at start they are moved
to other descriptors, stdin becomes /dev/null and stdout goes to stderr, so nothing a task
prints or reads can get mixed into them.

Commands: ``{"id": N, "op": "policy", "state": null|"paused", "reason": str, "move": bool}``,
``{"id": N, "op": "status"}``, ``{"id": N, "op": "drain", "timeout": s, "reason": str}``,
``{"id": N, "op": "arbitrate", "on": bool}``, ``{"op": "grant", "ticket": N}`` (``"move": true``: send the task back),
``{"op": "close"}``. Replies: ``{"id": N, "reply": {...}}``. Events: ``{"event": "ready",
"address": ...}`` once registered with the scheduler, ``{"event": "refused", "reason": str}``
when the portal refused it, ``{"event": "want"|"done", "ticket": N, ...}`` for each task
(slotgate.py), ``{"event": "closed"}`` at the end.
End of input (the agent is gone) closes the worker.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
import threading
from typing import IO, Any

logger = logging.getLogger("grid_portal.node")

# The Dask settings that make an idle worker cheap for its owner are the volunteer's
# (grid-portal.volunteer.worker-dask, sent by the agent). These the worker needs whatever is
# configured:
WORKER_NEEDS: dict[str, Any] = {
    # Grid tasks may start processes of their own (multiprocessing, subprocess pools).
    "distributed.worker.daemon": False,
    # No plain-HTTP routes (metrics, health, statics) on the volunteer's LAN address: the
    # worker's only door is its mutual-TLS comm, behind the protocol's gate.
    "distributed.worker.http.routes": [],
}
PLUGIN_OWNS_PAUSING = {"distributed.worker.memory.pause": False}
# A sandboxed worker runs no preload (a Dask config could name one), and spills nothing to disk:
# its task processes can write where it would spill, and it would unpickle what it read back.
# Under memory pressure the node plugin pauses the worker instead.
SANDBOXED_WORKER_CONFIG: dict[str, Any] = {
    "distributed.worker.preload": [],
    "distributed.worker.preload-argv": [],
    "distributed.worker.memory.target": False,
    "distributed.worker.memory.spill": False,
}


def _keep_out_of_reach() -> None:
    """Make this process non-dumpable (Linux): other processes of the same user, its own task
    processes included, can then neither ptrace it nor open its /proc/PID/mem, environ or fd/,
    where its key and its control channel are (without CAP_SYS_PTRACE, which the sandbox
    drops). Task processes start dumpable again (exec)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE, 0
    except (OSError, AttributeError):
        logger.warning("could not make the worker process non-dumpable")


def _in_memory(tls: dict[str, str]) -> dict[str, str]:
    """PEM text (from the agent) -> paths only this process can open: ``/proc/self/fd/N`` of a
    memory file. (Dask would write a key given as text to a temporary file to load it.)"""
    if not hasattr(os, "memfd_create") or not all("\n" in v for v in tls.values()):
        return tls  # paths already (a worker outside the sandbox), or no memfd: as given
    paths = {}
    for name, text in tls.items():
        fd = os.memfd_create(f"grid-{name}", os.MFD_CLOEXEC)
        os.write(fd, text.encode())
        paths[name] = f"/proc/self/fd/{fd}"
    return paths


def _trusted_dask_config() -> None:
    """Read Dask's configuration again, without ``~/.config/dask``: the worker's home may be
    a place its tasks can write to, and a config there could name a preload."""
    import dask.config

    home = os.path.realpath(os.path.join(os.path.expanduser("~"), ".config", "dask"))
    dask.config.refresh(paths=[p for p in dask.config.paths if os.path.realpath(p) != home])


def _private_channels() -> tuple[IO[str], IO[str]]:
    """Take stdin/stdout for the agent; leave /dev/null and stderr in their place."""
    commands = os.fdopen(os.dup(0), "r", encoding="utf-8")
    events = os.fdopen(os.dup(1), "w", encoding="utf-8", buffering=1)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return commands, events


class WorkerProcess:
    def __init__(self, config: dict[str, Any], commands: IO[str], events: IO[str]) -> None:
        self.config = config
        self.commands = commands
        self.events = events
        self._write_lock = threading.Lock()
        self.worker: Any = None
        self.plugin: Any = None
        self.gate: Any = None
        self._drain: asyncio.Future[Any] | None = None

    def emit(self, message: dict[str, Any]) -> None:
        with self._write_lock:
            try:
                self.events.write(json.dumps(message) + "\n")
                self.events.flush()
            except (OSError, ValueError):
                pass  # the agent has gone; end of input closes us

    async def run(self) -> int:
        import dask
        from distributed import Security, Worker

        from grid_portal import guard
        from grid_portal.node import inbound
        from grid_portal.node.plugin import NodePlugin
        from grid_portal.node.slotgate import GatedThreadPoolExecutor, SlotGate
        from grid_portal.protocol import WORKER_HANDLERS, WORKER_STREAM_OPS

        c = self.config
        # Every task passes the gate: it counts what this portal received and, when the
        # volunteer serves several portals, waits for the agent's grant (slotgate.py).
        self.gate = gate = SlotGate(self.emit, arbitrated=bool(c.get("arbitrated")))
        executor = None
        if c.get("isolate_tasks"):
            from grid_portal.node.taskproc import TaskProcessExecutor

            executor = TaskProcessExecutor(
                c["nthreads"],
                memory_limit=c.get("memory_limit"),
                env=dict(os.environ),
                cwd=c.get("local_directory"),
                jobs_dir=c.get("jobs_directory"),
                shared_places=c.get("shared_places") or (),
                gate=gate,
                job_linger=c["job_linger"],
            )
        self.plugin = NodePlugin(
            c["info"],
            gpus=c.get("gpus", []),
            # The agent's settings, always sent.
            telemetry_interval=c["telemetry_interval"],
            idle_heartbeat_interval=c["idle_heartbeat_interval"],
            idle_after=c["idle_after"],
            memory_pause_fraction=c["memory_pause"],
            executor=executor,
            gate=gate,
        )
        tls = _in_memory(c["tls"])
        security = Security(
            tls_ca_file=tls["ca"],
            tls_client_cert=tls["cert"],
            tls_client_key=tls["key"],
            tls_worker_cert=tls["cert"],
            tls_worker_key=tls["key"],
            require_encryption=True,
        )
        # The agent's settings, always sent; what the worker needs wins over them.
        settings = {**c["worker_dask"], **WORKER_NEEDS, **PLUGIN_OWNS_PAUSING}
        if c.get("isolate_tasks"):
            settings.update(SANDBOXED_WORKER_CONFIG)
        if c.get("local_directory"):
            settings["temporary-directory"] = c["local_directory"]
        # Other nodes' data, and anything a peer sends, is read as data (inbound.py).
        inbound.install()
        with dask.config.set(settings):
            executors: dict[str, Any] = (
                {"default": executor, "offload": executor}
                if executor
                else {"default": GatedThreadPoolExecutor(gate, c["nthreads"])}
            )
            self.worker = Worker(
                c["scheduler"],
                security=security,
                nthreads=c["nthreads"],
                memory_limit=c.get("memory_limit") or "auto",
                resources=c.get("resources") or None,
                name=c["name"],
                plugins={self.plugin},
                executor=executors,
                death_timeout=c["death_timeout"],
                local_directory=c.get("local_directory"),
                dashboard=False,
                dashboard_address="127.0.0.1:0",
                deserializers=inbound.NODE_DESERIALIZERS,
            )
            worker = self.worker
            # Default deny (grid_portal/protocol.py): the worker answers the portal's
            # scheduler, and other nodes only for data transfer; never a researcher.
            guard.install(worker, guard.Gate("node", WORKER_HANDLERS, WORKER_STREAM_OPS))
            try:
                await worker
            except Exception as exc:  # noqa: BLE001 - the portal refused us: tell the agent why
                reason = refusal_text(exc)
                if reason is None:
                    raise
                logger.warning("the portal refused this worker: %s", reason)
                self.emit({"event": "refused", "reason": reason})
                return 4
            loop = asyncio.get_running_loop()
            self.emit({"event": "ready", "address": worker.address, "name": str(worker.name)})
            threading.Thread(target=self._read_commands, args=(loop,), daemon=True).start()
            await worker.finished()
        gate.open()
        self.emit({"event": "closed", "reason": str(getattr(worker, "close_reason", "") or "")})
        return 0

    # -- commands from the agent -------------------------------------------------------------
    def _read_commands(self, loop: asyncio.AbstractEventLoop) -> None:
        for line in self.commands:
            try:
                command = json.loads(line)
            except ValueError:
                logger.warning("ignoring a malformed command from the agent")
                continue
            if command.get("op") == "grant":  # here, not on the loop: a task thread waits
                self.gate.grant(int(command.get("ticket", 0)), bool(command.get("move")))
                continue
            asyncio.run_coroutine_threadsafe(self._handle(command), loop)
        # End of input: the agent has gone, so must we.
        self.gate.open()
        asyncio.run_coroutine_threadsafe(self._close("the volunteer agent has gone"), loop)

    async def _handle(self, command: dict[str, Any]) -> None:
        op = command.get("op")
        plugin = self.plugin
        try:
            if op == "policy":
                reply = plugin.apply_policy(
                    command.get("state"), command.get("reason"), bool(command.get("move"))
                )
            elif op == "status":
                reply = plugin.status()
            elif op == "arbitrate":
                self.gate.arbitrate(bool(command.get("on")))
                reply = {"ok": True}
            elif op == "network":
                plugin.network = command.get("network")
                reply = {"ok": True}
            elif op == "drain":
                # Reply at once; the drain goes on (its first step, before any wait, marks the
                # node draining, so the status in the reply says so).
                self._drain = asyncio.ensure_future(
                    plugin.drain(
                        float(command["drain_timeout"]),  # the agent's setting, always sent
                        command.get("reason") or "draining",
                    )
                )
                await asyncio.sleep(0)
                reply = plugin.status()
            elif op == "close":
                await self._close(command.get("reason") or "volunteer-stopped")
                return
            else:
                reply = {"error": f"unknown command {op!r}"}
        except Exception as exc:  # noqa: BLE001 - report, keep serving
            logger.exception("command %r failed", op)
            reply = {"error": str(exc)}
        if "id" in command:
            self.emit({"id": command["id"], "reply": reply})

    async def _close(self, reason: str) -> None:
        from distributed.core import Status

        worker = self.worker
        ending = (Status.closing, Status.closed, Status.closing_gracefully, Status.failed)
        if worker is not None and worker.status not in ending:
            await worker.close(reason=reason)


def refusal_text(exc: BaseException) -> str | None:
    """The portal's own words when it refused the worker's registration (a revoked
    certificate), from Dask's ``Unexpected response from register: {..., 'message': ...}``
    at the bottom of the exception's causes; None for any other failure."""
    import re

    seen: BaseException | None = exc
    while seen is not None:
        text = str(seen)
        if text.startswith("Unexpected response from register"):
            found = re.search(r"'message': (['\"])(.*?)\1", text)
            return found.group(2) if found else text[:300]
        seen = seen.__cause__ or seen.__context__
    return None


def main() -> int:
    # Ctrl-C in the volunteer's terminal is for the agent, which drains us in order.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    commands, events = _private_channels()
    line = commands.readline()
    if not line:
        return 2
    config = json.loads(line)
    if config.get("isolate_tasks"):
        _keep_out_of_reach()  # before any task process exists
        _trusted_dask_config()
    logging.basicConfig(
        level=logging.DEBUG if config.get("verbose") else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    import distributed  # noqa: F401 - it sets its loggers up on import; quiet them after

    if not config.get("verbose"):
        logging.getLogger("distributed").setLevel(logging.WARNING)
        logging.getLogger("tornado").setLevel(logging.WARNING)
    process = WorkerProcess(config, commands, events)
    try:
        return asyncio.run(process.run())
    except (OSError, asyncio.TimeoutError, TimeoutError) as exc:
        logger.warning("cannot reach the portal at %s (%s)", config.get("scheduler"), exc)
        return 3
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
