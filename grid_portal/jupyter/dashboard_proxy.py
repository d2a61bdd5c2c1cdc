"""``{base_url}grid/dashboard/``: the portal's Dask dashboard, for the portal's admin only.

The dashboard shows everyone's work, so the portal runs it only with ``grid-portal serve
--dashboard`` and only on loopback (``grid_portal/portal/dashboard.py``). This small proxy
(no jupyter-server-proxy) serves it through the admin's Jupyter server, behind the server's
own login: every request must be authenticated, and this server's portal certificate must be
the admin's (anyone else: 403). Where it listens comes from the portal (``Grid.dashboard_url``,
an admin-only handler) and must be a loopback address, so a portal can never point this
proxy anywhere else. Bokeh's websockets (``.../ws``) are relayed both ways.
"""

from __future__ import annotations

import contextlib
import ipaddress
import time
from typing import Any
from urllib.parse import urlsplit

from jupyter_server.auth.decorator import ws_authenticated
from jupyter_server.base.handlers import JupyterHandler
from jupyter_server.utils import url_path_join
from tornado import httpclient, web, websocket

from grid_portal.errors import GridError
from grid_portal.jupyter.handlers import (
    AUTH_RESOURCE,
    ApiError,
    _JsonErrors,
    api_error,
    require_admin,
)

URL_CACHE_SECONDS = 10.0  # the dashboard's address changes only when the portal restarts
# What passes back from the dashboard (no cookies of its own, nothing hop-by-hop).
PASSED_HEADERS = ("Content-Type", "Cache-Control", "Etag", "Last-Modified")


def _loopback(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


class _Dashboard:
    """What both handlers share: the admin check and the dashboard's address."""

    settings: dict[str, Any]

    async def dashboard_base(self) -> str:
        """The dashboard's loopback URL, for the admin; else an ApiError to answer with."""
        portal = self.settings["grid_portal"]
        await require_admin(
            portal,
            "only the portal's admin may open the Dask dashboard: it shows everyone's work "
            "(your own jobs' task streams are in the Grid sidebar)",
        )
        cache = self.settings.setdefault("grid_portal_dashboard", {"at": 0.0, "url": None})
        if cache["url"] is None or time.monotonic() - cache["at"] > URL_CACHE_SECONDS:
            try:
                cache["url"] = await portal.run(lambda grid: grid.dashboard_url())
            except GridError as exc:
                raise api_error(exc) from None
            cache["at"] = time.monotonic()
        url = cache["url"]
        if not url:
            raise ApiError(
                404,
                "the portal runs no Dask dashboard; start it with `grid-portal serve "
                "--dashboard` (needs bokeh: pip install bokeh)",
            )
        if not _loopback(url):
            raise ApiError(502, f"the portal's dashboard is not on loopback ({url}); not proxied")
        return url


class DashboardProxy(_Dashboard, _JsonErrors, JupyterHandler):
    """Plain HTTP: pages, scripts, JSON."""

    auth_resource = AUTH_RESOURCE

    async def prepare(self) -> None:  # type: ignore[override]
        await super().prepare()
        if self.current_user is None:
            raise web.HTTPError(403)

    @web.authenticated
    async def get(self, path: str) -> None:
        base = await self.dashboard_base()
        query = f"?{self.request.query}" if self.request.query else ""
        request = httpclient.HTTPRequest(
            base + path + query, follow_redirects=False, request_timeout=30
        )
        try:
            response = await httpclient.AsyncHTTPClient().fetch(request, raise_error=False)
        except OSError as exc:
            raise ApiError(503, f"the portal's dashboard does not answer ({exc})") from None
        if response.code == 599:
            raise ApiError(503, "the portal's dashboard does not answer; is the portal running?")
        self.set_status(response.code)
        for name in PASSED_HEADERS:
            if name in response.headers:
                self.set_header(name, response.headers[name])
        location = response.headers.get("Location")
        if location:
            # Dask redirects within its own paths: keep them under this proxy.
            prefix = url_path_join(self.base_url, "grid", "dashboard")
            self.set_header("Location", url_path_join(prefix, urlsplit(location).path))
        if response.body:
            self.write(response.body)
        self.finish()


class DashboardSocketProxy(_Dashboard, websocket.WebSocketHandler, JupyterHandler):
    """Bokeh's websocket for a dashboard page, relayed both ways."""

    auth_resource = AUTH_RESOURCE

    @ws_authenticated
    async def get(self, path: str) -> None:
        try:
            base = await self.dashboard_base()
        except ApiError as exc:
            self.set_status(exc.status_code)
            self.finish({"message": exc.message})
            return
        query = f"?{self.request.query}" if self.request.query else ""
        self._target = "ws" + (base + path + query)[len("http") :]
        await super().get(path)

    def select_subprotocol(self, subprotocols: list[str]) -> str | None:
        self._subprotocols = list(subprotocols)
        return subprotocols[0] if subprotocols else None

    async def open(self, path: str) -> None:  # type: ignore[override]
        try:
            self._upstream = await websocket.websocket_connect(
                self._target,
                subprotocols=getattr(self, "_subprotocols", None) or None,
                on_message_callback=self._from_dashboard,
            )
        except OSError:
            self.close(1011, "the portal's dashboard does not answer")

    def _from_dashboard(self, message: str | bytes | None) -> None:
        if message is None:
            self.close()
            return
        with contextlib.suppress(websocket.WebSocketClosedError):  # the browser left
            self.write_message(message, binary=isinstance(message, bytes))

    async def on_message(self, message: str | bytes) -> None:
        upstream = getattr(self, "_upstream", None)
        if upstream is not None:
            await upstream.write_message(message, binary=isinstance(message, bytes))

    def on_close(self) -> None:
        upstream = getattr(self, "_upstream", None)
        if upstream is not None:
            upstream.close()

    def check_origin(self, origin: str) -> bool:
        return JupyterHandler.check_origin(self, origin)  # Jupyter's own origin rules


def dashboard_routes(base_url: str) -> list[tuple[str, type[web.RequestHandler]]]:
    prefix = url_path_join(base_url, "grid", "dashboard")
    return [
        (prefix + "/(.*/ws)", DashboardSocketProxy),
        (prefix + "/?(.*)", DashboardProxy),
    ]
