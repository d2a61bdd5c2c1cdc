"""Joining a LAN portal from the sidebar, and the admin answering join requests there.

- ``POST discovered/{id}/join`` (body ``{"name": ...}``, optional): ask the portal found on
  the LAN to let this server's user join as a researcher (``jupyter/joins.py`` does it);
  202 with the pairing code. ``GET discovered/join``: how that request stands (``{"join":
  null}`` before any).
- ``GET requests``: the join requests waiting at this server's portal; ``POST
  requests/{id}/approve`` and ``.../deny``: answer one. The portal's admin only (403 for
  anyone else, with what to do); the portal checks the role again (grid_portal/protocol.py).

Thin, as every handler: they check the input and call the library or the Grid.
"""

from __future__ import annotations

import json

from jupyter_server.auth.decorator import authorized
from jupyter_server.utils import url_path_join
from tornado import web

from grid_portal.errors import GridError, NotFound, UsageError
from grid_portal.jupyter.discovered import (
    DiscoveredHandler,
    cache_of,
    portal_configured,
    untrusted_message,
)
from grid_portal.jupyter.handlers import ApiError, GridHandler, api_error, require_admin
from grid_portal.jupyter.joins import LanJoins

MAX_NAME = 63  # a DNS label, as the portal allows


def _joins(handler: GridHandler) -> LanJoins:
    return handler.settings.setdefault("grid_portal_joins", LanJoins(handler.portal))


class DiscoveredJoinHandler(GridHandler):
    @web.authenticated
    @authorized
    async def post(self, portal_id: str) -> None:
        if portal_configured(self.portal.address):
            raise ApiError(
                409,
                "this Jupyter server already uses a portal (a saved login, "
                "GRID_PORTAL_ADDRESS or c.GridPortal.address); `grid-portal logout` or unset "
                "it to join another",
            )
        name = _name_from(self.request.body)
        found = cache_of(self.settings).found.get(portal_id)
        if found is None:
            raise ApiError(
                404,
                f"no portal {portal_id!r} was found on this network; GET discovered lists "
                "the ones found (add refresh=true to look again)",
            )
        if not found.verified:
            raise ApiError(409, untrusted_message(found))
        joins = _joins(self)
        if joins.busy():
            raise ApiError(
                409,
                "a join request from this server is still waiting for an answer; GET "
                "discovered/join shows it",
            )
        try:
            status = await joins.start(found, name)
        except GridError as exc:
            raise api_error(exc) from None
        self.write_json(status.to_dict(), status=202)


def _name_from(body: bytes) -> str | None:
    if not body.strip():
        return None
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        raise ApiError(400, 'the body must be JSON: {"name": "the name to join as"}') from None
    if not isinstance(data, dict):
        raise ApiError(400, 'the body must be a JSON object: {"name": "the name to join as"}')
    name = data.get("name")
    if name in (None, ""):
        return None
    if not isinstance(name, str) or len(name) > MAX_NAME or not name.strip():
        raise ApiError(400, f"name must be text of 1 to {MAX_NAME} characters")
    return name.strip()


class JoinStatusHandler(GridHandler):
    @web.authenticated
    @authorized
    async def get(self) -> None:
        status = _joins(self).status
        self.write_json({"join": None if status is None else status.to_dict()})


class _AdminHandler(GridHandler):
    async def require_admin(self) -> None:
        await require_admin(
            self.portal,
            "only the portal's admin answers join requests (with `grid-portal requests`, or "
            "in the sidebar)",
        )


class JoinRequestsHandler(_AdminHandler):
    @web.authenticated
    @authorized
    async def get(self) -> None:
        await self.require_admin()
        everything = self.get_query_argument("all", "false").lower() in ("1", "true")
        await self.call_json(lambda grid: {"requests": grid.join_requests(everything)})


class JoinDecisionHandler(_AdminHandler):
    @web.authenticated
    @authorized
    async def post(self, request_id: str, action: str) -> None:
        await self.require_admin()
        approve = action == "approve"
        try:
            record = await self.portal.run(lambda g: g.decide_join_request(request_id, approve))
        except NotFound as exc:
            raise ApiError(404, str(exc)) from None
        except UsageError as exc:  # already decided, or expired
            raise ApiError(409, str(exc)) from None
        except GridError as exc:
            raise api_error(exc) from None
        self.write_json(record)


def lan_routes(api: str) -> list[tuple[str, type[web.RequestHandler]]]:
    """The URL rules under ``{base_url}grid/api/`` (``api``)."""
    return [
        (url_path_join(api, "discovered"), DiscoveredHandler),
        (url_path_join(api, "discovered", "join"), JoinStatusHandler),
        (url_path_join(api, "discovered", "([^/]+)", "join"), DiscoveredJoinHandler),
        (url_path_join(api, "requests"), JoinRequestsHandler),
        (url_path_join(api, "requests", "([^/]+)", "(approve|deny)"), JoinDecisionHandler),
    ]
