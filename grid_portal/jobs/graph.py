"""A job's Dask graph from what is kept of it: the stages of a workflow spec, a --bg cell.

Both sides submit these graphs: the researcher's kernel (``jobs/workflow.py``, through
``Grid.client``) and the portal after a restart (``portal/recovery.py``, through a client of
its own admin identity). So this module is node-neutral and imports no Dask client: the
caller passes one in, and only ``dask.annotate`` is used here. Task keys are
``("<stage>-<job id>", i)`` (``"<stage>-<job id>"`` without a map) and ``grid-cell-<job id>-0``,
so a job submitted again has the same keys as the first time.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from grid_portal.jobs.spec import JobSpec, SpecError, SpecProblem, StageSpec, load_spec
from grid_portal.jobs.stage_task import StagedFile, StagePlan, TaskId, collect, run_task
from grid_portal.protocol import (
    HOLD_ANNOTATION,
    JOB_ANNOTATION,
    JOB_KIND_ANNOTATION,
    JOB_NAME_ANNOTATION,
    JOB_OPEN_ANNOTATION,
    REPLICA_ANNOTATION,
    REPLICAS_ANNOTATION,
    RETRIES_ANNOTATION,
    STAGE_ANNOTATION,
    WHERE_ANNOTATION,
    copy_key,
)

# Annotations the portal plugin reads (grid_portal/portal/{placement,tasklog}.py), for
# pipelines: a task of a streamed `each` stage names the key prefix of the task it follows
# (item i of the other stage), so the portal queues it in that item's place; a task of a
# stage with `fail: job` fails its whole job.
EACH_ANNOTATION = "grid_each"
FAIL_ANNOTATION = "grid_fail"


def job_annotations(job_id: str, name: str, kind: str, session: bool = False) -> dict[str, Any]:
    """The annotations that make tasks one job (``Grid.job`` sets them too).

    ``session``: more tasks may follow (an interactive session), so the portal does not end the
    job when the tasks it has seen are done.
    """
    annotations: dict[str, Any] = {
        JOB_ANNOTATION: job_id,
        JOB_NAME_ANNOTATION: name,
        JOB_KIND_ANNOTATION: kind,
    }
    if session:
        annotations[JOB_OPEN_ANNOTATION] = True
    return annotations


def origin_of(stage: StageSpec) -> str:
    return stage.run.origin.rsplit(".run", 1)[0]


def requirement_text(stage: StageSpec) -> str | None:
    """The stage's ``where``, with ``gpu_memory`` added as a condition on the GPU."""
    parts = []
    if stage.where:
        parts.append(f"({stage.where})")
    if stage.resources.gpu_memory:
        parts.append(f"gpu.memory >= {int(stage.resources.gpu_memory)}B")
    return " and ".join(parts) or None


def check_requirements(spec: JobSpec) -> list[SpecProblem]:
    """Each stage's ``where``, compiled: unknown attributes and type mismatches, found here."""
    from grid_portal.requirements.matching import ExpressionError, compile_requirement

    problems = []
    for stage in spec.stages:
        text = requirement_text(stage)
        if text is None:
            continue
        try:
            compile_requirement(text)
        except ExpressionError as exc:
            problems.append(SpecProblem(f"{origin_of(stage)}.where", str(exc)))
    return problems


def stage_plan(job_id: str, stage: StageSpec, spec: JobSpec) -> StagePlan:
    run = stage.run
    code = None
    if run.kind == "file":
        path = spec.base_dir / str(run.path)
        try:
            code = StagedFile.of(str(run.path), path.read_bytes())
        except OSError as exc:
            raise SpecError(f"cannot read {path}: {exc.strerror or exc}", run.origin) from None
    kind = {"function": "function", "shell": "shell"}.get(
        run.kind, "file-function" if run.function else "script"
    )
    target = run.command if run.kind == "shell" else str(run.to_value())
    return StagePlan(
        job_id=job_id,
        stage=stage.name,
        origin=origin_of(stage),
        kind=kind,
        target=str(target),
        code=code,
        args=tuple(stage.args),
        params=dict(stage.params),
        outputs=tuple(stage.outputs),
        timeout=stage.timeout,
        pick=(stage.map.as_name,) if stage.map and _each(stage) and not stage.map.stream else (),
    )


def _each(stage: StageSpec) -> str | None:
    """The stage whose items this one follows one to one (``map: {each: ...}``), if any."""
    return stage.map.each if stage.map is not None and stage.map.kind == "each" else None


def bindings_of(stage: StageSpec, spec: JobSpec) -> list[dict[str, Any]]:
    """The keyword arguments of each task: one dict per map item (one empty dict without a map)."""
    if stage.map is None:
        return [{}]
    if stage.map.kind == "each":  # its item arrives from the other stage, as an input
        return [{} for _ in range(spec.count(stage))]
    if stage.map.kind != "files":
        return [stage.map.bind(item) for item in stage.map.items(spec.base_dir)]
    out = []
    for path in stage.map.items(spec.base_dir):
        rel = Path(path).relative_to(spec.base_dir).as_posix()
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise SpecError(
                f"cannot read {path}: {exc.strerror or exc}", f"{stage.map.origin}.files.glob"
            ) from None
        out.append(stage.map.bind(StagedFile.of(rel, data)))
    if not out:
        raise SpecError(
            f"{stage.map.glob!r} matches no file in {spec.base_dir}; check the pattern",
            f"{stage.map.origin}.files.glob",
        )
    return out


# --- after a portal restart (grid_portal/portal/recovery.py) -----------------------------

_NOT_KEPT = (
    "{origin} reads files from the submitter's machine ({what}), which the portal does not keep; "
    "submit the job again"
)


def why_not_resubmittable(spec: Mapping[str, Any]) -> str | None:
    """Why the portal cannot submit this stored spec again by itself; None if it can.

    Pure: nothing is imported or read. Stages that read files on the submitter's machine
    (``file.py`` stages, ``files`` maps) are not resubmitted: the portal keeps no copy, and it
    must never read files of its own machine on a researcher's behalf.
    """
    try:
        checked = load_spec(spec, base_dir=_NO_FILES)
    except SpecError as exc:
        return f"its stored spec is no longer valid: {exc}"
    problems = check_requirements(checked)
    if problems:
        return f"its stored spec is no longer valid: {SpecError(problems)}"
    for stage in checked.stages:
        if stage.run.kind == "file":
            return _NOT_KEPT.format(origin=origin_of(stage), what=str(stage.run.path))
        if stage.map is not None and stage.map.kind == "files":
            return _NOT_KEPT.format(origin=origin_of(stage), what=f"files {stage.map.glob!r}")
    return None


# A folder that never exists: a resubmitted spec has no base folder of its own.
_NO_FILES = Path("/nonexistent/grid-portal-resubmission")


def resubmit_workflow(client: Any, job_id: str, spec: Mapping[str, Any]) -> list[Any]:
    """Submit a workflow again under its own job id, from the spec kept with its job.

    Used by the portal after a restart, through its own client, with the owner set by the
    caller's annotation (the job's record, with its spec, is already the portal's). The same
    graph as ``submit_workflow`` after its checks, minus importing what stages run (the portal
    never imports researchers' modules) and without waiting for nodes: volunteers rejoin a
    restarted portal by themselves, and the tasks wait for them.
    """
    from grid_portal.errors import GridError

    reason = why_not_resubmittable(spec)
    if reason is not None:
        raise GridError(reason)
    checked = load_spec(spec, base_dir=_NO_FILES)
    plans = {s.name: stage_plan(job_id, s, checked) for s in checked.stages}
    bindings = {s.name: bindings_of(s, checked) for s in checked.stages}
    return submit_stages(client, checked, job_id, plans, bindings)


def submit_stages(
    client: Any,
    spec: JobSpec,
    job_id: str,
    plans: Mapping[str, StagePlan],
    bindings: Mapping[str, list[dict[str, Any]]],
) -> list[Any]:
    """Submit every stage through ``client`` (a Dask client), needs first, as job ``job_id``;
    returns the futures of the stages whose outputs come back (``_kept``). The others are
    dropped on return: Dask keeps what those need."""
    import dask

    needed = {n for s in spec.stages for n in s.needs}
    futures: dict[str, list[Any]] = {}
    collected: dict[str, Any] = {}
    with dask.annotate(**job_annotations(job_id, spec.name, "workflow")):
        for stage in _submission_order(spec):
            inputs: dict[str, Any] = {}
            each = _each(stage)
            streamed = bool(each and stage.map and stage.map.stream)
            count = len(bindings[stage.name])
            per_item: list[dict[str, Any]] = [{} for _ in range(count)]
            for name in stage.needs:
                upstream = futures[name]
                argument = spec.stage(name).argument
                if name == each and stage.map is not None:
                    argument = stage.map.as_name
                    if streamed:  # one to one: item i waits for item i only, no barrier
                        for i, item in enumerate(per_item):
                            item[argument] = upstream[i]
                        continue
                if spec.stage(name).map is None:
                    inputs[argument] = upstream[0]
                elif stage.map is None:
                    inputs[argument] = upstream  # one task: take the list directly
                else:  # every task of a map needs the whole list: gather it once
                    if name not in collected:
                        with dask.annotate(grid_stage=f"{name}-collect"):
                            collected[name] = client.submit(
                                collect, *upstream, key=f"{name}-collect-{job_id}", pure=False
                            )
                    inputs[argument] = collected[name]
            task_inputs = [{**inputs, **item} for item in per_item]
            prefix = f"{stage.name}-{job_id}"
            keys: list[Any] = [(prefix, i) for i in range(count)] if stage.map else [prefix]
            annotations: dict[str, Any] = {STAGE_ANNOTATION: stage.name}
            where = requirement_text(stage)
            if where:
                annotations[WHERE_ANNOTATION] = where
            if _kept(stage, needed):
                annotations[HOLD_ANNOTATION] = True
            if stage.replicas > 1:
                annotations[REPLICAS_ANNOTATION] = stage.replicas
            if streamed:
                annotations[EACH_ANNOTATION] = f"{each}-{job_id}"
            if stage.fail == "job":
                annotations[FAIL_ANNOTATION] = "job"
            if stage.retries is not None:  # given: a lost node counts as a try too
                annotations[RETRIES_ANNOTATION] = stage.retries
            task = (plans[stage.name], bindings[stage.name], task_inputs)
            futures[stage.name] = _map_stage(client, stage, task, keys, annotations)
            # Replicas: copy j of task i is ("<stage>-<job>-replica<j>", i); the portal runs
            # the copies on different nodes and compares them before anything uses copy 0.
            for j in range(1, stage.replicas):
                marks = {STAGE_ANNOTATION: f"{stage.name}-replica{j}", REPLICA_ANNOTATION: j}
                if where:
                    marks[WHERE_ANNOTATION] = where
                if stage.retries is not None:
                    marks[RETRIES_ANNOTATION] = stage.retries
                _map_stage(client, stage, task, [copy_key(k, j) for k in keys], marks)
    return [f for s in spec.stages if _kept(s, needed) for f in futures[s.name]]


def _map_stage(
    client: Any,
    stage: StageSpec,
    task: tuple[StagePlan, list[dict[str, Any]], list[dict[str, Any]]],
    keys: list[Any],
    annotations: dict[str, Any],
) -> list[Any]:
    """The stage's tasks (or one copy of them), under ``keys``, annotated: one future each.
    ``task``: the stage's plan, each task's bindings and each task's inputs."""
    import dask  # here, not at the top: importing this module stays free of Dask

    plan, bindings, inputs = task
    with dask.annotate(**annotations):
        return client.map(
            run_task,
            [plan] * len(keys),
            [TaskId(str(k), i if stage.map else None) for i, k in enumerate(keys)],
            bindings,
            inputs,
            key=keys,
            resources=stage.requirement().resources(),
            retries=stage.retries or None,
            priority=stage.priority,
            pure=False,
        )


def _kept(stage: StageSpec, needed: set[str]) -> bool:
    """Whose outputs come back: the last stages, and every stage that declares output files."""
    return stage.name not in needed or bool(stage.outputs)


def _submission_order(spec: JobSpec) -> list[StageSpec]:
    """Needs first; among stages free to go, higher ``priority`` first, then file order.

    Fair share tags a user's tasks in the order they arrive, so this order is the order in
    which a workflow's independent stages get the user's share of the grid.
    """
    import heapq

    position = {s.name: i for i, s in enumerate(spec.stages)}
    waiting = {s.name: set(s.needs) for s in spec.stages}
    ready = [(-s.priority, position[s.name]) for s in spec.stages if not s.needs]
    heapq.heapify(ready)
    order: list[StageSpec] = []
    while ready:
        _, i = heapq.heappop(ready)
        stage = spec.stages[i]
        order.append(stage)
        for other in spec.stages:
            if stage.name in waiting[other.name]:
                waiting[other.name].discard(stage.name)
                if not waiting[other.name]:
                    heapq.heappush(ready, (-other.priority, position[other.name]))
    return order


# --- a %%grid --bg cell, again ----------------------------------------------------------------


def resubmit_kept_cell(client: Any, job_id: str, name: str, kept: Mapping[str, Any]) -> Any:
    """Run a --bg cell again from what its job kept at the portal (``CellRun.kept_spec``),
    under its own job id, through ``client``: the portal does this after a restart. As
    before, the node keeps the result at the portal; nothing streams (the kernel that
    listened is gone). A sandboxed node cannot keep it (its task process has no way to the
    portal) and the kernel that would have kept it instead no longer waits on this task, so
    the portal also holds the task's result (as it holds a workflow's outputs) until
    ``jobs.cell.fetch_kept`` moves it to the ledger. Waits for a node rather than refusing:
    volunteers rejoin a restarted portal by themselves. Returns the task's future."""
    import dask

    from grid_portal.jobs.cell_task import run_cell_task
    from grid_portal.model import Requirement
    from grid_portal.requirements import compile_requirement
    from grid_portal.units import parse_size

    payload = base64.b64decode(kept["payload"])
    request = {**kept["request"], "channel": None, "job_id": job_id, "keep": True}
    options = kept["options"]
    memory = options.get("memory")
    requirement = Requirement(
        cpus=options.get("cpus", 1),
        gpus=options.get("gpus", 0),
        memory=parse_size(memory) if memory is not None else None,
    )
    annotations = {
        **job_annotations(job_id, name, "cell"),
        HOLD_ANNOTATION: True,
        STAGE_ANNOTATION: "cell",
    }
    extra: dict[str, Any] = {}
    if options.get("where"):
        annotations[WHERE_ANNOTATION] = compile_requirement(options["where"]).text
    elif options.get("workers") is not None:  # kept before cells were placed by the portal
        extra.update(workers=list(options["workers"]), allow_other_workers=False)
    if options.get("retries") is not None:  # given (0 too): a lost node counts as a try
        extra["retries"] = int(options["retries"])
        annotations[RETRIES_ANNOTATION] = int(options["retries"])
    with dask.annotate(**annotations):
        return client.submit(
            run_cell_task,
            payload,
            request,
            key=f"grid-cell-{job_id}-0",
            resources=requirement.resources(),
            pure=False,
            **extra,
        )
