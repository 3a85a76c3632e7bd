"""The gateway's log output (the engine service's too)."""

from __future__ import annotations

import logging
import os
import socket


def worker_id() -> str:
    """The worker serving this process, as every log line, `/api/health` and a WebSocket's
    `connected` name it: host and process id."""
    return f"{socket.gethostname()}:{os.getpid()}"


def configure_logging(level: str) -> None:
    # Only the gateway's own loggers: Hypercorn has its own handlers, and the root's would
    # print each of its lines twice.
    logger = logging.getLogger("app")
    logger.setLevel(level)
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(
            logging.Formatter("%(asctime)s [%(process)d] %(levelname)s %(name)s: %(message)s")
        )
        logger.addHandler(handler)
