"""The market's prices: a `PriceBook` (each symbol's current price and a rolling window of
(time, price, volume) points that gives each ticker its 24-hour volume and change), and the
simulated feed on it, a geometric random walk per symbol. The live feed
(app/services/market_feed.py) keeps its prices in a PriceBook too; `Market` is what both offer.

Prices move only when `tick` (or `poll`) is called and the caller supplies the clock, so a seeded
feed replays exactly. The last price of each symbol can be saved (`snapshot_prices`) and put back
after a restart (`restore`); prices seen elsewhere are recorded with `observe`.
"""

from __future__ import annotations

import itertools
import math
import random
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

if TYPE_CHECKING:
    from app.services.events import Event

STARTING_PRICES: dict[str, float] = {
    "BTC/USDT": 95000.0,
    "ETH/USDT": 3500.0,
    "SOL/USDT": 180.0,
    "BNB/USDT": 650.0,
    "XRP/USDT": 2.2,
    "ADA/USDT": 0.9,
    "DOGE/USDT": 0.32,
    "AVAX/USDT": 35.0,
    "LINK/USDT": 20.0,
}
DEFAULT_START_PRICE = 100.0
HISTORY_LIMIT = 10_000
# exp() of a long run of negative returns can underflow to 0; a price must stay positive.
MIN_PRICE = 1e-8
PRICE_SIGNIFICANT_DIGITS = 8


def round_price(price: float) -> float:
    """Round to 8 significant digits: cents for BTC, enough decimals for sub-dollar coins."""
    return float(f"{price:.{PRICE_SIGNIFICANT_DIGITS}g}")


@dataclass(frozen=True)
class Ticker:
    """One symbol's state: last price, traded volume and percent change over the window."""

    symbol: str
    price: float
    volume_24h: float
    change_24h: float

    def as_dict(self) -> dict[str, Any]:
        """The `market_update` entry."""
        return {
            "symbol": self.symbol,
            "price": round_price(self.price),
            "volume_24h": round(self.volume_24h, 2),
            "change_24h": round(self.change_24h, 2),
        }


class MarketPoint(NamedTuple):
    """One recorded step: when, the closing price, and the volume traded in the step."""

    at: float
    price: float
    volume: float


class _Track:
    """One symbol's current price and its recent history, with the history's volume total."""

    __slots__ = ("price", "history", "volume_total")

    def __init__(self, price: float) -> None:
        self.price = price
        self.history: deque[MarketPoint] = deque()
        self.volume_total = 0.0

    def record(self, point: MarketPoint, limit: int, window_seconds: float) -> None:
        self.history.append(point)
        self.volume_total += point.volume
        cutoff = point.at - window_seconds
        while len(self.history) > limit or self.history[0].at < cutoff:
            self.volume_total -= self.history.popleft().volume

    def clear(self) -> None:
        self.history.clear()
        self.volume_total = 0.0


class PriceBook:
    """The prices of a fixed list of symbols as they are recorded: each symbol's current price
    and its points within the window. A symbol has no price until one is given (`start_prices`,
    `record`, `observe` or `restore`)."""

    def __init__(
        self,
        symbols: Sequence[str],
        *,
        start_prices: Mapping[str, float] | None = None,
        window_seconds: float = 86400.0,
        history_limit: int = HISTORY_LIMIT,
    ) -> None:
        if not math.isfinite(window_seconds) or window_seconds <= 0:
            raise ValueError(f"window_seconds must be a finite number > 0, got {window_seconds}")
        if history_limit < 1:
            raise ValueError(f"history_limit must be at least 1, got {history_limit}")
        self._symbols = list(dict.fromkeys(symbols))
        self._tracks: dict[str, _Track] = {}
        for symbol in self._symbols:
            if start_prices is None or symbol not in start_prices:
                continue
            start = start_prices[symbol]
            if not _valid_price(start):
                raise ValueError(
                    f"start price of {symbol} must be a finite number > 0, got {start}"
                )
            self._tracks[symbol] = _Track(float(start))
        self._window_seconds = window_seconds
        self._history_limit = history_limit

    @property
    def symbols(self) -> list[str]:
        return list(self._symbols)

    def record(self, symbol: str, price: float, volume: float, at: float) -> None:
        """A new price of a symbol of this book at time `at`, with the volume traded since the
        last one."""
        track = self._tracks.get(symbol)
        if track is None:
            track = self._tracks[symbol] = _Track(price)
        track.price = price
        # A clock that steps back must not unsort the history the window trimming relies on.
        at = max(at, track.history[-1].at) if track.history else at
        track.record(MarketPoint(at, price, volume), self._history_limit, self._window_seconds)

    def observe(self, prices: Mapping[str, float], at: float) -> None:
        """Record prices seen elsewhere (an exchange, the gateway's stream) at time `at`, with no
        volume. Symbols not in this book and prices that are not finite and positive are
        ignored. Unlike `restore`, the history is kept: the new point extends it."""
        for symbol, price in prices.items():
            if symbol in self._symbols and _valid_price(price):
                self.record(symbol, float(price), 0.0, at)

    def latest(self) -> list[Ticker]:
        """The tickers of the symbols that have a price, in the book's order."""
        return [
            self._ticker(symbol, track)
            for symbol in self._symbols
            if (track := self._tracks.get(symbol)) is not None
        ]

    def price(self, symbol: str) -> float | None:
        """The current price, or None for a symbol with no price yet or not in this book."""
        track = self._tracks.get(symbol)
        return track.price if track is not None else None

    def prices(self, symbol: str, count: int | None = None) -> list[float]:
        """Recent closing prices, oldest first: all in the window, or the last `count`."""
        track = self._tracks.get(symbol)
        if track is None:
            return []
        if count is None:
            return [point.price for point in track.history]
        recent = [point.price for point in itertools.islice(reversed(track.history), max(count, 0))]
        recent.reverse()
        return recent

    def history(self, symbol: str) -> list[MarketPoint]:
        """The recorded points in the window, oldest first."""
        track = self._tracks.get(symbol)
        return list(track.history) if track is not None else []

    def snapshot_prices(self) -> dict[str, float]:
        """The current price of every symbol that has one, to persist."""
        return {symbol: track.price for symbol, track in self._tracks.items()}

    def restore(self, state: Mapping[str, float]) -> None:
        """Continue from saved prices. Symbols not in this book and prices that are not finite
        and positive are ignored; a restored symbol starts a fresh history."""
        for symbol, price in state.items():
            if symbol not in self._symbols or not _valid_price(price):
                continue
            track = self._tracks.get(symbol)
            if track is None:
                self._tracks[symbol] = _Track(float(price))
                continue
            track.price = float(price)
            # The saved price is not a market move: measuring change across it would be wrong.
            track.clear()

    def _ticker(self, symbol: str, track: _Track) -> Ticker:
        history = track.history
        change = (track.price / history[0].price - 1.0) * 100.0 if len(history) > 1 else 0.0
        volume = max(track.volume_total, 0.0) if history else 0.0
        return Ticker(symbol, track.price, volume, change)


class SimulatedMarket(PriceBook):
    """A seeded random-walk feed over a fixed list of symbols."""

    source = "simulated"
    healthy = True  # nothing to lose contact with

    def __init__(
        self,
        symbols: Sequence[str],
        *,
        seed: int | None = None,
        start_prices: Mapping[str, float] | None = None,
        volatility: float = 0.002,
        window_seconds: float = 86400.0,
        history_limit: int = HISTORY_LIMIT,
    ) -> None:
        if not math.isfinite(volatility) or volatility < 0:
            raise ValueError(f"volatility must be a finite number >= 0, got {volatility}")
        known = {**STARTING_PRICES, **(start_prices or {})}
        super().__init__(
            symbols,
            start_prices={symbol: known.get(symbol, DEFAULT_START_PRICE) for symbol in symbols},
            window_seconds=window_seconds,
            history_limit=history_limit,
        )
        self._rng = random.Random(seed)
        self._volatility = volatility
        # Ito correction: E[exp(r)] = 1, so the walk has no built-in up or down trend.
        self._drift = -0.5 * volatility * volatility

    def tick(self, now: float) -> list[Ticker]:
        """Advance every symbol one step at time `now` and return the new tickers."""
        for symbol, track in self._tracks.items():
            log_return = self._rng.normalvariate(self._drift, self._volatility)
            price = max(track.price * math.exp(log_return), MIN_PRICE)
            # Quote volume: roughly one unit of the base asset per step, so it scales with price.
            volume = price * self._rng.lognormvariate(0.0, 0.5)
            self.record(symbol, price, volume, now)
        return self.latest()

    async def poll(self, now: float) -> list[Ticker]:
        """The feed's step, as the live feed has it: here, `tick`."""
        return self.tick(now)

    def notices(self) -> list[Event]:
        """Alerts and status changes to publish: a random walk has none."""
        return []

    async def close(self) -> None:
        """Nothing to release."""


class Market(Protocol):
    """What the producers, the engine and the views use of a market feed, simulated or live."""

    @property
    def symbols(self) -> list[str]: ...

    @property
    def source(self) -> str: ...

    @property
    def healthy(self) -> bool: ...

    def latest(self) -> list[Ticker]: ...

    def price(self, symbol: str) -> float | None: ...

    def prices(self, symbol: str, count: int | None = None) -> list[float]: ...

    def history(self, symbol: str) -> list[MarketPoint]: ...

    def snapshot_prices(self) -> dict[str, float]: ...

    def restore(self, state: Mapping[str, float]) -> None: ...

    def observe(self, prices: Mapping[str, float], at: float) -> None: ...

    async def poll(self, now: float) -> list[Ticker]:
        """Move on to time `now` and return the tickers that changed (none while a live feed
        is failing)."""
        ...

    def notices(self) -> list[Event]:
        """The alert and status_change events the feed has for the stream since last asked."""
        ...

    async def close(self) -> None: ...


def prices_in(market_update: Any) -> dict[str, float]:
    """{symbol: price} of a `market_update`'s data (entries without a price left out)."""
    if not isinstance(market_update, list):
        return {}
    return {
        entry["symbol"]: entry["price"]
        for entry in market_update
        if isinstance(entry, dict) and entry.get("price") is not None and "symbol" in entry
    }


def _valid_price(value: Any) -> bool:
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value > 0
    )
