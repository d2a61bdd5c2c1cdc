"""How a ``grid-portal`` process logs: the portal's two processes and a volunteer alike.

One place, so that the enrolment process, the scheduler process and a volunteer write the
same format and keep Dask's and Tornado's chatter down the same way.
"""

from __future__ import annotations

import logging


def setup_logging(verbose: bool) -> None:
    """Log to stderr with times; ``verbose``: everything, Dask's and Tornado's debug too."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    if not verbose:
        logging.getLogger("distributed").setLevel(logging.WARNING)
        logging.getLogger("tornado").setLevel(logging.WARNING)
