"""How every Sluice process logs: one line per record with time, level and logger."""

from __future__ import annotations

import logging


def setup_logging(verbose: bool = False) -> None:
    """Log to stderr at INFO (DEBUG when ``verbose``); aiokafka only from WARNING up."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("aiokafka").setLevel(logging.WARNING)
