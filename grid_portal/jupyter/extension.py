"""The Jupyter server extension: the grid's REST and live API under ``{base_url}grid/api/``.

Enabled on install by ``jupyter-config/jupyter_server_config.d/grid_portal.json``; found
through ``grid_portal._jupyter_server_extension_points()``. Configured with traitlets
(``c.GridPortal.address``, ``c.GridPortal.embedded_cpus``, ... see ``service.GridPortal``).

A classic function-based extension: it has no options of its own to parse, pages to serve or
command line, so an ``ExtensionApp`` would add machinery and nothing else. The one thing a
function-based extension lacks is a shutdown hook (jupyter-server calls ``stop_extension``
only on ``ExtensionApp``\\ s), so ``_load_jupyter_server_extension`` chains the server's own
``cleanup_extensions`` step: when the server stops, the Grid connection and the event feed
close, and an embedded portal this server started is stopped.
"""

from __future__ import annotations

from typing import Any

from traitlets import TraitError

from grid_portal.jupyter.handlers import handlers
from grid_portal.jupyter.service import GridPortal

SETTINGS_KEY = "grid_portal"


def _load_jupyter_server_extension(serverapp: Any) -> None:
    """Add the handlers and one (not yet connected) ``GridPortal`` to the server."""
    web_app = serverapp.web_app
    try:
        portal = GridPortal(parent=serverapp, log=serverapp.log)
    except TraitError as exc:
        # The user's own mistake in c.GridPortal: one line in the log, not a traceback and a
        # missing extension; the API (and so the sidebar) answers every call with it.
        serverapp.log.error("Grid Portal: %s", exc)
        portal = GridPortal(log=serverapp.log)  # the defaults, never used to connect
        portal.config_error = str(exc)
    web_app.settings[SETTINGS_KEY] = portal
    web_app.add_handlers(".*$", handlers(web_app.settings["base_url"]))

    cleanup = serverapp.cleanup_extensions

    async def cleanup_extensions() -> None:
        try:
            await portal.close()
        finally:
            await cleanup()

    serverapp.cleanup_extensions = cleanup_extensions
    serverapp.log.info(
        "Grid Portal extension loaded at grid/api/; portal: %s",
        "none until the setting above is fixed"
        if portal.config_error
        else portal.address or "found on first use (GRID_PORTAL_ADDRESS, else the embedded one)",
    )
