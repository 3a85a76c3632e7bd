"""Host health metrics for `health_update` (psutil)."""
from __future__ import annotations

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
