"""Host and process health: `health_update` data, memory and event-loop lag (psutil)."""

from __future__ import annotations

import asyncio
import gc
import time
from typing import Any

import psutil

from app.services import metrics


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
            metrics.LOOP_LAG.observe(self.last)

    def stats(self) -> dict[str, float]:
        return {
            "event_loop_lag_ms": round(self.last * 1000, 3),
            "event_loop_lag_max_ms": round(self.max * 1000, 3),
        }


class GarbageCollector:
    """The garbage collector's schedule, and what its full collections cost.

    A full collection stops the worker for as long as it takes to scan every tracked object:
    about 38 ms per 1000 open connections. So nothing is left for one to do: a closed
    connection leaves no reference cycle (app/services/transport.py breaks Hypercorn's), the
    resume history holds no tracked object, and what start-up made is frozen out of every
    collection. The young generation is collected every 50,000 net allocations (frequent
    collections with thousands of connections lengthened the latency tail); Python's own rule
    still runs a full collection when the long-lived objects have grown by a quarter, which a
    steady number of connections does not do. GC_INTERVAL > 0 adds a full collection on a
    timer, for code that does leave cycles."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.collections = 0
        self.last_pause = 0.0
        self.max_pause = 0.0
        self.young_max_pause = 0.0
        self._started = 0.0

    def configure(self) -> None:
        gc.set_threshold(50_000, 20, 100 if self.interval else 10)
        gc.collect()
        gc.freeze()
        if self._time_collection not in gc.callbacks:
            gc.callbacks.append(self._time_collection)

    def release(self) -> None:
        if self._time_collection in gc.callbacks:
            gc.callbacks.remove(self._time_collection)

    def _time_collection(self, phase: str, info: dict[str, int]) -> None:
        """Every collection, timed: Python's own and the timer's."""
        if phase == "start":
            self._started = time.perf_counter()
            return
        pause = time.perf_counter() - self._started
        metrics.observe_gc_pause(info["generation"], pause)
        if info["generation"] < 2:
            self.young_max_pause = max(self.young_max_pause, pause)
            return
        self.collections += 1
        self.last_pause = pause
        self.max_pause = max(self.max_pause, pause)

    async def run(self) -> None:
        if not self.interval:
            return
        while True:
            await asyncio.sleep(self.interval)
            gc.collect()

    def stats(self) -> dict[str, float]:
        return {
            "gc_full_collections": self.collections,
            "gc_pause_ms": round(self.last_pause * 1000, 3),
            "gc_pause_max_ms": round(self.max_pause * 1000, 3),
            "gc_young_pause_max_ms": round(self.young_max_pause * 1000, 3),
        }
