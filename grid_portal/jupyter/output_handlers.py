"""``GET jobs/{id}/outputs`` and ``GET jobs/{id}/outputs/{name}``: a workflow's outputs, as
``grid-portal job ID --fetch DIR`` brings them back, one by one.

Thin, as every handler: ``Grid.held_results`` fetches what the portal holds for the job, as
data only (a value that is not plain data stays unopened: the Jupyter server never unpickles
what a volunteer's node made), and ``jobs/outputs.py`` names it. Only the job's owner gets
anything (404 otherwise, as for a job that does not exist). Serving them does not release them
(``grid-portal job ID --fetch`` still can). A file is served as a download, never rendered:
``Content-Disposition: attachment``, ``nosniff`` and a sandboxing CSP, so an HTML file a node
made cannot run script in this server's origin.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from jupyter_server.auth.decorator import authorized
from jupyter_server.utils import url_path_join
from tornado import web

from grid_portal.jupyter.handlers import ApiError, GridHandler, _not_found

if TYPE_CHECKING:
    from grid_portal.client import Grid
    from grid_portal.jobs.outputs import Output


BINARY = "application/octet-stream"


class _OutputsBase(GridHandler):
    async def outputs(self, job_id: str) -> tuple[Any, list[Output]]:
        """The caller's finished job and its outputs; ApiError (404, 409) otherwise."""
        me = await self.user()

        def fetch(grid: Grid) -> tuple[Any, list[Output] | None]:
            from grid_portal.errors import NotFound
            from grid_portal.jobs.outputs import list_outputs

            job = grid.get_job(job_id)
            if job is None or job.owner != me:
                return None, None  # someone else's job is as good as unknown to this user
            if not job.state.finished:
                return job, None
            try:
                return job, list_outputs(grid.held_results(job_id, data_only=True))
            except NotFound as exc:
                raise ApiError(404, str(exc)) from None

        job, outputs = await self.run(fetch)
        if job is None:
            raise _not_found(f"no job {job_id!r} of yours; GET jobs lists them")
        if outputs is None:
            raise ApiError(
                409, f"job {job_id} is {job.state.value}; its outputs come once it is done"
            )
        return job, outputs


class JobOutputsHandler(_OutputsBase):
    """The list: every file, value and failed item of a finished workflow."""

    @web.authenticated
    @authorized
    async def get(self, job_id: str) -> None:
        job, outputs = await self.outputs(job_id)
        self.write_json(
            {"job": job_id, "state": job.state.value, "outputs": [o.to_dict() for o in outputs]}
        )


class JobOutputHandler(_OutputsBase):
    """One output's bytes, with its content type."""

    @web.authenticated
    @authorized
    async def get(self, job_id: str, name: str) -> None:
        _, outputs = await self.outputs(job_id)
        output = next((o for o in outputs if o.name == name), None)
        if output is None:
            raise _not_found(f"job {job_id} has no output {name!r}; GET outputs lists them")
        if output.kind == "error":
            raise ApiError(409, f"{name} has no output: it failed ({output.error})")
        if output.data is None:
            raise ApiError(
                409,
                f"{name} is a {output.type} object, not plain data, so this server does not "
                "open it (it could run code); load it in a kernel that trusts its node: "
                "grid_portal.jobs.workflow.workflow_outputs(grid, job_id)",
            )
        self.set_header("X-Content-Type-Options", "nosniff")
        self.set_header("Content-Security-Policy", "sandbox; default-src 'none'")
        filename = name.rsplit("/", 1)[-1].replace('"', "")
        self.set_header("Content-Disposition", f'attachment; filename="{filename}"')
        if output.sha256:
            self.set_header("X-Grid-SHA256", output.sha256)
        self.finish(output.data, set_content_type=output.content_type or BINARY)


def output_routes(api: str) -> list[tuple[str, type[web.RequestHandler]]]:
    """The URL rules under ``{base_url}grid/api/``."""
    outputs = url_path_join(api, "jobs", "([^/]+)", "outputs")
    return [(outputs, JobOutputsHandler), (outputs + "/(.+)", JobOutputHandler)]


# -- their part of the OpenAPI document (openapi.py merges it) -----------------------------------


def _output_schema() -> dict[str, Any]:
    text = {"type": ["string", "null"]}
    return {
        "type": "object",
        "properties": {
            "name": {
                "type": "string",
                "description": "A file's path as `grid-portal job ID --fetch` places it, or "
                "the stage (`stage[i]` for a map item) for a value or an error.",
            },
            "stage": {"type": "string"},
            "item": {"type": ["integer", "null"], "description": "The map item, if any."},
            "kind": {
                "type": "string",
                "enum": ["file", "value", "error", "unopened"],
                "description": "A file; a stage's value (served as JSON); an item that "
                "failed (`error` says why); a value that is not plain data, not served "
                "(`type` names it).",
            },
            "content_type": text,
            "size": {"type": ["integer", "null"], "description": "Bytes served."},
            "sha256": text,
            "error": text,
            "type": text,
        },
        "required": ["name", "stage", "item", "kind"],
    }


SCHEMAS: dict[str, Any] = {
    "JobOutputs": {
        "type": "object",
        "properties": {
            "job": {"type": "string"},
            "state": {"type": "string"},
            "outputs": {"type": "array", "items": {"$ref": "#/components/schemas/JobOutput"}},
        },
        "required": ["job", "state", "outputs"],
    },
    "JobOutput": _output_schema(),
}


def openapi_paths(operation: Any, json_body: Any, path_parameter: Any) -> dict[str, Any]:
    """The two paths, made with openapi.py's helpers (passed in: it imports this module)."""
    job = path_parameter("job_id", "The job's id.")
    gone = json_body("Error", "No such job, not yours, or nothing held for it any more.")
    return {
        "/jobs/{job_id}/outputs": {
            "get": operation(
                "What one of your finished workflows brought back, as `grid-portal job` does",
                {
                    "200": json_body("JobOutputs", "Its files, values and failed items."),
                    "404": gone,
                    "409": json_body("Error", "The job is still running."),
                },
                description="The portal holds a workflow's outputs for a day after it ends "
                "(or until `grid-portal job ID --fetch` takes them); listing and reading them "
                "here keeps them held. The items that succeeded are there when others failed.",
                operationId="listJobOutputs",
                parameters=[job],
            )
        },
        "/jobs/{job_id}/outputs/{name}": {
            "get": operation(
                "One output's bytes: a file as it is, a value as JSON",
                {
                    "200": {
                        "description": "The bytes, with the output's content type, as an "
                        "attachment; `X-Grid-SHA256` carries a file's checksum.",
                        "content": {
                            "application/octet-stream": {
                                "schema": {"type": "string", "format": "binary"}
                            },
                            "*/*": {"schema": {"type": "string", "format": "binary"}},
                        },
                    },
                    "404": gone,
                    "409": json_body(
                        "Error",
                        "The job is still running, the item failed, or the value is not "
                        "plain data (not opened here).",
                    ),
                },
                operationId="getJobOutput",
                parameters=[job, path_parameter("name", "An output's name, from the list.")],
            )
        },
    }
