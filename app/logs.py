"""The gateway's log output (the engine service's too)."""

from __future__ import annotations

import logging
import os
import socket
import time


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


class Throttled:
    """A log line that may come thousands of times a second (a refused request: anyone can send
    them): the first of each distinct line in `interval` seconds is written, the same line again
    only counted, and its next writing says how many were left out."""

    MAX_LINES = 1000  # distinct lines remembered; past it, forgotten (and written again)

    def __init__(self, logger: logging.Logger, interval: float = 10.0) -> None:
        self._logger = logger
        self.interval = interval
        self._lines: dict[str, tuple[float, int]] = {}  # line -> (next due, left out since)

    def info(self, message: str, *args: object) -> None:
        line = message % args if args else message
        now = time.monotonic()
        due, left_out = self._lines.get(line, (0.0, 0))
        if now < due:
            self._lines[line] = (due, left_out + 1)
            return
        if len(self._lines) >= self.MAX_LINES:
            self._lines.clear()
        self._lines[line] = (now + self.interval, 0)
        if left_out:
            line += f" (and {left_out} more times in the last {self.interval:g} s)"
        self._logger.info("%s", line)
