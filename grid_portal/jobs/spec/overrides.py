"""``--set key=value`` overrides: dotted paths into the document, checked against the schema."""

from __future__ import annotations

import re
from typing import Any

import yaml

from grid_portal.jobs.spec.problems import SpecError, _join_path, _short, _suggest, _type_name
from grid_portal.jobs.spec.reading import _check_text_size, _plain
from grid_portal.jobs.spec.schema import _SCHEMA, _resolve_schema


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
