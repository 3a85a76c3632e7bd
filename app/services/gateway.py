"""The gateway composes the services (the bus, the connection manager, API keys, the market,
the trading engine, the producers), starts and stops them with the app. One per app, in
`app.extensions["gateway"]`. The commands clients run are in app/services/commands.py."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import signal
import time
from typing import Any

from app.errors import GatewayError
from app.logs import worker_id
from app.services.archive import Archive
from app.services.auth import ApiKeys
from app.services.bus import EventBus, MemoryBus
from app.services.commands import ACTIONS, COMMANDS
from app.services.connections import ConnectionManager
from app.services.database import Database
from app.services.engine import RiskRules, TradingEngine
from app.services.engines import Engine, PaperEngine
from app.services.events import (
    SERVER_VERSION,
    TOPICS,
    Event,
    normalize_symbol,
)
from app.services.health import (
    GarbageCollector,
    LoopLagMonitor,
    process_rss,
)
from app.services.idempotency import IdempotentPublisher
from app.services.leader import LeaderLease
from app.services.market import prices_in
from app.services.market_feed import open_market
from app.services.metrics import MetricsSync
from app.services.read_model import ReadModel
from app.services.redis_bus import RedisBus
from app.services.redis_client import RedisTarget
from app.services.remote_engine import RemoteEngine
from app.services.simulation import Simulation
from config import Config

log = logging.getLogger(__name__)

PRODUCER_STOP_TIMEOUT = 5.0


class OpenGatewayRefused(RuntimeError):
    def __init__(self, host: str) -> None:
        super().__init__(
            f"HOST={host} is reachable from other machines and no API key is configured: "
            "whoever reaches it would have every scope, trade included. Set API_KEYS (or create "
            "a key: python -m app keys create), listen on loopback (HOST=127.0.0.1), or set "
            "ALLOW_OPEN_GATEWAY=true to serve it open on purpose"
        )


class Gateway:
    def __init__(self, config: Config, db: Database, bus: EventBus | None = None) -> None:
        self.config = config
        self.db = db
        self.lease: LeaderLease | None = None
        redis = redis_target(config) if bus is None and config.uses_redis else None
        if bus is not None:
            self.bus = bus
        elif redis is not None:
            redis_bus = RedisBus(
                redis,
                prefix=config.REDIS_PREFIX,
                history_size=config.EVENT_HISTORY_SIZE,
                history_max_age=config.EVENT_HISTORY_MAX_AGE,
                deaf_after=config.REDIS_DEAF_AFTER,
            )
            redis_bus.on_link_change = self._on_link_change
            self.bus = redis_bus
            self.lease = lease(redis, config, "leader", "producers' leader")
        else:
            self.bus = MemoryBus(config.EVENT_HISTORY_SIZE, config.EVENT_HISTORY_MAX_AGE)
        self.manager = ConnectionManager(
            self.bus,
            max_connections=config.WS_MAX_CONNECTIONS,
            queue_size=config.WS_SEND_QUEUE_SIZE,
            heartbeat_interval=config.WS_HEARTBEAT_INTERVAL,
            connection_timeout=config.WS_CONNECTION_TIMEOUT,
            close_timeout=config.WS_CLOSE_TIMEOUT,
            fast_path=config.WS_FAST_PATH,
            max_per_key=config.WS_MAX_CONNECTIONS_PER_KEY,
        )
        if isinstance(self.bus, RedisBus):
            self.bus.on_stream_reset = self.manager.stream_reset
        self.api_keys = ApiKeys(
            config.API_KEYS, db, config.API_KEY_REFRESH_INTERVAL, config.API_KEY_CACHE_MAX_AGE
        )
        symbols = [normalize_symbol(s) for s in config.SYMBOLS]
        if None in symbols or not symbols:
            raise ValueError(f"SYMBOLS must be BASE/QUOTE pairs, got {config.SYMBOLS!r}")
        self.market = open_market(
            config.MARKET_FEED, [s for s in symbols if s], config.MARKET_FEED_URL
        )
        # The paper engine trades in this process; with ENGINE_URL a remote engine does.
        self.trading = (
            None
            if config.ENGINE_URL
            else TradingEngine(db, self.market, self.bus.publish, risk_rules(config))
        )
        self.simulation = Simulation(
            market=self.market,
            engine=self.trading,
            db=db,
            publish=self.bus.publish,
            system_status=self.system_status,
            intervals=producer_intervals(config),
        )
        self.engine: Engine = (
            PaperEngine(self.trading, self.simulation)
            if self.trading is not None
            else self._remote_engine()
        )
        # One way: producers publish to the bus; its listeners are the fan-out, the
        # followers' price feed and, with a remote engine, its read model.
        self.bus.add_listener(self.manager.fan_out)
        self.bus.add_listener(self._follow_prices)
        self.archive = Archive(
            db,
            self.bus,
            max_age=config.EVENT_ARCHIVE_MAX_AGE,
            max_events=config.EVENT_ARCHIVE_MAX_EVENTS,
        )
        self.manager.archive = self.archive
        # Ingest's idempotency keys, also kept where a Redis that loses its data cannot lose them.
        self.publisher = IdempotentPublisher(self.bus, db, config.EVENT_HISTORY_MAX_AGE)
        self.bus.add_listener(self.archive.observe)
        # With Redis, one worker of the deployment archives: the holder of this lease.
        self.archivist_lease = (
            lease(redis, config, "archivist", "archivist") if redis is not None else None
        )
        self.metrics = MetricsSync(self, config.METRICS_INTERVAL)
        self.loop_lag = LoopLagMonitor()
        self.garbage = GarbageCollector(config.GC_INTERVAL)
        self.started = time.time()
        self.running = False  # between start() and stop(): serving
        self._tasks: list[asyncio.Task[None]] = []
        self._producers: list[asyncio.Task[None]] = []
        self._stopping = asyncio.Event()
        self._terminating = False

    async def start(self) -> None:
        await self.api_keys.refresh()  # logs whether the gateway is open or keyed
        if not self.api_keys.keyed and not self.config.on_loopback:  # before anything starts
            if not self.config.ALLOW_OPEN_GATEWAY:
                raise OpenGatewayRefused(self.config.HOST)
            log.warning("ALLOW_OPEN_GATEWAY: serving %s with no API key", self.config.HOST)
        self.bus.raise_floor(await self.archive.head())  # a seq names one event for good
        await self.bus.start()
        await self.engine.start()
        await self.simulation.restore()
        self.garbage.configure()
        self._tasks = [
            asyncio.create_task(self._watch_keys()),
            asyncio.create_task(self.metrics.run()),
            asyncio.create_task(self.manager.run_heartbeat()),
            asyncio.create_task(self.loop_lag.run()),
            asyncio.create_task(self.garbage.run()),
            asyncio.create_task(self.archive.run()),
            asyncio.create_task(self.publisher.run()),
        ]
        if self.archivist_lease is not None:
            self._tasks.append(
                asyncio.create_task(
                    self.archivist_lease.run(self.archive.elected, self.archive.deposed)
                )
            )
        else:
            await self.archive.elected()
        if self.config.SIMULATION:
            if self.lease is not None:
                self._tasks.append(
                    asyncio.create_task(self.lease.run(self._start_producers, self._stop_producers))
                )
            else:
                await self._start_producers()
        if multiprocessing.parent_process() is not None:  # a worker of Hypercorn's master
            asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, self._terminate)
        self.running = True

    def _terminate(self) -> None:
        """SIGTERM: Hypercorn's master stops the other workers this way when one dies, and an
        operator may send it. Without this the worker would die at once and cut its clients off
        (1006); instead they are told and closed with 1001, then the process ends (unless the
        master's graceful shutdown, also under way in the master's case, ends it first)."""
        if self._terminating:
            return  # a repeated SIGTERM must not cut the clients being closed; the timer ends it
        self._terminating = True
        log.info("SIGTERM: closing %d connections, then stopping", len(self.manager.connections))
        self.manager.close_all_for_shutdown()
        asyncio.get_running_loop().call_later(self.config.WS_CLOSE_TIMEOUT + 1, _end_process)

    async def _watch_keys(self) -> None:
        """Look at the stored keys every API_KEY_REFRESH_INTERVAL; when they changed, close the
        WebSockets they no longer admit. The same look tells readiness whether the database
        answers (its outage is logged once, by the database)."""
        admitted_by = self.api_keys.stored
        while True:
            await asyncio.sleep(self.api_keys.refresh_interval)
            try:
                await self.api_keys.refresh()
            except GatewayError:  # the database is away: the keys as last read stay in force
                continue
            except Exception:
                log.exception("could not read the API keys")
                continue
            if self.api_keys.stored != admitted_by:
                admitted_by = self.api_keys.stored
                self.manager.close_unadmitted(self.api_keys.still_admits)

    @property
    def is_leader(self) -> bool:
        """Whether this worker runs the producers (always, without Redis)."""
        return self.config.SIMULATION and (self.lease is None or self.lease.is_leader)

    async def _start_producers(self) -> None:
        # A new leader continues from what the database says, not from what it saw.
        await self.simulation.restore()
        await self.engine.load()
        self._stopping = asyncio.Event()
        self._producers = [
            asyncio.create_task(loop()) for loop in self.simulation.loops(self._stopping)
        ]

    async def _stop_producers(self) -> None:
        """Let each producer finish its tick (bounded), then cancel what is left."""
        self._stopping.set()
        if self._producers:
            await asyncio.wait(self._producers, timeout=PRODUCER_STOP_TIMEOUT)
        await _cancel(self._producers)
        self._producers = []

    async def _write_pending(self) -> None:
        """A stopping worker writes what it had not archived yet, and the idempotency keys it
        gave (bounded: the database may be what is failing)."""
        try:
            async with asyncio.timeout(PRODUCER_STOP_TIMEOUT):
                await self.archive.flush()
                await self.publisher.flush()
        except Exception as error:
            log.error("stopping: events or idempotency keys not written (%s)", error)

    def _follow_prices(self, events: list[Event]) -> None:
        """Followers price approvals with what the leader's feed says, and keep its history
        (a follower that becomes leader analyses from it)."""
        if not self.is_leader:
            for event in events:
                if event.type == "market_update":
                    self.market.observe(prices_in(event.data), event.created)

    def _remote_engine(self) -> RemoteEngine:
        """ENGINE_URL's engine; its read model follows the stream."""
        read_model = ReadModel(self.db, lambda: self.bus.stream_id)
        self.bus.add_listener(read_model.observe)
        return RemoteEngine(
            self.config.ENGINE_URL,
            api_key=self.config.ENGINE_API_KEY,
            timeout=self.config.ENGINE_TIMEOUT,
            read_model=read_model,
            result_models={name: COMMANDS[name].result for name in ACTIONS},
            on_reachability=self._on_engine_reachability,
        )

    def _on_engine_reachability(self, reachable: bool, reason: str) -> None:
        self.manager.notify_all(
            "status_change",
            {
                "status": "running" if reachable else "degraded",
                "component": "engine",
                "reason": "trading engine reachable again"
                if reachable
                else f"trading engine unreachable: {reason}; user actions are refused "
                "(ENGINE_UNAVAILABLE) until it is back",
            },
        )

    def _on_link_change(self, connected: bool, reason: str) -> None:
        self.manager.notify_all(
            "status_change",
            {
                "status": "running" if connected else "degraded",
                "reason": "event stream reconnected"
                if connected
                else f"event stream unavailable: {reason}; reconnecting",
            },
        )

    async def stop(self) -> None:
        self.running = False
        if self.manager.shutdown_watch is not None:
            self._tasks.append(self.manager.shutdown_watch)
        await _cancel(self._tasks)
        await self._stop_producers()
        await self._write_pending()
        self._tasks.clear()
        self.garbage.release()
        await self.engine.close()
        await self.market.close()
        await self.bus.stop()

    def stats(self) -> dict[str, Any]:
        """The connection manager's stats with this worker's memory and event-loop lag."""
        return {
            **self.manager.get_stats(),
            **self.loop_lag.stats(),
            **self.garbage.stats(),
            "rss_bytes": process_rss(),
        }

    def health(self) -> dict[str, Any]:
        """This worker's readiness: degraded while its event stream does not work (Redis
        unreachable, or the worker not receiving the stream) or its database does not answer.
        (Liveness is GET /api/health/live: a dependency's outage is no reason to restart.)"""
        bus = self.bus
        keys_age = self.api_keys.age
        health: dict[str, Any] = {
            "status": "ok",
            "version": SERVER_VERSION,
            "worker": worker_id(),
            "uptime_seconds": round(time.time() - self.started, 3),
            "connections": len(self.manager.connections),
            "bus_backend": bus.backend,
            "last_seq": bus.head,
            "leader": self.is_leader,
            "engine_reachable": self.engine.reachable,
            "database_backend": self.db.backend,
            "database_available": self.db.available,
            "api_keys_age_seconds": None if keys_age is None else round(keys_age, 3),
        }
        reasons = []
        if isinstance(bus, RedisBus):
            health.update(
                redis_mode=bus.mode,
                redis_connected=bus.connected,
                stream_lag=bus.lag,
                receiving=not bus.deaf,
            )
            if not bus.connected:
                reasons.append(f"Redis unavailable: {bus.last_error}")
            elif bus.deaf:
                reasons.append("not receiving the event stream")
        if self.db.available is False:
            reasons.append(
                f"database unreachable for {time.time() - (self.db.down_since or 0):.0f} s "
                f"({self.db.last_error}); API keys as read {keys_age or 0:.0f} s ago"
            )
        if reasons:
            health.update(status="degraded", reason="; ".join(reasons))
        return health

    def system_status(self) -> dict[str, Any]:
        engine = self.engine
        status = "paused" if engine.paused else "running"
        return {
            "status": "degraded" if engine.reachable is False else status,
            "version": SERVER_VERSION,
            "uptime_seconds": round(time.time() - self.started, 3),
            "simulation": self.config.SIMULATION,
            "symbols": self.market.symbols,
            "connections": len(self.manager.connections),
            "last_seq": self.bus.head,
            "bus_backend": self.bus.backend,
            "leader": self.is_leader,
            "available_topics": list(TOPICS),
            "engine": {"mode": engine.mode, "reachable": engine.reachable},
            "market_feed": {"source": self.market.source, "healthy": self.market.healthy},
            "counters": {
                **self.engine.counters,
                "events_published": self.manager.counters["events_published"],
            },
        }


def _end_process() -> None:
    """Stop as SIGTERM would by default (the master then sees the worker ended by it)."""
    asyncio.get_running_loop().remove_signal_handler(signal.SIGTERM)
    os.kill(os.getpid(), signal.SIGTERM)


async def _cancel(tasks: list[asyncio.Task[None]]) -> None:
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await task


def redis_target(config: Config) -> RedisTarget:
    return RedisTarget(
        config.REDIS_URL, config.REDIS_SENTINELS, config.REDIS_SENTINEL_MASTER, config.REDIS_CLUSTER
    )


def lease(redis: RedisTarget, config: Config, name: str, role: str) -> LeaderLease:
    """The deployment's lease `name` (its key beside the stream's, in the same hash slot)."""
    key = f"{redis.key_prefix(config.REDIS_PREFIX)}:{name}"
    return LeaderLease(redis, key, config.LEADER_TTL, role=role)


def risk_rules(config: Config) -> RiskRules:
    return RiskRules(
        fee_rate=config.FEE_RATE,
        slippage=config.SLIPPAGE,
        risk_per_trade=config.RISK_PER_TRADE,
        max_position_share=config.MAX_POSITION_SHARE,
        max_drawdown=config.MAX_DRAWDOWN,
        proposal_ttl=config.PROPOSAL_TTL,
        confidence_threshold=config.PROPOSAL_CONFIDENCE,
        auto_approve=config.AUTO_APPROVE,
        initial_cash=config.INITIAL_CASH,
    )


def producer_intervals(config: Config) -> dict[str, float]:
    return {
        "market": config.MARKET_INTERVAL,
        "analysis": config.ANALYSIS_INTERVAL,
        "portfolio": config.PORTFOLIO_INTERVAL,
        "status": config.STATUS_INTERVAL,
        "health": config.HEALTH_INTERVAL,
    }
