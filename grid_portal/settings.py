"""The portal's and the volunteer's settings: ``grid-portal.yaml`` registered with ``dask.config``.

One configuration system per process. ``grid-portal serve`` and ``grid-portal volunteer`` read
their settings from ``dask.config`` under ``grid-portal.portal`` and ``grid-portal.volunteer``;
the defaults are written once, in the packaged ``grid-portal.yaml``, which this module registers
at import (as ``distributed.config`` registers ``distributed.yaml``). So an operator sets them
like any Dask setting (a YAML file in ``~/.config/dask/``, or ``DASK_GRID_PORTAL__PORTAL__X``
environment variables); command-line flags and a volunteer's ``--config`` file override them.
``grid-portal-schema.yaml`` describes and checks every key. The Jupyter side stays on traitlets.

Keys are written with dashes (``node-timeout``); dask.config also accepts underscores, which is
what environment variables give, so both spellings are read as one.

Imported only where a portal or a volunteer runs: it imports ``dask`` (``grid-portal --help``
and ``import grid_portal`` stay free of it).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Container
from pathlib import Path
from typing import Any

import dask.config
import yaml

from grid_portal.errors import UsageError
from grid_portal.units import parse_duration

ROOT = "grid-portal"
DEFAULTS_FILE = Path(__file__).with_name("grid-portal.yaml")
SCHEMA_FILE = Path(__file__).with_name("grid-portal-schema.yaml")
DOCS = "docs/configuration.md"


def packaged_defaults() -> dict[str, Any]:
    """The packaged ``grid-portal.yaml``, as written (a fresh copy)."""
    return yaml.safe_load(DEFAULTS_FILE.read_text())


@functools.cache
def schema() -> dict[str, Any]:
    return yaml.safe_load(SCHEMA_FILE.read_text())


dask.config.update_defaults(packaged_defaults())


def get(key: str) -> Any:
    """The value of ``grid-portal.<key>`` (e.g. ``"portal.node-timeout"``), checked against the
    schema: a wrong one is a UsageError naming the key and where to fix it."""
    value = dask.config.get(f"{ROOT}.{key}")
    _raise_first(_validator(key).iter_errors(_dashed(value)), key)
    return value


def duration(key: str) -> float:
    """A duration setting in seconds (``"2s"``, ``"5m"`` or a number), more than 0."""
    seconds = parse_duration(get(key))
    if seconds <= 0:
        raise UsageError(_problem(key, get(key), "a duration of more than 0, like 2s or 5m"))
    return seconds


def value(key: str) -> Any:
    """``grid-portal.<key>``: seconds for a duration key, else the value as configured."""
    return duration(key) if _is_duration(_schema_of(key)) else get(key)


def given_or(given: Any, key: str) -> Any:
    """``given`` unless it is None (a flag not given, a parameter left out), else ``value(key)``."""
    return value(key) if given is None else given


def merged(
    section: str, given: dict[str, Any], only: Container[str] | None = None
) -> dict[str, Any]:
    """Every setting of ``grid-portal.<section>`` by its Python name (``node_timeout``), or
    those named in ``only`` (the fields of what the caller makes): the value in ``given`` where
    it is not None (command-line flags over a volunteer's file, as the caller layered them),
    else the configured one. Durations come back in seconds, also when given as text ("5m");
    a table given (Dask settings) adds to the configured one, as a Dask YAML file would."""
    result = {}
    for key, node in leaf_keys():
        head, _, name = key.partition(".")
        python_name = name.replace("-", "_")
        if head == section and (only is None or python_name in only):
            chosen = given.get(python_name)
            if chosen is None:
                result[python_name] = value(key)
            elif _is_duration(node):
                result[python_name] = parse_duration(chosen)
            elif isinstance(chosen, dict):
                result[python_name] = {**value(key), **chosen}
            else:
                result[python_name] = chosen
    return result


def field_from(key: str) -> Any:
    """A dataclass field whose default is ``grid-portal.<key>`` at the time an instance is
    made (a duration key gives seconds): the default stays written once, in the yaml."""
    return dataclasses.field(default_factory=lambda: value(key))


def check() -> None:
    """Check every ``grid-portal`` setting against the schema, and every duration's value;
    a command calls this before it starts anything, so a mistake is one line, not a crash
    half-way through starting."""
    import jsonschema

    config = {ROOT: _dashed(dask.config.get(ROOT, {}))}
    validator = jsonschema.Draft202012Validator(schema())
    _raise_first(validator.iter_errors(config), None)
    for key, sub in leaf_keys():
        if _is_duration(sub):
            duration(key)


def leaf_keys() -> list[tuple[str, dict[str, Any]]]:
    """Every leaf key of the schema (``"portal.node-timeout"``) with its schema, in order."""
    found: list[tuple[str, dict[str, Any]]] = []

    def walk(prefix: str, node: dict[str, Any]) -> None:
        for name, sub in node.get("properties", {}).items():
            key = f"{prefix}.{name}" if prefix else name
            if "properties" in sub:
                walk(key, sub)
            else:
                found.append((key, sub))

    walk("", schema()["properties"][ROOT])
    return found


def apply_dask_settings(wanted: dict[str, Any]) -> dict[str, Any]:
    """Set, for this whole process, ``wanted`` Dask settings (dotted Dask keys, e.g. the value
    of ``grid-portal.portal.scheduler-dask``), each only where Dask's value is still the one
    its own packaged files give (so an operator's own Dask setting wins). Returns what was set.

    Called once by a process that exists to run one Dask server (the portal's scheduler
    process), after ``import distributed`` registered Dask's defaults: the settings then hold
    for everything that server starts, and nothing else shares the process."""
    chosen = {
        name: value
        for name, value in wanted.items()
        if dask.config.get(name, None) in (None, _packaged_dask_default(name))
    }
    dask.config.set(chosen)
    return chosen


def _packaged_dask_default(name: str) -> Any:
    """The value Dask's own configuration files give ``name`` (what nobody changed)."""
    value = None
    for defaults in dask.config.defaults:
        node: Any = defaults
        for part in name.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node is not None:
            value = node
    return value


def env_name(key: str) -> str:
    """The environment variable dask.config reads for ``key``."""
    return "DASK_" + "__".join(p.replace("-", "_").upper() for p in [ROOT, *key.split(".")])


# -- checking ---------------------------------------------------------------------------------
def _dashed(value: Any) -> Any:
    """Keys as the schema writes them: dask.config treats ``node_timeout`` (an environment
    variable's spelling) as ``node-timeout``."""
    if isinstance(value, dict):
        return {str(k).replace("_", "-"): _dashed(v) for k, v in value.items()}
    return value


def _is_duration(node: dict[str, Any]) -> bool:
    return node.get("$ref") == "#/$defs/duration"


def _schema_of(key: str) -> dict[str, Any]:
    node = schema()["properties"][ROOT]
    for part in key.split("."):
        node = node["properties"][part]
    return node


def _validator(key: str) -> Any:
    import jsonschema

    # The key's own schema, with the shared definitions its $ref points to.
    return jsonschema.Draft202012Validator({**_schema_of(key), "$defs": schema()["$defs"]})


def _raise_first(errors: Any, base: str | None) -> None:
    error = next(iter(sorted(errors, key=lambda e: list(e.absolute_path))), None)
    if error is None:
        return
    parts = [str(p) for p in error.absolute_path]
    if base is None:
        parts = parts[1:]  # the whole configuration: drop "grid-portal"
    key = ".".join([*([base] if base else []), *parts])
    definitions = schema()["$defs"].values()
    if error.validator == "additionalProperties":
        return _raise_unknown(key, error)
    if any(error.schema is d or error.schema == d for d in definitions):
        expected = str(error.schema["description"])
    else:
        expected = error.message
    raise UsageError(_problem(key, error.instance, expected))


def _raise_unknown(key: str, error: Any) -> None:
    known = sorted(error.schema.get("properties", {}))
    unknown = sorted(set(error.instance) - set(known))
    where = f"{ROOT}.{key}" if key else ROOT
    raise UsageError(
        f"configuration: unknown key {', '.join(map(repr, unknown))} in {where}; the keys "
        f"there are {', '.join(known)}. "
        f"Fix the name in your Dask configuration (a YAML file in ~/.config/dask/, or a "
        f"DASK_GRID_PORTAL__... environment variable); see {DOCS}"
    )


def _problem(key: str, value: Any, expected: str) -> str:
    return (
        f"configuration {ROOT}.{key} = {value!r} is not valid: it must be {expected}. "
        f"Fix it where it is set (the environment variable {env_name(key)}, or a YAML file in "
        f"~/.config/dask/), or remove it to use the default; see {DOCS}"
    )


# -- the docs' table ---------------------------------------------------------------------------
TABLE_BEGIN = "<!-- settings table: made by `python -m grid_portal.settings`; checked by a test -->"
TABLE_END = "<!-- end of settings table -->"


def settings_table_markdown() -> str:
    """Every key of the schema with its packaged default, environment variable and description,
    as Markdown for docs/configuration.md (tests/test_settings.py checks the docs hold it)."""
    defaults = packaged_defaults()[ROOT]
    lines = [TABLE_BEGIN, ""]
    for section in schema()["properties"][ROOT]["properties"]:
        lines += [
            f"### `{ROOT}.{section}`",
            "",
            "| key | default | environment variable | what it sets |",
            "|---|---|---|---|",
        ]
        for key, node in leaf_keys():
            if key.partition(".")[0] != section:
                continue
            default: Any = defaults
            for part in key.split("."):
                default = default[part]
            if isinstance(default, dict):
                shown = "<br>".join(f"`{k}: {_yaml_scalar(v)}`" for k, v in default.items())
            else:
                shown = f"`{_yaml_scalar(default)}`"
            about = " ".join(str(node["description"]).split())
            lines.append(f"| `{key.partition('.')[2]}` | {shown} | `{env_name(key)}` | {about} |")
        lines.append("")
    lines.append(TABLE_END)
    return "\n".join(lines)


def _yaml_scalar(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


if __name__ == "__main__":
    print(settings_table_markdown())
