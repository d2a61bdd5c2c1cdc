"""The wire contract: every handler, stream op and annotation the grid uses, and who may use it.

Dask lets anyone who passes TLS call any handler of a scheduler or worker. A community grid
joins strangers, so the portal's scheduler and every volunteer's worker check each call against
the tables below before it runs (``grid_portal/guard.py``). What is not listed is refused and
logged: default deny. A new handler is one line here, with the roles that need it and why.

Roles are what the portal's CA writes in a certificate (its OU), read back from the TLS
session, never from a message:

- ``scheduler``: the portal's own scheduler (volunteers' workers answer it).
- ``node``: a volunteer's machine. Only ever a Dask worker, never a client.
- ``client``: a researcher or student. Only ever a Dask client.
- ``teacher``: a class's teacher: a client who may also see and cancel everyone's jobs and set
  quotas, but runs no code on the portal or outside tasks.
- ``admin``: the portal's owner (who runs ``grid-portal serve``): everything.
- ``peer``: another portal that borrows this portal's idle volunteers (portal peering,
  ``grid-portal peers add``): it may ask what this portal lent it, and nothing else.
- ``delegate``: a credential the portal gives one running job of a researcher, named
  ``<owner>/job/<job id>`` (`delegate_name`), so that the job's own tasks can be Dask clients
  (``get_client()``): it submits into that job only, as its owner, sees only that job's keys,
  and dies with the job.

There is no certificate for "the Hub": a Hub user's server enrols as that user (``client`` or
``teacher``) through the portal's HTTPS endpoint and is checked like anyone else.

This module is plain data (no Dask import) so that the docs' trust table can be checked
against it (tests/test_protocol.py) and every side can read it cheaply.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

SCHEDULER = "scheduler"
NODE = "node"
CLIENT = "client"
TEACHER = "teacher"
ADMIN = "admin"
DELEGATE = "delegate"
PEER = "peer"
ROLES = (SCHEDULER, NODE, CLIENT, TEACHER, ADMIN, DELEGATE, PEER)

PEOPLE = frozenset({CLIENT, TEACHER, ADMIN})  # who may use the grid's own handlers
CLIENTS = PEOPLE | {DELEGATE}  # who may be a Dask client
STAFF = frozenset({TEACHER, ADMIN})  # who may see everyone's work
NODES = frozenset({NODE})
ADMINS = frozenset({ADMIN})
PEERS = frozenset({PEER})
NOBODY: frozenset[str] = frozenset()

# -- annotations the grid sets on tasks (dask.annotate), read by the portal and the nodes -----
JOB_ANNOTATION = "grid_job"
JOB_NAME_ANNOTATION = "grid_job_name"
JOB_KIND_ANNOTATION = "grid_job_kind"
JOB_OPEN_ANNOTATION = "grid_job_open"  # an interactive session: more tasks may follow
JOB_OWNER_ANNOTATION = "grid_job_owner"  # honoured only from the admin (the portal resubmitting)
STREAM_ANNOTATION = "grid_stream"  # the Dask Queue a cell's output goes to
PUSH_ANNOTATION = "grid_push"  # push this task's result with its completion if it is small
STAGE_ANNOTATION = "grid_stage"
WHERE_ANNOTATION = "grid_where"
HOLD_ANNOTATION = "grid_hold"  # keep this task's result for the job's owner to fetch later
REPLICAS_ANNOTATION = "grid_replicas"  # on copy 0: how many copies there are
REPLICA_ANNOTATION = "grid_replica"  # on copy j >= 1: which copy it is
AGREED_ANNOTATION = "grid_agreed"  # the task that hands on the copies' agreed value
ITEMS_ANNOTATION = "grid_items"  # a batch task of a sweep: how many items it runs
SWEEP_ANNOTATION = "grid_sweep_items"  # a sweep's probe tasks: how many items are still to come
RETRIES_ANNOTATION = "grid_retries"  # retries given: a lost node counts as a try too
# Task metadata a node sends with a task's completion (Dask's task-finished ``metadata``).
FAILED_ITEMS_METADATA = "grid_failed_items"  # a batch task: how many of its items raised

# -- messages the grid adds to Dask's streams -------------------------------------------------
PUSH_OP = "grid-pushed-result"  # node -> portal -> client: a small finished result
PUSH_LIMIT = 256 * 1024  # bytes of pickled result; larger ones are gathered as usual
# A kernel's cell session (jobs/cell_session.py): a task that holds a slot for the kernel's
# cells, which then go to it as stream messages instead of one Dask graph each.
LEASE_ANNOTATION = "grid_cell_lease"  # the lease task of a kernel's cell session
CELL_SEND_OP = "grid-cell-send"  # kernel -> portal: a cell for the kernel's own lease
CELL_RUN_OP = "grid-cell-run"  # portal -> node: a cell for a lease task running there
CELL_STOP_OP = "grid-cell-stop"  # portal -> node: stop that cell (cancel, interrupt)
CELL_OUT_OP = "grid-cell-out"  # node -> portal -> kernel: lease ready, a cell's output, result

# -- shared limits ---------------------------------------------------------------------------
MAX_REPORT_BYTES = 64 * 1024  # a node's startup report or one heartbeat's grid metrics
MAX_LABELS = 64
MAX_LABEL_LENGTH = 128
MAX_GPUS = 64
# People's certificates are short-lived and renewed by their client (grid_portal/renewal.py);
# the admin's lives with the CA, a node's is revoked by name.
PERSON_CERT_DAYS = 14
PERSON_ROLES_RENEWED = frozenset({CLIENT, TEACHER})
ENROLLED_CERT_DAYS = 365  # any other role's certificate from enrolment (a node's, the admin's)


def enrolment_cert_days(role: str) -> float:
    """How long a certificate given at enrolment (a token or an approved join request) lives."""
    return PERSON_CERT_DAYS if role in PERSON_ROLES_RENEWED else ENROLLED_CERT_DAYS


# A job's delegated credential (portal/delegation.py) lives at most this long; a task that
# needs longer asks again, and none works once its job has ended.
DELEGATE_CERT_HOURS = 1.0
# What a node reports is cleaned against these by grid_portal/portal/reports.py.
MAX_REPORT_DEPTH = 16  # an honest report nests 4 deep
MAX_REPORT_TEXT = 256  # any other string a node reports (CPU model, GPU name, versions)
MAX_REASON_LENGTH = 200  # why a node is paused or draining
MAX_PACKAGES = 64
SANDBOX_LEVELS = ("bubblewrap", "user", "process", "none")  # grid_portal/node/sandbox.py
NODE_POLICY_STATES = (None, "paused", "draining")  # a heartbeat's "policy": {"state": ...}


@dataclass(frozen=True)
class Rule:
    """Who may use one handler or stream op, and why they need it (for the docs)."""

    roles: frozenset[str]
    why: str
    checked: str = ""  # what the portal checks beyond the role (ownership, binding)
    refusal: str = ""  # what a refused caller is told, when the op's name says too little


def _rules(
    roles: Iterable[str], why: str, names: Iterable[str], checked: str = "", refusal: str = ""
) -> dict[str, Rule]:
    return {name: Rule(frozenset(roles), why, checked, refusal) for name in names}


OWNED_KEYS = "every key must be one the caller's identity submitted (staff: any)"
BOUND_WORKER = "the worker named is the caller's own connection"
BOUND_CLIENT = "the client named is one of the caller's own connections"
FETCHED_INPUTS = "only inputs of a task the worker runs, or replicas the scheduler asked for"
OWNED_JOB = "the job is the caller's (staff: any); else 'not found'"
OWNED_QUEUE = "the queue is one the caller made, or (a node) a running task of its streams to it"
DELEGATED = "; a delegate: only its job's keys, while the job runs"


def delegate_name(owner: str, job_id: str) -> str:
    """The name in a delegated credential: whose job, and which."""
    return f"{owner}/job/{job_id}"


def delegation(name: str) -> tuple[str, str] | None:
    """(owner, job id) of a delegate's name, or None if it is not one."""
    owner, sep, job_id = name.rpartition("/job/")
    return (owner, job_id) if sep and owner and job_id else None


# Copy j >= 1 of a replicated task is named from copy 0's key: what a kernel (replication.py)
# and a workflow (jobs/graph.py) submit, and what the portal (portal/replicas.py) reads back.
REPLICA_SUFFIX = "-replica"


def copy_key(key: Any, j: int) -> Any:
    """The key of copy ``j`` of the task whose copy 0 has ``key``: ``KEY-replicaJ``, or that
    in the name part of a tuple key (a map's item keeps its index)."""
    if j == 0:
        return key
    if isinstance(key, tuple):
        return (f"{key[0]}{REPLICA_SUFFIX}{j}", *key[1:])
    return f"{key}{REPLICA_SUFFIX}{j}"


def original_key(key: Any, j: int) -> Any:
    """Copy 0's key, from the key of copy ``j`` (None where ``key`` is not such a copy)."""
    suffix = f"{REPLICA_SUFFIX}{j}"
    if isinstance(key, tuple) and isinstance(key[0], str) and key[0].endswith(suffix):
        return (key[0][: -len(suffix)], *key[1:])
    if isinstance(key, str) and key.endswith(suffix):
        return key[: -len(suffix)]
    return None


# -- the portal's scheduler: request/reply handlers --------------------------------------------
SCHEDULER_HANDLERS: dict[str, Rule] = {
    # Connecting.
    **_rules(
        CLIENTS,
        "connect as a Dask client",
        ["register-client"],
        BOUND_CLIENT,
        refusal="a node certificate is only ever a worker; people log in with `grid-portal login`",
    ),
    **_rules(
        NODES,
        "join as a Dask worker",
        ["register-worker"],
        "name = the certificate's",
        refusal="only enrolled volunteer nodes may join as workers",
    ),
    **_rules(NODES, "worker upkeep", ["heartbeat_worker", "unregister"], BOUND_WORKER),
    **_rules(
        NODES, "a worker fetched a dependency", ["add_keys"], f"{BOUND_WORKER}; {FETCHED_INPUTS}"
    ),
    **_rules(
        NODES | ADMINS,
        "a volunteer leaving gracefully hands its results on (Worker.close_gracefully)",
        ["retire_workers"],
        "a node names only its own worker",
    ),
    **_rules(CLIENTS | NODES, "what a Dask peer asks on connecting", ["identity", "versions"]),
    **_rules(PEOPLE, "client.ncores()", ["ncores", "ncores_running"]),
    # Results of one's own work.
    **_rules(CLIENTS, "fetch results of one's own tasks", ["gather"], OWNED_KEYS + DELEGATED),
    **_rules(
        CLIENTS | NODES,
        "where one's own results are; a node, where its tasks' inputs are",
        ["who_has"],
        OWNED_KEYS + DELEGATED + "; a node: any key it names",
    ),
    **_rules(PEOPLE, "retry one's own erred tasks", ["retry"], OWNED_KEYS),
    **_rules(PEOPLE, "client.scatter", ["scatter"], BOUND_CLIENT + "; keys not others'"),
    # A %%grid cell's output stream: a Dask Queue made by the kernel, fed by the cell's node.
    **_rules(
        PEOPLE,
        "a %%grid cell's output stream",
        ["queue_create", "queue_get", "queue_qsize"],
        OWNED_QUEUE,
    ),
    **_rules(PEOPLE | NODES, "a %%grid cell's output stream", ["queue_put"], OWNED_QUEUE),
    # The grid's own handlers (portal/plugin.py, portal/scheduling.py).
    **_rules(
        PEOPLE,
        "browse the grid",
        ["grid_nodes", "grid_node", "grid_capacity", "grid_largest_offer", "grid_match"],
    ),
    **_rules(PEOPLE, "live changes of nodes and one's own jobs", ["grid_changes"]),
    **_rules(PEOPLE, "who am I to the portal", ["grid_whoami"]),
    **_rules(
        PERSON_ROLES_RENEWED,
        "renew one's own short-lived certificate",
        ["grid_renew"],
        "signed for the caller's own name and role; never once revoked",
    ),
    **_rules(PEOPLE, "fair share is public to its users", ["grid_fairshare"]),
    **_rules(
        PEOPLE,
        "one's own jobs",
        [
            "grid_jobs",
            "grid_job",
            "grid_job_cancel",
            "grid_job_result",
            "grid_job_tasks",
            "grid_job_logs",
            "grid_workflow_outputs",
            "grid_workflow_release",
        ],
        OWNED_JOB,
    ),
    **_rules(PEOPLE, "start a job record", ["grid_job_create"], "owner = the caller"),
    **_rules(
        PEOPLE | NODES,
        "keep a %%grid --bg result",
        ["grid_job_store_result"],
        OWNED_JOB + "; a node: only a job it ran",
    ),
    **_rules(NODES, "what a shell task printed", ["grid_task_output"], "only the task's node"),
    **_rules(
        NODES,
        "a credential for the job of a task the node runs (the task called get_client())",
        ["grid_delegate"],
        "the task runs on the caller's worker now and its job runs; signed for the job's owner "
        "by the enrolment process",
    ),
    **_rules(
        STAFF,
        "quotas and the fair-share half-life",
        ["grid_fairshare_set"],
        refusal="only the portal's admin or a class's teachers may change fair-share settings",
    ),
    **_rules(ADMINS, "cut off a node", ["grid_revoke"]),
    **_rules(
        NODES,
        "a volunteer that lends to peers: the peer portals it may serve now, and what it lent",
        ["grid_peer_offers"],
        "what it lent is recorded under the caller's own name; what it says it uses only splits a peer's quota among volunteers, never above it",
    ),
    **_rules(
        PEERS,
        "a peer portal: what this portal lent it",
        ["grid_peer_exchange"],
        "only its own peering, while its peer token is not revoked",
        refusal="only a peer portal's certificate may ask what was lent to it",
    ),
    **_rules(
        PEERS,
        "a peer portal ended the peering (`grid-portal peers remove` there)",
        ["grid_peer_unlink"],
        "only its own peering",
        refusal="only a peer portal's certificate may end its peering",
    ),
    **_rules(
        ADMINS,
        "answer join requests from the sidebar, as `grid-portal requests` does",
        ["grid_join_requests", "grid_join_decide"],
        refusal="only the portal's admin answers join requests",
    ),
    **_rules(
        ADMINS,
        "where the portal's own Dask dashboard listens (loopback), for the admin's proxy",
        ["grid_dashboard"],
        refusal="only the portal's admin may see the Dask dashboard: it shows everyone's work",
    ),
    # Read-only views of everyone's tasks: for those who may see everyone's work.
    **_rules(
        STAFF,
        "Dask's views of everyone's tasks",
        [
            "processing",
            "has_what",
            "nbytes",
            "get_task_status",
            "get_task_stream",
            "get_task_stream_index",
            "get_task_prefix_states",
            "events",
            "get_story",
            "call_stack",
            "profile",
        ],
    ),
    # Everything else Dask offers (running code on the portal or outside tasks, reshaping the
    # cluster, shared variables and locks, logs, dashboards) is the admin's alone.
}

# -- the portal's scheduler: stream ops --------------------------------------------------------
# One table serves the workers' and the clients' streams (Dask's design); the roles keep them
# apart, and ``worker`` / ``client`` fields always come from the connection, never the message.
SCHEDULER_STREAM_OPS: dict[str, Rule] = {
    **_rules(
        CLIENTS,
        "a Dask client's own stream",
        [
            "update-graph",
            "client-desires-keys",
            "client-releases-keys",
            "heartbeat-client",
            "close-client",
            "subscribe-topic",
            "unsubscribe-topic",
        ],
    ),
    **_rules(
        CLIENTS,
        "cancel or ask about one's own tasks",
        ["cancel-keys", "report-key"],
        OWNED_KEYS + DELEGATED,
    ),
    **_rules(PEOPLE, "a %%grid cell's output stream, closed", ["queue_release"], OWNED_QUEUE),
    **_rules(
        PEOPLE,
        "a future put in one's own queue, let go",
        ["queue-future-release"],
        OWNED_QUEUE,
    ),
    **_rules(
        NODES,
        "a Dask worker's own stream",
        [
            "release-worker-data",
            "keep-alive",
            "worker-status-change",
            "request-refresh-who-has",
            "steal-response",
        ],
    ),
    **_rules(
        NODES,
        "a task's outcome",
        ["task-finished", "task-erred", "long-running", "reschedule"],
        "only from the worker that runs the task",
    ),
    **_rules(NODES, "a worker fetched a dependency", ["add-keys"], FETCHED_INPUTS),
    **_rules(NODES, "worker events", ["log-event"], "not the topics Dask prints in kernels"),
    **_rules(NODES, "a small result with its completion", [PUSH_OP], "only from the task's node"),
    **_rules(
        PEOPLE,
        "a cell sent to one's own cell session's lease (no graph per cell)",
        [CELL_SEND_OP],
        "the lease was submitted on this very connection; the cell's job is the caller's",
    ),
    **_rules(
        NODES,
        "a leased cell's output and result, to its kernel",
        [CELL_OUT_OP],
        "only from the node the portal sent that cell (or lease) to",
    ),
}

# -- every volunteer's worker -----------------------------------------------------------------
# A worker answers the portal's scheduler, and other nodes only for data transfer; never a
# researcher (who reaches nodes only through tasks) and never the portal's other clients.
WORKER_HANDLERS: dict[str, Rule] = {
    **_rules(
        {SCHEDULER, NODE},
        "data transfer between nodes, and the portal gathering results",
        ["get_data"],
    ),
    **_rules({SCHEDULER, NODE}, "liveness", ["ping"]),
    **_rules(
        {SCHEDULER},
        "what the portal's scheduler asks of its workers",
        [
            "gather",
            "free_keys",
            "update_data",
            "terminate",
            "identity",
            "versions",
            "keys",
            "get_logs",
            "call_stack",
            "profile",
            "profile_metadata",
            "get_monitor_info",
            "get_story",
            "benchmark_disk",
            "benchmark_memory",
            "benchmark_network",
            "grid_node_status",
        ],
    ),
    **_rules(
        {SCHEDULER},
        "the admin's client.run and plugins, relayed by the portal (admin only there)",
        ["run", "run_coroutine", "plugin-add", "plugin-remove", "upload_file"],
    ),
}

# A worker's stream ops come from the portal's scheduler, over the connection the worker itself
# opened when it registered; nobody else may open a stream to a worker.
WORKER_STREAM_OPS: dict[str, Rule] = _rules(
    {SCHEDULER},
    "the portal's scheduler directing its worker",
    [
        "close",
        "cancel-compute",
        "acquire-replicas",
        "compute-task",
        "free-keys",
        "remove-replicas",
        "steal-request",
        "refresh-who-has",
        "worker-status-change",
        "remove-worker",
        CELL_RUN_OP,
        CELL_STOP_OP,
    ],
)


def allowed(table: Mapping[str, Rule], op: str, role: str | None) -> bool:
    """May ``role`` use ``op``? Unknown ops and unknown roles: no."""
    rule = table.get(op)
    return rule is not None and role is not None and role in rule.roles


# -- the docs' trust table ---------------------------------------------------------------------
TABLE_BEGIN = "<!-- protocol table: made by `python -m grid_portal.protocol`; checked by a test -->"
TABLE_END = "<!-- end of protocol table -->"


def trust_table_markdown() -> str:
    """The tables above as Markdown, for docs/security.md (tests/test_protocol.py checks that
    the docs hold exactly this)."""
    lines = [TABLE_BEGIN, ""]
    sections = (
        ("the portal's scheduler: requests", SCHEDULER_HANDLERS),
        ("the portal's scheduler: stream messages", SCHEDULER_STREAM_OPS),
        ("a volunteer's worker: requests", WORKER_HANDLERS),
        ("a volunteer's worker: stream messages", WORKER_STREAM_OPS),
    )
    for title, table in sections:
        lines += [f"**{title}**", "", "| op | who may | why | checked beyond the role |"]
        lines.append("|---|---|---|---|")
        for name in sorted(table):
            rule = table[name]
            roles = ", ".join(r for r in ROLES if r in rule.roles)
            lines.append(f"| `{name}` | {roles} | {rule.why} | {rule.checked or ''} |")
        lines.append("")
    lines += [
        "Anything else Dask offers on the portal's scheduler (running code there or on every",
        "volunteer outside a task, plugins, restarts, shared variables, locks, logs) is the",
        "admin's alone; on a volunteer's worker, anything else is nobody's.",
        "",
        TABLE_END,
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    print(trust_table_markdown())
