"""OpenAPI paths and schemas of the sidebar's LAN and dashboard endpoints.

Kept beside ``openapi.py`` (which merges them into the one document) so that the handlers
of ``discovery_handlers.py`` and ``dashboard_handlers.py`` are described next to nothing else.
"""

from __future__ import annotations

from typing import Any

_STR = {"type": "string"}
_STR_OR_NULL = {"type": ["string", "null"]}
_NUM_OR_NULL = {"type": ["number", "null"]}
_TASK_STATES = ["queued", "running", "done", "failed", "cancelled"]


def _object(properties: dict[str, Any], required: list[str]) -> dict[str, Any]:
    return {"type": "object", "properties": properties, "required": required}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


_JOIN_REQUEST = _object(
    {
        "id": _STR,
        "name": {**_STR, "description": "The name asked for."},
        "role": {"type": "string", "enum": ["node", "client"]},
        "code": {**_STR, "description": "The six-digit pairing code the requester shows."},
        "address": {**_STR, "description": "Where the request came from."},
        "created_at": {"type": "number"},
        "expires_at": {"type": "number"},
        "state": {
            "type": "string",
            "enum": ["pending", "approved", "denied", "enrolled", "expired"],
        },
        "decided_at": _NUM_OR_NULL,
        "enrolled_name": _STR_OR_NULL,
    },
    ["id", "name", "role", "code", "address", "created_at", "expires_at", "state"],
)

_INT_OR_NULL = {"type": ["integer", "null"]}

_MACHINE_PORTAL = _object(
    {
        "portal": {**_STR, "description": "The portal's host and port, as the volunteer names it."},
        "state": {
            **_STR_OR_NULL,
            "description": "running, paused, draining, connecting, refused, leaving...",
        },
        "share": {**_NUM_OR_NULL, "description": "Its share (`--share`)."},
        "share_percent": {
            **_NUM_OR_NULL,
            "description": "Its share of the shares of the portals served for themselves, in "
            "percent; null for a peer portal lent to, which gets what its home leaves.",
        },
        "lent_by": {
            **_STR_OR_NULL,
            "description": "The home portal that lends this machine to this peer portal "
            "(`--lend-to-peers`); null for a portal served for itself.",
        },
        "tasks": {**_INT_OR_NULL, "description": "Tasks received since the volunteer started."},
        "core_seconds": {**_NUM_OR_NULL, "description": "CPU time those tasks were given."},
        "running_tasks": {**_INT_OR_NULL, "description": "Null while not connected."},
        "problem": {
            **_STR_OR_NULL,
            "description": "Why it is not served (unreachable, refused, its CA changed).",
        },
    },
    ["portal", "state", "share", "share_percent", "lent_by", "tasks", "core_seconds"],
)

_MACHINE_VOLUNTEER = {
    "name": {**_STR, "description": "The volunteer's name (`--name`)."},
    "state": {
        **_STR_OR_NULL,
        "description": "running, paused, draining, connecting; null when it did not answer.",
    },
    "reason": {**_STR_OR_NULL, "description": "Why it is paused or draining."},
    "problem": {
        **_STR_OR_NULL,
        "description": "Why it could not be asked (it did not answer in time, refused).",
    },
    "portals": {"type": "array", "items": _ref("MachinePortal")},
}

SCHEMAS: dict[str, Any] = {
    "MachinePortal": _MACHINE_PORTAL,
    "MachineVolunteer": _object(_MACHINE_VOLUNTEER, ["name", "state", "problem", "portals"]),
    "ThisMachine": _object(
        {
            "running": {
                "type": "boolean",
                "description": "Whether a volunteer of this server's user runs on its machine.",
            },
            "hint": {**_STR, "description": "With none running: how to start one."},
            **_MACHINE_VOLUNTEER,
            "name": {**_MACHINE_VOLUNTEER["name"], "description": "The first volunteer's."},
            "volunteers": {
                "type": "array",
                "description": "Every volunteer of this user here (one, nearly always; the "
                "fields above are the first one's).",
                "items": _ref("MachineVolunteer"),
            },
        },
        ["running", "volunteers"],
    ),
    "DiscoveredPortal": _object(
        {
            "id": {**_STR, "description": "Use it to join: POST discovered/{id}/join."},
            "instance": {**_STR, "description": "The DNS-SD instance name."},
            "name": _STR,
            "addresses": {"type": "array", "items": _STR},
            "port": {"type": "integer"},
            "url": {**_STR, "description": "The enrolment endpoint at the resolved address."},
            "version": _STR,
            "enrol_url": _STR,
            "status_url": _STR,
            "ca_fingerprint": _STR,
            "nodes_online": {"type": ["integer", "null"]},
            "verified": {
                "type": ["boolean", "null"],
                "description": "Whether the CA its enrolment endpoint serves matches the "
                "announced fingerprint. Only verified portals may be joined.",
            },
            "problem": _STR_OR_NULL,
            "message": {
                **_STR_OR_NULL,
                "description": "For a portal that is not verified: the problem and how to "
                "type the portal's address instead. Null for a verified one.",
            },
        },
        ["id", "name", "addresses", "port", "url", "verified"],
    ),
    "Discovered": _object(
        {
            "configured": {
                "type": "boolean",
                "description": "True when this server already has a portal: nothing is "
                "browsed then.",
            },
            "portals": {"type": "array", "items": _ref("DiscoveredPortal")},
            "message": {
                **_STR_OR_NULL,
                "description": "Why no portal was found (nothing announced, no LAN to look "
                "on, multicast DNS unusable here) and how to type the portal's address "
                "instead.",
            },
            "searched_at": {"type": "number"},
        },
        ["configured", "portals"],
    ),
    "JoinStatus": _object(
        {
            "portal": _STR,
            "url": _STR,
            "name": {**_STR, "description": "The name asked for."},
            "state": {"type": "string", "enum": ["pending", "connected", "refused", "failed"]},
            "request": _STR_OR_NULL,
            "code": {**_STR_OR_NULL, "description": "The pairing code, as `123 456`."},
            "expires_at": _NUM_OR_NULL,
            "message": _STR_OR_NULL,
            "started_at": {"type": "number"},
        },
        ["portal", "url", "name", "state"],
    ),
    "JoinState": _object({"join": {"oneOf": [_ref("JoinStatus"), {"type": "null"}]}}, ["join"]),
    "JoinRequest": _JOIN_REQUEST,
    "JobTaskStream": _object(
        {
            "job": _ref("Job"),
            "now": {"type": "number", "description": "The server's clock, for running bars."},
            "stages": {
                "type": "array",
                "description": "Per stage: tasks in all and by state, and the nodes used.",
                "items": _object(
                    {
                        "stage": _STR,
                        "tasks": {"type": "integer"},
                        "queued": {"type": "integer"},
                        "running": {"type": "integer"},
                        "done": {"type": "integer"},
                        "failed": {"type": "integer"},
                        "cancelled": {"type": "integer"},
                        "nodes": {"type": "array", "items": _STR},
                    },
                    ["stage", "tasks", "nodes"],
                ),
            },
            "tasks": {
                "type": "array",
                "description": "Each task: where it ran and when (started: given to its node, "
                "then when it computed; finished: null while it runs).",
                "items": _object(
                    {
                        "key": _STR,
                        "stage": _STR,
                        "item": {"type": ["integer", "null"]},
                        "node": _STR_OR_NULL,
                        "state": {"type": "string", "enum": _TASK_STATES},
                        "started": _NUM_OR_NULL,
                        "finished": _NUM_OR_NULL,
                        "attempts": {"type": "integer"},
                    },
                    ["key", "stage", "node", "state", "started", "finished"],
                ),
            },
            "truncated": {"type": "boolean", "description": "Only the latest tasks are listed."},
            "items": {
                "type": "array",
                "description": "A pipeline's items (stages that map over another stage's "
                "items): the stage each is in now, the node it runs on (or ran on, once "
                "done), and its path through the stages. Items still under way first; "
                "empty for a job with no such stages.",
                "items": _ref("PipelineItem"),
            },
            "items_truncated": {
                "type": "boolean",
                "description": "Only the first 500 items are listed.",
            },
        },
        ["job", "now", "stages", "tasks", "truncated"],
    ),
    "PipelineItem": _object(
        {
            "item": {"type": "integer", "description": "The map item's index."},
            "stage": {**_STR, "description": "Its first stage not done, else its last."},
            "state": {"type": "string", "enum": _TASK_STATES},
            "node": {**_STR_OR_NULL, "description": "Where that stage runs (null: queued)."},
            "path": {
                "type": "array",
                "description": "Its tasks, stage by stage, in the order they ran.",
                "items": _object(
                    {
                        "stage": _STR,
                        "state": {"type": "string", "enum": _TASK_STATES},
                        "node": _STR_OR_NULL,
                        "started": _NUM_OR_NULL,
                        "finished": _NUM_OR_NULL,
                        "moved": {
                            "type": ["integer", "null"],
                            "description": "Bytes of its inputs made on other nodes.",
                        },
                    },
                    ["stage", "state", "node"],
                ),
            },
        },
        ["item", "stage", "state", "node", "path"],
    ),
    "JoinRequests": _object(
        {"requests": {"type": "array", "items": _ref("JoinRequest")}}, ["requests"]
    ),
    "SavedPortals": _object(
        {
            "default": {
                **_STR_OR_NULL,
                "description": "The saved portal this server's own Grid uses (the rest of the "
                "sidebar shows it); null when none of the saved portals is that one.",
            },
            "portals": {
                "type": "array",
                "description": "Every portal saved by `grid-portal login`, in name order; "
                "empty unless there are at least two.",
                "items": _ref("SavedPortal"),
            },
        },
        ["default", "portals"],
    ),
    "SavedPortal": _object(
        {
            "name": {**_STR, "description": "The name it was saved under (`--as`)."},
            "default": {"type": "boolean"},
            "scheduler": _STR_OR_NULL,
            "capacity": {
                "oneOf": [_ref("Capacity"), {"type": "null"}],
                "description": "Its totals (nodes online, free cores...); null while it "
                "cannot be used.",
            },
            "nodes": {
                "type": "array",
                "description": "Its nodes, each with `portal` set to this portal's name; a "
                "node lent by a peer portal has the label `site`.",
                "items": _ref("Node"),
            },
            "problem": {
                **_STR_OR_NULL,
                "description": "Why it cannot be used now, and what to do (expired or "
                "revoked certificate, another CA, unreachable).",
            },
            "connecting": {
                "type": "boolean",
                "description": "The server is connecting to it now (in the background: no "
                "request waits for a portal); its nodes follow in a later answer.",
            },
        },
        ["name", "default", "scheduler", "capacity", "nodes", "problem", "connecting"],
    ),
}


def paths(operation: Any, json_body: Any, path_parameter: Any, flag: Any) -> dict[str, Any]:
    """The paths, made with ``openapi.py``'s own helpers (passed in: it imports this)."""
    error = json_body
    return {
        "/discovered": {
            "get": operation(
                "Grid Portals announced on this server's LAN (DNS-SD), each checked",
                {"200": json_body("Discovered", "The portals found.")},
                description="Browsed only while this server has no portal configured; "
                "answers are cached for 15 s.",
                operationId="getDiscovered",
                parameters=[flag("refresh", "Browse again now.")],
            )
        },
        "/discovered/join": {
            "get": operation(
                "How this server's join request stands",
                {"200": json_body("JoinState", "The request, or null before any was sent.")},
                operationId="getJoinStatus",
            )
        },
        "/discovered/{portal_id}/join": {
            "post": operation(
                "Ask a portal found on the LAN to let this server's user join as a researcher",
                {
                    "202": json_body("JoinStatus", "Sent; the admin's answer is awaited."),
                    "400": error("Error", "The body is not valid."),
                    "404": error("Error", "No portal of that id was found."),
                    "409": error(
                        "Error",
                        "This server already has a portal, the portal cannot be trusted, "
                        "or a request is still waiting.",
                    ),
                },
                description="The CA is checked against the announcement again; the key is "
                "made in this server and never leaves it. Once the admin approves, the "
                "enrolment is saved as `grid-portal login` saves it and this server switches "
                "to the new portal.",
                operationId="joinDiscovered",
                parameters=[path_parameter("portal_id", "The id GET discovered gave.")],
                requestBody={
                    "required": False,
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "properties": {
                                    "name": {"type": "string", "minLength": 1, "maxLength": 63}
                                },
                            }
                        }
                    },
                },
            )
        },
        "/portals": {
            "get": operation(
                "Every portal this user logged in to, with its nodes and counts",
                {"200": json_body("SavedPortals", "The saved portals, grouped.")},
                description="For a researcher who ran `grid-portal login` to several portals: "
                "each one's nodes and totals, and which one this server's own Grid (the rest "
                "of the API) uses. A portal that cannot be used is listed with its problem; "
                "the others are answered all the same. Answers are cached for 2 s.",
                operationId="getPortals",
            )
        },
        "/volunteer": {
            "get": operation(
                "The volunteer running on this server's machine, and what each portal received",
                {"200": json_body("ThisMachine", "Its portals, or running false and a hint.")},
                description="The volunteer agent of this server's user, asked over its "
                "control socket as `grid-portal volunteer status` asks it: per portal it "
                "serves, its state, share, tasks and core-seconds received, running tasks and "
                "problem. No volunteer running, or one that does not answer, is a 200 too. "
                "Answers are cached for 2 s.",
                operationId="getVolunteer",
            )
        },
        "/jobs/{job_id}/tasks": {
            "get": operation(
                "One of your jobs as a task stream: each task's node, stage, state and times",
                {
                    "200": json_body("JobTaskStream", "The job, its stages and its tasks."),
                    "404": error("Error", "No such job, or not yours."),
                },
                description="What Dask's dashboard shows as its task stream, limited to your "
                "own job (the sidebar polls it while a job's view is open).",
                operationId="getJobTasks",
                parameters=[path_parameter("job_id", "The job's id.")],
            )
        },
        "/requests": {
            "get": operation(
                "Join requests waiting at this server's portal (the portal's admin only)",
                {
                    "200": json_body("JoinRequests", "Pending requests."),
                    "403": error("Error", "Not the portal's admin."),
                },
                operationId="listJoinRequests",
                parameters=[flag("all", "Also requests answered or expired.")],
            )
        },
        **{
            f"/requests/{{request_id}}/{action}": {
                "post": operation(
                    f"{action.capitalize()} a join request (the portal's admin only)",
                    {
                        "200": json_body("JoinRequest", "The request, decided."),
                        "403": error("Error", "Not the portal's admin."),
                        "404": error("Error", "No request of that id."),
                        "409": error("Error", "Already decided, or expired."),
                    },
                    description="Approve only a request whose pairing code is the one shown "
                    "on the requester's screen.",
                    operationId=f"{action}JoinRequest",
                    parameters=[path_parameter("request_id", "The request's id.")],
                )
            }
            for action in ("approve", "deny")
        },
    }
