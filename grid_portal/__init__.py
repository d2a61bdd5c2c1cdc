"""Grid Portal: a LAN-first, community-powered compute grid for science, used from Jupyter.

This module is the public face only. It stays light: ``import grid_portal`` must not import
Dask (``import distributed`` alone costs about 0.6 s), so everything heavy is imported lazily.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from grid_portal.client import Grid

__all__ = ["Grid", "__version__", "load_ipython_extension", "unload_ipython_extension"]


def __getattr__(name: str) -> Any:
    # Lazy attribute access (PEP 562) keeps `import grid_portal` free of Dask.
    if name == "Grid":
        from grid_portal.client import Grid

        return Grid
    raise AttributeError(f"module 'grid_portal' has no attribute {name!r}")


def load_ipython_extension(ipython: Any) -> None:
    """``%load_ext grid_portal``: register the ``%%grid`` and ``%grid`` magics."""
    from grid_portal.notebook.magics import load_ipython_extension as _load

    _load(ipython)


def unload_ipython_extension(ipython: Any) -> None:
    from grid_portal.notebook.magics import unload_ipython_extension as _unload

    _unload(ipython)


def _jupyter_server_extension_points() -> list[dict[str, str]]:
    return [{"module": "grid_portal.jupyter.extension"}]


def _jupyter_labextension_paths() -> list[dict[str, str]]:
    return [{"src": "labextension", "dest": "grid-portal"}]
