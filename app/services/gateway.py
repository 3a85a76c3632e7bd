"""The gateway: the bus, the connection manager, API keys and commands, started and stopped
together with the app. One instance per app, in `app.extensions["gateway"]`."""
from __future__ import annotations

import asyncio
import contextlib
import gc
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from app.services.auth import ApiKeys
from app.services.bus import EventBus, MemoryBus
from app.services.connections import ConnectionManager
from app.services.events import SERVER_VERSION, TOPICS
from config import Config

CommandHandler = Callable[..., Awaitable[Any]]


@dataclass(frozen=True)
class Command:
    name: str
    scope: str
    handler: CommandHandler


class Gateway:
    def __init__(self, config: Config, bus: EventBus | None = None) -> None:
        self.config = config
        self.bus = bus or MemoryBus(config.EVENT_HISTORY_SIZE, config.EVENT_HISTORY_MAX_AGE)
        self.manager = ConnectionManager(
            self.bus,
            max_connections=config.WS_MAX_CONNECTIONS,
            queue_size=config.WS_SEND_QUEUE_SIZE,
            heartbeat_interval=config.WS_HEARTBEAT_INTERVAL,
            connection_timeout=config.WS_CONNECTION_TIMEOUT,
            close_timeout=config.WS_CLOSE_TIMEOUT,
            fast_path=config.WS_FAST_PATH,
        )
        self.api_keys = ApiKeys(config.API_KEYS)
        self.commands: dict[str, Command] = {}
        self.status_providers: list[Callable[[], dict[str, Any]]] = []
        self.started = time.time()
        self._tasks: list[asyncio.Task[None]] = []
        self.add_command("get_status", "read", self._get_status)

    def add_command(self, name: str, scope: str, handler: CommandHandler) -> None:
        """Register a WebSocket `command`; `handler(connection, **args)` returns its result."""
        self.commands[name] = Command(name, scope, handler)

    async def start(self) -> None:
        # Thousands of long-lived connection objects make every full collection a pause of
        # 100 ms and more; collecting the young generation less often keeps the latency tail
        # low (see PERFORMANCE in the README).
        gc.set_threshold(50_000, 20, 100)
        await self.bus.start()
        self._tasks.append(asyncio.create_task(self.manager.run_heartbeat()))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        await self.bus.stop()

    def system_status(self) -> dict[str, Any]:
        status: dict[str, Any] = {
            "status": "running",
            "version": SERVER_VERSION,
            "uptime_seconds": round(time.time() - self.started, 3),
            "connections": len(self.manager.connections),
            "last_seq": self.bus.head,
            "bus_backend": self.bus.backend,
            "available_topics": list(TOPICS),
        }
        for provider in self.status_providers:
            status.update(provider())
        return status

    async def _get_status(self, connection: Any) -> dict[str, Any]:
        return self.system_status()
