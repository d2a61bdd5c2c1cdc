"""REST and websocket handlers under ``{base_url}grid/api/``.

Thin by design: each one asks the server's ``GridPortal`` (see ``service.py``) to run a Grid
call on its thread pool and writes the answer as JSON. They hold no grid state.

Errors are JSON, ``{"message": ..., "reason": ..., "problems": [...]}``, never a traceback:
bad input is 400 naming the field, an unknown node or job (or someone else's job) is 404, an
unreachable portal is 503 with a message the sidebar can show. Every method needs the Jupyter
server's authentication, and writes need XSRF protection (Jupyter's ``prepare`` checks it for
cookie-authenticated requests).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from http.client import responses
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jupyter_core.utils import ensure_async
from jupyter_server.auth.decorator import authorized, ws_authenticated
from jupyter_server.base.handlers import APIHandler, JupyterHandler
from jupyter_server.base.websocket import WebSocketMixin
from jupyter_server.utils import url_path_join
from tornado import web, websocket

from grid_portal import __version__
from grid_portal.errors import ConnectionFailed, GridError, Unsatisfiable
from grid_portal.jupyter.openapi import API_VERSION, openapi_json
from grid_portal.jupyter.service import GridPortal
from grid_portal.protocol import ADMIN, STAFF

if TYPE_CHECKING:
    from grid_portal.client import Grid
    from grid_portal.jobs.spec import JobSpec, SpecError

AUTH_RESOURCE = "grid"  # what a custom Jupyter Authorizer sees for these endpoints


class ApiError(web.HTTPError):
    """An HTTP error whose message is for the user (and, for bad specs, what was wrong)."""

    def __init__(
        self, status: int, message: str, problems: list[dict[str, str]] | None = None
    ) -> None:
        # tornado %-formats log_message when logging it: keep a literal '%' literal.
        super().__init__(status, message.replace("%", "%%"))
        self.message = message
        self.problems = problems


def api_error(exc: GridError) -> ApiError:
    """The HTTP status a user-facing grid error deserves."""
    from grid_portal.jobs.spec import SpecError

    if isinstance(exc, SpecError):
        return _spec_error(exc)
    if isinstance(exc, ConnectionFailed):
        return ApiError(503, str(exc))
    if isinstance(exc, Unsatisfiable):
        return ApiError(409, str(exc))
    return ApiError(400, str(exc))  # UsageError, and any other mistake the user can fix


class _JsonErrors:
    """Errors as JSON with a message a person can act on; never a traceback."""

    def write_error(self: Any, status_code: int, **kwargs: Any) -> None:
        exc = (kwargs.get("exc_info") or (None, None, None))[1]
        reply: dict[str, Any] = {"message": responses.get(status_code, "error"), "reason": None}
        if isinstance(exc, ApiError):
            reply["message"] = exc.message
            if exc.problems is not None:
                reply["problems"] = exc.problems
        elif isinstance(exc, web.HTTPError):
            if exc.log_message:
                reply["message"] = exc.log_message % exc.args if exc.args else exc.log_message
            reply["reason"] = exc.reason
        elif exc is not None:
            reply["message"] = (
                "internal error in the Grid Portal server extension; the Jupyter server log "
                "has the details"
            )
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(reply))

    def log_exception(self: Any, typ: Any, value: Any, tb: Any) -> None:
        if isinstance(value, ApiError):
            self.log.info(
                "%s %s: %d %s",
                self.request.method,
                self.request.path,
                value.status_code,
                value.message,
            )
        else:
            super().log_exception(typ, value, tb)  # type: ignore[misc]


class GridHandler(_JsonErrors, APIHandler):
    """Base of the REST handlers."""

    auth_resource = AUTH_RESOURCE

    @property
    def portal(self) -> GridPortal:
        return self.settings["grid_portal"]

    async def prepare(self) -> None:  # type: ignore[override]
        await super().prepare()
        # Whatever allow_unauthenticated_access says, nothing under grid/ answers a stranger.
        if self.current_user is None:
            raise web.HTTPError(403)

    @web.authenticated
    def options(self, *args: Any, **kwargs: Any) -> None:
        # Jupyter lets CORS pre-flights through unauthenticated; the grid API does not.
        super().options(*args, **kwargs)

    async def run(self, fn: Callable[[Grid], Any]) -> Any:
        """``fn(grid)`` on the thread pool; grid errors become the HTTP errors they deserve."""
        try:
            return await self.portal.run(fn)
        except GridError as exc:
            raise api_error(exc) from None

    async def call_json(self, fn: Callable[[Grid], Any]) -> None:
        """Run ``fn(grid)`` off the event loop, serialise its answer there too, write it."""
        self.finish(await self.run(lambda grid: _dumps(fn(grid))))

    async def user(self) -> str:
        try:
            return await self.portal.user()
        except GridError as exc:
            raise api_error(exc) from None

    def write_json(self, data: Any, status: int = 200) -> None:
        self.set_status(status)
        self.finish(_dumps(data))


async def require_admin(portal: GridPortal, refusal: str) -> None:
    """403 with ``refusal`` unless this server's portal certificate is the portal's admin's."""
    try:
        role = await portal.role()
    except GridError as exc:
        raise api_error(exc) from None
    if role != ADMIN:
        raise ApiError(403, f"{refusal}; this server is connected as {role or 'nobody'}")


def _dumps(data: Any) -> str:
    return json.dumps(data, separators=(",", ":"))


def _not_found(what: str) -> ApiError:
    return ApiError(404, what)


# -- nodes and capacity ------------------------------------------------------------------------


class NodesHandler(GridHandler):
    @web.authenticated
    @authorized
    async def get(self) -> None:
        # While the live feed runs, its mirror answers (at most one poll behind the portal,
        # each node already JSON); otherwise the portal does, and the feed starts for the
        # next request. The portal's records are already the public Node shape
        # (Node.to_dict()): turning 10,000 of them into dataclasses and back would cost more
        # than the request itself.
        reply = await self.portal.events.nodes_body()
        if reply is not None:
            body, etag = reply
            self.set_header("Content-Type", "application/json")
            self.set_header("Etag", etag)  # made with the body, once per change
            if self.check_etag_header():
                self.set_status(304)
                self.finish()
            else:
                self.finish(body)
            return
        await self.call_json(lambda grid: {"nodes": grid.nodes(as_dict=True)})


class NodeHandler(GridHandler):
    @web.authenticated
    @authorized
    async def get(self, name: str) -> None:
        node = await self.run(lambda grid: grid.node(name, as_dict=True))
        if node is None:
            raise _not_found(f"no node named {name!r} on this grid; GET nodes lists them")
        self.write_json(node)


class CapacityHandler(GridHandler):
    @web.authenticated
    @authorized
    async def get(self) -> None:
        await self.call_json(lambda grid: grid.capacity().to_dict())


# -- jobs ---------------------------------------------------------------------------------------


class JobsHandler(GridHandler):
    @web.authenticated
    @authorized
    async def get(self) -> None:
        me = await self.user()
        everyone = self._flag("everyone")
        if everyone and await self.portal.role() not in STAFF:
            raise ApiError(
                403,
                "only the portal's admin (in a class: a teacher) may list everyone's jobs; "
                "leave out everyone=true to list your own",
            )

        def overview(grid: Grid) -> dict[str, Any]:
            data = grid.jobs_overview(everyone=everyone)
            others = data.get("others") or {}
            return {
                # The portal already limits a connection to its own jobs; filter again so an
                # admin connection shows everyone's work only when asked to.
                "jobs": [j for j in data["jobs"] if everyone or j["owner"] == me],
                "others": {
                    "running": int(others.get("running", 0)),
                    "queued": int(others.get("queued", 0)),
                },
            }

        await self.call_json(overview)

    @web.authenticated
    @authorized
    async def post(self) -> None:
        from grid_portal.jobs.spec import MAX_DOCUMENT_BYTES

        dry_run = self._flag("dry_run")
        wait_for_nodes = self._flag("wait_for_nodes")
        body = self.request.body
        if len(body) > MAX_DOCUMENT_BYTES:
            raise ApiError(
                413,
                f"the job spec is {len(body):,} bytes; at most {MAX_DOCUMENT_BYTES:,} are "
                "accepted. Fan out with a map instead of listing every item.",
            )
        base_dir = Path(self.settings.get("server_root_dir") or ".").expanduser()
        spec = await self.portal.offload(_load_job, body, base_dir)

        def submit(grid: Grid) -> dict[str, Any]:
            from grid_portal.jobs.workflow import check_nodes, load_workflow

            if dry_run:
                # Every check a submission makes (what stages run, their requirements, and
                # whether a connected node could run each), and nothing submitted.
                checked = load_workflow(spec)
                if not wait_for_nodes:
                    check_nodes(grid, checked)
                return {
                    "name": checked.name,
                    "stages": len(checked.stages),
                    "tasks": checked.task_count(),
                }
            run_workflow = getattr(grid, "run_workflow", None)
            if run_workflow is None:  # a Grid from before workflows existed
                raise ApiError(501, "this server's grid_portal cannot submit workflows")
            with self.portal.submit_lock:
                return run_workflow(spec, wait_for_nodes=wait_for_nodes).to_dict()

        result = await self.run(submit)
        if dry_run:
            self.write_json(result)
            return
        self.set_header("Location", url_path_join(self.base_url, "grid/api/jobs", result["id"]))
        self.write_json(result, status=201)

    def _flag(self, name: str) -> bool:
        value = self.get_query_argument(name, "false").lower()
        if value not in ("true", "false", "1", "0"):
            raise ApiError(400, f"query parameter {name} must be true or false, not {value!r}")
        return value in ("true", "1")


def _load_job(body: bytes, base_dir: Path) -> JobSpec:
    """Parse and check a submitted spec (on the thread pool: it may read files)."""
    from grid_portal.jobs.spec import SpecError, load_spec

    try:
        document = json.loads(body or b"null")
    except (ValueError, RecursionError) as exc:
        raise ApiError(400, f"the body is not valid JSON: {exc}") from None
    if not isinstance(document, dict):
        raise ApiError(
            400,
            "the body must be a JSON object: a job spec with a name and stages "
            "(see docs/job-format.md)",
        )
    try:
        return load_spec(document, base_dir=base_dir)
    except SpecError as exc:
        raise _spec_error(exc) from None
    except RecursionError:
        raise ApiError(400, "the job spec is nested too deeply") from None


def _spec_error(exc: SpecError) -> ApiError:
    """400 naming the first problem, with every problem and where it is in ``problems``."""
    problems = [{"path": p.path, "message": p.message} for p in exc.problems]
    count = len(exc.problems)
    first = str(exc.problems[0]) if exc.problems else str(exc)
    more = f" (and {count - 1} more problems)" if count > 1 else ""
    return ApiError(400, f"the job spec is not valid: {first}{more}", problems=problems)


class JobHandler(GridHandler):
    @web.authenticated
    @authorized
    async def get(self, job_id: str) -> None:
        me = await self.user()

        def one(grid: Grid) -> dict[str, Any] | None:
            job = grid.get_job(job_id)
            return job.to_dict() if job is not None and job.owner == me else None

        job = await self.run(one)
        if job is None:
            raise _not_found(f"no job {job_id!r} of yours; GET jobs lists them")
        self.write_json(job)

    @web.authenticated
    @authorized
    async def delete(self, job_id: str) -> None:
        me = await self.user()

        def cancel(grid: Grid) -> dict[str, Any] | None:
            job = grid.get_job(job_id)
            if job is None or job.owner != me:
                return None  # someone else's job is as good as unknown to this user
            return grid.cancel(job_id, reason="cancelled by its owner").to_dict()

        job = await self.run(cancel)
        if job is None:
            raise _not_found(f"no job {job_id!r} of yours to cancel; GET jobs lists them")
        self.write_json(job)


class JobLogsHandler(GridHandler):
    """What a job's shell and script tasks printed, as ``grid-portal logs`` shows it. (Its
    outputs: ``output_handlers.py``.)"""

    @web.authenticated
    @authorized
    async def get(self, job_id: str) -> None:
        me = await self.user()
        stage = self.get_query_argument("stage", None) or None
        item_text = self.get_query_argument("item", None)
        item: int | None = None
        if item_text not in (None, ""):
            try:
                item = int(item_text)
            except ValueError:
                raise ApiError(
                    400, f"query parameter item must be a whole number, not {item_text!r}"
                ) from None

        def logs(grid: Grid) -> dict[str, Any] | None:
            job = grid.get_job(job_id)
            if job is None or job.owner != me:
                return None  # someone else's job is as good as unknown to this user
            tasks = grid.job_logs(job_id, stage=stage, item=item)
            if tasks is None:
                return None
            keep = ("stage", "item", "node", "state", "stdout", "stderr")
            return {
                "job": job_id,
                "tasks": [
                    {k: t.get(k) for k in keep}
                    for t in tasks
                    if (t.get("stdout") or t.get("stderr"))
                    and (stage is None or t.get("stage") == stage)
                    and (item is None or t.get("item") == item)
                ],
            }

        body = await self.run(logs)
        if body is None:
            raise _not_found(f"no job {job_id!r} of yours; GET jobs lists them")
        self.write_json(body)


# -- about the API ------------------------------------------------------------------------------


class VersionHandler(GridHandler):
    @web.authenticated
    @authorized
    async def get(self) -> None:
        self.write_json({"version": __version__, "api": API_VERSION})


class WhoamiHandler(GridHandler):
    """Who this server is at the portal: the sidebar shows staff the "everyone" toggle."""

    @web.authenticated
    @authorized
    async def get(self) -> None:
        me = await self.user()
        try:
            role = await self.portal.role()
        except GridError as exc:
            raise api_error(exc) from None
        self.write_json({"user": me, "role": role, "staff": role in STAFF})


class OpenAPIHandler(GridHandler):
    @web.authenticated
    @authorized
    async def get(self) -> None:
        self.finish(openapi_json(self.base_url))


class NotFoundHandler(GridHandler):
    """Anything else under grid/: 404 as JSON, but only to someone authenticated."""

    @web.authenticated
    def _reject(self, *args: Any, **kwargs: Any) -> None:
        raise _not_found(f"no such endpoint: {self.request.method} {self.request.path}")

    get = post = put = patch = delete = head = _reject


# -- live events --------------------------------------------------------------------------------


class EventsHandler(_JsonErrors, WebSocketMixin, websocket.WebSocketHandler, JupyterHandler):
    """``GET events``: a websocket of node and job deltas (protocol in docs/rest-api.md)."""

    auth_resource = AUTH_RESOURCE

    @property
    def portal(self) -> GridPortal:
        return self.settings["grid_portal"]

    @ws_authenticated
    async def get(self, *args: Any, **kwargs: Any) -> None:
        allowed = await ensure_async(
            self.authorizer.is_authorized(self, self.current_user, "read", AUTH_RESOURCE)
        )
        if not allowed:
            raise web.HTTPError(403)
        result = super().get(*args, **kwargs)
        if result is not None:
            await result

    def open(self, *args: Any, **kwargs: Any) -> None:  # type: ignore[override]
        super().open(*args, **kwargs)  # starts Jupyter's keep-alive pings
        self.portal.events.subscribe(self)

    def send(self, text: str) -> None:
        """Called by the EventHub; raises WebSocketClosedError once the peer is gone."""
        self.write_message(text)

    def on_message(self, message: str | bytes) -> None:
        """The feed is one-way; anything a client sends is ignored."""

    def on_close(self) -> None:
        self.portal.events.unsubscribe(self)


def _sidebar_routes(base_url: str) -> list[tuple[str, type[web.RequestHandler]]]:
    """Portals on the LAN and joining them, the saved portals, this machine's volunteer, a
    job's task stream, the admin's Dask dashboard."""
    from grid_portal.jupyter.dashboard_proxy import dashboard_routes  # they import this module
    from grid_portal.jupyter.discovery_handlers import lan_routes
    from grid_portal.jupyter.portals_view import portals_routes
    from grid_portal.jupyter.taskstream import JobTasksHandler
    from grid_portal.jupyter.volunteer_view import volunteer_routes

    api = url_path_join(base_url, "grid", "api")
    tasks = (url_path_join(api, "jobs", "([^/]+)", "tasks"), JobTasksHandler)
    return [
        *lan_routes(api),
        *portals_routes(api),
        *volunteer_routes(api),
        tasks,
        *dashboard_routes(base_url),
    ]


def _output_routes(api: str) -> list[tuple[str, type[web.RequestHandler]]]:
    from grid_portal.jupyter.output_handlers import output_routes  # it imports this module

    return output_routes(api)


def handlers(base_url: str) -> list[tuple[str, type[web.RequestHandler]]]:
    """The URL rules, under ``{base_url}grid/api/``."""
    api = url_path_join(base_url, "grid", "api")
    return [
        (url_path_join(api, "nodes"), NodesHandler),
        (url_path_join(api, "nodes", "([^/]+)"), NodeHandler),
        (url_path_join(api, "capacity"), CapacityHandler),
        (url_path_join(api, "jobs"), JobsHandler),
        (url_path_join(api, "jobs", "([^/]+)"), JobHandler),
        (url_path_join(api, "jobs", "([^/]+)", "logs"), JobLogsHandler),
        *_output_routes(api),
        (url_path_join(api, "version"), VersionHandler),
        (url_path_join(api, "whoami"), WhoamiHandler),
        (url_path_join(api, "openapi.json"), OpenAPIHandler),
        (url_path_join(api, "events"), EventsHandler),
        *_sidebar_routes(base_url),
        (url_path_join(base_url, "grid") + "(/.*)?", NotFoundHandler),
    ]
