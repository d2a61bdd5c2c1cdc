"""``grid-portal volunteer`` with several portals: the options, enrolling each portal, and
``volunteer attach URL --token T --share N`` / ``volunteer detach URL|NAME``.

One agent serves every portal with one set of rules and one pause (node/agent.py); this
module only turns what the volunteer typed (or its config file, or the set its state dir
keeps: node/portals.py) into enrolments. A portal that cannot be served (unreachable, refused,
its CA changed, given twice) gets one message and the others go on.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from grid_portal.errors import GridError, UsageError
from grid_portal.units import counted, duration_arg


@dataclass
class PortalRequest:
    """A portal the volunteer asked for: a URL with a token, or a saved enrolment (pin)."""

    url: str | None
    token: str | None = None
    share: float = 1.0
    pin: str | None = None


# -- options ------------------------------------------------------------------------------
class _PortalOption(argparse.Action):
    """``--portal https://...`` starts another portal's entry (its --token and --share follow
    it); any other value is the name of a portal found on the LAN, as before."""

    def __call__(self, parser: Any, namespace: Any, value: Any, option: Any = None) -> None:
        if str(value).startswith("https://") or str(value).startswith("http://"):
            entries = getattr(namespace, "portal_entries", None) or []
            entries.append({"url": value})
            namespace.portal_entries = entries
        else:
            namespace.portal_choice = value


class _EntryOption(argparse.Action):
    """``--token``/``--share``: of the last ``--portal URL``, or of PORTAL_URL before any."""

    def __call__(self, parser: Any, namespace: Any, value: Any, option: Any = None) -> None:
        entries = getattr(namespace, "portal_entries", None) or []
        if entries:
            if self.dest in entries[-1]:
                parser.error(f"{option} given twice for --portal {entries[-1]['url']}")
            entries[-1][self.dest] = value
        else:
            setattr(namespace, self.dest, value)


def add_options(p: argparse.ArgumentParser) -> None:
    """The volunteer's portal options (``--portal`` itself comes with the LAN options)."""
    p.add_argument(
        "target",
        nargs="?",
        metavar="URL|NAME",
        help="attach: the portal's https:// address; detach: its address or name",
    )
    p.add_argument(
        "--token",
        action=_EntryOption,
        help="a join token from `grid-portal token create` (after --portal URL: that portal's)",
    )
    p.add_argument(
        "--share",
        action=_EntryOption,
        help="this portal's share of the machine when several have work (default 1; "
        "--share 2 gets twice the CPU time of a portal with 1)",
    )
    lend = p.add_argument_group("lending to peer portals (docs/federation.md)")
    lend.add_argument(
        "--lend-to-peers",
        action="store_true",
        help="also serve the peer portals your portal lends to, only while your portal has "
        "nothing for this machine (off by default)",
    )
    bound = lend.add_argument(
        "--lend-bound",
        type=duration_arg,
        metavar="D",
        help="when your portal's work comes, a peer's running tasks may finish within D, then "
        "they move back to the peer",
    )
    # Its default is the setting, written once in grid-portal.yaml (as cli._configured marks).
    bound.config_key = "volunteer.lend-bound"  # type: ignore[attr-defined]
    p.set_defaults(portal_entries=[], share=None)


# -- which portals ------------------------------------------------------------------------
def requested_portals(
    args: argparse.Namespace, settings: dict[str, Any], config: dict[str, Any], state_dir: Path
) -> tuple[PortalRequest, list[PortalRequest]]:
    """(the main portal, its URL None for LAN discovery; the further portals), from the
    command line, the config file's ``portals`` list, or else the set the state dir keeps
    (with no portal named at all)."""
    from grid_portal.node.portals import load_portals, parse_share

    further = [
        PortalRequest(
            e["url"], e.get("token"), parse_share(e.get("share", 1), f"--share of {e['url']}")
        )
        for e in args.portal_entries
    ]
    for i, e in enumerate(config.get("portals") or []):
        token = e.get("token")
        if not token and e.get("token_file"):
            token = read_token(Path(str(e["token_file"])))
        further.append(
            PortalRequest(str(e["url"]), token, parse_share(e.get("share", 1), f"portals[{i}]"))
        )
    share = parse_share(args.share if args.share is not None else 1)
    main = PortalRequest(settings["portal"], settings["token"], share)
    if main.url is None and not further and not args.portal_choice:
        saved = load_portals(state_dir)
        if saved:
            requests = [PortalRequest(e.url, None, e.share, e.pin) for e in saved]
            return requests[0], requests[1:]
    if main.url is None and further:
        main, further = further[0], further[1:]
    _refuse_twice([main, *further])
    return main, further


def _refuse_twice(requests: list[PortalRequest]) -> None:
    from grid_portal.node.portals import portal_label

    seen: set[str] = set()
    for request in requests:
        if request.url is None:
            continue
        label = portal_label(request.url)
        if label in seen:
            raise UsageError(
                f"the portal {label} is given twice; a volunteer serves a portal once (one "
                "worker, one share): give it once, with the --share you want"
            )
        seen.add(label)


def read_token(path: Path) -> str:
    path = path.expanduser()
    try:
        return path.read_text().strip()
    except OSError as exc:
        raise UsageError(f"cannot read the token file {path}: {exc.strerror or exc}") from None


def enrol_request(
    request: PortalRequest, name: str, state_dir: Path, check: Any, name_given: bool
) -> Any:
    """The enrolment for one further portal: with its token, or the saved one."""
    from grid_portal.node.agent import enrol
    from grid_portal.node.portals import ca_changed, load_enrolment

    if request.url is None:
        raise UsageError("a further portal needs its https:// address")
    if request.token:
        return enrol(request.url, request.token, name, state_dir, check=check, name_given=False)
    if request.pin is None:
        raise UsageError(
            f"--portal {request.url} needs --token (a join token from that portal's admin) "
            "right after it"
        )
    creds = load_enrolment({"state_dir": str(state_dir), "pin": request.pin})
    changed = ca_changed(request.url, Path(creds.ca).read_text())
    if changed is not None:
        raise UsageError(changed)
    return creds


def enrol_all(
    requests: list[PortalRequest], enrol_one: Any, say: Any
) -> list[tuple[PortalRequest, Any]]:
    """Enrol with each portal; one that fails is said and skipped while another works. With
    every portal failing, the first failure is the command's error."""
    done: list[tuple[PortalRequest, Any]] = []
    errors: list[GridError] = []
    for request in requests:
        try:
            done.append((request, enrol_one(request)))
        except GridError as exc:
            errors.append(exc)
            if len(requests) > 1:
                say(f"{request.url or 'portal'}: {exc} (not served; the other portals go on)")
    if not done and errors:
        raise errors[0]
    return done


def add_links(
    volunteer: Any, enrolled: list[tuple[PortalRequest, Any]], save_to: Path | None, say: Any
) -> list[str]:
    """Give the agent its portals; ``save_to``: keep them as the state dir's set (a volunteer
    started with several). Returns the names of the portals served."""
    from grid_portal.node.portals import PortalEntry, portal_label, save_portals

    served, entries = [], []
    for request, creds in enrolled:
        label = portal_label(request.url) if request.url else creds.scheduler
        try:
            volunteer.add_link(creds, request.share, request.url, label)
        except UsageError as exc:
            if not served:
                raise
            say(f"{label}: {exc}")
            continue
        served.append(label)
        if request.url:
            entries.append(PortalEntry(request.url, pin_of(creds), request.share))
    if save_to is not None:
        save_portals(save_to, entries)
    return served


def pin_of(creds: Any) -> str:
    """The enrolment's directory name in the state dir: its portal's CA pin."""
    return Path(creds.ca).parent.name


# -- attach / detach ----------------------------------------------------------------------
def _running_agent(args: argparse.Namespace) -> tuple[Path | None, dict[str, Any], Path]:
    """(the running agent's control socket or None, its status, its state dir)."""
    from grid_portal.node.agent import default_state_dir
    from grid_portal.node.control import NoVolunteer, find_agent, request

    try:
        path: Path | None = find_agent(args.name)
        status: dict[str, Any] = request(path, "status") if path is not None else {}
    except NoVolunteer:
        path, status = None, {}
    running = Path(status["state_dir"]) if status.get("state_dir") else None
    return path, status, (args.state_dir or running or default_state_dir()).expanduser()


def cmd_attach(args: argparse.Namespace) -> int:
    """``grid-portal volunteer attach URL --token T [--share N]``."""
    from grid_portal.envcheck import check_portal
    from grid_portal.node.agent import hostname
    from grid_portal.node.control import request
    from grid_portal.node.portals import PortalEntry, load_portals, parse_share, portal_label

    url = args.target
    if not url:
        raise UsageError("say which portal: grid-portal volunteer attach URL --token T --share N")
    share = parse_share(args.share if args.share is not None else 1)
    label = portal_label(url)
    token = args.token or (read_token(args.token_file) if args.token_file else None)
    path, status, state_dir = _running_agent(args)
    served = {p.get("portal") for p in status.get("portals") or []}
    saved = {e.label: e for e in load_portals(state_dir)}
    if label in served or (path is None and label in saved):
        raise UsageError(
            f"this volunteer already serves {label}; a portal is attached once. To change its "
            f"share: grid-portal volunteer detach {label}, then attach it again with --share"
        )
    if token:
        from grid_portal.node.agent import enrol

        creds = enrol(
            url, token, args.name or status.get("name") or hostname(), state_dir, check_portal
        )
    elif label in saved:
        creds = enrol_request(
            PortalRequest(url, None, share, saved[label].pin), "", state_dir, None, False
        )
    else:
        raise UsageError(f"attach {url} needs --token (a join token from that portal's admin)")
    entry = PortalEntry(url, pin_of(creds), share)
    if path is None:
        from grid_portal.node.portals import remember

        remember(state_dir, entry)
        print(
            f"attached {label} (share {share:g}) as {creds.name}; the volunteer serves it "
            "from its next start (grid-portal volunteer)"
        )
        return 0
    fields = {"state_dir": str(state_dir), "pin": entry.pin, "url": url, "share": share}
    status = request(path, "attach", label=label, **fields)
    from grid_portal.node.portals import remember

    remember(state_dir, entry)
    print(f"attached {label} (share {share:g}) as {creds.name}")
    print(portals_text(status))
    return 0


def cmd_detach(args: argparse.Namespace) -> int:
    """``grid-portal volunteer detach URL|NAME``."""
    from grid_portal.node.control import request
    from grid_portal.node.portals import forget

    which = args.target
    if not which:
        raise UsageError("say which portal: grid-portal volunteer detach URL|NAME")
    path, status, state_dir = _running_agent(args)
    gone = forget(state_dir, which)
    if path is not None:
        status = request(path, "detach", portal=which)
        print(f"detached {which}: its worker finishes its running tasks and leaves")
        print(portals_text(status))
        return 0
    if gone is None:
        raise UsageError(f"{which} is not attached (no running volunteer; none saved)")
    print(f"detached {gone.label}; the volunteer no longer serves it from its next start")
    return 0


# -- status -------------------------------------------------------------------------------
def portals_text(status: dict[str, Any]) -> str:
    """Per portal: state, share, what it received."""
    portals = status.get("portals") or []
    if not portals:
        return "  portals  none"
    from grid_portal.node.portals import share_percents

    lines = []
    for p, percent in zip(portals, share_percents(portals), strict=True):
        how = (
            f"lent by {p['lent_by']} while it has no work here"
            if percent is None
            else f"share {float(p.get('share') or 0):g} ({percent:.0f}%)"
        )
        line = (
            f"  {p.get('portal')}  {p.get('state')}, {how}, received {p.get('tasks', 0)} "
            f"tasks, {float(p.get('core_seconds') or 0):.1f} core-s"
        )
        if p.get("lent_by") and p.get("cap") is not None:
            line += f", at most {counted(p['cap'], 'slot')} now (its quota at {p['lent_by']})"
        if p.get("running_tasks"):
            line += f", {p['running_tasks']} running"
        if p.get("problem"):
            line += f"\n      {p['problem']}"
        lines.append(line)
    return "\n".join(lines)


__all__ = [
    "PortalRequest",
    "add_links",
    "add_options",
    "cmd_attach",
    "cmd_detach",
    "enrol_all",
    "enrol_request",
    "pin_of",
    "portals_text",
    "requested_portals",
]
