"""The gateway's log output (the engine service's too)."""

from __future__ import annotations

import logging


def configure_logging(level: str) -> None:
    # Only the gateway's own loggers: Hypercorn has its own handlers, and the root's would
    # print each of its lines twice.
    logger = logging.getLogger("app")
    logger.setLevel(level)
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
