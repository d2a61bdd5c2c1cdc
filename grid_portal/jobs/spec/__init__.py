"""The job format: multi-stage workflows written as YAML or JSON, with a published JSON Schema.

A job file names stages; each stage runs a Python function, a Python file or a shell command,
optionally fanned out over a list, a range, a parameter grid or a folder of files, and may need
the outputs of other stages. ``load_spec`` turns a file, text or dict into a checked ``JobSpec``;
``grid_portal.jobs.workflow`` turns that into a Dask graph.

Why so defensive: a job spec may come from anyone who can reach the portal (REST, CLI), and it
is checked before any work exists. Size, nesting depth, stage count and the number of tasks a
map expands to are all bounded, and map sizes are computed arithmetically, so a
``range: {stop: 1000000000000}`` is refused at once instead of filling memory.

The package, by concern: ``schema`` (limits, patterns, the JSON Schema), ``problems``
(``SpecError`` and its wording), ``reading`` (file/text/dict to bounded plain values),
``overrides`` (``--set``), ``validation`` (schema errors as readable problems), ``model`` (the
dataclasses), ``build`` (document to ``JobSpec``; ``load_spec``) and ``checks`` (importing what a
stage runs). Import the public names from here.

No Dask imports here (docs/architecture.md, rules): this package is imported by the CLI, the REST
handlers and the portal alike, and must stay cheap.
"""

from grid_portal.jobs.spec.build import load_spec
from grid_portal.jobs.spec.checks import check_importable, resolve_callable
from grid_portal.jobs.spec.model import JobSpec, MapSpec, Resources, RunTarget, StageSpec
from grid_portal.jobs.spec.problems import SpecError, SpecProblem
from grid_portal.jobs.spec.schema import (
    MAX_DEPTH,
    MAX_DOCUMENT_BYTES,
    MAX_REPLICAS,
    MAX_STAGES,
    MAX_TASKS,
    job_schema,
)

__all__ = [
    "MAX_DEPTH",
    "MAX_DOCUMENT_BYTES",
    "MAX_REPLICAS",
    "MAX_STAGES",
    "MAX_TASKS",
    "JobSpec",
    "MapSpec",
    "Resources",
    "RunTarget",
    "SpecError",
    "SpecProblem",
    "StageSpec",
    "check_importable",
    "job_schema",
    "load_spec",
    "resolve_callable",
]
