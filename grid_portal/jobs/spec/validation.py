"""Validating a document against the JSON Schema, its errors worded as readable problems."""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from grid_portal.jobs.spec.problems import (
    SpecError,
    SpecProblem,
    _format_path,
    _short,
    _suggest,
    _type_name,
)
from grid_portal.jobs.spec.schema import (
    _PATTERN_HINTS,
    _RUN_HINT,
    MAX_PROBLEMS,
    _resolve_schema,
    _validator,
)

if TYPE_CHECKING:
    import jsonschema


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
