"""What a workflow's shell and script tasks printed, on its way from the node to the portal.

Node side, and the portal installs the worker plugin: the task leaves its output in a file
(``leave_output``: it may run in a sandboxed process with no connection of its own), and
``TaskOutputForwarder``, a worker plugin the portal sends to every node, forwards it to the
portal's ``grid_task_output`` handler for ``grid-portal logs``. Imports no client code.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
from pathlib import Path
from typing import Any

OUTPUT_FOLDER = "grid-task-output"


def _output_path(local_directory: str | os.PathLike[str], key_text: str) -> Path:
    digest = hashlib.sha256(key_text.encode("utf-8", "surrogatepass")).hexdigest()[:32]
    return Path(local_directory) / OUTPUT_FOLDER / f"{digest}.json"


def leave_output(key: str, stdout: str, stderr: str) -> None:
    """Leave what the task printed where the worker's ``TaskOutputForwarder`` finds it.

    A file, because the task may run in a sandboxed process of its own that has no
    connection to the portal; the worker process, which has one, forwards it.
    """
    try:
        from distributed import get_worker

        worker = get_worker()  # a task process's view: its outbox is the worker's directory
        path = _output_path(getattr(worker, "grid_outbox", None) or worker.local_directory, key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
        tmp.write_text(json.dumps({"stdout": stdout, "stderr": stderr}))
        os.replace(tmp, path)
    except Exception:  # noqa: BLE001 - logs are a convenience; the task's result matters
        pass


try:
    from distributed.diagnostics.plugin import WorkerPlugin as _WorkerPlugin
except ImportError:  # pragma: no cover - distributed is a dependency
    _WorkerPlugin = object  # type: ignore[assignment,misc]


class TaskOutputForwarder(_WorkerPlugin):  # type: ignore[misc,valid-type]
    """Worker plugin (installed by the portal on every node): sends each finished task's
    captured output to the portal (``grid_task_output``), for ``grid-portal logs``."""

    name = "grid-task-output"
    idempotent = True

    def setup(self, worker: Any) -> None:
        self.worker = worker

    def transition(self, key: Any, start: str, finish: str, **kwargs: Any) -> None:
        if start != "executing" or finish not in ("memory", "error"):
            return
        path = _output_path(self.worker.local_directory, str(key))
        try:
            data = json.loads(path.read_text())
            path.unlink()
        except (OSError, ValueError):
            return  # not a shell or script task (or nothing left): nothing to send
        self.worker.loop.add_callback(self._send, str(key), data)

    async def _send(self, key: str, data: dict[str, Any]) -> None:
        with contextlib.suppress(Exception):
            await self.worker.scheduler.grid_task_output(
                key=key, stdout=str(data.get("stdout", "")), stderr=str(data.get("stderr", ""))
            )
