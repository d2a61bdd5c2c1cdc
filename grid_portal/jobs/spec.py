"""The job format: multi-stage workflows written as YAML or JSON, with a published JSON Schema.

A job file names stages; each stage runs a Python function, a Python file or a shell command,
optionally fanned out over a list, a range, a parameter grid or a folder of files, and may need
the outputs of other stages. ``load_spec`` turns a file, text or dict into a checked ``JobSpec``;
``grid_portal.jobs.workflow`` turns that into a Dask graph.

Why so defensive: a job spec may come from anyone who can reach the portal (REST, CLI), and it
is checked before any work exists. Size, nesting depth, stage count and the number of tasks a
map expands to are all bounded, and map sizes are computed arithmetically, so a
``range: {stop: 1000000000000}`` is refused at once instead of filling memory.

No Dask imports here (docs/architecture.md, rules): this module is imported by the CLI, the REST handlers and
the portal alike, and must stay cheap.
"""

from __future__ import annotations

import ast
import copy
import datetime
import difflib
import functools
import glob
import hashlib
import heapq
import importlib
import importlib.util
import itertools
import json
import keyword
import math
import os
import re
import shlex
import string
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, Literal

import yaml

from grid_portal.errors import UsageError
from grid_portal.model import Requirement
from grid_portal.units import parse_duration, parse_size

if TYPE_CHECKING:
    import jsonschema

__all__ = [
    "MAX_DEPTH",
    "MAX_DOCUMENT_BYTES",
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
                    "description": "How many times a failed task is tried again (on any node) before the stage fails.",
                    "type": "integer",
                    "minimum": 0,
                    "maximum": 100,
                    "default": 0,
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


# --- errors -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SpecProblem:
    """One thing wrong with a spec: where (``stages[2].resources.gpus``) and what."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class SpecError(UsageError):
    """A job spec is wrong; ``problems`` lists every problem found, most basic first."""

    def __init__(self, problems: Sequence[SpecProblem] | str, path: str = "") -> None:
        if isinstance(problems, str):
            problems = [SpecProblem(path, problems)]
        self.problems: list[SpecProblem] = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))

    def __reduce__(self) -> tuple[Any, ...]:
        # Raised on workers and shipped back by Dask: keep the problems through pickling.
        return (type(self), (self.problems,))


def _short(value: Any, limit: int = 60) -> str:
    """A repr for messages, cut short: values come from untrusted documents."""
    try:
        text = repr(value)
    except ValueError:  # an int too long to print
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _join_path(base: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{base}[{key}]"
    if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_-]*", key):
        return f"{base}.{key}" if base else key
    return f"{base}[{_short(key)}]"


def _format_path(parts: Iterable[str | int]) -> str:
    text = ""
    for part in parts:
        text = _join_path(text, part)
    return text


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "text"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, (datetime.date, datetime.time)):
        return "a date or time"
    if isinstance(value, (bytes, bytearray)):
        return "binary data"
    return f"a {type(value).__name__}"


# --- reading and bounding the document ----------------------------------------------------------


class _Abort(Exception):
    """Stop walking a document: a limit was hit, the problem is already recorded."""


class _Walker:
    """Copies a document into plain JSON values, enforcing the limits on the way.

    Walking (rather than trusting the parser) matters: YAML aliases can make a tiny text
    expand into billions of values, or into a structure that contains itself.
    """

    def __init__(self) -> None:
        self.values = 0
        self.size = 0
        self.problems: list[SpecProblem] = []

    def problem(self, path: str, message: str) -> None:
        self.problems.append(SpecProblem(path, message))
        if len(self.problems) >= MAX_PROBLEMS:
            raise _Abort

    def budget(self, path: str, size: int) -> None:
        self.values += 1
        self.size += size
        if self.size > MAX_DOCUMENT_BYTES or self.values > MAX_VALUES:
            self.problems.append(
                SpecProblem(
                    path,
                    f"the job spec is too large (more than {MAX_DOCUMENT_BYTES:,} bytes or "
                    f"{MAX_VALUES:,} values); pass big data as files, not inside the spec",
                )
            )
            raise _Abort

    def copy(self, value: Any, path: str, depth: int) -> Any:
        if depth > MAX_DEPTH:
            self.problems.append(
                SpecProblem(path, f"nested more than {MAX_DEPTH} levels deep; flatten it")
            )
            raise _Abort
        # Sizes are roughly what the value takes as JSON text, plus a separator.
        if value is None or isinstance(value, bool):
            self.budget(path, 6)
            return value
        if isinstance(value, int):
            if abs(value) >= _MAX_INT:
                self.budget(path, 20)
                self.problem(path, "integer too large (use fewer than 19 digits)")
                return 0
            self.budget(path, len(str(int(value))) + 1)
            return int(value)
        if isinstance(value, float):
            self.budget(path, len(repr(value)) + 1)
            if not math.isfinite(value):
                self.problem(path, f"{value} is not allowed; use a finite number")
                return 0.0
            return float(value)
        if isinstance(value, str):
            self.budget(path, len(value) + 3)
            return str(value)
        if isinstance(value, Mapping):
            self.budget(path, 2)
            out: dict[str, Any] = {}
            for key, item in value.items():
                if not isinstance(key, str):
                    self.problem(
                        path,
                        f"key {_short(key)} is {_type_name(key)}, not text; quote it",
                    )
                    continue
                self.budget(path, len(key) + 4)
                out[str(key)] = self.copy(item, _join_path(path, key), depth + 1)
            return out
        if isinstance(value, (list, tuple)):
            self.budget(path, 2)
            return [self.copy(item, _join_path(path, i), depth + 1) for i, item in enumerate(value)]
        hint = (
            "; quote it to make it text"
            if isinstance(value, (datetime.date, datetime.time))
            else ""
        )
        self.problem(path, f"{_type_name(value)} is not allowed in a job spec{hint}")
        return None


def _plain(document: Any, origin: str = "") -> Any:
    """The document as plain JSON values within the limits, or SpecError."""
    walker = _Walker()
    try:
        result = walker.copy(document, origin, 0)
    except _Abort:
        pass
    except RecursionError:  # only possible if MAX_DEPTH were raised near Python's own limit
        walker.problems.append(SpecProblem(origin, "nested too deeply"))
    if walker.problems:
        raise SpecError(walker.problems)
    return result


def _reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise SpecError(f"key {_short(key)} appears twice in one mapping; keep one")
        out[key] = value
    return out


def _parse_json(text: str) -> Any:
    try:
        return json.loads(text, object_pairs_hook=_reject_duplicate_keys)
    except json.JSONDecodeError as exc:
        raise SpecError(
            f"not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}"
        ) from None
    except (ValueError, RecursionError) as exc:  # too-long integers, deep nesting
        raise SpecError(f"not valid JSON: {exc}") from None


def _parse_yaml(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        where = ""
        if exc.problem_mark is not None:
            where = f" at line {exc.problem_mark.line + 1}, column {exc.problem_mark.column + 1}"
        what = ": ".join(m for m in (exc.context, exc.problem) if m) or "syntax error"
        raise SpecError(f"not valid YAML: {what}{where}") from None
    except yaml.YAMLError as exc:
        raise SpecError(f"not valid YAML: {exc}") from None
    except RecursionError:
        raise SpecError(f"not valid YAML: nested too deeply (at most {MAX_DEPTH} levels)") from None
    except (ValueError, TypeError, OverflowError) as exc:  # e.g. an integer with 5,000 digits
        raise SpecError(f"not valid YAML: {_short(str(exc), 200)}") from None


def _check_text_size(text: str) -> None:
    if (
        len(text) > MAX_DOCUMENT_BYTES
        or len(text.encode("utf-8", "surrogatepass")) > MAX_DOCUMENT_BYTES
    ):
        raise SpecError(
            f"the job spec is larger than {MAX_DOCUMENT_BYTES:,} bytes; "
            "pass big data as files, not inside the spec"
        )


def _parse_text(text: str, *, json_only: bool = False) -> Any:
    _check_text_size(text)
    if json_only:
        return _parse_json(text)
    if text.lstrip().startswith(("{", "[")):
        # Strict JSON first (it reports duplicate keys); YAML flow style falls through.
        try:
            return json.loads(text, object_pairs_hook=_reject_duplicate_keys)
        except SpecError:
            raise
        except (ValueError, RecursionError):
            pass
    return _parse_yaml(text)


def _read_file(path: Path) -> str:
    data = b""
    try:
        size = path.stat().st_size
        if size <= MAX_DOCUMENT_BYTES:  # checked first: a huge file is never read
            with path.open("rb") as f:
                data = f.read(MAX_DOCUMENT_BYTES + 1)
    except FileNotFoundError:
        raise SpecError(f"no such job file: {path}") from None
    except IsADirectoryError:
        raise SpecError(f"{path} is a folder; give the job file (.yaml, .yml or .json)") from None
    except (OSError, ValueError) as exc:
        raise SpecError(f"cannot read job file {path}: {exc}") from None
    if size > MAX_DOCUMENT_BYTES or len(data) > MAX_DOCUMENT_BYTES:
        raise SpecError(
            f"{path} is {max(size, len(data)):,} bytes; a job spec may be at most {MAX_DOCUMENT_BYTES:,}"
        )
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise SpecError(f"{path} is not UTF-8 text (byte {exc.start}); save it as UTF-8") from None


def _looks_like_path(source: str) -> bool:
    if "\n" in source or len(source) > 4096:
        return False
    if source.strip().lower().endswith((".yaml", ".yml", ".json")):
        return True
    try:
        return os.path.isfile(source)
    except (OSError, ValueError):
        return False


def _read_source(source: Any, base_dir: str | Path | None) -> tuple[Any, Path]:
    """(the raw document, the folder relative paths are resolved against)."""
    if isinstance(source, str) and _looks_like_path(source):
        source = Path(source.strip())
    if isinstance(source, Path):
        text = _read_file(source)
        folder = Path(base_dir) if base_dir is not None else source.parent
        return _parse_text(text, json_only=source.suffix.lower() == ".json"), folder.absolute()
    folder = Path(base_dir).absolute() if base_dir is not None else Path.cwd()
    if isinstance(source, str):
        return _parse_text(source), folder
    if isinstance(source, Mapping):
        return source, folder
    raise SpecError(
        f"a job spec must be a file path, YAML/JSON text or a dict, not {_type_name(source)}"
    )


# --- overrides ----------------------------------------------------------------------------------


def _split_override_key(key: str) -> list[str | int]:
    parts: list[str | int] = []
    for chunk in key.split("."):
        match = re.fullmatch(r"([^\[\]]*)((?:\[-?[0-9]+\])*)", chunk)
        if not match or (not match.group(1) and not match.group(2)):
            raise ValueError(chunk)
        if match.group(1):
            parts.append(
                int(match.group(1)) if re.fullmatch(r"-?[0-9]+", match.group(1)) else match.group(1)
            )
        parts.extend(int(i) for i in re.findall(r"\[(-?[0-9]+)\]", match.group(2)))
    return parts


def _resolve_schema(node: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in node:
        node = _SCHEMA["$defs"][node["$ref"].rsplit("/", 1)[1]]
    return node


def _child_schema(
    node: dict[str, Any] | None, key: str | int
) -> tuple[bool, dict[str, Any] | None]:
    """(is the key allowed here, the schema below it or None when unknown)."""
    if node is None:
        return True, None
    node = _resolve_schema(node)
    if isinstance(key, int):
        items = node.get("items")
        return True, items if isinstance(items, dict) else None
    branches = [_resolve_schema(b) for b in node.get("anyOf", [])] or [node]
    for branch in branches:
        props = branch.get("properties", {})
        if key in props:
            return True, props[key]
        extra = branch.get("additionalProperties", True)
        if extra is not False:
            return True, extra if isinstance(extra, dict) else None
    return False, None


def _known_fields(node: dict[str, Any]) -> list[str]:
    node = _resolve_schema(node)
    names: list[str] = []
    for branch in [_resolve_schema(b) for b in node.get("anyOf", [])] or [node]:
        names.extend(branch.get("properties", {}))
    return names


def _apply_override(doc: dict[str, Any], text: str) -> None:
    if not isinstance(text, str) or "=" not in text:
        raise SpecError(
            f"--set {_short(text)}: write key=value, like stages.simulate.params.steps=2000"
        )
    key, _, raw_value = text.partition("=")
    key = key.strip()
    label = f"--set {key}"
    try:
        parts = _split_override_key(key)
    except ValueError:
        raise SpecError(
            f"{label}: not a dotted path; write it like name=x or stages.simulate.retries=3"
        ) from None
    _check_text_size(raw_value)
    try:
        value = yaml.safe_load(raw_value) if raw_value.strip() else ""
    except (yaml.YAMLError, ValueError, TypeError, OverflowError, RecursionError):
        raise SpecError(
            f"{label}: cannot read the value {_short(raw_value)}; quote text that contains ':', '#' or '{{'"
        ) from None
    value = _plain(value, key)

    node: Any = doc
    schema: dict[str, Any] | None = _SCHEMA
    done = ""
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if done == "stages" and isinstance(node, list) and isinstance(part, str):
            # Stages are addressed by name: stages.simulate.params.steps
            names = [s.get("name") if isinstance(s, dict) else None for s in node]
            if part not in names:
                known = ", ".join(str(n) for n in names if n is not None) or "none"
                raise SpecError(f"{label}: no stage named {part!r}; stages are: {known}")
            part = names.index(part)
        if isinstance(node, list):
            if not isinstance(part, int):
                raise SpecError(f"{label}: {done or 'the spec'} is a list; use an index like [0]")
            if not -len(node) <= part < len(node):
                raise SpecError(f"{label}: {done} has {len(node)} items; no item [{part}]")
            part = part % len(node)
        elif isinstance(node, dict):
            if isinstance(part, int):
                raise SpecError(f"{label}: {done or 'the spec'} is a mapping, not a list")
            allowed, _ = _child_schema(schema, part)
            if not allowed:
                raise SpecError(
                    f"{label}: unknown field {part!r} in {done or 'the spec'}"
                    f"{_suggest(part, _known_fields(schema or {}))}"
                )
        else:
            raise SpecError(f"{label}: {done} is {_type_name(node)}, so it has no {part!r}")
        _, schema = _child_schema(schema, part)
        if last:
            node[part] = value
        else:
            if isinstance(node, dict) and part not in node:
                node[part] = {}  # e.g. --set stages.a.resources.gpus=1 with no resources yet
            node = node[part]
        done = _join_path(done, part)


def _did_you_mean(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _suggest(word: str, choices: Iterable[str]) -> str:
    choices = list(choices)
    hint = _did_you_mean(word, choices)
    if hint:
        return hint
    return f"; known fields: {', '.join(choices)}" if choices else ""


# --- schema errors as readable problems ---------------------------------------------------------

_TYPE_WORDS = {
    "string": "text",
    "integer": "an integer",
    "number": "a number",
    "object": "a mapping",
    "array": "a list",
    "boolean": "true or false",
    "null": "null",
}


def _branch_types(schemas: Iterable[dict[str, Any]]) -> list[str]:
    words: list[str] = []
    for sub in schemas:
        types = _resolve_schema(sub).get("type", [])
        for t in [types] if isinstance(types, str) else types:
            if _TYPE_WORDS[t] not in words:
                words.append(_TYPE_WORDS[t])
    return words


def _or(words: Sequence[str]) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " or " + words[-1]


def _schema_problems(error: jsonschema.ValidationError) -> list[SpecProblem]:
    path = list(error.absolute_path)
    where = _format_path(path)
    kind, value, inst = error.validator, error.validator_value, error.instance

    if kind == "required":
        missing = [k for k in value if isinstance(inst, dict) and k not in inst]
        missing = [k for k in missing if error.message.startswith(repr(k))] or missing[:1]
        hint = f" ({_RUN_HINT})" if missing == ["run"] else ""
        return [SpecProblem(_format_path([*path, m]), f"is required{hint}") for m in missing]
    if kind == "additionalProperties":
        known = list(error.schema.get("properties", {}))
        extras = [k for k in inst if k not in known]
        return [
            SpecProblem(_format_path([*path, k]), f"unknown field{_suggest(k, known)}")
            for k in extras
        ]
    if kind == "type":
        types = [value] if isinstance(value, str) else value
        message = f"must be {_or([_TYPE_WORDS[t] for t in types])} (got {_type_name(inst)})"
        if where == "stages" and isinstance(inst, dict):
            message += "; write stages as a list of mappings, each with a name"
        return [SpecProblem(where, message)]
    if kind == "pattern":
        hint = _PATTERN_HINTS.get(value, f"must match {value}")
        if "propertyNames" in error.relative_schema_path:
            return [SpecProblem(where, f"key {_short(inst)}: {hint}")]
        return [SpecProblem(where, f"{_short(inst)} is not allowed: {hint}")]
    if kind in ("anyOf", "oneOf"):
        branches: list[dict[str, Any]] = value
        if all(set(b) == {"required"} for b in branches):
            if not isinstance(inst, dict):
                return []  # the type error beside it says what is wrong
            names = [b["required"][0] for b in branches]
            found = [n for n in names if n in inst]
            if not found:
                return [SpecProblem(where, f"give one of {_or(names)}")]
            return [
                SpecProblem(where, f"give only one of {_or(names)} (found {' and '.join(found)})")
            ]
        # Explain the failure of the branch whose type fits; else say which types fit.
        by_branch: dict[int, list[jsonschema.ValidationError]] = {}
        for sub in error.context or []:
            by_branch.setdefault(sub.relative_schema_path[0], []).append(sub)
        for subs in by_branch.values():
            if not any(s.validator == "type" and not s.relative_path for s in subs):
                return [p for s in subs for p in _schema_problems(s)]
        hint = f"; {_RUN_HINT}" if path and path[-1] == "run" else ""
        return [
            SpecProblem(
                where, f"must be {_or(_branch_types(branches))} (got {_type_name(inst)}){hint}"
            )
        ]
    messages = {
        "minimum": f"must be >= {value}",
        "maximum": f"must be <= {value}",
        "exclusiveMinimum": f"must be > {value}",
        "exclusiveMaximum": f"must be < {value}",
        "minLength": "must not be empty" if value == 1 else f"must be at least {value} characters",
        "minItems": "must not be empty" if value == 1 else f"needs at least {value} items",
        "minProperties": "must not be empty",
        "uniqueItems": "lists the same value more than once",
    }
    if kind in messages:
        return [SpecProblem(where, messages[kind])]
    if kind in ("maxLength", "maxItems", "maxProperties"):
        return [SpecProblem(where, f"has {len(inst):,}; at most {value:,} are allowed")]
    if kind == "not" and isinstance(value, dict) and "const" in value:
        return [SpecProblem(where, f"must not be {json.dumps(value['const'])}")]
    if kind == "enum":
        choices = " or ".join(json.dumps(v) for v in value)
        return [SpecProblem(where, f"must be {choices}, not {_short(json.dumps(inst))}")]
    return [SpecProblem(where, _short(error.message, 200))]


def _sort_key(error: jsonschema.ValidationError) -> tuple[Any, ...]:
    # Best first: the most basic problems (near the top of the document), then document order.
    path = tuple((0, p, "") if isinstance(p, int) else (1, 0, p) for p in error.absolute_path)
    return (len(path), path, error.validator in ("anyOf", "oneOf"))


def _validate(doc: dict[str, Any]) -> None:
    problems: list[SpecProblem] = []
    # A hostile document can hold millions of errors: sort only the first few thousand.
    errors = itertools.islice(_validator().iter_errors(doc), 20 * MAX_PROBLEMS)
    for error in sorted(errors, key=_sort_key):
        for problem in _schema_problems(error):
            if problem not in problems:
                problems.append(problem)
        if len(problems) >= MAX_PROBLEMS:
            break
    if problems:
        raise SpecError(problems)


# --- the parsed model ---------------------------------------------------------------------------


def _as_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return json.dumps(value, default=str)


@dataclass
class RunTarget:
    """What a stage runs.

    kind "function": ``module`` and ``function`` (``mypkg.sim:run``); kind "file": ``path``
    (relative to the spec's folder) and optionally ``function`` (``tools/fit.py:main``; without
    one the file runs as a script); kind "shell": ``command``, a template with ``{name}``
    placeholders.
    """

    kind: Literal["function", "file", "shell"]
    module: str | None = None
    function: str | None = None
    path: str | None = None
    command: str | None = None
    origin: str = field(default="run", repr=False, compare=False)  # for messages: stages[0].run

    @classmethod
    def parse(cls, value: Any, origin: str = "run") -> RunTarget:
        """``"mod:fn"``, ``"file.py"``, ``"file.py:fn"`` or ``{"shell": "..."}`` -> RunTarget."""
        if isinstance(value, Mapping):
            command = value.get("shell")
            if set(value) != {"shell"} or not isinstance(command, str) or not command:
                raise SpecError(f"must be {{shell: 'command'}}; {_RUN_HINT}", origin)
            target = cls("shell", command=command, origin=origin)
            target.placeholders()  # checks the template
            return target
        if not isinstance(value, str) or not re.fullmatch(RUN_PATTERN, value):
            raise SpecError(f"{_short(value)} is not a run target: {_RUN_HINT}", origin)
        head, sep, tail = value.partition(":")
        if head.endswith(".py"):
            return cls("file", path=head, function=tail or None, origin=origin)
        return cls("function", module=head, function=tail, origin=origin)

    def to_value(self) -> str | dict[str, str]:
        """The form written in a spec."""
        if self.kind == "shell":
            return {"shell": self.command or ""}
        if self.kind == "file":
            return f"{self.path}:{self.function}" if self.function else str(self.path)
        return f"{self.module}:{self.function}"

    def __str__(self) -> str:
        value = self.to_value()
        return value if isinstance(value, str) else f"shell: {value['shell']}"

    def placeholders(self) -> list[str]:
        """The ``{name}`` placeholders of a shell command, in order, each once."""
        if self.kind != "shell":
            return []
        names: list[str] = []
        try:
            parsed = list(string.Formatter().parse(self.command or ""))
        except ValueError as exc:
            raise SpecError(
                f"bad placeholder in the shell command ({exc}); write {{name}}, and {{{{ or }}}} for a literal brace",
                f"{self.origin}.shell",
            ) from None
        for _, name, spec, conversion in parsed:
            if name is None:
                continue
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name) or spec or conversion:
                raise SpecError(
                    f"placeholder {{{name}{'!' + conversion if conversion else ''}{':' + spec if spec else ''}}} "
                    "is not allowed: write a plain {name} (values are inserted as quoted text)",
                    f"{self.origin}.shell",
                )
            if name not in names:
                names.append(name)
        return names

    def render_shell(self, values: Mapping[str, Any]) -> str:
        """The shell command with every placeholder replaced by its shell-quoted value.

        Lists become several quoted words; ``{x_name}`` / ``{x_stem}`` give the file name of
        a path ``x`` with / without its suffix (handy for a ``files`` map).
        """
        out: list[str] = []
        for literal, name, _, _ in string.Formatter().parse(self.command or ""):
            out.append(literal)
            if name is None:
                continue
            if name in values:
                value = values[name]
            else:
                base, _, derived = name.rpartition("_")
                if derived not in ("name", "stem") or base not in values:
                    raise SpecError(f"no value for placeholder {{{name}}}", f"{self.origin}.shell")
                p = PurePosixPath(_as_text(values[base]).replace(os.sep, "/"))
                value = p.name if derived == "name" else p.stem
            if isinstance(value, (list, tuple)):
                out.append(" ".join(shlex.quote(_as_text(v)) for v in value))
            else:
                out.append(shlex.quote(_as_text(value)))
        return "".join(out)

    def script_argv(
        self, values: Mapping[str, Any], args: Sequence[Any] = (), python: str = sys.executable
    ) -> list[str]:
        """The command line of a script stage: ``python file.py ARGS --name=value ...``.

        Text is passed as is; anything else (numbers, lists, mappings) as JSON.
        """
        if self.kind != "file" or self.function:
            raise SpecError(
                "only a 'file.py' target without a function runs as a script", self.origin
            )
        argv = [python, str(self.path), *(_as_text(a) for a in args)]
        argv.extend(f"--{name}={_as_text(value)}" for name, value in values.items())
        return argv


def _range_len(start: int, stop: int, step: int) -> int:
    """len(range(start, stop, step)) without building it (and without len()'s overflow)."""
    if step > 0:
        return max(0, (stop - start + step - 1) // step)
    return max(0, (start - stop - step - 1) // -step)


@dataclass
class MapSpec:
    """A stage's fan-out: one task per item.

    kind "over": the list ``over``; "range": integers ``start``..``stop`` by ``step``;
    "grid": every combination of the lists in ``grid`` (last key varies fastest), each item a
    dict of keyword arguments; "files": sorted paths matching ``glob`` under the spec's folder;
    "each": one item per item of the map stage ``each`` (a pipeline: item i receives that
    stage's item i, as soon as it is done unless ``stream`` is False). An ``each`` map's count
    and items come from the other stage: ask ``JobSpec.count``.
    """

    kind: Literal["over", "range", "grid", "files", "each"]
    over: list[Any] | None = None
    start: int = 0
    stop: int = 0
    step: int = 1
    grid: dict[str, list[Any]] | None = None
    glob: str | None = None
    as_name: str = "item"  # the `as` of the spec
    origin: str = field(default="map", repr=False, compare=False)
    each: str | None = None  # kind "each": the stage whose items this one follows
    stream: bool = True  # kind "each": start item i when item i is done (False: a barrier)

    def count(self, base_dir: str | Path | None = None) -> int:
        """How many tasks this map makes; arithmetic for range and grid, never materialised."""
        if self.kind == "over":
            return len(self.over or [])
        if self.kind == "range":
            return _range_len(self.start, self.stop, self.step)
        if self.kind == "grid":
            return math.prod(len(v) for v in (self.grid or {}).values())
        if self.kind == "each":
            raise ValueError("an 'each' map has as many items as its stage: use JobSpec.count")
        return len(self._files(base_dir))

    def items(self, base_dir: str | Path | None = None) -> Iterator[Any]:
        """The items, lazily where possible (a range or grid is never built in full)."""
        if self.kind == "over":
            yield from self.over or []
        elif self.kind == "range":
            yield from range(self.start, self.stop, self.step)
        elif self.kind == "grid":
            grid = self.grid or {}
            keys = list(grid)
            for combo in itertools.product(*(grid[k] for k in keys)):
                yield dict(zip(keys, combo, strict=True))
        else:
            yield from self._files(base_dir)

    def bind(self, item: Any) -> dict[str, Any]:
        """The keyword arguments one item is passed as."""
        if self.kind == "grid":
            return dict(item)
        return {self.as_name: item}

    def argument_names(self) -> list[str]:
        """The keyword arguments (shell placeholders) this map supplies."""
        if self.kind == "grid":
            return list(self.grid or {})
        names = [self.as_name]
        if self.kind == "files":
            names += [f"{self.as_name}_name", f"{self.as_name}_stem"]
        return names

    def _files(self, base_dir: str | Path | None) -> list[Path]:
        root = Path(base_dir if base_dir is not None else Path.cwd()).absolute()
        pattern = self.glob or ""
        found: list[Path] = []
        try:
            for match in glob.iglob(pattern, root_dir=root, recursive=True):
                path = root / match
                if path.is_file():
                    found.append(path)
                    if len(found) > MAX_TASKS:
                        raise SpecError(
                            f"{pattern!r} matches more than {MAX_TASKS:,} files; narrow the pattern "
                            "or split the job",
                            f"{self.origin}.files.glob",
                        )
        except (OSError, ValueError) as exc:
            raise SpecError(
                f"cannot list {pattern!r} in {root}: {exc}", f"{self.origin}.files.glob"
            ) from None
        return sorted(found)

    def to_dict(self) -> dict[str, Any]:
        if self.kind == "over":
            out: dict[str, Any] = {"over": copy.deepcopy(self.over)}
        elif self.kind == "range":
            out = {"range": {"start": self.start, "stop": self.stop, "step": self.step}}
        elif self.kind == "grid":
            out = {"grid": copy.deepcopy(self.grid)}
        elif self.kind == "each":
            out = {"each": self.each}
            if not self.stream:
                out["stream"] = False
        else:
            out = {"files": {"glob": self.glob}}
        if self.kind != "grid":
            out["as"] = self.as_name
        return out


@dataclass
class Resources:
    """What one task needs from a node; sizes in bytes."""

    cpus: float = 1.0
    gpus: float = 0.0
    memory: int | None = None
    gpu_memory: int | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"cpus": self.cpus, "gpus": self.gpus}
        if self.memory is not None:
            out["memory"] = self.memory
        if self.gpu_memory is not None:
            out["gpu_memory"] = self.gpu_memory
        return out


@dataclass
class StageSpec:
    """One checked stage. ``priority`` already includes the job's default."""

    name: str
    run: RunTarget
    args: list[Any] = field(default_factory=list)
    params: dict[str, Any] = field(default_factory=dict)
    map: MapSpec | None = None
    needs: list[str] = field(default_factory=list)
    resources: Resources = field(default_factory=Resources)
    where: str | None = None
    retries: int = 0
    timeout: float | None = None  # seconds
    priority: int = 0
    outputs: list[str] = field(default_factory=list)
    replicas: int = 1  # copies of each task, on different nodes, compared by the portal
    fail: str = "item"  # "item": a failed task fails its item's chain; "job": the whole job

    @property
    def argument(self) -> str:
        """The keyword argument under which stages that need this one receive its outputs."""
        return _argument_name(self.name)

    def requirement(self) -> Requirement:
        """This stage's needs as the shared model's Requirement, for matching."""
        return Requirement(
            cpus=self.resources.cpus,
            gpus=self.resources.gpus,
            memory=self.resources.memory,
            where=self.where,
        )

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "run": self.run.to_value()}
        if self.args:
            out["args"] = copy.deepcopy(self.args)
        if self.params:
            out["params"] = copy.deepcopy(self.params)
        if self.map is not None:
            out["map"] = self.map.to_dict()
        if self.needs:
            out["needs"] = list(self.needs)
        out["resources"] = self.resources.to_dict()
        if self.where is not None:
            out["where"] = self.where
        out["retries"] = self.retries
        if self.timeout is not None:
            out["timeout"] = self.timeout
        out["priority"] = self.priority
        if self.outputs:
            out["outputs"] = list(self.outputs)
        if self.replicas > 1:
            out["replicas"] = self.replicas
        if self.fail != "item":
            out["fail"] = self.fail
        return out


@dataclass
class JobSpec:
    """A checked job: stages in an order where every stage comes after the stages it needs."""

    name: str
    priority: int = 0
    stages: list[StageSpec] = field(default_factory=list)
    base_dir: Path = field(default_factory=Path.cwd, compare=False)  # relative files start here

    def stage(self, name: str) -> StageSpec:
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise KeyError(name)

    def count(self, stage: StageSpec) -> int:
        """How many tasks ``stage`` makes (an ``each`` map: as many as its stage's)."""
        seen: set[str] = set()
        while stage.map is not None and stage.map.kind == "each" and stage.name not in seen:
            seen.add(stage.name)
            stage = self.stage(str(stage.map.each))
        return stage.map.count(self.base_dir) if stage.map else 1

    def task_count(self) -> int:
        """Tasks in the whole job (globs files for a ``files`` map)."""
        return sum(self.count(s) for s in self.stages)

    def to_dict(self) -> dict[str, Any]:
        """The spec as plain data; ``load_spec(spec.to_dict(), base_dir=...)`` gives it back."""
        return {
            "name": self.name,
            "priority": self.priority,
            "stages": [s.to_dict() for s in self.stages],
        }


def _argument_name(stage_name: str) -> str:
    return stage_name.replace("-", "_")


# --- semantic checks ----------------------------------------------------------------------------


class _Problems(list[SpecProblem]):
    def add(self, path: str, message: str) -> None:
        self.append(SpecProblem(path, message))


def _build_map(raw: dict[str, Any], where: str, problems: _Problems) -> MapSpec | None:
    kind = next(k for k in _MAP_KINDS if k in raw)
    default_as = _argument_name(raw["each"]) if kind == "each" else "item"
    as_name = raw.get("as", default_as)
    if "stream" in raw and kind != "each":
        problems.add(f"{where}.stream", "only used with each; remove 'stream'")
    if kind == "each":
        if not re.fullmatch(IDENTIFIER_PATTERN[:-1] + r"\Z", as_name) or keyword.iskeyword(as_name):
            problems.add(
                f"{where}.as" if "as" in raw else f"{where}.each",
                f"{_short(as_name)} cannot be an argument name: give 'as' a {_PATTERN_HINTS[IDENTIFIER_PATTERN]}, not a Python keyword",
            )
        return MapSpec(
            "each", each=raw["each"], stream=raw.get("stream", True), as_name=as_name, origin=where
        )
    if not re.fullmatch(IDENTIFIER_PATTERN[:-1] + r"\Z", as_name) or keyword.iskeyword(as_name):
        problems.add(
            f"{where}.as",
            f"{_short(as_name)} cannot be an argument name: {_PATTERN_HINTS[IDENTIFIER_PATTERN]}, not a Python keyword",
        )
    if kind == "grid":
        if "as" in raw:
            problems.add(
                f"{where}.as",
                "not used with grid: each grid item's keys are passed as keyword arguments; remove 'as'",
            )
        for key in raw["grid"]:
            if not re.fullmatch(IDENTIFIER_PATTERN[:-1] + r"\Z", key) or keyword.iskeyword(key):
                problems.add(
                    f"{where}.grid",
                    f"key {_short(key)} cannot be an argument name: {_PATTERN_HINTS[IDENTIFIER_PATTERN]}, not a Python keyword",
                )
        return MapSpec("grid", grid=raw["grid"], origin=where)
    if kind == "over":
        return MapSpec("over", over=raw["over"], as_name=as_name, origin=where)
    if kind == "files":
        pattern = raw["files"]["glob"]
        if "\x00" in pattern:
            problems.add(f"{where}.files.glob", "must not contain a NUL character")
        return MapSpec("files", glob=pattern, as_name=as_name, origin=where)
    r = raw["range"]
    spec = MapSpec(
        "range",
        start=r.get("start", 0),
        stop=r["stop"],
        step=r.get("step", 1),
        as_name=as_name,
        origin=where,
    )
    if spec.count() == 0:
        problems.add(
            f"{where}.range",
            f"is empty (start {spec.start}, stop {spec.stop}, step {spec.step}): no task would run",
        )
    return spec


def _parse_size_field(raw: dict[str, Any], key: str, where: str, problems: _Problems) -> int | None:
    if key not in raw:
        return None
    try:
        return parse_size(raw[key])
    except UsageError as exc:
        problems.add(f"{where}.{key}", str(exc))
        return None


def _build_stage(
    raw: dict[str, Any], where: str, job_priority: int, problems: _Problems, job_replicas: int = 1
) -> StageSpec | None:
    name = raw["name"]
    if not re.fullmatch(STAGE_NAME_PATTERN[:-1] + r"\Z", name):  # `$` would let a final newline in
        problems.add(
            f"{where}.name", f"{_short(name)} is not allowed: {_PATTERN_HINTS[STAGE_NAME_PATTERN]}"
        )
    try:
        run = RunTarget.parse(raw["run"], f"{where}.run")
    except SpecError as exc:
        problems.extend(exc.problems)
        return None

    params: dict[str, Any] = raw.get("params", {})
    args: list[Any] = raw.get("args", [])
    outputs: list[str] = raw.get("outputs", [])
    if args and run.kind == "shell":
        problems.add(
            f"{where}.args",
            "a shell command takes no positional args; use params and {name} placeholders",
        )
    if outputs and run.kind == "function":
        problems.add(
            f"{where}.outputs",
            "only shell and file stages declare output files; a function's return value is its output",
        )
    for i, pattern in enumerate(outputs):
        parts = PurePosixPath(pattern.replace("\\", "/")).parts
        if pattern.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", pattern) or ".." in parts:
            problems.add(
                f"{where}.outputs[{i}]",
                f"{_short(pattern)} must stay inside the task's folder: a relative pattern without '..'",
            )

    map_spec = _build_map(raw["map"], f"{where}.map", problems) if "map" in raw else None

    res = raw.get("resources", {})
    resources = Resources(
        cpus=float(res.get("cpus", 1)),
        gpus=float(res.get("gpus", 0)),
        memory=_parse_size_field(res, "memory", f"{where}.resources", problems),
        gpu_memory=_parse_size_field(res, "gpu_memory", f"{where}.resources", problems),
    )
    if resources.gpu_memory is not None and resources.gpus == 0:
        problems.add(
            f"{where}.resources.gpu_memory", "is set but gpus is 0; ask for gpus: 1 (or more)"
        )

    timeout: float | None = None
    if "timeout" in raw:
        try:
            timeout = parse_duration(raw["timeout"])
        except UsageError as exc:
            problems.add(f"{where}.timeout", str(exc))
        else:
            if timeout <= 0:
                problems.add(f"{where}.timeout", "must be more than 0 seconds")

    # Names that reach the function (or command): they must not collide.
    sources: dict[str, str] = {key: f"{where}.params.{key}" for key in params}
    supplied = map_spec.argument_names() if map_spec else []
    for arg in supplied:
        if arg in sources:
            problems.add(
                sources[arg],
                f"{arg!r} is also supplied by the map ({where}.map); set it in one place",
            )
        sources.setdefault(arg, f"{where}.map")
    each = map_spec.each if map_spec is not None and map_spec.kind == "each" else None
    for i, need in enumerate(raw.get("needs", [])):
        arg = _argument_name(need)
        if need == each:
            continue  # its items arrive one by one, under the map's `as`
        if need in raw["needs"][:i]:
            problems.add(f"{where}.needs[{i}]", f"{need!r} is listed twice; list each stage once")
            continue
        if arg in sources:
            problems.add(
                f"{where}.needs[{i}]",
                f"the outputs of {need!r} arrive as argument {arg!r}, which {sources[arg]} also sets; rename one",
            )
        sources.setdefault(arg, f"{where}.needs[{i}]")
    if run.kind == "shell":
        for placeholder in run.placeholders():
            if placeholder not in sources:
                known = ", ".join("{" + s + "}" for s in sources) or "none (set values in params)"
                problems.add(
                    f"{where}.run.shell", f"unknown placeholder {{{placeholder}}}; known: {known}"
                )

    return StageSpec(
        name=name,
        run=run,
        args=args,
        params=params,
        map=map_spec,
        needs=list(raw.get("needs", []))
        + ([each] if each and each not in raw.get("needs", []) else []),
        resources=resources,
        where=raw.get("where"),
        retries=raw.get("retries", 0),
        timeout=timeout,
        priority=raw.get("priority", job_priority),
        outputs=outputs,
        replicas=raw.get("replicas", job_replicas),
        fail=raw.get("fail", "item"),
    )


def _order(stages: list[StageSpec], problems: _Problems) -> list[StageSpec]:
    """Topological order, keeping the written order where needs allow; reports a cycle."""
    index = {s.name: i for i, s in enumerate(stages)}
    missing = [len(set(s.needs)) for s in stages]  # needs not yet placed
    dependents: list[list[int]] = [[] for _ in stages]
    for i, stage in enumerate(stages):
        for need in set(stage.needs):
            dependents[index[need]].append(i)
    ready = [i for i, n in enumerate(missing) if n == 0]
    heapq.heapify(ready)
    order: list[int] = []
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for j in dependents[i]:
            missing[j] -= 1
            if missing[j] == 0:
                heapq.heappush(ready, j)
    if len(order) < len(stages):
        # Every stage left waits on another one left: follow needs until a stage repeats.
        left = set(range(len(stages))) - set(order)
        trail: list[int] = []
        current = min(left)
        while current not in trail:
            trail.append(current)
            current = min(index[n] for n in stages[current].needs if index[n] in left)
        cycle = trail[trail.index(current) :] + [current]
        shown = " -> ".join(stages[i].name for i in cycle)
        problems.add(
            f"stages[{cycle[0]}].needs",
            f"the needs form a cycle: {shown} (each needs the next); remove one of these needs",
        )
        return stages
    return [stages[i] for i in order]


def _build(doc: dict[str, Any], base_dir: Path) -> JobSpec:
    problems = _Problems()
    name = doc["name"]
    if not re.fullmatch(JOB_NAME_PATTERN[:-1] + r"\Z", name):
        problems.add("name", f"{_short(name)} is not allowed: {_PATTERN_HINTS[JOB_NAME_PATTERN]}")
    job_priority = doc.get("priority", 0)

    stages: list[StageSpec] = []
    first_seen: dict[str, int] = {}
    argument_of: dict[str, int] = {}
    for i, raw in enumerate(doc["stages"]):
        stage_name = raw["name"]
        if stage_name in first_seen:
            problems.add(
                f"stages[{i}].name",
                f"duplicate stage name {stage_name!r} (also stages[{first_seen[stage_name]}]); give each stage its own name",
            )
        elif _argument_name(stage_name) in argument_of:
            other = doc["stages"][argument_of[_argument_name(stage_name)]]["name"]
            problems.add(
                f"stages[{i}].name",
                f"{stage_name!r} and {other!r} would both pass their outputs as argument "
                f"{_argument_name(stage_name)!r}; rename one",
            )
        first_seen.setdefault(stage_name, i)
        argument_of.setdefault(_argument_name(stage_name), i)
        stage = _build_stage(raw, f"stages[{i}]", job_priority, problems, doc.get("replicas", 1))
        if stage is not None:
            stages.append(stage)

    known = list(first_seen)
    needs_ok = True
    for i, raw in enumerate(doc["stages"]):
        for j, need in enumerate(raw.get("needs", [])):
            if need not in first_seen:
                needs_ok = False
                problems.add(
                    f"stages[{i}].needs[{j}]",
                    f"unknown stage {need!r}{_did_you_mean(need, known)}; known stages: {', '.join(known)}",
                )
            elif need == raw["name"]:
                needs_ok = False
                problems.add(f"stages[{i}].needs[{j}]", f"stage {need!r} cannot need itself")
            elif keyword.iskeyword(_argument_name(need)) and not isinstance(raw.get("run"), dict):
                problems.add(
                    f"stages[{i}].needs[{j}]",
                    f"{need!r} is a Python keyword, so its outputs cannot be passed as an argument; rename that stage",
                )

    for i, raw in enumerate(doc["stages"]):
        each = raw.get("map", {}).get("each")
        if each is None:
            continue
        if each not in first_seen:
            needs_ok = False
            problems.add(
                f"stages[{i}].map.each",
                f"unknown stage {each!r}{_did_you_mean(each, known)}; known stages: {', '.join(known)}",
            )
        elif each == raw["name"]:
            needs_ok = False
            problems.add(f"stages[{i}].map.each", f"stage {each!r} cannot map over itself")
        elif "map" not in doc["stages"][first_seen[each]]:
            problems.add(
                f"stages[{i}].map.each",
                f"stage {each!r} has no map, so it has no items to map over; use needs: [{each}]",
            )

    # Bound the work before anything is created: map sizes are computed, never materialised.
    by_name = {s.name: s for s in stages}

    def count_of(stage: StageSpec) -> int | None:  # None: a files map, counted later
        seen: set[str] = set()
        while stage.map is not None and stage.map.kind == "each":
            if stage.name in seen or stage.map.each not in by_name:
                return 0  # a cycle or an unknown stage, reported elsewhere
            seen.add(stage.name)
            stage = by_name[str(stage.map.each)]
        if stage.map is None:
            return 0  # reported above: nothing to map over
        return None if stage.map.kind == "files" else stage.map.count()

    total = 0
    for stage in stages:
        if stage.map is None:
            total += stage.replicas
        elif (n := count_of(stage)) is not None:  # a files map is counted when globbed
            if stage.map.kind == "each":
                total += n * stage.replicas
                continue
            if n > MAX_TASKS:
                problems.add(
                    stage.map.origin,
                    f"expands to {n:,} tasks; at most {MAX_TASKS:,} per job: split the job or use coarser items",
                )
            total += n * stage.replicas  # each copy of a replicated task is a task
    if total > MAX_TASKS and not any(p.path.endswith(".map") for p in problems):
        problems.add(
            "stages", f"the stages expand to {total:,} tasks; at most {MAX_TASKS:,} per job"
        )

    if needs_ok and len(stages) == len(first_seen) == len(doc["stages"]):
        stages = _order(stages, problems)
    if problems:
        raise SpecError(problems)
    return JobSpec(name=name, priority=job_priority, stages=stages, base_dir=base_dir)


# --- the public entry point ---------------------------------------------------------------------


def load_spec(
    source: str | Path | Mapping[str, Any],
    overrides: Iterable[str] = (),
    *,
    base_dir: str | Path | None = None,
) -> JobSpec:
    """Read, override, validate and check a job spec; raise SpecError listing every problem.

    ``source`` is a path to a .yaml/.yml/.json file, YAML or JSON text, or a dict.
    ``overrides`` are ``key=value`` settings (``--set`` on the command line) with dotted keys
    (``stages.simulate.params.steps=2000``; stages by name or index), values read as YAML.
    ``base_dir`` is where relative files are found: the file's folder, else the current one.
    """
    raw, folder = _read_source(source, base_dir)
    if raw is None:
        raise SpecError("the job spec is empty; it needs at least a name and stages")
    if not isinstance(raw, Mapping):
        hint = ""
        if isinstance(source, str) and "\n" not in source and isinstance(raw, str):
            hint = f"; if {source!r} is a file, it was not found"
        raise SpecError(
            f"a job spec must be a mapping with a name and stages, not {_type_name(raw)}{hint}"
        )
    doc = _plain(raw)
    overrides = [overrides] if isinstance(overrides, str) else list(overrides)
    if overrides:
        for text in overrides:
            _apply_override(doc, text)
        doc = _plain(doc)  # the overrides' values count towards the limits too
    _validate(doc)
    return _build(doc, folder)


# --- importing what a stage runs ----------------------------------------------------------------


def _import_file(path: Path, origin: str) -> Any:
    """Import a Python file as a module, cached while the file is unchanged."""
    try:
        mtime = path.stat().st_mtime_ns
    except OSError as exc:
        raise SpecError(f"cannot read {path}: {exc.strerror or exc}", origin) from None
    digest = hashlib.sha1(str(path).encode("utf-8", "surrogatepass")).hexdigest()[:12]
    name = f"_grid_portal_file_{digest}_{re.sub(r'[^A-Za-z0-9_]', '_', path.stem)}"
    cached = sys.modules.get(name)
    if cached is not None and getattr(cached, "__grid_portal_mtime__", None) == mtime:
        return cached
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise SpecError(f"cannot import {path}: not a Python file", origin)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # so classes defined in the file can be pickled
    try:
        spec.loader.exec_module(module)
    except (Exception, SystemExit) as exc:
        del sys.modules[name]
        raise SpecError(
            f"cannot import file {str(path)!r}: {type(exc).__name__}: {exc}", origin
        ) from None
    module.__grid_portal_mtime__ = mtime  # type: ignore[attr-defined]
    return module


def resolve_callable(
    target: RunTarget | str, base_dir: str | Path | None = None
) -> Callable[..., Any]:
    """The function a ``module:function`` or ``file.py:function`` target names.

    Imports the module (or file, relative to ``base_dir``); raises SpecError saying what
    could not be imported, e.g. ``stages[0].run: cannot import module 'mypkg.sim': No module
    named 'mypkg'``.
    """
    if isinstance(target, str):
        target = RunTarget.parse(target)
    origin = target.origin
    if target.kind == "shell":
        raise SpecError("a shell command is not a Python function", origin)
    if target.kind == "file" and not target.function:
        raise SpecError(
            f"{target.path} runs as a script; name a function ('{target.path}:main') to call one",
            origin,
        )
    if target.kind == "file":
        root = Path(base_dir) if base_dir is not None else Path.cwd()
        path = (root / str(target.path)).absolute()
        if not path.is_file():
            raise SpecError(f"no file {str(target.path)!r} in {root.absolute()}", origin)
        module = _import_file(path, origin)
        label = str(target.path)
    else:
        label = str(target.module)
        try:
            module = importlib.import_module(label)
        except (Exception, SystemExit) as exc:  # the module's own code may raise anything
            raise SpecError(f"cannot import module {label!r}: {exc}", origin) from None
    obj: Any = module
    for attr in str(target.function).split("."):
        try:
            obj = getattr(obj, attr)
        except AttributeError:
            raise SpecError(f"{label!r} has no attribute {target.function!r}", origin) from None
    if not callable(obj):
        raise SpecError(f"{target} is {_type_name(obj)}, not a function", origin)
    return obj


def _top_level_names(tree: ast.Module) -> set[str]:
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(t.id for t in targets if isinstance(t, ast.Name))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
    return names


def _check_file(stage: StageSpec, base_dir: Path) -> list[SpecProblem]:
    origin = stage.run.origin
    path = base_dir / str(stage.run.path)
    if not path.is_file():
        return [SpecProblem(origin, f"no file {stage.run.path!r} in {base_dir}")]
    try:
        if path.stat().st_size > 10 * MAX_DOCUMENT_BYTES:
            return []  # unusually big; leave it to the run
        tree = ast.parse(path.read_bytes(), filename=str(path))
    except SyntaxError as exc:
        return [SpecProblem(origin, f"{stage.run.path} line {exc.lineno}: {exc.msg}")]
    except (OSError, ValueError) as exc:
        return [SpecProblem(origin, f"cannot read {stage.run.path}: {exc}")]
    head = str(stage.run.function or "").split(".")[0]
    if head and head not in _top_level_names(tree):
        return [SpecProblem(origin, f"{stage.run.path} defines no {head!r} at top level")]
    return []


def check_importable(spec: JobSpec) -> list[SpecProblem]:
    """Problems with what the stages run, found on the submitting machine.

    A module that is not installed here at all is skipped (it may exist only on the nodes);
    one that is here must import and have the function. Files must exist; they are parsed,
    not run, to find the function.
    """
    problems: list[SpecProblem] = []
    for stage in spec.stages:
        if stage.run.kind == "file":
            problems.extend(_check_file(stage, spec.base_dir))
        elif stage.run.kind == "function":
            top = str(stage.run.module).split(".")[0]
            try:
                if importlib.util.find_spec(top) is None:
                    continue
            except (ImportError, ValueError):
                continue
            try:
                resolve_callable(stage.run, spec.base_dir)
            except SpecError as exc:
                problems.extend(exc.problems)
    return problems
