"""Host and process health: `health_update` data, memory and event-loop lag (psutil)."""

from __future__ import annotations

import asyncio
import gc
import time
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
        return {
            "event_loop_lag_ms": round(self.last * 1000, 3),
            "event_loop_lag_max_ms": round(self.max * 1000, 3),
        }


class GarbageCollector:
    """Full collections on a timer, and what they cost.

    The young generation is collected only every 50,000 net allocations: frequent collections
    with thousands of connections lengthened the latency tail. Each closed connection leaves a
    few hundred objects in reference cycles (the server's protocol objects, its cancelled
    handler task), and by the time they are garbage they are in the oldest generation, which
    Python would then collect only after hours at a low event rate while memory grows. What
    start-up made is frozen out of every collection, so a full one scans the live connections
    and the garbage only."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.collections = 0
        self.last_pause = 0.0
        self.max_pause = 0.0

    def configure(self) -> None:
        gc.set_threshold(50_000, 20, 100 if self.interval else 10)
        gc.collect()
        gc.freeze()

    async def run(self) -> None:
        if not self.interval:
            return
        while True:
            await asyncio.sleep(self.interval)
            started = time.perf_counter()
            gc.collect()
            self.last_pause = time.perf_counter() - started
            self.max_pause = max(self.max_pause, self.last_pause)
            self.collections += 1

    def stats(self) -> dict[str, float]:
        return {
            "gc_full_collections": self.collections,
            "gc_pause_ms": round(self.last_pause * 1000, 3),
            "gc_pause_max_ms": round(self.max_pause * 1000, 3),
        }
