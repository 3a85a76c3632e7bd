"""Host and process health: `health_update` data, memory and event-loop lag (psutil)."""
from __future__ import annotations

import asyncio
from typing import Any

import psutil


def health_snapshot() -> dict[str, Any]:
    """The spec's health_update data. CPU is measured since the previous call (non-blocking)."""
    return {
        "cpu_percent": psutil.cpu_percent(interval=None),
        "memory_percent": psutil.virtual_memory().percent,
        "disk_percent": psutil.disk_usage("/").percent,
        "process_count": len(psutil.pids()),
    }


def process_rss() -> int:
    """This worker's resident memory in bytes."""
    return int(psutil.Process().memory_info().rss)


class LoopLagMonitor:
    """How long the event loop was blocked: a task sleeps `interval` and measures how late it
    wakes. Every client of this worker waits at least that long for its next frame."""

    def __init__(self, interval: float = 0.1) -> None:
        self.interval = interval
        self.last = 0.0
        self.max = 0.0

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + self.interval
            await asyncio.sleep(self.interval)
            self.last = max(0.0, loop.time() - due)
            self.max = max(self.max, self.last)

    def stats(self) -> dict[str, float]:
        return {"event_loop_lag_ms": round(self.last * 1000, 3),
                "event_loop_lag_max_ms": round(self.max * 1000, 3)}
