"""``grid-portal``: the command line.

Kept light: ``grid-portal --help`` imports neither Dask nor the portal (``import distributed``
alone costs about 0.6 s); each command imports what it needs when it runs. Mistakes the user
can fix are GridErrors: they print one line and exit with 2, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from grid_portal import (
    __version__,
    cli_certs,
    cli_classroom,
    cli_discovery,
    cli_jobs,
    cli_peers,
    cli_volunteer,
)
from grid_portal.errors import GridError, UsageError
from grid_portal.process_logging import setup_logging
from grid_portal.units import counted, duration_arg, size_arg

EPILOG = """\
Start here:
  grid-portal serve                      run a portal on this machine (prints how to join)
  grid-portal token create               make a join token for a volunteer
  grid-portal volunteer URL --token T    lend this machine to a portal
  grid-portal volunteer                  ...one found on the LAN; the admin approves
  grid-portal requests                   join requests waiting for the admin
  grid-portal nodes                      list the grid's machines and their live load
  grid-portal status                     the grid's totals

Docs: README.md, docs/volunteer.md, docs/researcher.md.
"""


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def _label(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"label {text!r} must look like KEY=VALUE, e.g. room=B12")
    return key.strip(), value.strip()


class _ConfigDefaults(argparse.HelpFormatter):
    """Help that shows a configured option's default (``action.config_key``, a key of
    grid_portal/settings.py) as the configuration has it, looked up only when help is shown
    (reading the configuration imports Dask)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        key = getattr(action, "config_key", None)
        if key is None:
            return action.help
        from grid_portal import settings

        try:
            shown = settings.get(key)
        except GridError:
            shown = "(invalid: see grid-portal's error when it starts)"
        return f"{action.help} (default {shown}; setting {settings.ROOT}.{key})"


class _RawConfigDefaults(_ConfigDefaults, argparse.RawDescriptionHelpFormatter):
    pass


def _configured(action: argparse.Action, key: str) -> None:
    """The option's default is the setting ``key`` (None here: settings.merged fills it in)."""
    action.config_key = key  # type: ignore[attr-defined]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="grid-portal",
        description="Grid Portal: a community compute grid for science, used from Jupyter.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"grid-portal {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="show debug logs")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    # serve
    p = sub.add_parser(
        "serve",
        help="run a portal: a Dask scheduler (mutual TLS) and the enrolment endpoint",
        description="Run a portal on this machine. On first start it creates the portal's own "
        "certificate authority in the data dir; every connection to the scheduler is mutual "
        "TLS against it, also on loopback. Options left out take their value from the "
        "configuration (docs/configuration.md).",
        formatter_class=_ConfigDefaults,
    )
    # Defaults are settings (grid_portal/grid-portal.yaml), filled in by cmd_serve.
    _configured(p.add_argument("--host", help="address to listen on (0.0.0.0: all)"), "portal.host")
    _configured(p.add_argument("--port", type=int, help="scheduler port (0: any)"), "portal.port")
    _configured(
        p.add_argument("--http-port", type=int, help="enrolment HTTPS port (0: any)"),
        "portal.http-port",
    )
    p.add_argument("--data-dir", type=Path, help="where the CA, ledger and keys live")
    p.add_argument("--contact-host", help="the host name volunteers use to reach this portal")
    _configured(
        p.add_argument("--telemetry-interval", type=duration_arg, help="time between node samples"),
        "portal.telemetry-interval",
    )
    _configured(
        p.add_argument(
            "--node-timeout",
            type=duration_arg,
            help="how soon a node that vanished is declared offline and its tasks rerun",
        ),
        "portal.node-timeout",
    )
    _configured(
        p.add_argument(
            "--result-expiry-interval",
            type=duration_arg,
            help="how often expired kept results are deleted from the ledger",
        ),
        "portal.result-expiry-interval",
    )
    p.add_argument(
        "--embedded",
        action="store_true",
        help="a private portal on loopback with this machine as its volunteer (what Grid() "
        "starts when nothing is configured)",
    )
    p.add_argument(
        "--dashboard",
        action="store_true",
        help="run Dask's dashboard, on loopback only, for the admin's JupyterLab on this "
        "machine (Grid sidebar; needs bokeh): it shows everyone's work",
    )
    p.add_argument("--cpus", type=int, help="with --embedded: CPUs the local volunteer lends")
    p.add_argument(
        "--memory",
        type=size_arg,
        help="with --embedded: memory the local volunteer lends, e.g. 8GB",
    )
    cli_classroom.add_serve_options(p)  # --jupyterhub
    cli_discovery.add_serve_options(p)  # --no-announce
    p.set_defaults(func=cmd_serve)

    # token
    p = sub.add_parser("token", help="join tokens for volunteers and researchers")
    tsub = p.add_subparsers(dest="token_command", metavar="ACTION")
    t = tsub.add_parser(
        "create",
        help="print a new join token",
        description="Print a new join token. Tokens are random, stored only hashed, expire, "
        "and can be limited in uses. They carry a pin of the portal's CA, so a volunteer "
        "cannot be fooled by an impostor portal.",
    )
    t.add_argument("--ttl", type=duration_arg, default=3600.0, help="lifetime (default 1h)")
    t.add_argument(
        "--uses",
        type=_positive_int,
        default=None,
        help="how many enrolments (default: unlimited until it expires)",
    )
    t.add_argument(
        "--for",
        dest="role",
        choices=["node", "client", "peer"],
        default="node",
        help="node: a volunteer machine (default); client: a researcher's connection; peer: "
        "another portal that may borrow this portal's idle volunteers (its admin runs "
        "`grid-portal peers add URL --token T`; one use by default)",
    )
    t.add_argument("--note", default="", help="a note for `token list`")
    t.add_argument("--data-dir", type=Path, help="the portal's data dir")
    t.set_defaults(func=cmd_token_create)
    t = tsub.add_parser("list", help="list tokens (never their secrets)")
    t.add_argument("--data-dir", type=Path, help="the portal's data dir")
    t.set_defaults(func=cmd_token_list)
    p.set_defaults(func=lambda args: p.print_help() or 2)
    # certs list / certs revoke / token revoke: the admin can cut anyone off (nobody is trusted
    # for good: a certificate or a token can be withdrawn at once)
    cli_certs.add_parsers(sub, tsub)
    cli_peers.add_parsers(sub)  # peers add / list / remove: portal peering

    # volunteer
    p = sub.add_parser(
        "volunteer",
        help="lend this machine to a portal; pause, resume, drain or show it",
        usage="grid-portal volunteer PORTAL_URL --token TOKEN [--share N] [options]\n"
        "       grid-portal volunteer --portal URL --token T --share N [--portal URL ...]\n"
        "       grid-portal volunteer [--yes | --portal NAME] [options]  (found on the LAN, "
        "no token: the admin approves)\n"
        "       grid-portal volunteer {pause,resume,drain,status} [--name NAME]\n"
        "       grid-portal volunteer attach URL --token T [--share N] | detach URL|NAME",
        description="Enrol this machine with a portal and run grid work on it until stopped, "
        "under your rules (hours, idle-only, owner load, battery, temperature) and in a "
        "sandbox. It rejoins by itself when the portal or the network comes back. Ctrl-C or "
        "SIGTERM let running tasks finish first, so nothing is lost.\n\n"
        "While it runs, from another terminal of the same user:\n"
        "  grid-portal volunteer pause     no new tasks; running ones are suspended\n"
        "  grid-portal volunteer resume    undo pause (your rules still apply)\n"
        "  grid-portal volunteer drain     finish running tasks, take no new ones, then leave\n"
        "  grid-portal volunteer status    state, reason, tasks, sandbox, each portal\n"
        "  grid-portal volunteer attach URL --token T --share N   serve one more portal\n"
        "  grid-portal volunteer detach URL|NAME                  stop serving one\n\n"
        "Several portals (docs/federation.md): one agent, one set of rules and one pause for "
        "all; when more than one has work, the lent CPUs are split by --share, and one with "
        "no work leaves them all to the others.",
        formatter_class=_RawConfigDefaults,
    )
    p.add_argument(
        "portal",
        nargs="?",
        metavar="PORTAL_URL",
        help="the portal's https:// address (or pause, resume, drain, status: see above)",
    )
    cli_volunteer.add_options(p)  # --token, --share
    p.add_argument("--token-file", type=Path, help="read the join token from this file")
    p.add_argument("--config", type=Path, help="read options from a TOML file (volunteer.toml)")
    p.add_argument("--name", help="this machine's name on the grid (default: host name)")
    p.add_argument("--cpus", type=int, help="CPUs to lend (default: all but one)")
    p.add_argument("--memory", type=size_arg, help="memory to lend, e.g. 8GB (default: half)")
    p.add_argument("--gpus", help="GPUs to lend: none (default), all, or indices like 0,2")
    p.add_argument(
        "--label",
        type=_label,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a label researchers can select on (repeatable), e.g. --label room=B12",
    )
    p.add_argument(
        "--oversubscribe", action="store_true", help="allow offering more than the machine has"
    )
    rules = p.add_argument_group("rules (see docs/volunteer-policy.md)")
    rules.add_argument(
        "--idle-only",
        action="store_true",
        default=None,
        help="run only while you are not using the machine",
    )
    rules.add_argument(
        "--max-owner-load",
        metavar="PCT",
        help="pause while your own programs use more than PCT%% of the CPU",
    )
    rules.add_argument(
        "--owner-load-grace",
        metavar="D",
        help="how long the load must stay over (or under) the limit (default 30s)",
    )
    rules.add_argument(
        "--hours",
        help="run only within these hours, e.g. 18:00-08:00 or 'mon-fri 18:00-08:00; "
        "sat,sun 00:00-24:00'",
    )
    rules.add_argument(
        "--pause-on-battery", action="store_true", default=None, help="pause while on battery"
    )
    rules.add_argument(
        "--max-temperature", metavar="C", help="pause while the CPU is hotter than C °C"
    )
    rules.add_argument(
        "--idle-input",
        dest="idle_input_seconds",
        metavar="D",
        help="idle-only: keyboard and mouse untouched this long (default 5m)",
    )
    rules.add_argument(
        "--suspend-limit",
        metavar="D",
        help="paused longer than this, running tasks move elsewhere (default 10m)",
    )
    box = p.add_argument_group("sandbox")
    box.add_argument(
        "--sandbox",
        choices=("auto", "bubblewrap", "user", "process", "none"),
        default="auto",
        help="how grid tasks are kept from your files (default auto: bubblewrap if it works here)",
    )
    box.add_argument(
        "--sandbox-user",
        default="grid-portal",
        help="for --sandbox user: the unprivileged user tasks run as (default grid-portal)",
    )
    box.add_argument(
        "--scratch",
        type=Path,
        help="the one directory grid work may write to (default: in the state dir)",
    )
    p.add_argument("--state-dir", type=Path, help="where this volunteer keeps its certificate")
    # Defaults are settings (grid_portal/grid-portal.yaml); the --config file overrides them.
    _configured(
        p.add_argument(
            "--drain-timeout",
            type=duration_arg,
            help="on stop, how long running tasks may take to finish",
        ),
        "volunteer.drain-timeout",
    )
    _configured(
        p.add_argument(
            "--reconnect-max", type=duration_arg, help="longest wait between attempts to rejoin"
        ),
        "volunteer.reconnect-max",
    )
    _configured(
        p.add_argument(
            "--network-refresh",
            type=duration_arg,
            help="how often to re-measure bandwidth and round trip to the portal",
        ),
        "volunteer.network-refresh",
    )
    ctl = p.add_argument_group("pause, resume, drain, status")
    ctl.add_argument("--reason", help="pause: the reason shown on the grid")
    ctl.add_argument("--wait", action="store_true", help="drain: wait until the volunteer left")
    ctl.add_argument("--json", action="store_true", help="status: machine-readable")
    cli_discovery.add_join_options(
        p,
        portal_action=cli_volunteer._PortalOption,
        portal_help="; --portal https://... --token T --share N: one more portal to serve",
    )  # LAN joins, and further portals
    p.set_defaults(func=cmd_volunteer)

    # login
    p = sub.add_parser(
        "login",
        help="connect this machine to a portal as a researcher",
        description="Enrol as a researcher with a token from the portal's admin (`grid-portal "
        "token create --for client`). Writes a connection file that Grid() and every "
        "grid-portal command then use.",
    )
    p.add_argument(
        "portal",
        nargs="?",
        metavar="PORTAL_URL",
        help="the portal's https:// address (none: look on the LAN)",
    )
    p.add_argument("--token", help="a researcher token (none: ask the admin to approve)")
    p.add_argument("--name", help="your name on the grid (default: your user name)")
    p.add_argument(
        "--output", type=Path, help="where to write the connection file (default: your config dir)"
    )
    p.add_argument(
        "--as",
        dest="portal_name",
        metavar="PORTAL_NAME",
        help="the name this portal is kept under among yours, for Grid(portals=[...]) "
        "(default: its host name)",
    )
    cli_discovery.add_join_options(p)  # LAN joins
    p.set_defaults(func=cmd_login)

    # nodes / status
    p = sub.add_parser(
        "nodes",
        help="the grid's machines, their capacity and live load; `nodes revoke NAME`",
        description="List the grid's machines. `grid-portal nodes revoke NAME` disconnects a "
        "node at once and refuses it from then on (the portal's admin only).",
    )
    p.add_argument("action", nargs="?", choices=["revoke"], help="revoke: throw a node out")
    p.add_argument("name", nargs="?", help="the node to revoke")
    p.add_argument("--json", action="store_true", help="machine-readable records")
    p.add_argument("--portal", help="a connection file (default: as Grid() finds one)")
    p.set_defaults(func=cmd_nodes)
    p = sub.add_parser("status", help="the grid's totals")
    p.add_argument("--json", action="store_true", help="machine-readable totals")
    p.add_argument("--portal", help="a connection file (default: as Grid() finds one)")
    p.set_defaults(func=cmd_status)

    # lab
    p = sub.add_parser(
        "lab",
        help="JupyterLab with the grid: the sidebar, %%%%grid cells, and (with nothing configured) an "
        "embedded portal with this machine as its volunteer",
        description="Start JupyterLab with the grid: the JupyterLab of the Python that runs "
        "grid-portal (never another `jupyter` found first on the PATH). Extra arguments go to "
        "`jupyter lab`.",
    )
    p.add_argument("jupyter_args", nargs=argparse.REMAINDER, help="passed to jupyter lab")
    p.set_defaults(func=cmd_lab)

    # embedded
    p = sub.add_parser("embedded", help="the private portal Grid() starts on this machine")
    esub = p.add_subparsers(dest="embedded_command", metavar="ACTION")
    e = esub.add_parser("start", help="start it (if not running) and print its connection file")
    e.set_defaults(func=cmd_embedded_start)
    e = esub.add_parser("stop", help="stop it")
    e.set_defaults(func=cmd_embedded_stop)
    p.set_defaults(func=lambda args: p.print_help() or 2)
    cli_jobs.register(sub)  # submit, jobs, job, cancel, logs
    cli_classroom.register(sub)  # ledger, classroom
    cli_discovery.register(sub)  # discover, requests
    return parser


# -- commands ------------------------------------------------------------------------------
def cmd_serve(args: argparse.Namespace) -> int:
    setup_logging(args.verbose)
    from grid_portal import settings
    from grid_portal.portal.server import PortalConfig, describe, run_portal

    settings.check()  # a wrong setting is one line naming it, before anything starts

    if args.embedded:
        from grid_portal.embedded import embedded_config

        config = embedded_config(args.data_dir, cpus=args.cpus, memory=args.memory)

        def ready(info: Any) -> None:
            # The connection file is published by the local volunteer once it has joined.
            print(f"Embedded portal ready at {info.scheduler}", flush=True)

    else:
        config = PortalConfig(
            data_dir=cli_certs.data_dir_of(args),
            contact_host=args.contact_host,
            jupyterhub=cli_classroom.hub_settings(args),
            # The flags given, over the configuration (grid-portal.portal.*). Settings with no
            # field here (no flag either) the scheduler process reads from the configuration.
            **settings.merged("portal", vars(args), only=PortalConfig.__dataclass_fields__),
        )
        config.dashboard = args.dashboard
        cli_discovery.serve_companions(args, config)

        def ready(info: Any) -> None:
            print(describe(info), flush=True)

    try:
        asyncio.run(run_portal(config, on_ready=ready))
    except OSError as exc:
        raise GridError(
            f"cannot start the portal: {exc}. Is another portal using port {config.port} or "
            f"{config.http_port}? Choose others with --port and --http-port."
        ) from None
    return 0


def cmd_token_create(args: argparse.Namespace) -> int:
    store, pin = cli_certs.token_store(args)
    uses = 1 if args.role == "peer" and args.uses is None else args.uses  # one peer links
    created = store.create(ttl=args.ttl, uses=uses, note=args.note, pin=pin, role=args.role)
    print(created.text)
    return 0


def cmd_token_list(args: argparse.Namespace) -> int:
    from datetime import datetime

    from rich.console import Console
    from rich.table import Table

    store, _ = cli_certs.token_store(args)
    table = Table("id", "for", "created", "expires", "uses left", "note")
    for t in store.list():
        table.add_row(
            str(t.id),
            getattr(t, "role", "node"),
            datetime.fromtimestamp(t.created_at).strftime("%Y-%m-%d %H:%M"),
            datetime.fromtimestamp(t.expires_at).strftime("%Y-%m-%d %H:%M"),
            "unlimited" if t.uses_left is None else str(t.uses_left),
            t.note,
        )
    Console().print(table)
    return 0


VOLUNTEER_CONTROL = ("pause", "resume", "drain", "status")


def _volunteer_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The volunteer's settings: the command line over the --config file over the defaults
    (the agent's timings: the configuration, grid-portal.volunteer.*)."""
    from grid_portal import settings
    from grid_portal.node.policy import (
        POLICY_OPTIONS,
        SETTING_KEYS,
        load_policy_config,
        policy_from_options,
    )
    from grid_portal.units import parse_size

    settings.check()  # a wrong setting is one line naming it, before anything starts

    config = load_policy_config(args.config) if args.config else {}

    def pick(key: str) -> Any:
        value = getattr(args, key, None)
        return config.get(key) if value is None else value

    # No portal: look for one on the LAN; no token: a join request (cli_discovery.py).
    portal = args.portal or config.get("portal")
    token = args.token
    token_file = args.token_file or config.get("token_file")
    if not token and token_file:
        path = Path(token_file).expanduser()
        try:
            token = path.read_text().strip()
        except OSError as exc:
            raise UsageError(f"cannot read the token file {path}: {exc.strerror or exc}") from None
    gpus = pick("gpus")
    if isinstance(gpus, list):
        gpus = ",".join(str(i) for i in gpus) or "none"
    memory = args.memory if args.memory is not None else config.get("memory")
    policy = policy_from_options(**{k: pick(k) for k in POLICY_OPTIONS})
    return {
        "portal": portal,
        "token": token,
        "name": pick("name"),
        "cpus": pick("cpus"),
        "memory": parse_size(memory) if memory is not None else None,
        "gpus": gpus or "none",
        "labels": {**config.get("labels", {}), **dict(args.label)},
        "config": config,  # further portals: its `portals` list (cli_volunteer.py)
        "policy": policy,
        "timings": settings.merged("volunteer", {k: pick(k) for k in SETTING_KEYS}),
    }


def cmd_volunteer(args: argparse.Namespace) -> int:
    if args.portal in VOLUNTEER_CONTROL:
        return _volunteer_control(args)
    if args.portal in ("attach", "detach"):
        return (cli_volunteer.cmd_attach if args.portal == "attach" else cli_volunteer.cmd_detach)(
            args
        )
    setup_logging(args.verbose)
    from grid_portal.envcheck import check_portal
    from grid_portal.node.agent import (
        Volunteer,
        VolunteerOptions,
        decide_offer,
        default_state_dir,
        describe_policy,
        hostname,
        measure_network,
    )
    from grid_portal.node.probe import parse_gpu_selection, probe_gpus, probe_static
    from grid_portal.node.sandbox import plan_sandbox

    # Everything the volunteer typed is checked before anyone is contacted.
    settings = _volunteer_settings(args)
    gpus = parse_gpu_selection(settings["gpus"], probe_gpus())
    static = probe_static(gpus=gpus)
    offer = decide_offer(
        settings["cpus"], settings["memory"], gpus, static, oversubscribe=args.oversubscribe
    )
    name = settings["name"] or hostname()
    state_dir = (args.state_dir or default_state_dir()).expanduser()
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
    plan = plan_sandbox(
        args.sandbox,
        args.scratch or state_dir / "scratch" / safe,
        gpus=gpus,
        sandbox_user=args.sandbox_user,
        user_scratch=args.scratch or Path("/var/lib/grid-portal/scratch") / safe,
    )
    main_request, further = cli_volunteer.requested_portals(
        args, settings, settings["config"], state_dir
    )
    name_given = settings["name"] is not None

    def enrol_one(request: Any) -> Any:
        if request is main_request and request.pin is None:
            # URL or LAN, token or join request (cli_discovery.py); sets settings["portal"].
            settings["portal"], settings["token"] = request.url, request.token
            creds = cli_discovery.volunteer_credentials(
                args, settings, name, state_dir, check=check_portal, name_given=name_given
            )
            request.url = settings["portal"]
            return creds
        return cli_volunteer.enrol_request(request, name, state_dir, check_portal, name_given)

    enrolled = cli_volunteer.enrol_all(
        [main_request, *further], enrol_one, lambda text: print(text, flush=True)
    )
    creds = enrolled[0][1]
    # No certificate file is bound into the sandbox: the agent hands them over in memory.
    static.network = measure_network(enrolled[0][0].url, Path(creds.ca).read_text())
    options = VolunteerOptions(
        cpus=offer.cpus,
        memory=offer.memory,
        gpus=offer.gpus,
        labels=settings["labels"],
        local_directory=str(plan.scratch / "work"),
        policy=settings["policy"],
        control=True,
        verbose=args.verbose,
        portal_url=enrolled[0][0].url,
        lend_to_peers=args.lend_to_peers,
        **settings["timings"],  # drain_timeout, reconnect_max, ...: flags, file, configuration
    )

    def plan_for(label: str) -> Any:
        """A further portal's sandbox: a scratch directory of its own, beside the first's."""
        suffix = "-" + "".join(c if c.isalnum() or c in "-_." else "_" for c in label)
        base = args.scratch or state_dir / "scratch" / safe
        user = args.scratch or Path("/var/lib/grid-portal/scratch") / safe
        return plan_sandbox(
            args.sandbox,
            base.with_name(base.name + suffix),
            gpus=gpus,
            sandbox_user=args.sandbox_user,
            user_scratch=user.with_name(user.name + suffix),
        )

    volunteer = Volunteer(
        None, options, static, sandbox=plan, name=creds.name, plan_for=plan_for, state_dir=state_dir
    )
    labels = cli_volunteer.add_links(
        volunteer, enrolled, state_dir if further else None, lambda text: print(text, flush=True)
    )

    async def main() -> None:
        import signal

        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, volunteer.request_stop)
        await volunteer.run()

    rules = describe_policy(settings["policy"])
    print(
        f"Volunteering as {creds.name} for {', '.join(labels)}.\n"
        f"  sandbox: {plan.describe()}\n"
        f"  rules:   {'; '.join(rules) if rules else 'none: grid work always runs'}\n"
        "Ctrl-C to leave (running tasks finish first); `grid-portal volunteer status` to see "
        "what it does.",
        flush=True,
    )
    asyncio.run(main())
    print("Left the grid. Thank you!", flush=True)
    return 0


def _volunteer_control(args: argparse.Namespace) -> int:
    """`grid-portal volunteer pause|resume|drain|status`: ask the running agent."""
    import time

    from grid_portal.node.control import find_agent, request, running_agents

    op = args.portal
    path = find_agent(args.name)
    fields = {"reason": args.reason} if op == "pause" and args.reason else {}
    status = request(path, op, **fields)
    if op == "drain" and args.wait:
        print(f"{status.get('name')}: draining; waiting for its running tasks...", flush=True)
        while status.get("name") in running_agents(path.parent):
            time.sleep(0.5)
        print(f"{status.get('name')}: left the grid")
        return 0
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    print(_volunteer_status_text(status, full=op == "status"))
    return 0


def _volunteer_status_text(status: dict[str, Any], full: bool) -> str:
    from grid_portal.units import format_size

    head = f"{status.get('name')}: {status.get('state')}"
    if status.get("reason"):
        head += f" ({status['reason']})"
    if not full:
        return head
    lines = [head]
    running, suspended = status.get("running_tasks"), status.get("suspended_tasks")
    if running is not None:
        tasks = f"{running} running"
        if suspended:
            tasks += f", {suspended} of them suspended"
        lines.append(f"  tasks    {tasks}")
    offer = status.get("offer") or {}
    if offer:
        gpus = offer.get("gpus") or []
        lines.append(
            f"  lends    {offer.get('cpus')} CPUs, {format_size(offer.get('memory'))}, "
            + (f"GPUs {', '.join(map(str, gpus))}" if gpus else "no GPU")
        )
    if len(status.get("portals") or []) > 1:
        lines.append("  portals")
        lines.append(cli_volunteer.portals_text(status))
    else:
        lines.append(f"  portal   {status.get('portal')}")
    lines.append(f"  sandbox  {status.get('sandbox_description') or status.get('sandbox')}")
    rules = status.get("rules") or []
    lines.append(f"  rules    {'; '.join(rules) if rules else 'none: grid work always runs'}")
    if len(status.get("reasons") or []) > 1:
        lines.append(f"  why      {'; '.join(status['reasons'])}")
    return "\n".join(lines)


def _grid(args: argparse.Namespace) -> Any:
    from grid_portal.client import Grid

    return Grid(args.portal, start_embedded=False, timeout=10)


def cmd_nodes(args: argparse.Namespace) -> int:
    from grid_portal.render import nodes_table

    if args.action == "revoke":
        if not args.name:
            raise UsageError("say which node: grid-portal nodes revoke NAME")
        with _grid(args) as grid:
            reply = grid.revoke(args.name)
        print(
            f"revoked {reply['revoked']}; disconnected {counted(reply['disconnected'], 'worker')}"
        )
        return 0
    with _grid(args) as grid:
        nodes = grid.nodes()
    if args.json:
        print(json.dumps([n.to_dict() for n in nodes], indent=2))
        return 0
    from rich.console import Console

    Console().print(nodes_table(nodes))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from grid_portal.render import capacity_text

    with _grid(args) as grid:
        capacity = grid.capacity()
    if args.json:
        print(json.dumps(capacity.to_dict(), indent=2))
    else:
        print(capacity_text(capacity))
    return 0


def cmd_login(args: argparse.Namespace) -> int:
    from grid_portal.login import login

    if not args.portal or not args.token:  # found on the LAN, or a join request
        return cli_discovery.cmd_login_lan(args)
    path = login(
        args.portal, args.token, name=args.name, output=args.output, portal_name=args.portal_name
    )
    print(f"Logged in. Connection file: {path}")
    print("Grid() and grid-portal commands now use this portal.")
    if args.output is None:
        from grid_portal.portals import name_for

        named = args.portal_name or name_for(args.portal)
        print(f"It is kept as portal {named!r}: Grid(portals=[...]) uses several portals at once.")
    return 0


def cmd_lab(args: argparse.Namespace) -> int:
    import importlib.util
    import os

    # The JupyterLab of this interpreter (the one grid-portal is installed in, with the server
    # extension and the sidebar), never the first `jupyter` on the PATH, which may belong to
    # another Python that lacks both.
    if importlib.util.find_spec("jupyterlab") is None:
        raise GridError(
            f"JupyterLab is not installed for {sys.executable}: "
            "pip install 'grid-portal[jupyter]' (or run ./dev lab)"
        )
    command = [sys.executable, "-m", "jupyterlab", *args.jupyter_args]
    if hasattr(os, "geteuid") and os.geteuid() == 0 and "--allow-root" not in command:
        command.append("--allow-root")  # JupyterLab refuses to run as root without it
    os.execv(sys.executable, command)
    return 0  # not reached


def cmd_embedded_start(args: argparse.Namespace) -> int:
    from grid_portal.connection import embedded_connection_path
    from grid_portal.embedded import ensure_embedded_portal

    conn = ensure_embedded_portal()
    print(
        f"embedded portal at {conn.scheduler} (pid {conn.pid}); connection file: "
        f"{embedded_connection_path()}"
    )
    return 0


def cmd_embedded_stop(args: argparse.Namespace) -> int:
    from grid_portal.embedded import stop_embedded_portal

    print("stopped the embedded portal" if stop_embedded_portal() else "no embedded portal runs")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # `grid-portal lab` passes everything it does not know on to `jupyter lab`.
    args, unknown = parser.parse_known_args(argv)
    if unknown and getattr(args, "command", None) == "lab":
        args.jupyter_args = [*unknown, *args.jupyter_args]
    elif unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except GridError as exc:
        print(f"grid-portal: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
