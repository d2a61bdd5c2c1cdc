"""The OpenAPI 3.1 document of the grid's REST API (served as ``GET grid/api/openapi.json``).

Kept as Python data beside the handlers so that one change updates both; the tests validate
every real response against these schemas and run schemathesis over the whole document. The
``events`` websocket cannot be described by OpenAPI paths; its message schemas are under the
``x-events`` extension, and the tests validate real messages against them too.
"""

from __future__ import annotations

import copy
import functools
import json
import re
from typing import Any

API_VERSION = 1

_NUMBER_OR_NULL = {"type": ["number", "null"]}
_INT_OR_NULL = {"type": ["integer", "null"]}
_STRING_OR_NULL = {"type": ["string", "null"]}
_NON_NEGATIVE_INT = {"type": "integer", "minimum": 0}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _object(
    properties: dict[str, Any], required: list[str] | None = None, description: str = ""
) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "object", "properties": properties}
    if required:
        schema["required"] = required
    if description:
        schema["description"] = description
    return schema


_NODE_STATES = ["online", "busy", "paused", "draining", "offline"]
_JOB_STATES = ["queued", "running", "done", "failed", "cancelled", "interrupted"]

SCHEMAS: dict[str, Any] = {
    "Error": _object(
        {
            "message": {"type": "string", "description": "What went wrong and how to fix it."},
            "reason": _STRING_OR_NULL,
            "problems": {
                "type": "array",
                "description": "For an invalid job spec: every problem, with where it is.",
                "items": _object(
                    {"path": {"type": "string"}, "message": {"type": "string"}},
                    ["path", "message"],
                ),
            },
        },
        ["message"],
    ),
    "Version": _object(
        {
            "version": {"type": "string", "description": "The grid-portal package version."},
            "api": {"type": "integer", "description": "This API's version."},
        },
        ["version", "api"],
    ),
    "JobLogs": _object(
        {
            "job": {"type": "string"},
            "tasks": {
                "type": "array",
                "description": "One record per task that printed something, as `grid-portal "
                "logs` shows them. Only shell and script tasks' output is kept.",
                "items": _object(
                    {
                        "stage": {"type": "string"},
                        "item": {"type": ["integer", "null"], "description": "Map item."},
                        "node": _STRING_OR_NULL,
                        "state": {"type": "string"},
                        "stdout": _STRING_OR_NULL,
                        "stderr": _STRING_OR_NULL,
                    },
                    ["stage", "item", "node", "state", "stdout", "stderr"],
                ),
            },
        },
        ["job", "tasks"],
    ),
    "Whoami": _object(
        {
            "user": {"type": "string", "description": "The name this server's jobs are owned by."},
            "role": {
                "type": "string",
                "description": "Its role at the portal: admin, teacher, client, ...",
            },
            "staff": {
                "type": "boolean",
                "description": "Whether it may list everyone's jobs (GET jobs?everyone=true).",
            },
        },
        ["user", "role", "staff"],
    ),
    "Offer": _object(
        {
            "cpus": _NON_NEGATIVE_INT,
            "memory": {**_NON_NEGATIVE_INT, "description": "bytes"},
            "gpus": {"type": "array", "items": {"type": "integer"}},
        },
        ["cpus", "memory", "gpus"],
        "What the volunteer lends to the grid.",
    ),
    "GpuInfo": _object(
        {
            "index": {"type": "integer"},
            "name": {"type": "string"},
            "memory_total": {"type": "integer"},
            "capability": _STRING_OR_NULL,
            "driver": _STRING_OR_NULL,
            "uuid": _STRING_OR_NULL,
        },
        ["index", "name", "memory_total"],
    ),
    "StaticCapacity": _object(
        {
            "cpu_model": {"type": "string"},
            "cores_physical": _INT_OR_NULL,
            "cores_logical": {"type": "integer"},
            "cpu_freq_mhz": _NUMBER_OR_NULL,
            "memory_total": {"type": "integer"},
            "disk_free": _INT_OR_NULL,
            "os": {"type": "string"},
            "os_release": {"type": "string"},
            "arch": {"type": "string"},
            "python": {"type": "string"},
            "gpus": {"type": "array", "items": _ref("GpuInfo")},
            "network": _object(
                {
                    "bandwidth": _NUMBER_OR_NULL,
                    "rtt": _NUMBER_OR_NULL,
                    "measured_at": _NUMBER_OR_NULL,
                }
            ),
            "packages": {"type": "object", "additionalProperties": {"type": "string"}},
        },
        description="What the machine is, as its probe found it (empty for a plain Dask worker).",
    ),
    "GpuTelemetry": _object(
        {
            "index": {"type": "integer"},
            "utilization": _NUMBER_OR_NULL,
            "memory_used": _INT_OR_NULL,
            "temperature": _NUMBER_OR_NULL,
        },
        ["index"],
    ),
    "Telemetry": _object(
        {
            "time": {"type": "number", "description": "Unix time of the sample."},
            "cpu_percent": {"type": "number"},
            "grid_cpu_percent": {"type": "number"},
            "memory_used": {"type": "integer"},
            "memory_percent": {"type": "number"},
            "running_tasks": {"type": "integer"},
            "gpus": {"type": "array", "items": _ref("GpuTelemetry")},
            "tasks_received": {
                "type": "integer",
                "description": "Tasks this portal received from the node since its worker "
                "started (a volunteer may serve several portals).",
            },
            "core_seconds_received": {"type": "number"},
        },
        ["time"],
        "A live sample from the node's heartbeat.",
    ),
    "Node": _object(
        {
            "name": {"type": "string"},
            "state": {"enum": _NODE_STATES},
            "reason": {**_STRING_OR_NULL, "description": "Why paused, draining or offline."},
            "address": _STRING_OR_NULL,
            "capacity": _ref("StaticCapacity"),
            "offer": _ref("Offer"),
            "labels": {"type": "object", "additionalProperties": {"type": "string"}},
            "telemetry": {"oneOf": [_ref("Telemetry"), {"type": "null"}]},
            "joined": _NUMBER_OR_NULL,
            "last_seen": _NUMBER_OR_NULL,
            "sandbox": _STRING_OR_NULL,
            "cpus_in_use": {"type": "number"},
            "gpus_in_use": {"type": "number"},
            "history": {
                "type": "array",
                "items": _ref("Telemetry"),
                "description": "The last 10 minutes of telemetry (GET nodes/{name} only; "
                "empty in lists).",
            },
        },
        ["name", "state", "capacity", "offer", "labels", "telemetry", "history"],
        "One volunteer machine. Offline nodes stay listed for a while.",
    ),
    "NodeList": _object({"nodes": {"type": "array", "items": _ref("Node")}}, ["nodes"]),
    "Capacity": _object(
        {
            "nodes_online": _NON_NEGATIVE_INT,
            "nodes_total": _NON_NEGATIVE_INT,
            "cores_total": _NON_NEGATIVE_INT,
            "cores_free": {"type": "number"},
            "gpus_total": _NON_NEGATIVE_INT,
            "gpus_free": {"type": "number"},
            "memory_total": _NON_NEGATIVE_INT,
            "memory_free": _NON_NEGATIVE_INT,
            "tasks_running": _NON_NEGATIVE_INT,
        },
        [
            "nodes_online",
            "nodes_total",
            "cores_total",
            "cores_free",
            "gpus_total",
            "gpus_free",
            "memory_total",
            "memory_free",
            "tasks_running",
        ],
        "Totals over the online nodes.",
    ),
    "Job": _object(
        {
            "id": {"type": "string"},
            "name": {"type": "string"},
            "owner": {"type": "string"},
            "kind": {"type": "string", "description": "cell, workflow, graph or task"},
            "state": {"enum": _JOB_STATES},
            "submitted": {"type": "number"},
            "started": _NUMBER_OR_NULL,
            "finished": _NUMBER_OR_NULL,
            "tasks_total": _NON_NEGATIVE_INT,
            "tasks_done": _NON_NEGATIVE_INT,
            "tasks_failed": _NON_NEGATIVE_INT,
            "nodes": {"type": "array", "items": {"type": "string"}},
            "error": _STRING_OR_NULL,
            "has_result": {"type": "boolean"},
        },
        [
            "id",
            "name",
            "owner",
            "kind",
            "state",
            "submitted",
            "tasks_total",
            "tasks_done",
            "tasks_failed",
            "nodes",
            "has_result",
        ],
    ),
    "SpecCheck": _object(
        {
            "name": {"type": "string"},
            "stages": _NON_NEGATIVE_INT,
            "tasks": {**_NON_NEGATIVE_INT, "description": "After expanding every map."},
        },
        ["name", "stages", "tasks"],
    ),
    "JobList": _object(
        {
            "jobs": {"type": "array", "items": _ref("Job"), "description": "Your jobs."},
            "others": _object(
                {"running": _NON_NEGATIVE_INT, "queued": _NON_NEGATIVE_INT},
                ["running", "queued"],
                "Other users' jobs, only as counts.",
            ),
        },
        ["jobs", "others"],
    ),
}

# The events websocket's messages (see docs/rest-api.md for the protocol).
EVENT_SCHEMAS: dict[str, Any] = {
    "snapshot": _object(
        {
            "type": {"const": "snapshot"},
            "version": {"type": "integer"},
            "nodes": {"type": "array", "items": _ref("Node")},
            "jobs": {"type": "array", "items": _ref("Job")},
            "capacity": _ref("Capacity"),
        },
        ["type", "version", "nodes", "jobs", "capacity"],
    ),
    "nodes": _object(
        {
            "type": {"const": "nodes"},
            "version": {"type": "integer"},
            "nodes": {
                "type": "array",
                "items": {
                    **SCHEMAS["Node"],
                    "required": [r for r in SCHEMAS["Node"]["required"] if r != "capacity"],
                    "description": "A changed node, whole except that `capacity` is left out "
                    "while it is the same as last sent (keep the one you have).",
                },
            },
            "removed": {"type": "array", "items": {"type": "string"}},
        },
        ["type", "version", "nodes", "removed"],
    ),
    "jobs": _object(
        {
            "type": {"const": "jobs"},
            "jobs": {"type": "array", "items": _ref("Job")},
            "removed": {"type": "array", "items": {"type": "string"}},
        },
        ["type", "jobs", "removed"],
    ),
    "capacity": _object(
        {"type": {"const": "capacity"}, "capacity": _ref("Capacity")}, ["type", "capacity"]
    ),
    "error": _object(
        {"type": {"const": "error"}, "message": {"type": "string"}}, ["type", "message"]
    ),
}


def _json(schema: str, description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ref(schema)}}}


_ERRORS = {
    "403": _json("Error", "Not authenticated (no or bad token), or an XSRF check failed."),
    "503": _json("Error", "The portal cannot be reached; the message says what to check."),
}


def _operation(
    summary: str, ok: dict[str, dict[str, Any]], description: str = "", **extra: Any
) -> dict[str, Any]:
    responses = {**ok, **_ERRORS}
    op = {"summary": summary, "responses": responses, **extra}
    if description:
        op["description"] = description
    return op


def _path_parameter(name: str, description: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "path",
        "required": True,
        "description": description,
        "schema": {"type": "string", "minLength": 1},
    }


def _flag(name: str, description: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "description": description,
        "schema": {"type": "string", "enum": ["true", "false", "1", "0"], "default": "false"},
    }


def _job_spec_schemas() -> dict[str, Any]:
    """The job-spec JSON Schema (grid_portal.jobs.spec), its $defs moved to components."""
    from grid_portal.jobs.spec import job_schema

    schema = copy.deepcopy(job_schema())
    schema.pop("$schema", None)
    defs = schema.pop("$defs", {})
    text = json.dumps({"JobSpec": schema, **{f"JobSpec_{k}": v for k, v in defs.items()}})
    text = re.sub(r'"#/\$defs/([^"]+)"', r'"#/components/schemas/JobSpec_\1"', text)
    return json.loads(text)


@functools.lru_cache(maxsize=8)
def openapi_json(base_url: str = "/") -> str:
    """The OpenAPI document as JSON text, with the server URL under ``base_url``."""
    api = base_url.rstrip("/") + "/grid/api"
    from grid_portal.jupyter import openapi_sidebar  # it takes this module's helpers

    sidebar = openapi_sidebar.paths(_operation, _json, _path_parameter, _flag)
    from grid_portal.jupyter import output_handlers  # it takes this module's helpers too

    outputs = output_handlers.openapi_paths(_operation, _json, _path_parameter)
    document: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {
            "title": "Grid Portal",
            "version": str(API_VERSION),
            "description": (
                "The grid's REST API, served by the user's own Jupyter server. Every request "
                "needs the server's authentication: a token (`Authorization: token ...`) or "
                "the login cookie plus XSRF (`X-XSRFToken` header matching the `_xsrf` cookie) "
                "for writes. Errors are JSON with a `message`. Live updates come over the "
                "websocket `GET events`; its messages are described under `x-events`."
            ),
        },
        "servers": [{"url": api}],
        "security": [{"token": []}],
        "paths": {
            "/nodes": {
                "get": _operation(
                    "Every node the portal knows, online ones and recently offline ones",
                    {"200": _json("NodeList", "The nodes (without history).")},
                    operationId="listNodes",
                )
            },
            "/nodes/{name}": {
                "get": _operation(
                    "One node with its last 10 minutes of telemetry",
                    {
                        "200": _json("Node", "The node."),
                        "404": _json("Error", "No node by that name."),
                    },
                    operationId="getNode",
                    parameters=[_path_parameter("name", "The node's name.")],
                )
            },
            "/capacity": {
                "get": _operation(
                    "Totals over the online nodes",
                    {"200": _json("Capacity", "The totals.")},
                    operationId="getCapacity",
                )
            },
            "/jobs": {
                "get": _operation(
                    "Your jobs, and how many other users' jobs run or wait",
                    {
                        "200": _json("JobList", "Your jobs (or everyone's), oldest first."),
                        "400": _json("Error", "A query parameter is not true or false."),
                        "403": _json("Error", "everyone=true from someone not the admin."),
                    },
                    operationId="listJobs",
                    parameters=[
                        _flag(
                            "everyone",
                            "Everyone's jobs, not only yours: for the portal's admin and, on a "
                            "class portal, its teachers.",
                        )
                    ],
                ),
                "post": _operation(
                    "Submit a job spec (a multi-stage workflow, docs/job-format.md)",
                    {
                        "201": _json("Job", "Submitted; `Location` is the job's URL."),
                        "200": _json("SpecCheck", "With dry_run: the spec passed every check."),
                        "400": _json("Error", "Not JSON, or the spec is invalid: `problems`."),
                        "409": _json(
                            "Error", "No connected node could run a stage (see wait_for_nodes)."
                        ),
                        "413": _json("Error", "The spec is too large."),
                        "501": _json("Error", "This server cannot submit workflows."),
                    },
                    description="The spec is checked completely before anything is submitted: "
                    "its fields, what each stage runs (a module importable on this server must "
                    "have the function; files are found under the server's root directory), "
                    "its requirements, and that a connected node could run each stage.",
                    operationId="submitJob",
                    parameters=[
                        _flag("dry_run", "Check the spec as a submission would, submit nothing."),
                        _flag(
                            "wait_for_nodes",
                            "Accept stages no connected node can run now; they wait for one.",
                        ),
                    ],
                    requestBody={
                        "required": True,
                        "content": {"application/json": {"schema": _ref("JobSpec")}},
                    },
                ),
            },
            "/jobs/{job_id}": {
                "get": _operation(
                    "One of your jobs",
                    {
                        "200": _json("Job", "The job."),
                        "404": _json("Error", "No such job, or not yours."),
                    },
                    operationId="getJob",
                    parameters=[_path_parameter("job_id", "The job's id.")],
                ),
                "delete": _operation(
                    "Cancel one of your jobs: queued tasks are dropped, running ones released",
                    {
                        "200": _json("Job", "The job, now cancelled (or already finished)."),
                        "404": _json("Error", "No such job, or not yours."),
                    },
                    operationId="cancelJob",
                    parameters=[_path_parameter("job_id", "The job's id.")],
                ),
            },
            "/jobs/{job_id}/logs": {
                "get": _operation(
                    "What one of your jobs' shell and script tasks printed",
                    {
                        "200": _json("JobLogs", "Each task's stdout and stderr."),
                        "400": _json("Error", "item is not a whole number."),
                        "404": _json("Error", "No such job, or not yours."),
                    },
                    description="A workflow's outputs: GET jobs/{job_id}/outputs.",
                    operationId="getJobLogs",
                    parameters=[
                        _path_parameter("job_id", "The job's id."),
                        {
                            "name": "stage",
                            "in": "query",
                            "required": False,
                            "description": "Only this stage's tasks.",
                            "schema": {"type": "string"},
                        },
                        {
                            "name": "item",
                            "in": "query",
                            "required": False,
                            "description": "Only this map item's tasks.",
                            "schema": {"type": "integer", "minimum": 0},
                        },
                    ],
                ),
            },
            "/version": {
                "get": _operation(
                    "The extension's version",
                    {"200": _json("Version", "Versions.")},
                    operationId="getVersion",
                )
            },
            "/whoami": {
                "get": _operation(
                    "Who this server is at the portal",
                    {"200": _json("Whoami", "Its user name and role.")},
                    operationId="getWhoami",
                )
            },
            "/openapi.json": {
                "get": _operation(
                    "This document",
                    {
                        "200": {
                            "description": "The OpenAPI document.",
                            "content": {"application/json": {"schema": {"type": "object"}}},
                        }
                    },
                    operationId="getOpenAPI",
                )
            },
            **outputs,
            **sidebar,
        },
        "components": {
            "schemas": {
                **SCHEMAS,
                **openapi_sidebar.SCHEMAS,
                **output_handlers.SCHEMAS,
                **_job_spec_schemas(),
            },
            "securitySchemes": {
                "token": {
                    "type": "apiKey",
                    "in": "header",
                    "name": "Authorization",
                    "description": "`token <the Jupyter server's token>`",
                }
            },
        },
        "x-events": {
            "path": "/events",
            "description": "A websocket. The first message is a snapshot; then deltas. A "
            "snapshot may come again (after the portal restarted or came back): it replaces "
            "everything the client holds.",
            "messages": EVENT_SCHEMAS,
        },
    }
    return json.dumps(document)


def openapi_document(base_url: str = "/") -> dict[str, Any]:
    """The OpenAPI document, with the server URL under this Jupyter server's base URL."""
    return json.loads(openapi_json(base_url))
