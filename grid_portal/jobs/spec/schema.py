"""The limits on a job spec, its name patterns, and its published JSON Schema (draft 2020-12)."""

from __future__ import annotations

import copy
import functools
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import jsonschema


# Limits on hostile or runaway input, all checked before any work is created.
MAX_DOCUMENT_BYTES = 1_000_000  # the spec as text (or its rough JSON size, for a dict)
MAX_DEPTH = 32  # nesting of mappings and lists, params included
MAX_VALUES = 1_000_000  # values visited; YAML aliases count each time they are used
MAX_STAGES = 1_000
MAX_TASKS = 100_000  # tasks in one job, after expanding every map
MAX_PROBLEMS = 100  # stop collecting after this many; nobody reads more
MAX_REPLICAS = 5  # copies of each task, each on its own node (replicas: 2 is the usual)
_MAX_INT = 2**63  # larger integers are refused: they are never meant and break reprs

_MAP_KINDS = ("over", "range", "grid", "files", "each")

# --- patterns (ECMA-262 compatible, as JSON Schema requires) ------------------------------------

_DOTTED = r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*"
JOB_NAME_PATTERN = r"^[A-Za-z0-9_.-]([A-Za-z0-9_. -]{0,98}[A-Za-z0-9_.-])?$"
STAGE_NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_-]{0,63}$"
IDENTIFIER_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]{0,63}$"
RUN_PATTERN = rf"^({_DOTTED}:{_DOTTED}|[^:]+\.py(:{_DOTTED})?)$"

_RUN_HINT = (
    "write 'module:function' (like mypkg.sim:run), 'path/to/file.py', "
    "'path/to/file.py:function' or {shell: 'command {placeholder}'}"
)
_PATTERN_HINTS = {
    JOB_NAME_PATTERN: "use 1-100 letters, digits, spaces, '_', '.' or '-' (no space at either end)",
    STAGE_NAME_PATTERN: "start with a letter or '_', then up to 63 letters, digits, '_' or '-'",
    IDENTIFIER_PATTERN: "use a Python name: letters, digits and '_', not starting with a digit",
    RUN_PATTERN: _RUN_HINT,
}


# --- the JSON Schema ----------------------------------------------------------------------------


def _size_schema(what: str) -> dict[str, Any]:
    return {
        "description": f"{what}: bytes as an integer, or a size such as '512MB', '16GB' or '1.5GiB'.",
        "type": ["string", "integer"],
        "minimum": 0,
        "minLength": 1,
        "maxLength": 32,
    }


_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "Grid Portal job",
    "description": (
        "A multi-stage workflow for Grid Portal. Each stage runs a Python function, a Python "
        "file or a shell command, optionally once per item of a map, and may need the outputs "
        "of other stages."
    ),
    "type": "object",
    "required": ["name", "stages"],
    "additionalProperties": False,
    "properties": {
        "name": {
            "description": "The job's name, shown in job lists: 1-100 letters, digits, spaces, '_', '.' or '-'.",
            "type": "string",
            "pattern": JOB_NAME_PATTERN,
        },
        "priority": {
            "description": "Default priority of every stage (higher runs first among your own jobs); a stage may set its own.",
            "type": "integer",
            "minimum": -1_000_000,
            "maximum": 1_000_000,
            "default": 0,
        },
        "replicas": {
            "description": f"Default replicas of every stage (a stage may set its own): run each task this many times, each copy on a different node, and compare the results. 1 to {MAX_REPLICAS}.",
            "type": "integer",
            "minimum": 1,
            "maximum": MAX_REPLICAS,
            "default": 1,
        },
        "stages": {
            "description": f"The stages, as a list; each has a unique name. Order does not matter: 'needs' decides it. At most {MAX_STAGES:,}.",
            "type": "array",
            "minItems": 1,
            "maxItems": MAX_STAGES,
            "items": {"$ref": "#/$defs/stage"},
        },
    },
    "$defs": {
        "stage": {
            "description": "One step of the workflow.",
            "type": "object",
            "required": ["name", "run"],
            "additionalProperties": False,
            "properties": {
                "name": {
                    "description": "Unique stage name; stages that need this one receive its outputs as a keyword argument of this name, with '-' turned into '_'.",
                    "type": "string",
                    "pattern": STAGE_NAME_PATTERN,
                },
                "run": {"$ref": "#/$defs/run"},
                "params": {
                    "description": "Keyword arguments for the function (or placeholders for a shell command, --name=value options for a script); any JSON values.",
                    "type": "object",
                },
                "args": {
                    "description": "Positional arguments for the function or script; not allowed for a shell command.",
                    "type": "array",
                },
                "map": {"$ref": "#/$defs/map"},
                "needs": {
                    "description": "Names of the stages that must finish first; their outputs are passed to this stage as keyword arguments named after them.",
                    "type": "array",
                    "maxItems": MAX_STAGES,
                    "items": {
                        "description": "The name of another stage of this job.",
                        "type": "string",
                        "pattern": STAGE_NAME_PATTERN,
                    },
                },
                "resources": {"$ref": "#/$defs/resources"},
                "where": {
                    "description": "A requirement expression that a node must satisfy, such as 'gpu.capability >= 8.0'.",
                    "type": "string",
                    "minLength": 1,
                    "maxLength": 2000,
                },
                "retries": {
                    "description": "How many times a task is tried again (on any node) before it fails, whether it failed or its node was lost while running it. Not given: a failed task is not tried again, and a task whose node is lost runs again elsewhere (Dask's rule).",
                    "type": "integer",
                    "minimum": 0,
                    "maximum": 100,
                },
                "timeout": {
                    "description": "Longest time one task may run, as seconds or a duration such as '90s', '10m' or '1h30m'.",
                    "type": ["string", "number"],
                    "exclusiveMinimum": 0,
                    "minLength": 1,
                    "maxLength": 32,
                },
                "priority": {
                    "description": "This stage's priority; defaults to the job's.",
                    "type": "integer",
                    "minimum": -1_000_000,
                    "maximum": 1_000_000,
                },
                "outputs": {
                    "description": "Glob patterns, relative to the task's working folder, of files a shell or file stage produces; the matching files are brought back and become the stage's outputs.",
                    "type": "array",
                    "maxItems": 100,
                    "items": {
                        "description": "A relative glob pattern such as 'out/*.mkv'.",
                        "type": "string",
                        "minLength": 1,
                        "maxLength": 1000,
                    },
                },
                "replicas": {
                    "description": f"Run each task of this stage this many times, each copy on a different node, and compare the results: when copies differ (a faulty or dishonest node) the job fails, naming the nodes. Defaults to the job's (1: once). 1 to {MAX_REPLICAS}.",
                    "type": "integer",
                    "minimum": 1,
                    "maximum": MAX_REPLICAS,
                },
                "fail": {
                    "description": "What a failed task (after its retries) fails: 'item' (default), only its own item's chain through the stages that map over this one with 'each'; or 'job', the whole job at once.",
                    "enum": ["item", "job"],
                    "default": "item",
                },
            },
        },
        "run": {
            "description": "What the stage runs: 'module:function', 'path/to/file.py' (run as a script), 'path/to/file.py:function', or {shell: 'command'}.",
            "anyOf": [
                {
                    "description": "A Python function ('module:function' or 'file.py:function') or a Python script ('file.py'); file paths are relative to the spec's folder.",
                    "type": "string",
                    "maxLength": 1000,
                    "pattern": RUN_PATTERN,
                },
                {
                    "description": "A shell command.",
                    "type": "object",
                    "required": ["shell"],
                    "additionalProperties": False,
                    "properties": {
                        "shell": {
                            "description": "The command line; {name} placeholders are replaced by shell-quoted params, the map item and needed stages' outputs.",
                            "type": "string",
                            "minLength": 1,
                            "maxLength": 100_000,
                        }
                    },
                },
            ],
        },
        "map": {
            "description": "Fan-out: one task per item. Give exactly one of over, range, grid, files or each.",
            "type": "object",
            "additionalProperties": False,
            "oneOf": [{"required": [kind]} for kind in _MAP_KINDS],
            "properties": {
                "over": {
                    "description": "A list of items, any JSON values.",
                    "type": "array",
                    "minItems": 1,
                },
                "range": {
                    "description": "Integers from start (default 0) up to but not including stop, by step (default 1), like Python's range().",
                    "type": "object",
                    "required": ["stop"],
                    "additionalProperties": False,
                    "properties": {
                        "start": {"description": "First integer (default 0).", "type": "integer"},
                        "stop": {"description": "End, not included.", "type": "integer"},
                        "step": {
                            "description": "Increment, not 0; negative counts down (default 1).",
                            "type": "integer",
                            "not": {"const": 0},
                        },
                    },
                },
                "grid": {
                    "description": "Parameter lists; one task per combination (cartesian product), each passed as keyword arguments named by the keys.",
                    "type": "object",
                    "minProperties": 1,
                    "maxProperties": 64,
                    "propertyNames": {"pattern": IDENTIFIER_PATTERN},
                    "additionalProperties": {"type": "array", "minItems": 1},
                },
                "files": {
                    "description": "One task per file matching a glob pattern, relative to the spec's folder ('**' matches any depth).",
                    "type": "object",
                    "required": ["glob"],
                    "additionalProperties": False,
                    "properties": {
                        "glob": {
                            "description": "A glob pattern such as 'inputs/*.mp4'.",
                            "type": "string",
                            "minLength": 1,
                            "maxLength": 4096,
                        }
                    },
                },
                "each": {
                    "description": "One task per item of another map stage (named here, and needed by this one): item i of this stage receives the output of item i of that stage and starts as soon as that item is done (a pipeline).",
                    "type": "string",
                    "pattern": STAGE_NAME_PATTERN,
                },
                "stream": {
                    "description": "With each: true (default) starts item i as soon as item i of the other stage is done; false waits for all of that stage first (a barrier between the stages).",
                    "type": "boolean",
                    "default": True,
                },
                "as": {
                    "description": "The keyword argument (or shell placeholder) the item is passed as; default 'item' (with each: the other stage's name, '-' as '_'). Not used with grid.",
                    "type": "string",
                    "pattern": IDENTIFIER_PATTERN,
                },
            },
        },
        "resources": {
            "description": "What one task of this stage needs from a node.",
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "cpus": {
                    "description": "CPU cores (may be fractional); default 1.",
                    "type": "number",
                    "minimum": 0,
                    "maximum": 4096,
                },
                "gpus": {
                    "description": "GPUs (may be fractional); default 0.",
                    "type": "number",
                    "minimum": 0,
                    "maximum": 1024,
                },
                "memory": _size_schema("Memory"),
                "gpu_memory": _size_schema("Memory on each GPU; needs gpus > 0"),
            },
        },
    },
}


def job_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of a job spec; a fresh copy the caller may change."""
    return copy.deepcopy(_SCHEMA)


@functools.cache
def _validator() -> jsonschema.Draft202012Validator:
    # Imported on first use: with its optional format checkers installed, `import jsonschema`
    # can take over a second, and importing this module should stay cheap for the CLI.
    import jsonschema

    return jsonschema.Draft202012Validator(_SCHEMA)


def _resolve_schema(node: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in node:
        node = _SCHEMA["$defs"][node["$ref"].rsplit("/", 1)[1]]
    return node
