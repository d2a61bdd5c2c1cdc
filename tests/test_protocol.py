"""The wire contract (grid_portal/protocol.py) against what runs and what the docs say."""

from __future__ import annotations

import asyncio
from pathlib import Path

from grid_portal.protocol import (
    SCHEDULER_HANDLERS,
    SCHEDULER_STREAM_OPS,
    TABLE_BEGIN,
    TABLE_END,
    WORKER_HANDLERS,
    WORKER_STREAM_OPS,
    trust_table_markdown,
)

DOCS = Path(__file__).resolve().parent.parent / "docs" / "security.md"


def test_the_docs_trust_table_is_the_protocol() -> None:
    text = DOCS.read_text()
    assert TABLE_BEGIN in text and TABLE_END in text, "docs/security.md lost its protocol table"
    documented = text[text.index(TABLE_BEGIN) : text.index(TABLE_END) + len(TABLE_END)]
    assert documented == trust_table_markdown(), (
        "docs/security.md's trust table is out of date: paste `python -m grid_portal.protocol`"
    )


def test_every_handler_the_portal_adds_is_in_the_contract() -> None:
    """A PortalPlugin started on an in-process scheduler: each grid handler it registers has a
    rule, and each rule names a handler or stream op that exists (no stale entries)."""
    from distributed import Scheduler

    from grid_portal.portal.plugin import PortalPlugin

    async def build() -> tuple[set[str], set[str]]:
        scheduler = Scheduler(dashboard=False, validate=False)
        plugin = PortalPlugin()
        await plugin.start(scheduler)
        try:
            return set(scheduler.handlers), set(scheduler.stream_handlers)
        finally:
            await plugin.close()

    handlers, stream_ops = asyncio.run(build())
    grid_handlers = {h for h in handlers if h.startswith("grid_")}
    assert grid_handlers <= set(SCHEDULER_HANDLERS), grid_handlers - set(SCHEDULER_HANDLERS)
    assert set(SCHEDULER_HANDLERS) <= handlers, set(SCHEDULER_HANDLERS) - handlers
    assert set(SCHEDULER_STREAM_OPS) <= stream_ops, set(SCHEDULER_STREAM_OPS) - stream_ops


def test_worker_rules_name_real_worker_handlers() -> None:
    from distributed import Worker

    from grid_portal.node.cell_lease import install_handlers

    async def build() -> tuple[set[str], set[str]]:
        worker = Worker("tcp://127.0.0.1:9", dashboard=False)
        # What the NodePlugin adds (grid_portal/node/plugin.py): grid_node_status, and the
        # stream handlers for leased cells, installed by the same function it calls.
        install_handlers(worker)
        return set(worker.handlers) | {"grid_node_status"}, set(worker.stream_handlers)

    handlers, stream_ops = asyncio.run(build())
    assert set(WORKER_HANDLERS) <= handlers, set(WORKER_HANDLERS) - handlers
    assert set(WORKER_STREAM_OPS) <= stream_ops, set(WORKER_STREAM_OPS) - stream_ops
