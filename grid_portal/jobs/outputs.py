"""A workflow's outputs by name, as data, for whoever serves them (the REST API).

``grid-portal job ID --fetch DIR`` writes a workflow's output files under DIR and shows its
values; this names the same things so that they can be listed and served one by one:

- a file a task made (a ``StagedFile``) by the path ``--fetch`` gives it (``out/a.txt``; a
  path taken by other content moves under ``_2/``...), its bytes as they are;
- a stage's value (a function's return) by the stage (``analyse``; a map stage's item
  ``simulate[3]``), as JSON: files in it as their names, other non-JSON data as its repr;
- an item that failed, by the same name, with its error (the other items are still served);
- a value that is not plain data (a class of the researcher's, a function) is listed with
  its type and not served: opening it would run what a node sent.

Nothing here unpickles: the values come opened as data only (``Grid.held_results`` with
``data_only``), or stay ``UntrustedData``, whose bytes are never read.
"""

from __future__ import annotations

import json
import mimetypes
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from grid_portal.jobs.stage_task import StagedFile, TaskFailed, _Placer, _replace_files

JSON_TYPE = "application/json"
BINARY_TYPE = "application/octet-stream"


@dataclass
class Output:
    """One thing a workflow brought back: a file, a value, an item's error, or an unopened
    value."""

    name: str
    stage: str
    item: int | None
    kind: str  # "file" | "value" | "error" | "unopened"
    content_type: str | None = None
    data: bytes | None = None  # what GET outputs/{name} answers; None: not served
    sha256: str | None = None
    error: str | None = None  # kind "error": why the item has no output
    type: str | None = None  # kind "unopened": the type it carries

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "stage": self.stage,
            "item": self.item,
            "kind": self.kind,
            "content_type": self.content_type,
            "size": len(self.data) if self.data is not None else None,
            "sha256": self.sha256,
            "error": self.error,
            "type": self.type,
        }


class _Namer(_Placer):
    """Names files as ``--fetch`` would place them, and writes nothing."""

    def __init__(self) -> None:
        super().__init__(Path("."))
        self.files: list[tuple[str, StagedFile]] = []

    def place(self, staged: StagedFile) -> str:
        name, new = self.name(staged)
        if new:
            self.files.append((name, staged))
        return name


def list_outputs(
    held: dict[str, list[tuple[int | None, Any, BaseException | None]]],
) -> list[Output]:
    """Every output of a workflow, from ``Grid.held_results(job_id, data_only=True)``."""
    from grid_portal.safe_pickle import UntrustedData

    namer = _Namer()
    out: list[Output] = []
    for stage, items in held.items():
        for item, value, error in items:
            name = stage if item is None else f"{stage}[{item}]"
            if error is not None:
                out.append(Output(name, stage, item, "error", error=_one_line(error)))
                continue
            if isinstance(value, UntrustedData):
                out.append(Output(name, stage, item, "unopened", type=value.type_name))
                continue
            before = len(namer.files)
            try:
                shown = _replace_files(value, namer, absolute=False)
            except TaskFailed as exc:  # a damaged file (checksum) or a path outside
                out.append(Output(name, stage, item, "error", error=str(exc)))
                continue
            for path, staged in namer.files[before:]:
                out.append(
                    Output(
                        path, stage, item, "file", _content_type(path), staged.data, staged.sha256
                    )
                )
            if not isinstance(value, StagedFile):
                data = json.dumps(shown, default=repr, ensure_ascii=False).encode()
                out.append(Output(name, stage, item, "value", JSON_TYPE, data))
    return out


def _content_type(path: str) -> str:
    kind, _ = mimetypes.guess_type(path, strict=False)
    return kind or BINARY_TYPE


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[-1] if text else ''}".strip()
