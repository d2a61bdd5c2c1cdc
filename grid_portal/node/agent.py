"""``grid-portal volunteer``: enrol with a portal, then run a supervised, sandboxed worker.

The agent is the trusted part, running as the volunteer. It starts the Dask worker as a child
process (``grid_portal.node.worker``) inside the sandbox (``grid_portal.node.sandbox``) and
controls it over that process's stdin/stdout, a channel no one else can reach. It

- restarts the worker whenever it ended (a plain ``dask worker`` exits when its scheduler goes
  away; a volunteer must not), with back-off, until the owner stops it;
- applies the volunteer's rules (``grid_portal.node.policy``): it observes the machine every
  second or two and tells the worker to pause (no new tasks, running ones suspended), to move
  its tasks elsewhere after the suspend limit, or to run again;
- answers ``grid-portal volunteer pause|resume|drain|status`` on an owner-only local socket
  (``grid_portal.node.control``);
- on SIGINT/SIGTERM or ``drain``, drains the node (running tasks finish, nothing new starts) and
  leaves gracefully, so nothing is lost. A second signal stops at once.

The decisions are made here, outside the sandbox, where the agent can see the desktop session
and the whole machine; the worker only executes them.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import signal
import socket
import ssl
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import platformdirs
import psutil

from grid_portal.enrolment import (
    fetch_pinned_ca,
    pinned_context,
    portal_base,
    post_json,
    reason,
    request,
)
from grid_portal.errors import GridError, UsageError
from grid_portal.model import NetworkInfo, Offer, StaticCapacity
from grid_portal.node.policy import Decision, Observation, Policy, PolicyEngine, observe
from grid_portal.node.sandbox import (
    SHARED_PLACES,
    SandboxPlan,
    import_path,
    plan_sandbox,
    prepare_scratch,
)
from grid_portal.node.worker import QUIET_WORKER_CONFIG  # noqa: F401 - its old home
from grid_portal.settings import field_from
from grid_portal.units import format_duration, format_size

logger = logging.getLogger("grid_portal.volunteer")

# A pause longer than this hands running tasks back to the grid, unless the policy says otherwise.
DEFAULT_SUSPEND_LIMIT = Policy().suspend_limit
# How a sandboxed worker starts: ``python -I -c WORKER_BOOT grid_portal.node.worker PATH_JSON``
# (isolated mode ignores PYTHONPATH, so the agent passes the import path the worker needs; the
# module's name is there for `ps` and whoever looks for the worker by its command line).
WORKER_BOOT = (
    "import json, sys; sys.path[:0] = [p for p in json.loads(sys.argv[2]) if p not in sys.path]; "
    "from grid_portal.node.worker import main; sys.exit(main())"
)


@dataclass
class Credentials:
    """What enrolment gives a volunteer; stored 0600 in its state dir."""

    name: str
    scheduler: str
    ca: str  # paths
    cert: str
    key: str
    # The name this machine asked for (--name, or the host name); the portal may have changed
    # it ("laptop" -> "laptop-2"). None in files written before it was kept.
    requested_name: str | None = None

    def security(self) -> Any:
        from distributed import Security

        return Security(
            tls_ca_file=self.ca,
            tls_client_cert=self.cert,
            tls_client_key=self.key,
            tls_worker_cert=self.cert,
            tls_worker_key=self.key,
            require_encryption=True,
        )


@dataclass
class VolunteerOptions:
    cpus: int
    memory: int
    gpus: list[int] = field(default_factory=list)
    labels: dict[str, str] = field(default_factory=dict)
    # Seconds; left out: the configured ones (grid-portal.volunteer.*, grid_portal/settings.py).
    death_timeout: float = field_from("volunteer.death-timeout")  # unreachable portal: give up
    reconnect_max: float = field_from("volunteer.reconnect-max")  # longest wait to rejoin
    drain_timeout: float = field_from("volunteer.drain-timeout")  # on SIGTERM: tasks may finish
    telemetry_interval: float = field_from("volunteer.telemetry-interval")
    local_directory: str | None = None  # the worker's scratch directory (sandboxed: required)
    policy: Policy | None = None  # the volunteer's rules; None: always run
    control: bool = False  # answer `grid-portal volunteer pause|resume|drain|status`
    verbose: bool = False
    portal_url: str | None = None  # the portal's HTTPS address, to re-measure the network
    network_refresh: float = field_from("volunteer.network-refresh")  # bandwidth and RTT again


def default_state_dir() -> Path:
    return Path(platformdirs.user_data_dir("grid-portal")) / "volunteer"


# -- offer -------------------------------------------------------------------------------
def decide_offer(
    cpus: int | None,
    memory: int | None,
    gpus: list[int],
    static: StaticCapacity,
    oversubscribe: bool = False,
) -> Offer:
    """What the volunteer lends, checked against what the machine has."""
    have_cpus = static.cores_logical
    if cpus is None:
        cpus = max(1, have_cpus - 1) if have_cpus > 2 else have_cpus
    if cpus < 1:
        raise UsageError(f"--cpus {cpus}: offer at least 1 CPU (or don't volunteer)")
    if cpus > have_cpus and not oversubscribe:
        raise UsageError(
            f"--cpus {cpus}: this machine has {have_cpus} logical CPUs; offer at most "
            f"{have_cpus}, or add --oversubscribe if you mean it"
        )
    have_memory = static.memory_total
    if memory is None:
        memory = int(have_memory * 0.5)
    if memory <= 0:
        raise UsageError("--memory must be more than 0 (for example --memory 4GB)")
    if memory > have_memory and not oversubscribe:
        raise UsageError(
            f"--memory {format_size(memory)}: this machine has {format_size(have_memory)} of "
            "memory; offer less, or add --oversubscribe if you mean it"
        )
    return Offer(cpus=int(cpus), memory=int(memory), gpus=list(gpus))


# -- enrolment -----------------------------------------------------------------------------
def enrol(
    portal_url: str,
    token: str,
    name: str,
    state_dir: Path,
    check: Callable[[str, ssl.SSLContext], Any] | None = None,
    name_given: bool = True,
) -> Credentials:
    """Join a portal with a token: check its CA against the token's pin, send a CSR, store
    the certificate. A node that enrolled before with this portal reuses its certificate.

    A state dir holds one node per portal. When ``name`` was given (``name_given``: --name or
    the config file) and is not the name this state dir enrolled as, the volunteer is refused
    before anything is sent, with the two ways out: run as the enrolled node, or give the
    new one a state dir of its own. (Enrolling it here would replace the other node's
    certificate; running as the other node would be a silent lie.)

    ``check(base_url, pinned_context)`` runs before anything is sent (the token is not spent on
    a machine the portal could not use): the environment check of ``envcheck.check_portal``.
    """
    from grid_portal.envcheck import local_versions
    from grid_portal.keys import parse_token

    secret_pin = parse_token(token)
    pin = secret_pin[1]
    base = portal_base(portal_url)
    node_dir = state_dir / pin
    saved = node_dir / "node.json"
    if saved.exists():
        creds = Credentials(**json.loads(saved.read_text()))
        if name_given and not _enrolled_as(creds, name):
            safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
            raise UsageError(
                f"this state dir ({state_dir}) already holds node {creds.name!r} of this "
                f"portal, so --name {name} would run as {creds.name}. To run as "
                f"{creds.name}, leave out --name; to add {name} as another volunteer on this "
                f"machine, give it a state dir of its own: --state-dir "
                f"{state_dir.with_name(f'{state_dir.name}-{safe}')}"
            )
        logger.info("using this machine's earlier enrolment as %s", creds.name)
        if check is not None:
            check(base, pinned_context(Path(creds.ca).read_text()))
        return creds
    ca_pem = fetch_pinned_ca(base, pin)
    if check is not None:
        check(base, pinned_context(ca_pem))
    from grid_portal.keys import make_key_and_csr

    key_pem, csr_pem = make_key_and_csr(name)
    reply = post_json(
        f"{base}/api/enrol",
        ca_pem,
        # Versions let the portal refuse a machine whose Python or Dask cannot run its work.
        {"token": token, "csr": csr_pem, "name": name, "versions": local_versions()},
        what="enrol this machine",
    )
    return save_credentials(node_dir, reply["ca"], key_pem, reply, name)


def save_credentials(
    node_dir: Path, ca_pem: str, key_pem: str, reply: dict[str, Any], requested_name: str
) -> Credentials:
    """Keep what enrolment gave this machine (a token's or an approved join request's): the
    CA, the certificate and key (0600) and ``node.json``, in its private state dir."""
    from grid_portal.keys import write_private

    node_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(node_dir, 0o700)
    (node_dir / "ca.pem").write_text(ca_pem)
    (node_dir / "node.pem").write_text(reply["cert"])
    write_private(node_dir / "node-key.pem", key_pem)
    creds = Credentials(
        name=reply["name"],
        scheduler=reply["scheduler"],
        ca=str(node_dir / "ca.pem"),
        cert=str(node_dir / "node.pem"),
        key=str(node_dir / "node-key.pem"),
        requested_name=requested_name,
    )
    write_private(node_dir / "node.json", json.dumps(asdict(creds), indent=2))
    return creds


def _enrolled_as(creds: Credentials, name: str) -> bool:
    """Whether asking for ``name`` means the node these credentials belong to."""
    if name in (creds.name, creds.requested_name):
        return True
    if creds.requested_name is not None:
        return False
    # A file from before requested_name was kept: the portal cleans a name the way below and
    # adds "-2", "-3"... when it is taken (portal/http.py, portal/ledger.py).
    cleaned = "".join(c if c.isalnum() or c in "-_." else "-" for c in name).strip("-.")
    taken = creds.name.rsplit("-", 1)
    return cleaned == creds.name or (taken[0] == cleaned and taken[-1].isdigit())


def measure_network(portal_url: str, ca_pem: str, probe_bytes: int = 2**20) -> NetworkInfo:
    """Round-trip time (best of 3 pings) and download bandwidth (one short transfer)."""
    base = portal_base(portal_url)
    ctx = pinned_context(ca_pem)
    try:
        rtts = []
        for _ in range(3):
            t0 = time.perf_counter()
            request(f"{base}/api/ping", ctx, timeout=5)
            rtts.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        data = request(f"{base}/api/bandwidth?bytes={probe_bytes}", ctx, timeout=30)
        elapsed = max(time.perf_counter() - t0 - min(rtts), 1e-6)
        return NetworkInfo(bandwidth=len(data) / elapsed, rtt=min(rtts), measured_at=time.time())
    except (urllib.error.URLError, OSError) as exc:
        logger.warning("could not measure the network to the portal: %s", reason(exc))
        return NetworkInfo()


# -- the supervised worker ----------------------------------------------------------------
def describe_policy(policy: Policy | None) -> list[str]:
    """The volunteer's rules in words, for ``volunteer status`` and the start-up message."""
    if policy is None:
        return []
    rules = []
    if policy.hours is not None:
        rules.append(f"only within hours {policy.hours}")
    if policy.idle_only:
        rules.append("only while the owner is idle")
    if policy.max_owner_load is not None:
        rules.append(
            f"pause while the owner's own load is over {policy.max_owner_load:g}% "
            f"(for {format_duration(policy.owner_load_grace)})"
        )
    if policy.pause_on_battery:
        rules.append("pause on battery")
    if policy.max_temperature is not None:
        rules.append(f"pause above {policy.max_temperature:g}°C")
    if rules:
        rules.append(f"move tasks elsewhere after {format_duration(policy.suspend_limit)} paused")
    return rules


def policy_needs(policy: Policy | None) -> frozenset[str]:
    """What the volunteer's rules read from the machine: "load" (the CPU of the owner and of
    the grid, which lists every process), "sensors" (battery, temperature, keyboard idle
    time). Nothing else is read: hours need the clock alone, and no rules need nothing, so an
    idle volunteer costs its owner next to nothing."""
    if policy is None:
        return frozenset()
    needs = set()
    if policy.idle_only or policy.max_owner_load is not None:
        needs.add("load")
    if policy.idle_only or policy.pause_on_battery or policy.max_temperature is not None:
        needs.add("sensors")
    return frozenset(needs)


def policy_interval(policy: Policy | None) -> float:
    """How often to look at the machine: at least twice per grace period, at most every 2 s."""
    if policy is None:
        return 2.0
    return max(0.5, min(2.0, policy.owner_load_grace / 2))


class Volunteer:
    """Keeps one sandboxed worker connected to the portal, under the volunteer's rules."""

    def __init__(
        self,
        creds: Credentials,
        options: VolunteerOptions,
        capacity: StaticCapacity,
        sandbox: SandboxPlan | None = None,
    ) -> None:
        self.creds = creds
        self.options = options
        self.capacity = capacity
        # No plan: plain Dask (tasks in the worker's threads), as the embedded portal wants.
        self.plan = sandbox or SandboxPlan(
            level="none",
            scratch=Path(options.local_directory or "."),
            env=plan_sandbox("none", Path("."), gpus=options.gpus).env,
        )
        self.stop_requested = asyncio.Event()
        self.force_requested = asyncio.Event()  # a second stop: do not wait for tasks
        self.joined = asyncio.Event()
        self.stop_reason = "stopped by the volunteer"
        self.engine = PolicyEngine(options.policy) if options.policy is not None else None
        self.decision: Decision | None = None
        self.manual_pause: str | None = None
        self.paused_since: float | None = None
        self.proc: asyncio.subprocess.Process | None = None
        self.address: str | None = None
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._ids = itertools.count(1)
        self._pushed: tuple[str | None, str | None, bool] | None = None
        self._push_lock: asyncio.Lock | None = None
        self._stops = 0

    @property
    def sandbox(self) -> str:
        return self.plan.level

    def offer(self) -> Offer:
        return Offer(cpus=self.options.cpus, memory=self.options.memory, gpus=self.options.gpus)

    def _info(self) -> dict[str, Any]:
        return {
            "capacity": asdict(self.capacity),
            "offer": asdict(self.offer()),
            "labels": self.options.labels,
            "sandbox": self.plan.level,
        }

    # -- the main loop ----------------------------------------------------------------------
    async def run(self) -> None:
        from grid_portal.node.control import ControlServer

        self._push_lock = asyncio.Lock()
        control = None
        if self.options.control:
            control = ControlServer(self.creds.name, self.control)
            await control.start()
        watcher = asyncio.ensure_future(self._policy_loop())
        network = asyncio.ensure_future(self._network_loop())
        try:
            delay = 1.0
            while not self.stop_requested.is_set():
                started = time.monotonic()
                await self._run_worker_once()
                if self.stop_requested.is_set():
                    break
                if time.monotonic() - started > 60:
                    delay = 1.0
                logger.info("rejoining in %.0f s", delay)
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self.stop_requested.wait(), delay)
                delay = min(delay * 2, self.options.reconnect_max)
        finally:
            watcher.cancel()
            network.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
            with contextlib.suppress(asyncio.CancelledError):
                await network
            if control is not None:
                await control.close()
            await self._kill_worker()

    async def _network_loop(self) -> None:
        """Re-measure bandwidth and round trip to the portal now and then; the worker sends
        the figures in its telemetry, and the portal updates the node's capacity."""
        url = self.options.portal_url
        if not url:
            return
        while True:
            await asyncio.sleep(self.options.network_refresh)
            ca_pem = Path(self.creds.ca).read_text()
            measured = await asyncio.to_thread(measure_network, url, ca_pem)
            if measured.measured_at is not None:
                self.capacity.network = measured
                self._tell("network", network=asdict(measured))

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
            "nthreads": self.options.cpus,
            "memory_limit": self.options.memory,
            "resources": self.offer().resources(),
            "info": self._info(),
            "gpus": self.options.gpus,
            "telemetry_interval": self.options.telemetry_interval,
            "death_timeout": self.options.death_timeout,
            "local_directory": local or self.options.local_directory,
            "isolate_tasks": self.plan.isolates_tasks,
            "verbose": self.options.verbose,
        }

    async def _run_worker_once(self) -> None:
        """Start the worker process and stay with it until it ends or we are asked to stop."""
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
        reader = asyncio.ensure_future(self._read_events(proc, ready))
        exited = asyncio.ensure_future(proc.wait())
        stop = asyncio.ensure_future(self.stop_requested.wait())
        try:
            await asyncio.wait({ready, exited, stop}, return_when=asyncio.FIRST_COMPLETED)
            if ready.done():
                logger.info(
                    "joined %s as %s, offering %d CPUs, %s memory, %s",
                    self.creds.scheduler,
                    self.creds.name,
                    self.options.cpus,
                    format_size(self.options.memory),
                    f"GPUs {self.options.gpus}" if self.options.gpus else "no GPU",
                )
                self.joined.set()
                await self._push_quietly(force=True)
                await asyncio.wait({exited, stop}, return_when=asyncio.FIRST_COMPLETED)
            if not exited.done():
                await self._leave_gracefully(exited)
            elif not self.stop_requested.is_set():
                logger.warning("lost the portal; the worker closed (exit code %s)", proc.returncode)
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

    async def _read_events(
        self, proc: asyncio.subprocess.Process, ready: asyncio.Future[Any]
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
            if message.get("event") == "ready":
                self.address = message.get("address")
                if not ready.done():
                    ready.set_result(message)
            elif "id" in message:
                future = self._pending.pop(message["id"], None)
                if future is not None and not future.done():
                    future.set_result(message.get("reply") or {})

    async def _ask(self, op: str, timeout: float = 10.0, **fields: Any) -> dict[str, Any]:
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
        """Send a command that has no reply (``close``); nothing if the worker has gone."""
        proc = self.proc
        if proc is not None and proc.stdin is not None and proc.returncode is None:
            with contextlib.suppress(ConnectionError, OSError):
                proc.stdin.write((json.dumps({"op": op, **fields}) + "\n").encode())

    async def _leave_gracefully(self, exited: asyncio.Future[Any]) -> None:
        """Drain: let running tasks finish, then retire (results move to other nodes)."""
        timeout = self.options.drain_timeout
        if self._stops < 2 and self.joined.is_set():
            logger.info(
                "leaving the grid (%s): finishing running tasks first (Ctrl-C again to force)",
                self.stop_reason,
            )
            with contextlib.suppress(ConnectionError, OSError, asyncio.TimeoutError):
                await self._ask("drain", reason=self.stop_reason, drain_timeout=timeout)
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

    # -- rules ------------------------------------------------------------------------------
    async def _policy_loop(self) -> None:
        from grid_portal.node.probe import TelemetrySampler

        sampler = None
        needs = policy_needs(self.options.policy)
        if self.engine is not None and "load" in needs:
            # The grid's share of the CPU: this agent and everything under it (the sandbox, the
            # worker, its task processes). The sampler counts in cores; policy wants % of all.
            sampler = await asyncio.to_thread(TelemetrySampler, [], 0.0)
        cores = psutil.cpu_count() or 1
        interval = policy_interval(self.options.policy)
        while True:
            if self.engine is not None and not needs:
                # Hours only (or no rule at all): the clock is all there is to look at.
                self.decision = self.engine.decide(Observation(now=datetime.now().astimezone()))
            elif self.engine is not None:
                try:
                    sample = await asyncio.to_thread(sampler.sample) if sampler else None
                    observation = await asyncio.to_thread(
                        observe,
                        grid_cpu_percent=min(100.0, sample.grid_cpu_percent / cores)
                        if sample
                        else 0.0,
                        cpu_percent=sample.cpu_percent if sample else 0.0,
                    )
                    self.decision = self.engine.decide(observation)
                    logger.debug(
                        "owner load %.0f%% (machine %.0f%%, grid %.0f%%): %s",
                        observation.owner_load,
                        sample.cpu_percent if sample else 0.0,
                        sample.grid_cpu_percent / cores if sample else 0.0,
                        self.decision.reason or "run",
                    )
                except Exception as exc:  # noqa: BLE001 - keep the rules going; say why
                    logger.warning("could not look at the machine: %s", exc)
            await self._push_quietly()
            await asyncio.sleep(interval)

    def _desired(self) -> tuple[str | None, str | None, bool]:
        """What the worker should be doing now: (None or "paused", reason, move tasks)."""
        state: str | None = None
        reason: str | None = None
        if self.manual_pause:
            state, reason = "paused", self.manual_pause
        elif self.decision is not None and self.decision.action == "pause":
            state, reason = "paused", self.decision.reason
        now = time.monotonic()
        if state is None:
            self.paused_since = None
            return None, None, False
        if self.paused_since is None:
            self.paused_since = now
        policy = self.options.policy
        limit = policy.suspend_limit if policy is not None else DEFAULT_SUSPEND_LIMIT
        return state, reason, now - self.paused_since >= limit

    async def _push(self, force: bool = False) -> None:
        """Tell the worker the state it should be in, when that changed."""
        if self._push_lock is None or self.stop_requested.is_set():
            return
        async with self._push_lock:
            if not self.joined.is_set():
                return
            desired = self._desired()
            if desired == self._pushed and not force:
                return
            state, reason, move = desired
            await self._ask("policy", state=state, reason=reason, move=move)
            before = self._pushed[:2] if self._pushed is not None else None
            if state is not None and desired[:2] != before:
                logger.info("paused: %s", reason)
            elif state is None and before is not None and before[0] is not None:
                logger.info("running grid tasks again")
            if move and (self._pushed is None or not self._pushed[2]):
                logger.info("paused for long: running tasks move to other machines")
            self._pushed = desired

    # -- the control socket -----------------------------------------------------------------
    async def control(self, request: dict[str, Any]) -> dict[str, Any]:
        """Handle ``grid-portal volunteer pause|resume|drain|status``."""
        op = request.get("op")
        if op == "pause":
            self.manual_pause = str(request.get("reason") or "paused by the volunteer")[:200]
            await self._push_quietly()
        elif op == "resume":
            self.manual_pause = None
            await self._push_quietly()
        elif op == "drain":
            self.request_stop("drain asked by the volunteer", repeat_forces=False)
        return await self.status()

    async def _push_quietly(self, force: bool = False) -> None:
        """Push, leaving a failure to the next round of the rules loop (every few seconds)."""
        with contextlib.suppress(ConnectionError, OSError, asyncio.TimeoutError):
            await self._push(force=force)

    async def status(self) -> dict[str, Any]:
        state, reason, moving = self._desired()
        if self.stop_requested.is_set():
            word, reason = "draining", self.stop_reason
        elif not self.joined.is_set():
            word = "connecting"
        else:
            word = state or "running"
        result: dict[str, Any] = {
            "name": self.creds.name,
            "portal": self.creds.scheduler,
            "pid": os.getpid(),
            "state": word,
            "reason": reason,
            "reasons": list(self.decision.reasons) if self.decision is not None else [],
            "manual_pause": self.manual_pause is not None,
            "moving_tasks": moving,
            "sandbox": self.plan.level,
            "sandbox_description": self.plan.describe(),
            "rules": describe_policy(self.options.policy),
            "offer": asdict(self.offer()),
        }
        if self.joined.is_set():
            with contextlib.suppress(ConnectionError, OSError, asyncio.TimeoutError):
                worker = await self._ask("status", timeout=5)
                for key in (
                    "running_tasks",
                    "suspended_tasks",
                    "in_process_tasks",
                    "moved_tasks",
                    "address",
                ):
                    result[key] = worker.get(key)
                if word == "running" and worker.get("memory_pressure"):
                    result["state"], result["reason"] = "paused", "memory pressure"
        return result


def hostname() -> str:
    return socket.gethostname().split(".")[0] or "node"


def machine_cpus() -> int:
    return psutil.cpu_count() or 1
