"""The producers: the periodic topics at the spec's cadence, and the analysis that feeds the
trading engine. Each runs as its own loop that logs a failure and carries on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Collection, Coroutine
from typing import Any

from app.errors import GatewayError
from app.services import store
from app.services.analysis import Analysis, analyze
from app.services.engine import TradingEngine
from app.services.events import Event
from app.services.health import health_snapshot
from app.services.market import Market

log = logging.getLogger(__name__)

Publish = Callable[[list[Event]], Awaitable[object]]
PRODUCERS = ("market", "analysis", "portfolio", "status", "health")
TRADING_PRODUCERS = frozenset({"analysis", "portfolio"})  # the paper engine's own


class Simulation:
    def __init__(
        self,
        *,
        market: Market,
        engine: TradingEngine | None,
        db: Any,
        publish: Publish,
        system_status: Callable[[], dict[str, Any]],
        intervals: dict[str, float],
    ) -> None:
        self.market = market
        self.engine = engine
        self._db = db
        self._publish = publish
        self._system_status = system_status
        self._intervals = intervals

    async def restore(self) -> None:
        """Continue the random walk from the last persisted prices."""
        async with self._db.connection() as connection:
            prices = await store.select_prices(connection)
        if prices:
            self.market.restore(prices)

    def loops(
        self, stopping: asyncio.Event, only: Collection[str] = PRODUCERS
    ) -> list[Callable[[], Coroutine[Any, Any, None]]]:
        """The producer loops (of `only`; the trading ones need the paper engine); each ends
        between two ticks once `stopping` is set."""
        work = {
            "market": self.tick_market,
            "analysis": self.analyze_all,
            "portfolio": self.tick_portfolio,
            "status": self.publish_status,
            "health": self.publish_health,
        }
        return [
            _periodic(self._intervals[name], work[name], name, stopping)
            for name in PRODUCERS
            if name in only and (self.engine is not None or name not in TRADING_PRODUCERS)
        ]

    async def tick_market(self) -> None:
        now = time.time()
        tickers = await self.market.poll(now)
        # What the feed has to say first (a live feed's outage or recovery), then its prices;
        # a live feed that is failing has none, and nothing changed to save.
        notices = self.market.notices()
        if notices:
            await self._publish(notices)
        if not tickers:
            return
        await self._publish([Event("market_update", [t.as_dict() for t in tickers])])
        async with self._db.connection() as connection:
            await store.save_prices(connection, self.market.snapshot_prices(), now)

    async def analyze(self, symbol: str) -> Analysis:
        """Run the analysis of one symbol now, publish it, and let the engine act on it."""
        assert self.engine is not None, "the analysis agent is the paper engine's"
        analysis = analyze(symbol, self.market.prices(symbol))
        await self._publish([Event("analysis_update", analysis.as_dict(), symbol=symbol)])
        await self.engine.consider(
            symbol, analysis.decision, analysis.confidence, analysis.reasoning
        )
        return analysis

    async def analyze_all(self) -> None:
        for symbol in self.market.symbols:
            await self.analyze(symbol)

    async def tick_portfolio(self) -> None:
        assert self.engine is not None, "the portfolio is the paper engine's"
        await self.engine.expire_stale()
        await self.engine.publish_portfolio()

    async def publish_status(self) -> None:
        await self._publish([Event("system_status", self._system_status())])

    async def publish_health(self) -> None:
        await self._publish([Event("health_update", health_snapshot())])


def _periodic(
    interval: float, work: Callable[[], Awaitable[None]], name: str, stopping: asyncio.Event
) -> Callable[[], Coroutine[Any, Any, None]]:
    async def loop() -> None:
        failing = False
        while not stopping.is_set():
            started = time.monotonic()
            try:
                await work()
                if failing:
                    log.info("%s producer recovered", name)
                failing = False
            except GatewayError as error:  # a dependency is away (logged where it is seen)
                if not failing:
                    log.warning("%s producer paused: %s", name, error.details or error.error)
                failing = True
            except Exception:
                if not failing:  # once per outage, not once per tick
                    log.exception("%s producer failed; retrying every %.1f s", name, interval)
                failing = True
            # Sleep until the next tick, or stop at once: never in the middle of a tick, so a
            # database write is not cut off.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    stopping.wait(), max(0.0, interval - (time.monotonic() - started))
                )

    return loop
