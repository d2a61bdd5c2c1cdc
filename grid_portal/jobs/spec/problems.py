"""What is wrong with a spec: ``SpecProblem``, ``SpecError``, and the wording helpers they share."""

from __future__ import annotations

import datetime
import difflib
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from grid_portal.errors import UsageError


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


def _did_you_mean(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _suggest(word: str, choices: Iterable[str]) -> str:
    choices = list(choices)
    hint = _did_you_mean(word, choices)
    if hint:
        return hint
    return f"; known fields: {', '.join(choices)}" if choices else ""
