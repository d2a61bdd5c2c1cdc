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
import json
import logging
import os
import socket
import ssl
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
    enrol_with_token,
    fetch_pinned_ca,
    pinned_context,
    portal_base,
    reason,
    request,
)
from grid_portal.errors import GridError, UsageError
from grid_portal.model import NetworkInfo, Offer, StaticCapacity
from grid_portal.node.lending import Lending
from grid_portal.node.policy import Decision, Observation, Policy, PolicyEngine, observe
from grid_portal.node.portal_link import WORKER_BOOT, PortalLink  # noqa: F401 - WORKER_BOOT's old home
from grid_portal.node.sandbox import SandboxPlan, plan_sandbox
from grid_portal.node.shares import SlotArbiter
from grid_portal.settings import field_from
from grid_portal.units import format_duration, format_size

logger = logging.getLogger("grid_portal.volunteer")

# A pause longer than this hands running tasks back to the grid, unless the policy says otherwise.
DEFAULT_SUSPEND_LIMIT = Policy().suspend_limit


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
    # Serve the peer portals a home portal lends this machine to, while it has no work here
    # (node/lending.py); a lent task ends or moves within lend_bound seconds of home work.
    lend_to_peers: bool = False
    lend_bound: float = field_from("volunteer.lend-bound")
    control: bool = False  # answer `grid-portal volunteer pause|resume|drain|status`
    # Answer them only if no other agent of this name does (the embedded portal's volunteer:
    # the portal must not fail because the CLI cannot reach its volunteer).
    control_if_free: bool = False
    verbose: bool = False
    portal_url: str | None = None  # the portal's HTTPS address, to re-measure the network
    network_refresh: float = field_from("volunteer.network-refresh")  # bandwidth and RTT again
    idle_heartbeat_interval: float = field_from("volunteer.idle-heartbeat-interval")
    idle_after: float = field_from("volunteer.idle-after")  # no task this long: idle
    job_linger: float = field_from("volunteer.job-linger")  # a sandboxed job's processes stay
    memory_pause: float = field_from("volunteer.memory-pause")  # share of the worker's memory
    # Dask settings for the worker process (its idle cost): grid-portal.volunteer.worker-dask.
    worker_dask: dict[str, Any] = field_from("volunteer.worker-dask")


def default_state_dir() -> Path:
    return Path(platformdirs.user_data_dir("grid-portal")) / "volunteer"


# -- offer -------------------------------------------------------------------------------
def decide_offer(
    cpus: int | None,
    memory: int | None,
    gpus: list[int],
    static: StaticCapacity,
    oversubscribe: bool | None = False,
) -> Offer:
    """What the volunteer lends, checked against what the machine has. ``oversubscribe``:
    True lends more than the machine has; None where that cannot be asked for (the embedded
    portal's volunteer), so a refusal does not suggest it."""
    hint = ", or add --oversubscribe if you mean it" if oversubscribe is not None else ""
    have_cpus = static.cores_logical
    if cpus is None:
        cpus = max(1, have_cpus - 1) if have_cpus > 2 else have_cpus
    if cpus < 1:
        raise UsageError(f"--cpus {cpus}: offer at least 1 CPU (or don't volunteer)")
    if cpus > have_cpus and not oversubscribe:
        raise UsageError(
            f"--cpus {cpus}: this machine has {have_cpus} logical CPUs; offer at most "
            f"{have_cpus}{hint}"
        )
    have_memory = static.memory_total
    if memory is None:
        memory = int(have_memory * 0.5)
    if memory <= 0:
        raise UsageError("--memory must be more than 0 (for example --memory 4GB)")
    if memory > have_memory and not oversubscribe:
        raise UsageError(
            f"--memory {format_size(memory)}: this machine has {format_size(have_memory)} of "
            f"memory; offer less{hint}"
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
    key_pem, reply = enrol_with_token(base, ca_pem, token, name, "enrol this machine")
    return save_credentials(node_dir, reply["ca"], key_pem, reply, name)


def save_credentials(
    node_dir: Path, ca_pem: str, key_pem: str, reply: dict[str, Any], requested_name: str
) -> Credentials:
    """Keep what enrolment gave this machine (a token's or an approved join request's): the
    CA, the certificate and key (0600) and ``node.json``, in its private state dir."""
    from grid_portal.keys import keep_credentials, write_private

    ca, cert, key = keep_credentials(node_dir, "node", ca_pem, reply["cert"], key_pem)
    creds = Credentials(
        name=reply["name"],
        scheduler=reply["scheduler"],
        ca=str(ca),
        cert=str(cert),
        key=str(key),
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
    """The agent: one set of rules, one pause and one arbiter for every portal it serves,
    and one ``PortalLink`` (one sandboxed worker) per portal."""

    def __init__(
        self,
        creds: Credentials | None,
        options: VolunteerOptions,
        capacity: StaticCapacity,
        sandbox: SandboxPlan | None = None,
        name: str | None = None,
        plan_for: Callable[[str], SandboxPlan] | None = None,
        state_dir: Path | None = None,
    ) -> None:
        self.options = options
        self.state_dir = state_dir  # where the enrolments are (attach names one of them)
        self.capacity = capacity
        # No plan: plain Dask (tasks in the worker's threads), as the embedded portal wants.
        self.plan = sandbox or SandboxPlan(
            level="none",
            scratch=Path(options.local_directory or "."),
            env=plan_sandbox("none", Path("."), gpus=options.gpus).env,
        )
        # Each further portal's worker gets a sandbox and scratch directory of its own: two
        # portals' tasks must not reach each other's job directories.
        self.plan_for = plan_for
        self.name = name or (creds.name if creds is not None else hostname())
        self.stop_requested = asyncio.Event()
        self.joined = asyncio.Event()  # set while any portal's worker is joined
        self.stop_reason = "stopped by the volunteer"
        self.engine = PolicyEngine(options.policy) if options.policy is not None else None
        self.decision: Decision | None = None
        self.manual_pause: str | None = None
        self.paused_since: float | None = None
        self.arbiter = SlotArbiter(options.cpus)
        self.links: dict[str, PortalLink] = {}
        self._tasks: dict[str, asyncio.Future[None]] = {}  # each portal's link, running
        self._changed = asyncio.Event()  # a link ended
        self._said: tuple[str | None, str | None, bool] | None = None
        self._pending_links: list[PortalLink] = []  # added before run() started them
        # The peer portals the home portals lend this machine to (--lend-to-peers).
        self.lending: Lending | None = Lending(self) if options.lend_to_peers else None
        self._running = False
        if creds is not None:
            self._pending_links.append(
                PortalLink(self, creds, self.plan, url=options.portal_url, label=_label(options))
            )

    @property
    def sandbox(self) -> str:
        return self.plan.level

    @property
    def creds(self) -> Credentials:
        """The first portal's enrolment (callers that know one portal only)."""
        links = list(self.links.values()) or self._pending_links
        return links[0].creds

    def offer(self) -> Offer:
        return Offer(cpus=self.options.cpus, memory=self.options.memory, gpus=self.options.gpus)

    def node_info(self) -> dict[str, Any]:
        return {
            "capacity": asdict(self.capacity),
            "offer": asdict(self.offer()),
            "labels": self.options.labels,
            "sandbox": self.plan.level,
        }

    # -- the set of portals -----------------------------------------------------------------
    def add_link(
        self,
        creds: Credentials,
        share: float,
        url: str | None,
        label: str,
        lent_by: str | None = None,
        peer: str | None = None,
    ) -> PortalLink:
        """Serve one more portal (before or while running); its worker starts at once.
        ``lent_by``: a peer portal that home portal lends this machine to (``peer``: its name
        there), served only while the home portals have no work here (node/lending.py)."""
        problem = self._duplicate(creds, url, label)
        if problem is not None:
            raise UsageError(problem)
        first = not self.links and not self._pending_links
        plan = self.plan if first or self.plan_for is None else self.plan_for(label)
        link = PortalLink(self, creds, plan, share=share, url=url, label=label)
        link.lent_by, link.peer = lent_by, peer
        if self._running:
            self._start(link)
        else:
            self._pending_links.append(link)
        return link

    def _duplicate(self, creds: Credentials, url: str | None, label: str) -> str | None:
        for other in [*self.links.values(), *self._pending_links]:
            same = (
                other.label == label
                or other.creds.ca == creds.ca
                or other.creds.scheduler == creds.scheduler
                or (url is not None and other.url == url)
            )
            if same:
                return (
                    f"this volunteer already serves {other.label} (as {other.creds.name}); a "
                    "portal is attached once. To change its share, detach it and attach it "
                    "again with --share"
                )
        return None

    def _start(self, link: PortalLink) -> None:
        self.links[link.key] = link
        self.arbiter.add(link.key, link.share, lend=link.lent_by is not None)
        link.arbitrated = len(self.links) > 1
        self._tasks[f"{link.key}#{id(link)}"] = asyncio.ensure_future(self._serve(link))
        asyncio.ensure_future(self._arbitrate_all())

    async def _serve(self, link: PortalLink) -> None:
        try:
            await link.run()
        except GridError as exc:
            link.problem = str(exc)
            logger.error("%s: %s", link.label, exc)
        finally:
            self._changed.set()

    def detach(self, which: str) -> PortalLink:
        """Stop serving one portal: its worker drains (running tasks finish) and leaves, in
        the background; its slots go to the other portals at once."""
        link = self.find_link(which)
        link.request_stop("detached by the volunteer", repeat_forces=False)
        self.links.pop(link.key, None)
        self._grant(self.arbiter.remove(link.key))
        asyncio.ensure_future(self._arbitrate_all())
        logger.info("detached %s", link.label)
        return link

    def find_link(self, which: str) -> PortalLink:
        wanted = which.strip().rstrip("/")
        for link in self.links.values():
            if wanted in (link.label, link.url, link.creds.scheduler, link.creds.name):
                return link
        served = ", ".join(self.links) or "none"
        raise UsageError(f"this volunteer does not serve {which!r} (it serves: {served})")

    async def _arbitrate_all(self) -> None:
        """One portal: tasks run at once; several: each asks the arbiter for a slot."""
        on = len(self.links) > 1
        for link in list(self.links.values()):
            if link.arbitrated != on:
                await link.set_arbitrated(on)

    # -- events from the links ----------------------------------------------------------------
    def link_joined(self, link: PortalLink) -> None:
        self.joined.set()

    def link_left(self, link: PortalLink) -> None:
        if not any(other.joined.is_set() for other in self.links.values()):
            self.joined.clear()
        if self.links.get(link.key) is link:
            self._grant(self.arbiter.forget_tasks(link.key))

    def slot_event(self, link: PortalLink, message: dict[str, Any]) -> None:
        """A worker's task wants a slot, or ended: ask the arbiter, send its grants."""
        try:
            ticket = int(message["ticket"])
            if self.links.get(link.key) is not link:
                if message["event"] == "want":
                    link.grant(ticket)  # detached, finishing what it has: not arbitrated
                return
            if message["event"] == "want":
                grants = self.arbiter.want(link.key, ticket)
            else:
                grants = self.arbiter.done(link.key, ticket, float(message.get("seconds", 0)))
        except (KeyError, TypeError, ValueError):
            return  # not from our worker code; nothing to do
        self._grant(grants)
        if self.lending is not None:
            self.lending.slots_changed()  # home work may have come or gone: lent links follow

    def grant_all(self, grants: list[tuple[Any, int]]) -> None:
        """Send the arbiter's grants to the workers (the lending side's timers)."""
        self._grant(grants)

    def _grant(self, grants: list[tuple[Any, int]]) -> None:
        for key, ticket in grants:
            link = self.links.get(key)
            if link is not None:
                link.grant(ticket)

    # -- the main loop ----------------------------------------------------------------------
    async def run(self) -> None:
        from grid_portal.node.control import ControlServer

        control = None
        if self.options.control or self.options.control_if_free:
            try:
                # Both can refuse: a socket path too long for Unix, a name another agent holds.
                control = ControlServer(self.name, self.control)
                await control.start()
            except (UsageError, OSError) as exc:
                if self.options.control:
                    raise
                logger.info("no control socket (volunteer status cannot reach it): %s", exc)
                control = None
        self._running = True
        for link in self._pending_links:
            self._start(link)
        self._pending_links.clear()
        watcher = asyncio.ensure_future(self._policy_loop())
        lending = asyncio.ensure_future(self.lending.run()) if self.lending else None
        try:
            # Up while any portal is served: a portal that refused this machine stays listed
            # with its problem, a detached one goes; with none left, the agent ends.
            while not self.stop_requested.is_set():
                if not any(not task.done() for task in self._tasks.values()):
                    if any(link.problem for link in self.links.values()):
                        logger.error("no portal is served any more: %s", self._problems())
                    break
                self._changed.clear()
                changed = asyncio.ensure_future(self._changed.wait())
                stop = asyncio.ensure_future(self.stop_requested.wait())
                await asyncio.wait({changed, stop}, return_when=asyncio.FIRST_COMPLETED)
                changed.cancel()
                stop.cancel()
        finally:
            for link in self.links.values():
                link.request_stop(self.stop_reason, repeat_forces=False)
            if lending is not None:
                lending.cancel()
            await asyncio.gather(*self._tasks.values(), return_exceptions=True)
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
            if control is not None:
                await control.close()

    def _problems(self) -> str:
        return "; ".join(f"{link.label}: {link.problem}" for link in self.links.values())

    def request_stop(
        self, reason: str = "stopped by the volunteer", repeat_forces: bool = True
    ) -> None:
        """Drain and leave every portal; asked a second time (a second Ctrl-C), stop at once."""
        if not repeat_forces and self.stop_requested.is_set():
            return
        if not self.stop_requested.is_set():
            self.stop_reason = reason
        self.stop_requested.set()
        for link in self.links.values():
            link.request_stop(reason, repeat_forces=repeat_forces)

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

    def desired_for(self, link: PortalLink) -> tuple[str | None, str | None, bool]:
        """What ``link``'s worker should be doing: the rules' state, and for a lent-to peer
        portal also whether its home portals' work has come (node/lending.py)."""
        desired = self.desired()
        if desired[0] is None and link.lent_by is not None and self.lending is not None:
            return self.lending.desired(link)
        return desired

    def desired(self) -> tuple[str | None, str | None, bool]:
        """What every worker should be doing now: (None or "paused", reason, move tasks)."""
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

    async def _push_quietly(self, force: bool = False) -> None:
        """Tell every worker the state the rules want; say so when it changed."""
        if self.stop_requested.is_set():
            return
        for link in list(self.links.values()):
            await link.push_quietly(force=force)
        desired = self.desired()
        before = self._said
        if desired == before:
            return
        state, reason, move = desired
        if state is not None and (before is None or desired[:2] != before[:2]):
            logger.info("paused: %s", reason)
        elif state is None and before is not None and before[0] is not None:
            logger.info("running grid tasks again")
        if move and (before is None or not before[2]):
            logger.info("paused for long: running tasks move to other machines")
        self._said = desired

    # -- the control socket -----------------------------------------------------------------
    async def control(self, request: dict[str, Any]) -> dict[str, Any]:
        """Handle ``grid-portal volunteer pause|resume|drain|status|attach|detach``."""
        op = request.get("op")
        if op == "pause":
            self.manual_pause = str(request.get("reason") or "paused by the volunteer")[:200]
            await self._push_quietly()
        elif op == "resume":
            self.manual_pause = None
            await self._push_quietly()
        elif op == "drain":
            self.request_stop("drain asked by the volunteer", repeat_forces=False)
        elif op == "attach":
            await self._attach_request(request)
        elif op == "detach":
            self.detach(str(request.get("portal") or ""))
        return await self.status()

    async def _attach_request(self, request: dict[str, Any]) -> None:
        """Attach an enrolment the CLI made (``volunteer attach``): it names the saved files
        in this agent's state dir, never sends keys over the socket."""
        from grid_portal.node.portals import load_enrolment

        if self.state_dir is None or Path(str(request.get("state_dir"))) != self.state_dir:
            raise UsageError(
                f"attach an enrolment of this volunteer's state dir ({self.state_dir}): give "
                "`volunteer attach` the same --state-dir"
            )
        creds = await asyncio.to_thread(load_enrolment, request)
        self.add_link(
            creds,
            float(request.get("share") or 1.0),
            request.get("url"),
            str(request.get("label") or creds.scheduler),
        )

    async def status(self) -> dict[str, Any]:
        state, reason, moving = self.desired()
        if self.stop_requested.is_set():
            word, reason = "draining", self.stop_reason
        elif not self.joined.is_set():
            word = "connecting"
        else:
            word = state or "running"
        first = self.creds if (self.links or self._pending_links) else None
        result: dict[str, Any] = {
            "name": self.name,
            "portal": first.scheduler if first is not None else None,
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
            "state_dir": str(self.state_dir) if self.state_dir is not None else None,
        }
        portals = [await link.status(word, self.arbiter.received) for link in self.links.values()]
        result["portals"] = portals
        for key in ("running_tasks", "suspended_tasks", "in_process_tasks", "moved_tasks"):
            values = [p[key] for p in portals if p.get(key) is not None]
            if values:
                result[key] = sum(values)
        if portals and portals[0].get("address") is not None:
            result["address"] = portals[0]["address"]
        if word == "running" and any(p.get("memory_pressure") for p in portals):
            result["state"], result["reason"] = "paused", "memory pressure"
        return result


def _label(options: VolunteerOptions) -> str | None:
    from grid_portal.node.portals import portal_label

    return portal_label(options.portal_url) if options.portal_url else None


def hostname() -> str:
    return socket.gethostname().split(".")[0] or "node"


def machine_cpus() -> int:
    return psutil.cpu_count() or 1
