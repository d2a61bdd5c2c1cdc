"""Workflows, kernel side: a checked job spec is submitted, its outputs fetched and saved.

Submitting (``submit_workflow``, behind ``Grid.run_workflow`` and ``grid-portal submit``):

1. Everything that can be checked is checked before anything is submitted: the spec
   (``load_spec``), what the stages run (``check_importable``), each ``where`` expression,
   the files of a ``files`` map, and whether any connected node can run each stage at all.
2. The job is registered with its spec (so a restarted portal knows what was asked), then
   each stage, in dependency order, becomes one ``Client.map`` call (``jobs/graph.py``, which
   the portal also uses to submit a kept spec again): one task per map item, keys
   ``("<stage>-<job id>", i)`` (or ``"<stage>-<job id>"`` without a map), annotated with
   the job, the stage and the ``where`` requirement, with the stage's ``resources``,
   ``retries`` and ``priority``. A stage's inputs are the futures of the stages it needs:
   Dask itself orders the work and moves the data.
3. The results of the last stages (those no stage needs) and of every stage that declares
   output files are *held* by the portal (annotation ``grid_hold``), so the job runs to the
   end even when the submitter leaves; ``workflow_outputs`` fetches them later and
   ``release_outputs`` lets them go.

Running on a volunteer is the node side, ``jobs/stage_task.py`` (``run_task``); its names are
also importable from here, as before the split.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from grid_portal.errors import Unsatisfiable
from grid_portal.jobs.graph import (  # noqa: F401 - also importable from here
    EACH_ANNOTATION,
    FAIL_ANNOTATION,
    _submission_order,
    bindings_of,
    check_requirements,
    origin_of,
    requirement_text,
    stage_plan,
    submit_stages,
)
from grid_portal.jobs.spec import JobSpec, SpecError, check_importable, load_spec
from grid_portal.jobs.stage_task import (  # noqa: F401 - also importable from here
    StagedFile,
    StagePlan,
    TaskFailed,
    TaskId,
    _Placer,
    _short,
    collect,
    run_task,
)
from grid_portal.units import counted

if TYPE_CHECKING:
    from distributed import Future

    from grid_portal.model import Job


class WorkflowClient(Protocol):
    """What a workflow's kernel side needs of its client (a ``grid_portal.Grid``, whose
    methods these are). The client imports this module; naming what it needs of the client
    here, rather than the class, keeps that arrow one way."""

    @property
    def client(self) -> Any: ...

    def require(
        self,
        where: str | None,
        resources: Mapping[str, float] | None = None,
        asked: str | None = None,
    ) -> list[str]: ...

    def register_job(
        self, job_id: str, name: str, kind: str, spec: dict[str, Any] | None = None
    ) -> Job: ...

    def wait(
        self,
        job_id: str,
        *,
        futures: Iterable[Future] = (),
        progress: Callable[[Job], None] | None = None,
        timeout: float | None = None,
    ) -> Job | None: ...

    def get_job(self, job_id: str) -> Job | None: ...

    def held_keys(self, job_id: str) -> dict[str, list[Any]]: ...

    def held_results(
        self, job_id: str, *, data_only: bool = False, timeout: float = 60.0
    ) -> dict[str, list[tuple[int | None, Any, BaseException | None]]]: ...

    def release_held(self, job_id: str) -> bool: ...


def save_outputs(outputs: Mapping[str, Any], dest: str | Path) -> list[Path]:
    """Write every StagedFile in ``outputs`` under ``dest`` (checksums verified); returns the paths."""
    placer = _Placer(Path(dest))
    Path(dest).mkdir(parents=True, exist_ok=True)
    written: list[Path] = []

    def walk(value: Any) -> None:
        if isinstance(value, StagedFile):
            written.append(placer.root / placer.place(value))
        elif isinstance(value, (list, tuple)):
            for v in value:
                walk(v)
        elif isinstance(value, dict):
            for v in value.values():
                walk(v)

    for value in outputs.values():
        walk(value)
    return written


# --- submitting ----------------------------------------------------------------------------------


def load_workflow(
    spec: JobSpec | str | Path | Mapping[str, Any], overrides: Iterable[str] = ()
) -> JobSpec:
    """The checked spec, or SpecError listing every problem (nothing is submitted)."""
    if isinstance(spec, JobSpec):
        overrides = list(overrides)
        if overrides:
            spec = load_spec(spec.to_dict(), overrides, base_dir=spec.base_dir)
    else:
        spec = load_spec(spec, overrides)
    problems = check_importable(spec) + check_requirements(spec)
    if problems:
        raise SpecError(problems)
    return spec


def check_nodes(grid: WorkflowClient, spec: JobSpec) -> None:
    """Refuse a stage that no connected node could run (Unsatisfiable names the closest ones)."""
    for stage in spec.stages:
        asked = f"where {stage.where!r}" if stage.where else "its resources"
        try:
            grid.require(requirement_text(stage), stage.requirement().resources(), asked)
        except Unsatisfiable as exc:
            exc.args = (f"{origin_of(stage)} ({stage.name}): {exc}",)
            raise


def submit_workflow(
    grid: WorkflowClient,
    spec: JobSpec | str | Path | Mapping[str, Any],
    overrides: Iterable[str] = (),
    *,
    wait: bool = False,
    wait_for_nodes: bool = False,
    job_id: str | None = None,
    progress: Callable[[Job], None] | None = None,
) -> Job:
    """Check and submit a workflow; returns its Job (finished when ``wait``)."""
    from grid_portal.model import new_job_id

    spec = load_workflow(spec, overrides)
    job_id = job_id or new_job_id()
    plans = {s.name: stage_plan(job_id, s, spec) for s in spec.stages}
    bindings = {s.name: bindings_of(s, spec) for s in spec.stages}
    if not wait_for_nodes:
        check_nodes(grid, spec)
    kept = _register_and_submit(grid, spec, job_id, plans, bindings)
    if wait:
        grid.wait(job_id, futures=kept, progress=progress)
    del kept  # the portal holds them for the owner; let go of our references
    job = grid.get_job(job_id)
    assert job is not None
    return job


def _register_and_submit(
    grid: WorkflowClient,
    spec: JobSpec,
    job_id: str,
    plans: Mapping[str, StagePlan],
    bindings: Mapping[str, list[dict[str, Any]]],
) -> list[Future]:
    # The spec is kept with the job: a restarted portal submits it again (jobs/graph.py).
    grid.register_job(job_id, spec.name, "workflow", spec=spec.to_dict())
    return submit_stages(grid.client, spec, job_id, plans, bindings)


# --- results -------------------------------------------------------------------------------------


def held_outputs(grid: WorkflowClient, job_id: str) -> dict[str, list[Any]]:
    """The keys of a workflow's held outputs by stage (``Grid.held_keys``)."""
    return grid.held_keys(job_id)  # NotFound, UsageError


def workflow_outputs(grid: WorkflowClient, job_id: str, *, partial: bool = False) -> dict[str, Any]:
    """A workflow's kept outputs (last stages, stages with output files), by stage; a map
    stage's as a list in map order.

    Raises the task's error when one failed, unless ``partial``: then the items that
    succeeded are there and a failed item's place holds its error (an exception; see
    :func:`failed_items`). GridError when the job has no held outputs (not a workflow, not
    yours, already fetched and released, or expired).
    """
    out: dict[str, Any] = {}
    for stage, items in grid.held_results(job_id).items():
        values = []
        for _, value, error in items:
            if error is not None and not partial:
                raise error
            values.append(value if error is None else error)
        out[stage] = values if items and items[0][0] is not None else values[0]
    return out


def failed_items(outputs: Mapping[str, Any]) -> dict[str, dict[int | None, BaseException]]:
    """In ``workflow_outputs(..., partial=True)``: each stage's failed items and their
    errors (item None: the stage's one task)."""
    failed: dict[str, dict[int | None, BaseException]] = {}
    for stage, value in outputs.items():
        items = enumerate(value) if isinstance(value, list) else [(None, value)]
        for item, v in items:
            if isinstance(v, BaseException):
                failed.setdefault(stage, {})[item] = v
    return failed


def release_outputs(grid: WorkflowClient, job_id: str) -> bool:
    """Let the portal drop a workflow's held outputs (after they were fetched)."""
    return grid.release_held(job_id)


def describe_outputs(outputs: Mapping[str, Any], limit: int = 200) -> list[str]:
    """One line per stage for terminals: files are counted, values shown short."""
    lines = []
    for stage, value in outputs.items():
        files = [v for v in _iter_files(value)]
        if files:
            total = sum(f.size for f in files)
            lines.append(f"{stage}: {counted(len(files), 'file')}, {total:,} bytes")
        else:
            lines.append(f"{stage}: {_short(repr(value), limit)}")
    return lines


def _iter_files(value: Any) -> Iterable[StagedFile]:
    if isinstance(value, StagedFile):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _iter_files(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _iter_files(v)
