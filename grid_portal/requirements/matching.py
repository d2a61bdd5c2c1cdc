"""Requirement expressions: which nodes may run a piece of work.

In the spirit of HTCondor ClassAd requirements::

    expr = compile_requirement('gpu.memory >= 16GB and gpu.capability >= 8.0 and os == "linux"')
    expr.matches(node_attributes(node))   # -> bool
    expr.explain(node_attributes(node))   # -> ["gpu.memory is 12.0 GB, needs >= 16.0 GB"]

The text comes from users (notebook cells, job files, REST), so it is read by a small
hand-written tokenizer and recursive-descent parser: never ``eval``, never Python's ``ast``.
Every mistake a user can make (unknown attribute, a size compared with a string, ``in`` on
something that is not a set, too long, too deeply nested) is an :class:`ExpressionError` raised
at compile time, before anything runs; evaluation against any attribute dict never raises.

The compiled form is called :class:`Expression` (not ``Requirement``, which is the
``grid_portal.model`` record whose ``where`` field holds the text). No Dask imports here.
See docs/requirements.md for the grammar and the attribute table.
"""

from __future__ import annotations

import difflib
import functools
import json
import math
import operator
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from grid_portal.errors import UsageError
from grid_portal.model import Node, NodeState
from grid_portal.units import format_duration, format_size, parse_duration, parse_size

__all__ = [
    "ATTRIBUTES",
    "MAX_DEPTH",
    "MAX_LENGTH",
    "Attribute",
    "Expression",
    "ExpressionError",
    "compile_requirement",
    "node_attributes",
]

MAX_LENGTH = 2000  # characters; a requirement is a line or two, not a program
MAX_DEPTH = 50  # nested parentheses and `not`s; keeps the parser far from Python's stack limit

# Value types of attributes. Sizes are bytes, rates bytes per second, durations seconds.
SIZE = "size"
RATE = "rate"
DURATION = "duration"
NUMBER = "number"
VERSION = "version"
STRING = "string"
DICT = "dict"
_ORDERED = (SIZE, RATE, DURATION, NUMBER, VERSION)


@dataclass(frozen=True)
class Attribute:
    """One entry of the schema: what an attribute is, for type checks and for docs."""

    type: str  # SIZE, RATE, DURATION, NUMBER, VERSION, STRING or DICT
    doc: str
    values: str | None = None  # DICT only: the type of its values
    key_word: str = ""  # DICT only: what one key is called in messages ("label")
    choices: tuple[str, ...] = ()  # STRING only: the values it can have, checked at compile time


ATTRIBUTES: Mapping[str, Attribute] = {
    "name": Attribute(STRING, "the node's name"),
    "state": Attribute(
        STRING,
        "online, busy, paused, draining or offline",
        choices=tuple(s.value for s in NodeState),
    ),
    "os": Attribute(STRING, "operating system, e.g. linux, darwin, windows"),
    "os_release": Attribute(STRING, "operating system release"),
    "arch": Attribute(STRING, "machine architecture, e.g. x86_64, aarch64, arm64"),
    "python": Attribute(VERSION, "Python version of the node's worker"),
    "cpu_model": Attribute(STRING, "CPU model name"),
    "cpu_freq": Attribute(NUMBER, "CPU frequency in MHz"),
    "cpus": Attribute(NUMBER, "CPUs the volunteer offers to the grid"),
    "cores": Attribute(NUMBER, "logical cores of the machine"),
    "cores_physical": Attribute(NUMBER, "physical cores of the machine"),
    "memory": Attribute(SIZE, "memory the volunteer offers to the grid"),
    "memory_total": Attribute(SIZE, "memory of the machine"),
    "disk": Attribute(SIZE, "free disk space"),
    "gpus": Attribute(NUMBER, "GPUs the volunteer offers to the grid"),
    "gpu.memory": Attribute(SIZE, "largest memory among offered GPUs; 0 without a GPU"),
    "gpu.capability": Attribute(
        VERSION, "highest CUDA compute capability among offered GPUs; 0 without one"
    ),
    "gpu.name": Attribute(STRING, "name of the offered GPU with the most memory"),
    "site": Attribute(
        STRING, 'the site: its labels.site; a peer portal\'s lent node: that portal ("" if none)'
    ),
    "labels": Attribute(
        DICT, 'labels set by the volunteer: "k" in labels, labels.k', STRING, "label"
    ),
    "packages": Attribute(
        DICT, 'installed Python packages: "torch" in packages, packages.numpy', VERSION, "package"
    ),
    "bandwidth": Attribute(RATE, "measured bandwidth between node and portal"),
    "rtt": Attribute(DURATION, "measured round-trip time between node and portal"),
}

_KNOWN_LIST = ", ".join(ATTRIBUTES) + "; labels.<key> and packages.<name> read one label or package"


# --------------------------------------------------------------------------------------------
# Errors


class ExpressionError(UsageError):
    """A requirement expression that cannot be compiled.

    The message names the problem, shows the expression with carets under the offending part,
    and says how to fix it. The parts are kept as attributes for front ends that render their own
    (the sidebar underlines ``expression[position:position + length]``).
    """

    def __init__(
        self, problem: str, expression: str = "", position: int = 0, length: int = 1, fix: str = ""
    ) -> None:
        self.problem = problem
        self.expression = expression
        self.position = position
        self.length = max(1, length)
        self.fix = fix
        super().__init__(self._render())

    def __reduce__(self) -> tuple[Any, ...]:
        # Errors cross Dask comms (scheduler handler -> client): keep them picklable.
        return (type(self), (self.problem, self.expression, self.position, self.length, self.fix))

    def _render(self) -> str:
        lines = [f"invalid requirement: {self.problem}"]
        if self.expression:
            shown, caret_at = _window(self.expression, self.position)
            width = max(1, min(self.length, len(shown) - caret_at))
            lines.append("  " + shown)
            lines.append("  " + " " * caret_at + "^" * width)
        if self.fix:
            lines.append(self.fix)
        return "\n".join(lines)


def _window(text: str, position: int, width: int = 72) -> tuple[str, int]:
    """The part of ``text`` to show around ``position`` on one line, and the caret column."""
    # Tabs, newlines and control characters would break the caret's alignment.
    flat = "".join(
        " " if c.isspace() else (c if c.isprintable() else "?") for c in text[: MAX_LENGTH + 100]
    )
    position = max(0, min(position, len(flat)))
    if len(flat) <= width:
        return flat, position
    start = max(0, min(position - width // 2, len(flat) - width))
    end = start + width
    prefix = "..." if start > 0 else ""
    suffix = "..." if end < len(flat) else ""
    return prefix + flat[start:end] + suffix, len(prefix) + position - start


# --------------------------------------------------------------------------------------------
# Tokens


@dataclass(frozen=True)
class _Token:
    kind: str  # "name", "number", "string", an operator, a keyword, "(", ")", "[", "]", "end"
    text: str  # as written; for strings the decoded value
    pos: int
    end: int
    number: str = ""  # number tokens: the digits ("16" of "16GB")
    unit: str = ""  # number tokens: the unit ("GB"), possibly empty


_KEYWORDS = frozenset({"and", "or", "not", "in", "contains", "true", "false"})
_COMPARE_OPS = ("==", "!=", "<=", ">=", "<", ">")
_TWO_CHAR = {"==": "==", "!=": "!=", "<=": "<=", ">=": ">=", "&&": "and", "||": "or"}
_ONE_CHAR = {"<": "<", ">": ">", "!": "not", "(": "(", ")": ")", "[": "[", "]": "]"}
_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_\-]*(?:\.[A-Za-z0-9_][A-Za-z0-9_\-]*)*", re.ASCII)
_NUMBER_RE = re.compile(r"([0-9]+(?:\.[0-9]+)*)([A-Za-z][A-Za-z0-9]*(?:/s)?)?", re.ASCII)
_SPACED_UNIT_RE = re.compile(r"[ \t]+([A-Za-z]+(?:/s)?)(?![A-Za-z0-9_.\-])", re.ASCII)
_UNIT_WORDS = frozenset(
    ["b", "k", "kb", "m", "mb", "g", "gb", "t", "tb", "p", "pb"]
    + ["kib", "mib", "gib", "tib", "pib", "ms", "s", "h", "d"]
)
_ESCAPES = {"\\": "\\", '"': '"', "'": "'", "n": "\n", "t": "\t", "r": "\r"}


def _tokenize(text: str) -> list[_Token]:
    tokens: list[_Token] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c.isspace():
            i += 1
        elif "0" <= c <= "9":
            tokens.append(_number_token(text, i))
            i = tokens[-1].end
        elif c.isascii() and (c.isalpha() or c == "_"):
            m = _NAME_RE.match(text, i)
            assert m is not None  # the first character matched above
            word = m.group()
            kind = word.lower() if word.lower() in _KEYWORDS else "name"
            tokens.append(_Token(kind, word, i, m.end()))
            i = m.end()
        elif c in "\"'":
            value, end = _string(text, i)
            tokens.append(_Token("string", value, i, end))
            i = end
        elif text[i : i + 2] in _TWO_CHAR:
            tokens.append(_Token(_TWO_CHAR[text[i : i + 2]], text[i : i + 2], i, i + 2))
            i += 2
        elif c in _ONE_CHAR:
            tokens.append(_Token(_ONE_CHAR[c], c, i, i + 1))
            i += 1
        elif c == "=":
            raise ExpressionError(
                "'=' is not an operator", text, i, 1, 'use == to compare, like os == "linux"'
            )
        elif c in "&|":
            raise ExpressionError(
                f"{c!r} is not an operator", text, i, 1, "join conditions with and / or"
            )
        else:
            shown = repr(c) if c.isprintable() and not c.isspace() else f"U+{ord(c):04X}"
            raise ExpressionError(
                f"unexpected character {shown}",
                text,
                i,
                1,
                "use attribute names, numbers, sizes like 16GB, quoted strings, "
                "== != < <= > >= in contains, and, or, not and parentheses",
            )
    tokens.append(_Token("end", "", n, n))
    return tokens


def _number_token(text: str, i: int) -> _Token:
    m = _NUMBER_RE.match(text, i)
    assert m is not None  # called on a digit
    number, unit, end = m.group(1), m.group(2) or "", m.end()
    if not unit:
        # "16 GB" reads as one size; only known unit words glue, so "4 and" stays two tokens.
        spaced = _SPACED_UNIT_RE.match(text, end)
        if spaced and spaced.group(1).lower().removesuffix("/s") in _UNIT_WORDS:
            unit, end = spaced.group(1), spaced.end()
    return _Token("number", number + unit, i, end, number=number, unit=unit)


def _string(text: str, start: int) -> tuple[str, int]:
    quote, out, j, n = text[start], [], start + 1, len(text)
    while j < n and text[j] != "\n":
        c = text[j]
        if c == quote:
            return "".join(out), j + 1
        if c == "\\" and j + 1 < n:
            escaped = text[j + 1]
            if escaped not in _ESCAPES:
                raise ExpressionError(
                    f"unknown escape \\{escaped} in a string",
                    text,
                    j,
                    2,
                    "known escapes are \\\" \\' \\\\ \\n \\t \\r; write \\\\ for a backslash",
                )
            out.append(_ESCAPES[escaped])
            j += 2
            continue
        out.append(c)
        j += 1
    raise ExpressionError(
        "this string is never closed", text, start, 1, f"end it with {quote} on the same line"
    )


# --------------------------------------------------------------------------------------------
# Versions


_VERSION_RE = re.compile(r"\s*[vV]?([0-9]+(?:\.[0-9]+)*)(.*)", re.ASCII | re.DOTALL)
_PRE_RE = re.compile(r"[-_.]?(a|b|c|rc|alpha|beta|pre|preview|dev)[-_.]?[0-9]*([-_.+].*)?\s*")


def _version_key(text: str) -> tuple[tuple[int, ...], int] | None:
    """A sortable key: ``1.26.4 > 1.26 == 1.26.0 > 1.26rc1 > 1.9``; None if not a version.

    Release numbers compare numerically with trailing zeros ignored; a pre-release (a, b, rc,
    dev) sorts before its release; anything else after the numbers (+cu121, .post1) is ignored.
    """
    m = _VERSION_RE.fullmatch(text)
    if m is None:
        return None
    parts = m.group(1).split(".")
    if len(parts) > 20 or any(len(p) > 30 for p in parts):
        return None  # not a version, and int() of thousands of digits is slow or refused
    release = [int(p) for p in parts]
    while release and release[-1] == 0:
        release.pop()
    rest = m.group(2).strip()
    phase = 0 if rest and _PRE_RE.fullmatch(rest, 0) else 1
    return tuple(release), phase


# --------------------------------------------------------------------------------------------
# The compiled tree. After compilation there is no `not`: it is pushed down to the comparisons
# (De Morgan), so `explain` can say plainly what each failing comparison needed.

_MISSING = object()
_FLIP = {"==": "==", "!=": "!=", "<": ">", ">": "<", "<=": ">=", ">=": "<="}
_INVERSE = {
    "==": "!=",
    "!=": "==",
    "<": ">=",
    ">=": "<",
    ">": "<=",
    "<=": ">",
    "has": "lacks",
    "lacks": "has",
    "contains": "excludes",
    "excludes": "contains",
}
_OPS: dict[str, Callable[[Any, Any], bool]] = {
    "==": operator.eq,
    "!=": operator.ne,
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
}


def _normalize_package(name: str) -> str:
    # PEP 503: scikit_learn, Scikit.Learn and scikit-learn are one package.
    return re.sub(r"[-_.]+", "-", name).lower()


def _coerce(kind: str, value: Any) -> Any:
    """The node's value as ``kind``, or None when it cannot be one (then it counts as unknown)."""
    if kind in (SIZE, RATE, DURATION, NUMBER):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return None
        return None if isinstance(value, float) and math.isnan(value) else value
    if kind == VERSION:
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            return None
        try:
            return _version_key(str(value))
        except ValueError:  # str() of an int with more digits than Python allows
            return None
    if kind == STRING:
        return value if isinstance(value, str) else None
    return value if isinstance(value, Mapping) else None


def _plain(value: Any) -> str:
    """``str(value)`` that cannot fail: hand-made attribute dicts may hold absurd numbers."""
    try:
        return str(value)
    except ValueError:  # an int with more digits than Python will print
        return "a number too large to show"


def _safe(fmt: Callable[[Any], str], value: Any, unit: str) -> str:
    try:
        return fmt(value)
    except (OverflowError, ValueError):  # inf, nan and huge ints
        return f"{_plain(value)} {unit}"


def _format(kind: str, value: Any) -> str:
    if kind == SIZE:
        return _safe(format_size, value, "B")
    if kind == RATE:
        return _safe(format_size, value, "B") + "/s"
    if kind == DURATION:
        return _safe(format_duration, value, "s")
    if kind == NUMBER:
        if isinstance(value, float) and value.is_integer():
            return _plain(int(value))
        return _plain(value)
    text = json.dumps(_plain(value), ensure_ascii=False) if kind == STRING else _plain(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _exact(kind: str, value: Any) -> str:
    # Used when the rounded forms of two different values read the same ("16.0 GB" twice).
    if kind in (SIZE, RATE):
        text = _safe(lambda v: f"{int(v):,} B", value, "B")
        return text + ("/s" if kind == RATE else "")
    if kind == DURATION:
        return _safe(lambda v: f"{v:.6g} s", value, "s")
    return _format(kind, value)


def _short_repr(value: Any) -> str:
    try:
        text = repr(value)
    except Exception:  # a repr is only for the message; never let it break matching
        text = f"a {type(value).__name__}"
    return text if len(text) <= 40 else text[:37] + "..."


@dataclass(frozen=True)
class _Const:
    value: bool

    def matches(self, attrs: Mapping[str, Any]) -> bool:
        return self.value

    def explain(self, attrs: Mapping[str, Any]) -> list[str]:
        return [] if self.value else ["the requirement contains a condition that is always false"]

    def negate(self) -> _Const:
        return _Const(not self.value)


@dataclass(frozen=True)
class _Compare:
    """One comparison of a node attribute with a literal; ``negated`` when under a `not`."""

    display: str  # as messages name it: "gpu.memory", "labels.room", "labels"
    source: str  # key in the attribute dict: "gpu.memory", "labels"
    key: str | None  # DICT lookups and `in` tests: the label key / normalized package name
    kind: str  # type of the compared value
    op: str  # a comparison operator, "has" (`in`) or "contains"
    value: Any  # the literal, converted to `kind` (a version key, a casefolded string, ...)
    shown: str  # the literal as messages show it
    key_word: str = ""  # DICT lookups: "label" / "package"
    negated: bool = False

    def negate(self) -> _Compare:
        return replace(self, negated=not self.negated)

    def _lookup(self, attrs: Mapping[str, Any]) -> tuple[str, Any, Any]:
        """(status, value converted to ``kind``, raw value); status ok, missing or unusable."""
        raw = attrs.get(self.source, _MISSING)
        if self.key is not None:
            if raw is _MISSING:
                return "missing", None, None
            if not isinstance(raw, Mapping):
                return "unusable", None, raw
            found = raw.get(self.key, _MISSING)
            if found is _MISSING and self.key_word == "package":
                found = next(
                    (
                        v
                        for k, v in raw.items()
                        if isinstance(k, str) and _normalize_package(k) == self.key
                    ),
                    _MISSING,
                )
            if self.op == "has":
                return "ok", found is not _MISSING, found
            raw = found
        if raw is _MISSING:
            return "missing", None, None
        value = _coerce(self.kind, raw)
        return ("unusable", None, raw) if value is None else ("ok", value, raw)

    def _holds(self, value: Any) -> bool:
        if self.op == "has":
            return bool(value)
        if self.op == "contains":
            return self.value in value.casefold()
        if self.kind == STRING:  # case-insensitive, as in ClassAds: os == "Linux" is fine
            value = value.casefold()
        return _OPS[self.op](value, self.value)

    def matches(self, attrs: Mapping[str, Any]) -> bool:
        status, value, _ = self._lookup(attrs)
        if status != "ok":
            return self.negated  # a comparison on an unknown attribute is false; `not` flips it
        return self._holds(value) != self.negated

    def explain(self, attrs: Mapping[str, Any]) -> list[str]:
        status, value, raw = self._lookup(attrs)
        if (status != "ok" and self.negated) or (
            status == "ok" and self._holds(value) != self.negated
        ):
            return []
        dict_name = self.source if self.key is not None else ""
        if status == "missing":
            if self.key is not None and dict_name in attrs:
                return [
                    f"no {self.key_word} {json.dumps(self.key, ensure_ascii=False)} on this node"
                ]
            return [f"{dict_name or self.display} is unknown on this node"]
        if status == "unusable":
            shown = _short_repr(raw)
            return [f"{dict_name or self.display} has an unusable value on this node: {shown}"]
        op = _INVERSE[self.op] if self.negated else self.op
        if op == "has":
            return [f"no {self.key_word} {json.dumps(self.key, ensure_ascii=False)} on this node"]
        if op == "lacks":
            return [
                f"{self.key_word} {json.dumps(self.key, ensure_ascii=False)} is present, needs it absent"
            ]
        # Versions show as the node wrote them; the key is only for ordering.
        have = _format(self.kind, raw if self.kind == VERSION else value)
        if op in ("contains", "excludes"):
            verb = "to contain" if op == "contains" else "not to contain"
            return [f"{self.display} is {have}, needs {verb} {self.shown}"]
        if have == self.shown and self.kind in (SIZE, RATE, DURATION):
            have = _exact(self.kind, value)
            return [f"{self.display} is {have}, needs {op} {_exact(self.kind, self.value)}"]
        return [f"{self.display} is {have}, needs {op} {self.shown}"]


@dataclass(frozen=True)
class _All:
    items: tuple[_Node, ...]

    def matches(self, attrs: Mapping[str, Any]) -> bool:
        return all(item.matches(attrs) for item in self.items)

    def explain(self, attrs: Mapping[str, Any]) -> list[str]:
        return [reason for item in self.items for reason in item.explain(attrs)]

    def negate(self) -> _Any:
        return _any(item.negate() for item in self.items)


@dataclass(frozen=True)
class _Any:
    items: tuple[_Node, ...]

    def matches(self, attrs: Mapping[str, Any]) -> bool:
        return any(item.matches(attrs) for item in self.items)

    def explain(self, attrs: Mapping[str, Any]) -> list[str]:
        if self.matches(attrs):
            return []
        # The branch needing the fewest changes first, in full; the others as one line each.
        branches = sorted((item.explain(attrs) for item in self.items), key=len)
        return branches[0] + ["or else: " + "; ".join(b) for b in branches[1:] if b]

    def negate(self) -> _All:
        return _all(item.negate() for item in self.items)


_Node = _Const | _Compare | _All | _Any


def _all(items: Iterable[_Node]) -> _Node:
    flat: list[_Node] = []
    for item in items:
        flat.extend(item.items if isinstance(item, _All) else (item,))
    return flat[0] if len(flat) == 1 else _All(tuple(flat))


def _any(items: Iterable[_Node]) -> _Node:
    flat: list[_Node] = []
    for item in items:
        flat.extend(item.items if isinstance(item, _Any) else (item,))
    return flat[0] if len(flat) == 1 else _Any(tuple(flat))


# --------------------------------------------------------------------------------------------
# The parser: recursive descent over the grammar in docs/requirements.md, type-checking each
# comparison as it is read.


@dataclass(frozen=True)
class _Ref:
    """An attribute as written; ``spec`` is None for a name that is not in the schema."""

    token: _Token
    display: str
    source: str
    key: str | None
    spec: Attribute | None
    kind: str  # type of the referenced value (the dict's value type for labels.k)


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.tokens = _tokenize(text)
        self.i = 0
        self.depth = 0

    # -- helpers

    def peek(self, ahead: int = 0) -> _Token:
        return self.tokens[min(self.i + ahead, len(self.tokens) - 1)]

    def take(self) -> _Token:
        token = self.peek()
        self.i = min(self.i + 1, len(self.tokens) - 1)
        return token

    def fail(self, token: _Token | _Ref, problem: str, fix: str = "") -> ExpressionError:
        t = token.token if isinstance(token, _Ref) else token
        return ExpressionError(problem, self.text, t.pos, t.end - t.pos, fix)

    def enter(self, token: _Token) -> None:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise self.fail(
                token,
                f"the requirement is nested more than {MAX_DEPTH} levels deep",
                "simplify it: `not not x` is x, and a chain of and / or needs no parentheses",
            )

    @staticmethod
    def describe(token: _Token) -> str:
        return "the end of the requirement" if token.kind == "end" else repr(token.text)

    # -- grammar

    def parse(self) -> _Node:
        if self.peek().kind == "end":
            raise ExpressionError(
                "the requirement is empty",
                self.text,
                0,
                1,
                'write a condition like cpus >= 2 or os == "linux", or give no requirement',
            )
        node = self.or_expr()
        token = self.peek()
        if token.kind != "end":
            fix = "join conditions with and / or"
            if token.kind == ")":
                fix = "remove it, or add the '(' it closes"
            raise self.fail(token, f"unexpected {self.describe(token)}", fix)
        return node

    def or_expr(self) -> _Node:
        items = [self.and_expr()]
        while self.peek().kind == "or":
            self.take()
            items.append(self.and_expr())
        return _any(items)

    def and_expr(self) -> _Node:
        items = [self.not_expr()]
        while self.peek().kind == "and":
            self.take()
            items.append(self.not_expr())
        return _all(items)

    def not_expr(self) -> _Node:
        if self.peek().kind == "not":
            self.enter(self.take())
            node = self.not_expr().negate()
            self.depth -= 1
            return node
        return self.primary()

    def primary(self) -> _Node:
        token = self.peek()
        if token.kind == "(":
            self.enter(self.take())
            node = self.or_expr()
            close = self.peek()
            if close.kind != ")":
                raise self.fail(
                    close,
                    f"expected ')' but found {self.describe(close)}",
                    f"close the '(' at column {token.pos + 1}, or join conditions with and / or",
                )
            self.take()
            self.depth -= 1
            return node
        if token.kind in ("true", "false"):
            self.take()
            if self.peek().kind in _COMPARE_OPS:
                raise self.fail(
                    token,
                    f"{token.text} cannot be compared",
                    f"{token.text} is a whole condition by itself; no attribute is a boolean",
                )
            return _Const(token.kind == "true")
        return self.comparison()

    def comparison(self) -> _Node:
        left = self.operand()
        op = self.peek()
        negated = False
        if op.kind == "not" and self.peek(1).kind == "in":
            self.take()
            negated = True
            op = self.peek()
        if op.kind in _COMPARE_OPS:
            self.take()
            node = self.check_compare(left, op, self.operand())
        elif op.kind == "in":
            self.take()
            node = self.check_in(left, op, self.operand())
            node = node.negate() if negated else node
        elif op.kind == "contains":
            self.take()
            node = self.check_contains(left, op, self.operand())
        else:
            raise self.bare_operand(left, op)
        after = self.peek()
        if after.kind in _COMPARE_OPS:
            raise self.fail(
                after,
                "comparisons cannot be chained",
                "join them with and, like cpus >= 2 and cpus <= 8",
            )
        return node

    def operand(self) -> _Ref | _Token:
        token = self.take()
        if token.kind == "name":
            return self.attribute(token)
        if token.kind in ("number", "string"):
            return token
        if token.kind in ("true", "false"):
            raise self.fail(token, f"{token.text} cannot be compared", "no attribute is a boolean")
        if token.kind == "end":
            raise self.fail(
                token,
                "the requirement ends too early",
                "finish the comparison with an attribute or a value, like cpus >= 2",
            )
        if token.kind == "(":
            raise self.fail(
                token, "parentheses group conditions, not values", "write the value without them"
            )
        raise self.fail(
            token,
            f"expected an attribute or a value, found {self.describe(token)}",
            "a comparison reads attribute operator value, like gpu.memory >= 16GB",
        )

    def attribute(self, token: _Token) -> _Ref:
        name = token.text
        lower = name.lower()
        head, dot, rest = lower.partition(".")
        if lower in ATTRIBUTES:
            spec = ATTRIBUTES[lower]
            ref = _Ref(token, lower, lower, None, spec, spec.type)
        elif dot and head in ATTRIBUTES and ATTRIBUTES[head].type == DICT:
            spec = ATTRIBUTES[head]
            key = name.partition(".")[2]  # label keys keep their case
            key = _normalize_package(key) if spec.key_word == "package" else key
            ref = _Ref(token, f"{head}.{key}", head, key, spec, spec.values or STRING)
        else:
            ref = _Ref(token, name, name, None, None, "")
        if self.peek().kind == "[":
            ref = self.subscript(ref)
        return ref

    def subscript(self, ref: _Ref) -> _Ref:
        bracket = self.take()
        if ref.spec is None or ref.spec.type != DICT or ref.key is not None:
            raise self.fail(
                bracket,
                f"{ref.display} cannot be indexed with [ ]",
                'only labels and packages can, like labels["room"] or packages["scikit-learn"]',
            )
        key_token = self.take()
        if key_token.kind != "string":
            raise self.fail(
                key_token,
                f"expected a quoted key after '[', found {self.describe(key_token)}",
                f'write {ref.display}["key"]',
            )
        close = self.take()
        if close.kind != "]":
            raise self.fail(close, f"expected ']', found {self.describe(close)}", "close it with ]")
        key = key_token.text
        key = _normalize_package(key) if ref.spec.key_word == "package" else key
        span = _Token("name", self.text[ref.token.pos : close.end], ref.token.pos, close.end)
        return _Ref(
            span,
            f"{ref.source}[{json.dumps(key)}]",
            ref.source,
            key,
            ref.spec,
            ref.spec.values or STRING,
        )

    def known(self, ref: _Ref) -> _Ref:
        if ref.spec is not None:
            return ref
        head, dot, rest = ref.display.partition(".")
        close: list[str] = []
        if dot:  # "label.room": the dict's name is the typo, the key is probably right
            heads = [n for n, a in ATTRIBUTES.items() if a.type == DICT]
            close = [f"{h}.{rest}" for h in difflib.get_close_matches(head.lower(), heads, n=1)]
        if not close:
            close = difflib.get_close_matches(ref.display.lower(), list(ATTRIBUTES), n=2)
        hint = f"did you mean {' or '.join(close)}? " if close else ""
        if not dot and not close:
            hint = f"if it is a label, write labels.{ref.display}. "
        raise self.fail(ref, f"unknown attribute {ref.display!r}", f"{hint}Known: {_KNOWN_LIST}")

    def bare_operand(self, left: _Ref | _Token, after: _Token) -> ExpressionError:
        if isinstance(left, _Token):
            return self.fail(
                left,
                f"a value alone ({left.text}) is not a condition",
                "compare it with an attribute, like memory >= 16GB",
            )
        ref = self.known(left)
        if ref.kind == DICT:
            return self.fail(
                ref,
                f"{ref.display} alone is not a condition",
                f'test a key with "key" in {ref.display}, or a value with {ref.display}.key == "value"',
            )
        if after.kind == "end":
            return self.fail(
                ref,
                f"{ref.display} alone is not a condition",
                f"compare it with a value, like {_example(ref)}",
            )
        return self.fail(
            after,
            f"expected an operator after {ref.display}, found {self.describe(after)}",
            f"operators are == != < <= > >= contains in; like {_example(ref)}",
        )

    # -- type checks

    def check_compare(self, left: _Ref | _Token, op: _Token, right: _Ref | _Token) -> _Compare:
        if isinstance(left, _Ref) and isinstance(right, _Ref):
            for known, other in ((left, right), (right, left)):
                if known.spec is not None and known.kind == STRING and other.spec is None:
                    raise self.fail(
                        other,
                        f"{known.display} is text, but {other.display} is not quoted",
                        f'put the value in quotes: {known.display} == "{other.display}"',
                    )
            self.known(left)
            self.known(right)
            raise self.fail(
                right,
                "two attributes cannot be compared with each other",
                f"compare an attribute with a value, like {_example(left)}",
            )
        if isinstance(left, _Token) and isinstance(right, _Token):
            raise self.fail(
                left,
                "this compares two values",
                "one side must be an attribute, like cpus >= 4",
            )
        symbol = op.kind
        if isinstance(left, _Token):  # "16GB <= gpu.memory" reads as "gpu.memory >= 16GB"
            left, right, symbol = right, left, _FLIP[symbol]
        assert isinstance(left, _Ref) and isinstance(right, _Token)
        ref = self.known(left)
        if ref.kind == DICT:
            raise self.fail(
                op,
                f"{ref.display} is a set of keys; it cannot be compared with {op.kind}",
                f'test a key with "key" in {ref.display}, or a value with '
                f'{ref.display}.key == "value"',
            )
        if ref.kind == STRING and symbol not in ("==", "!="):
            raise self.fail(
                op,
                f"{ref.display} is text; it can be compared only with ==, != or contains",
                f'like {ref.display} == "value"',
            )
        value, shown = self.literal(ref, right)
        return _Compare(
            ref.display,
            ref.source,
            ref.key,
            ref.kind,
            symbol,
            value,
            shown,
            ref.spec.key_word if ref.spec and ref.key else "",
        )

    def check_in(self, left: _Ref | _Token, op: _Token, right: _Ref | _Token) -> _Compare:
        if not (isinstance(right, _Ref) and self.known(right).kind == DICT and right.key is None):
            shown = right.display if isinstance(right, _Ref) else right.text
            raise self.fail(
                right,
                f"'in' needs labels or packages on its right, not {shown}",
                '"lab" in labels tests a label, "torch" in packages a package; '
                'compare values with ==, like os == "linux"',
            )
        if isinstance(left, _Ref):
            shown = left.token.text
            raise self.fail(
                left, "the key before 'in' must be quoted", f'write "{shown}" in {right.display}'
            )
        if left.kind != "string":
            raise self.fail(
                left,
                "the key before 'in' must be quoted",
                f'write "{left.text}" in {right.display}',
            )
        spec = right.spec
        assert spec is not None
        key = _normalize_package(left.text) if spec.key_word == "package" else left.text
        return _Compare(
            right.display, right.source, key, DICT, "has", True, json.dumps(key), spec.key_word
        )

    def check_contains(self, left: _Ref | _Token, op: _Token, right: _Ref | _Token) -> _Compare:
        if not isinstance(left, _Ref):
            raise self.fail(
                left, "contains needs an attribute on its left", 'like cpu_model contains "EPYC"'
            )
        ref = self.known(left)
        if ref.kind == DICT:
            key = right.text if isinstance(right, _Token) else "key"
            raise self.fail(
                op,
                f"contains works on text, and {ref.display} is a set of keys",
                f'to test a key write "{key}" in {ref.display}',
            )
        if ref.kind != STRING:
            raise self.fail(
                op,
                f"contains works on text, and {ref.display} is a {ref.kind}",
                f"compare it with == != < <= > >=, like {_example(ref)}",
            )
        if not (isinstance(right, _Token) and right.kind == "string"):
            shown = right.display if isinstance(right, _Ref) else right.text
            raise self.fail(
                right,
                f"contains needs a quoted string, not {shown}",
                f'like {ref.display} contains "{shown}"',
            )
        return _Compare(
            ref.display,
            ref.source,
            ref.key,
            STRING,
            "contains",
            right.text.casefold(),
            json.dumps(right.text, ensure_ascii=False),
            ref.spec.key_word if ref.spec and ref.key else "",
        )

    def literal(self, ref: _Ref, lit: _Token) -> tuple[Any, str]:
        """The literal converted to the attribute's type, and how messages show it."""
        kind, name = ref.kind, ref.display
        if kind == STRING:
            if lit.kind != "string":
                raise self.fail(
                    lit,
                    f"{name} is text, but {lit.text} is not quoted",
                    f'put the value in quotes: {name} == "{lit.text}"',
                )
            choices = ref.spec.choices if ref.spec and ref.key is None else ()
            if choices and lit.text.casefold() not in choices:
                near = difflib.get_close_matches(lit.text.casefold(), choices, n=1)
                hint = f'did you mean "{near[0]}"? ' if near else ""
                raise self.fail(
                    lit,
                    f"{name} is never {json.dumps(lit.text)}",
                    f"{hint}It is one of: {', '.join(choices)}",
                )
            return lit.text.casefold(), json.dumps(lit.text, ensure_ascii=False)
        if kind == VERSION:
            key = _version_key(lit.text)
            if key is None:
                raise self.fail(
                    lit,
                    f"{json.dumps(lit.text)} is not a version",
                    'write a version like 1.26, 8.0 or "2.1.0rc1"',
                )
            return key, lit.text
        if lit.kind == "string":
            raise self.fail(
                lit,
                f"{name} is a {kind}, not text",
                f"write the value without quotes, like {_example(ref)}",
            )
        if kind == NUMBER:
            if lit.unit or lit.number.count(".") > 1:
                raise self.fail(
                    lit,
                    f"{name} is a plain number, so {lit.text} does not fit",
                    f"write it without a unit, like {_example(ref)}",
                )
            return _number(lit.number), _format(NUMBER, _number(lit.number))
        if kind == DURATION:
            try:
                seconds = parse_duration(lit.text) if lit.unit else float(lit.number)
            except (UsageError, ValueError):
                raise self.fail(
                    lit,
                    f"{lit.text} is not a duration",
                    "write it like 5ms, 2s, 1m or 1h30m; a plain number is seconds",
                ) from None
            return seconds, _format(DURATION, seconds)
        return self.size(ref, lit)

    def size(self, ref: _Ref, lit: _Token) -> tuple[int, str]:
        unit = lit.unit
        if not unit:
            if lit.number.count(".") <= 1 and float(lit.number) == 0:
                return 0, _format(ref.kind, 0)
            raise self.fail(
                lit,
                f"{lit.text} has no unit, and {ref.display} is a size",
                f"write a unit, like {lit.number}GB or {lit.number}GiB",
            )
        if unit.lower().endswith("/s"):
            if ref.kind != RATE:
                raise self.fail(
                    lit, f"{ref.display} is a size, not a rate", f"write {lit.number}{unit[:-2]}"
                )
            unit = unit[:-2]
        try:
            size = parse_size(lit.number + unit)
        except (UsageError, ValueError, OverflowError):
            raise self.fail(
                lit,
                f"{lit.text} is not a size",
                "write a number and a unit: B, KB, MB, GB, TB (powers of 1000) "
                "or KiB, MiB, GiB, TiB (powers of 1024)",
            ) from None
        return size, _format(ref.kind, size)


def _number(text: str) -> int | float:
    return float(text) if "." in text else int(text)


def _example(ref: _Ref) -> str:
    return {
        SIZE: f"{ref.display} >= 16GB",
        RATE: f"{ref.display} >= 100MB",
        DURATION: f"{ref.display} < 5ms",
        NUMBER: f"{ref.display} >= 4",
        VERSION: f"{ref.display} >= 1.26",
        STRING: f'{ref.display} == "value"',
    }.get(ref.kind, "cpus >= 4")


# --------------------------------------------------------------------------------------------
# Public API


class Expression:
    """A compiled requirement. Immutable and safe to share between threads; cheap to evaluate.

    ``matches`` and ``explain`` take the attribute dict of :func:`node_attributes` (or a
    :class:`~grid_portal.model.Node`, converted for you). Attributes the node lacks, or whose
    value has the wrong type, make their comparison false (and ``not`` makes it true); they
    never raise.
    """

    __slots__ = ("_root", "text")

    def __init__(self, text: str, root: _Node) -> None:
        self.text = text
        self._root = root

    def matches(self, attrs: Mapping[str, Any] | Node) -> bool:
        return self._root.matches(_as_attrs(attrs))

    def explain(self, attrs: Mapping[str, Any] | Node) -> list[str]:
        """Why a node fails, as short human lines; empty when it matches.

        For ``or``, the branch that needs the fewest changes comes first, in full; each other
        branch follows as one "or else: ..." line.
        """
        return self._root.explain(_as_attrs(attrs))

    def __repr__(self) -> str:
        return f"Expression({self.text!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Expression) and other.text == self.text

    def __hash__(self) -> int:
        return hash(self.text)


def _as_attrs(attrs: Mapping[str, Any] | Node) -> Mapping[str, Any]:
    if isinstance(attrs, Node):
        return node_attributes(attrs)
    if not isinstance(attrs, Mapping):
        raise TypeError(f"expected an attribute dict or a Node, got {type(attrs).__name__}")
    return attrs


def compile_requirement(text: str) -> Expression:
    """Parse and type-check a requirement; raise :class:`ExpressionError` on any mistake."""
    if not isinstance(text, str):
        raise ExpressionError(
            f"a requirement must be text, not {type(text).__name__}",
            fix='write it as a string, like "cpus >= 2"',
        )
    if len(text) > MAX_LENGTH:
        raise ExpressionError(
            f"the requirement is {len(text)} characters long; the limit is {MAX_LENGTH}",
            text,
            MAX_LENGTH,
            1,
            'shorten it: select nodes with a label (labels.pool == "x") instead of listing names',
        )
    return _compile(text)


@functools.lru_cache(maxsize=512)
def _compile(text: str) -> Expression:
    # The same few requirements come back for every task of a job: compile each once.
    return Expression(text, _Parser(text).parse())


def node_attributes(node: Node) -> dict[str, Any]:
    """The attribute namespace of a node, as requirements see it (see ``ATTRIBUTES``).

    Plain JSON-friendly values: sizes in bytes, ``bandwidth`` in bytes/s, ``rtt`` in seconds,
    versions as strings. Attributes the node does not know are left out, not set to a guess.
    """
    cap = node.capacity
    offered_indices = set(node.offer.gpus)
    offered = [g for g in cap.gpus if g.index in offered_indices]
    attrs: dict[str, Any] = {
        "name": node.name,
        "state": getattr(node.state, "value", node.state),
        "cpus": node.offer.cpus,
        "cores": cap.cores_logical,
        "memory": node.offer.memory,
        "gpus": len(node.offer.gpus),
        "gpu.memory": max((g.memory_total for g in offered), default=0),
        "gpu.capability": max(
            (g.capability for g in offered if g.capability and _version_key(g.capability)),
            key=lambda c: _version_key(c) or ((), 0),
            default="0",
        ),
        "labels": dict(node.labels),
        "site": str(node.labels.get("site", "")),
        "packages": {_normalize_package(k): v for k, v in cap.packages.items()},
    }
    if offered:
        attrs["gpu.name"] = max(offered, key=lambda g: g.memory_total).name
    optional = {
        "os": cap.os or None,
        "os_release": cap.os_release or None,
        "arch": cap.arch or None,
        "python": cap.python or None,
        "cpu_model": cap.cpu_model or None,
        "cpu_freq": cap.cpu_freq_mhz,
        "cores_physical": cap.cores_physical,
        "memory_total": cap.memory_total or None,  # 0 is the dataclass default: not probed
        "disk": cap.disk_free,
        "bandwidth": cap.network.bandwidth,
        "rtt": cap.network.rtt,
    }
    attrs.update({k: v for k, v in optional.items() if v is not None})
    return attrs
