"""The portal's own Dask dashboard, for its admin only.

Dask's dashboard shows every task and worker of the grid, so the portal runs its scheduler's
HTTP server with no routes unless ``grid-portal serve --dashboard`` asks for them, and even
then only on loopback (``LOOPBACK``, a spare port): nothing off this machine reaches it. The
admin's JupyterLab on this machine shows it through the Jupyter server, behind its login
(``grid_portal/jupyter/dashboard_proxy.py``), after asking where it listens with the
admin-only handler ``grid_dashboard`` (grid_portal/protocol.py).
"""

from __future__ import annotations

from typing import Any

LOOPBACK = "127.0.0.1:0"  # where Dask's HTTP server listens, dashboard or not


def http_routes(dashboard: bool) -> list[str]:
    """Dask's HTTP routes for the scheduler: its own defaults with the dashboard, else none
    (Dask always runs the HTTP server; without routes it serves nothing)."""
    if not dashboard:
        return []
    import dask

    return list(dask.config.get("distributed.scheduler.http.routes"))


class DashboardAddress:
    """``grid_dashboard``: where the dashboard listens (``{"url": ...}``; None when off)."""

    def __init__(self) -> None:
        self.url: str | None = None

    def started(self, scheduler: Any) -> None:
        """Record the HTTP server's loopback address once the scheduler runs."""
        server = getattr(scheduler, "http_server", None)
        if server is not None:
            self.url = f"http://{server.address}:{server.port}/"

    def handlers(self) -> dict[str, Any]:
        return {"grid_dashboard": self.handle}

    def handle(self, comm: Any = None) -> dict[str, Any]:
        return {"url": self.url}
