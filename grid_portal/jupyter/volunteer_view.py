"""``GET grid/api/volunteer``: the volunteer agent running on this machine as this server's
user, and per portal it serves what that portal received (the sidebar's "This machine").

The agent is found and asked as ``grid-portal volunteer status`` finds and asks it: its
control socket (``grid_portal.node.control``), which only its owner may use, so a Jupyter
server sees its own user's volunteers and nobody else's. The answer keeps what the sidebar
shows and nothing else: no state dir, keys, addresses or pid.

No volunteer running is an answer (``running: false`` with how to start one), and so is one
that does not answer in time (listed with its problem): neither is an error status, the
sidebar polls this and shows the section only while a volunteer runs.

Thin: it calls the control socket's client, nothing else.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from jupyter_server.auth.decorator import authorized
from jupyter_server.utils import url_path_join
from tornado import web

from grid_portal.errors import GridError
from grid_portal.jupyter.handlers import GridHandler

FRESH = 2.0  # seconds an answer serves every sidebar that asks
ASK_TIMEOUT = 15.0  # the agent asks each portal's worker in turn, 5 s at most each
PORTAL_FIELDS = ("portal", "state", "share", "lent_by", "tasks", "core_seconds", "problem")


def volunteers_here(directory: Path | None = None, timeout: float = ASK_TIMEOUT) -> dict[str, Any]:
    """Blocking: this user's running volunteers, each as the sidebar shows it. The first one's
    fields are also at the top (there is one, nearly always)."""
    from grid_portal.node.control import NONE_RUNNING, NoVolunteer, find_agent, running_agents
    from grid_portal.node.control import request as ask

    volunteers = []
    for name in running_agents(directory):
        try:
            status = ask(find_agent(name, directory), "status", timeout=timeout)
        except NoVolunteer:
            continue  # it left between the two looks
        except TimeoutError:
            again = f"`grid-portal volunteer status --name {name}` asks it again"
            volunteers.append(_unanswered(name, f"did not answer in {timeout:g} s; {again}"))
        except GridError as exc:  # it refused, or its answer was not one
            volunteers.append(_unanswered(name, str(exc)))
        except OSError as exc:
            volunteers.append(_unanswered(name, f"cannot be asked: {exc.strerror or exc}"))
        else:
            volunteers.append(_reduced(name, status))
    if not volunteers:
        return {"running": False, "hint": NONE_RUNNING, "volunteers": []}
    return {"running": True, **volunteers[0], "volunteers": volunteers}


def _reduced(name: str, status: dict[str, Any]) -> dict[str, Any]:
    from grid_portal.node.portals import share_percents

    portals = [p for p in status.get("portals") or [] if isinstance(p, dict)]
    return {
        "name": str(status.get("name") or name),
        "state": status.get("state"),
        "reason": status.get("reason"),
        "problem": None,
        "portals": [
            {
                **{key: p.get(key) for key in PORTAL_FIELDS},
                "share_percent": None if percent is None else round(percent, 1),
                "running_tasks": p.get("running_tasks"),
            }
            for p, percent in zip(portals, share_percents(portals), strict=True)
        ],
    }


def _unanswered(name: str, problem: str) -> dict[str, Any]:
    if not problem.startswith("the volunteer"):
        problem = f"the volunteer {name} {problem}"
    return {"name": name, "state": None, "reason": None, "problem": problem, "portals": []}


class VolunteerHandler(GridHandler):
    @web.authenticated
    @authorized
    async def get(self) -> None:
        self.write_json(await _answer(self))


async def _answer(handler: GridHandler) -> dict[str, Any]:
    """One agent request at a time for the whole server, its answer shared for FRESH s: an
    agent that hangs holds one thread, not one per poll."""
    settings = handler.settings
    lock = settings.setdefault("grid_portal_volunteer_lock", asyncio.Lock())
    async with lock:
        kept = settings.get("grid_portal_volunteer")
        if kept is not None and time.monotonic() - kept[0] < FRESH:
            return kept[1]
        answer = await handler.portal.offload(volunteers_here)
        settings["grid_portal_volunteer"] = (time.monotonic(), answer)
        return answer


def volunteer_routes(api: str) -> list[tuple[str, type[web.RequestHandler]]]:
    return [(url_path_join(api, "volunteer"), VolunteerHandler)]
