"""Reading a job spec from a file, text or dict into plain JSON values, within the limits."""

from __future__ import annotations

import datetime
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from grid_portal.jobs.spec.problems import SpecError, SpecProblem, _join_path, _short, _type_name
from grid_portal.jobs.spec.schema import (
    _MAX_INT,
    MAX_DEPTH,
    MAX_DOCUMENT_BYTES,
    MAX_PROBLEMS,
    MAX_VALUES,
)


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
