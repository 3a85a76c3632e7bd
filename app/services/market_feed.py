"""The live market feed: public tickers of the configured symbols from an exchange, through
ccxt's async API (`MARKET_FEED=ccxt:<exchange id>`), polled once per market tick. Prices are kept
in a `PriceBook` (app/services/market.py), as the simulated feed keeps its own, so the engine
fills at live prices and the analysis reads a live history.

When the exchange fails (rate limits, 5xx, timeouts, connection errors, broken answers) the feed
keeps the last prices, reports itself unhealthy, waits with exponential backoff (longer if the
exchange sends Retry-After) and, once per outage, has an `alert` and a `status_change` degraded
notice for the stream (`notices()`); a `status_change` running notice when it is back. A poll
never raises and never takes longer than `timeout`.

`open_market(MARKET_FEED, symbols, MARKET_FEED_URL)` makes the feed the settings ask for.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import math
import time
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

import ccxt.async_support as ccxt

from app.services.engine import alert
from app.services.events import Event
from app.services.market import HISTORY_LIMIT, MarketPoint, PriceBook, SimulatedMarket, Ticker

log = logging.getLogger(__name__)

CCXT_PREFIX = "ccxt:"
DEFAULT_TIMEOUT = 10.0  # seconds one poll may take, its requests and the rate limiter's waits
BACKOFF_BASE = 1.0  # seconds after the first failure; doubled after each next one
BACKOFF_MAX = 60.0
RETRY_AFTER_MAX = 86400.0  # a Retry-After beyond a day is taken as a day
ERROR_TEXT_LIMIT = 200  # characters of an exchange's error kept in a notice

# Per exchange, the ccxt options that keep it to public spot endpoints. Binance's load_markets
# would otherwise also load its futures markets (fapi, dapi) and, with keys, margin pairs and
# currencies (sapi).
SPOT_ONLY_OPTIONS: dict[str, dict[str, Any]] = {
    "binance": {
        "fetchMarkets": {"types": ["spot"]},
        "fetchCurrencies": False,
        "fetchMargins": False,
    },
}


class FeedError(Exception):
    """The exchange answered, but not with what the feed needs."""


class CcxtMarket:
    """Live public tickers of `symbols` from the ccxt exchange `exchange_id`, with the read
    interface of SimulatedMarket. `url` replaces the scheme and host of each of the exchange's
    API URLs (a testnet, a proxy, a stand-in), keeping their paths."""

    def __init__(
        self,
        exchange_id: str,
        symbols: Sequence[str],
        *,
        url: str = "",
        timeout: float = DEFAULT_TIMEOUT,
        backoff_base: float = BACKOFF_BASE,
        backoff_max: float = BACKOFF_MAX,
        window_seconds: float = 86400.0,
        history_limit: int = HISTORY_LIMIT,
    ) -> None:
        if exchange_id not in ccxt.exchanges:
            raise ValueError(f"ccxt has no exchange {exchange_id!r}")
        if not (math.isfinite(timeout) and timeout > 0):
            raise ValueError(f"timeout must be a finite number > 0, got {timeout}")
        if not (0 < backoff_base <= backoff_max and math.isfinite(backoff_max)):
            raise ValueError(
                f"need 0 < backoff_base <= backoff_max, got {backoff_base, backoff_max}"
            )
        self.source = CCXT_PREFIX + exchange_id
        self._book = PriceBook(symbols, window_seconds=window_seconds, history_limit=history_limit)
        self._exchange = getattr(ccxt, exchange_id)(
            {
                "enableRateLimit": True,  # ccxt spaces the requests by the exchange's limits
                "timeout": int(timeout * 1000),  # each request, in milliseconds
                "options": {"defaultType": "spot", **SPOT_ONLY_OPTIONS.get(exchange_id, {})},
            }
        )
        if url:
            self._exchange.urls["api"] = rebase_urls(self._exchange.urls["api"], url)
        self._timeout = timeout
        self._backoff_base = backoff_base
        self._backoff_max = backoff_max
        self._listed: list[str] | None = None  # the symbols the exchange lists, once loaded
        self._stats: dict[str, tuple[float, float]] = {}  # the exchange's 24 h volume and change
        self._failures = 0  # in a row
        self._retry_at = 0.0
        self._wait = 0.0  # the backoff that set _retry_at
        self._outage: str | None = None  # what failed, while the feed is failing
        self._notices: list[Event] = []
        self._closed = False

    # -- the read interface, as SimulatedMarket's ------------------------------------------------

    @property
    def symbols(self) -> list[str]:
        return self._book.symbols

    @property
    def healthy(self) -> bool:
        """False from a failed poll until the next good one (prices are the last known)."""
        return self._outage is None

    def latest(self) -> list[Ticker]:
        """The last known ticker of each symbol that has a price, with the exchange's 24 h
        volume and change."""
        return [
            self._ticker(symbol, price)
            for symbol in self._book.symbols
            if (price := self._book.price(symbol)) is not None
        ]

    def price(self, symbol: str) -> float | None:
        return self._book.price(symbol)

    def prices(self, symbol: str, count: int | None = None) -> list[float]:
        return self._book.prices(symbol, count)

    def history(self, symbol: str) -> list[MarketPoint]:
        return self._book.history(symbol)

    def snapshot_prices(self) -> dict[str, float]:
        return self._book.snapshot_prices()

    def restore(self, state: Mapping[str, float]) -> None:
        self._book.restore(state)

    def observe(self, prices: Mapping[str, float], at: float) -> None:
        self._book.observe(prices, at)

    def notices(self) -> list[Event]:
        """The alert and status_change events since last asked (then forgotten)."""
        notices, self._notices = self._notices, []
        return notices

    # -- polling ---------------------------------------------------------------------------------

    async def poll(self, now: float) -> list[Ticker]:
        """Fetch the tickers at time `now` (the caller's clock, as SimulatedMarket.tick) and
        return those with a new price; none while backing off, after a failure, or closed."""
        if self._closed or 0 < self._retry_at - now <= self._wait:
            return []
        # Only a response of this poll may say how long to wait (Retry-After).
        self._exchange.last_response_headers = None
        try:
            async with asyncio.timeout(self._timeout):
                tickers = self._accept(await self._fetch(), now)
        except Exception as error:  # never a crash: every failure is an outage, backed off
            self._failed(error, now)
            return []
        self._succeeded()
        return tickers

    async def close(self) -> None:
        """Release the exchange's HTTP session; later polls return nothing."""
        if self._closed:
            return
        self._closed = True
        try:
            await self._exchange.close()
        except Exception:
            log.exception("closing the %s market feed failed", self.source)

    async def _fetch(self) -> dict[str, Any]:
        if self._listed is None:
            await self._exchange.load_markets()  # once: ccxt keeps them
            self._listed = self._listed_symbols()
        tickers: dict[str, Any] = await self._exchange.fetch_tickers(self._listed)
        return tickers

    def _listed_symbols(self) -> list[str]:
        markets = self._exchange.markets or {}
        listed = [symbol for symbol in self._book.symbols if symbol in markets]
        missing = [symbol for symbol in self._book.symbols if symbol not in markets]
        if not listed:
            raise FeedError(f"{self.source} lists none of {', '.join(missing)}")
        if missing:
            log.warning("%s does not list %s: no prices for them", self.source, missing)
            self._notices.append(
                alert(
                    "medium",
                    "MARKET_SYMBOLS_UNLISTED",
                    f"{self.source} does not list {', '.join(missing)}: they have no live price",
                    action_required=True,
                    source=self.source,
                    symbols=missing,
                )
            )
        return listed

    def _accept(self, raw: Mapping[str, Any], now: float) -> list[Ticker]:
        """The exchange's tickers of the listed symbols that carry a usable price."""
        fresh: dict[str, float] = {}
        for symbol in self._listed or []:
            ticker = raw.get(symbol)
            if not isinstance(ticker, Mapping):
                continue
            price = _number(ticker.get("last")) or _number(ticker.get("close"))
            if price is None or price <= 0:
                continue
            volume = _number(ticker.get("quoteVolume"))
            if volume is None:
                base_volume = _number(ticker.get("baseVolume"))
                volume = base_volume * price if base_volume is not None else 0.0
            change = _number(ticker.get("percentage")) or 0.0
            fresh[symbol] = price
            self._stats[symbol] = (max(volume, 0.0), change)
        if not fresh:
            raise FeedError(f"{self.source} answered with no usable price")
        self._book.observe(fresh, now)
        return [self._ticker(symbol, price) for symbol, price in fresh.items()]

    def _ticker(self, symbol: str, price: float) -> Ticker:
        volume, change = self._stats.get(symbol, (0.0, 0.0))
        return Ticker(symbol, price, volume, change)

    # -- outages ---------------------------------------------------------------------------------

    def _failed(self, error: Exception, now: float) -> None:
        self._failures += 1
        delay = min(self._backoff_base * 2 ** min(self._failures - 1, 30), self._backoff_max)
        retry_after = _retry_after(self._exchange.last_response_headers)
        if retry_after is not None:
            delay = max(delay, retry_after)
        self._wait = delay
        self._retry_at = now + delay
        description = self._describe(error)
        if self._outage is not None:  # once per outage; the rest at debug level
            log.debug("%s still failing (%s); retrying in %.1f s", self.source, description, delay)
            return
        self._outage = description
        if isinstance(error, ccxt.BaseError | FeedError | TimeoutError):
            log.warning("%s failed (%s); retrying in %.1f s", self.source, description, delay)
        else:  # not an exchange error: a bug, or an answer ccxt could not parse
            log.exception("%s failed; retrying in %.1f s", self.source, delay)
        rate_limited = isinstance(error, ccxt.RateLimitExceeded | ccxt.DDoSProtection)
        self._notices += [
            alert(
                "medium" if rate_limited else "high",
                "MARKET_FEED_UNAVAILABLE",
                f"{'rate limited by' if rate_limited else 'no prices from'} {self.source}: "
                f"{description}; prices are the last known, retrying in {delay:.1f} s",
                action_required=False,
                source=self.source,
                error=type(error).__name__,
                retry_in=round(delay, 3),
            ),
            _status_change(
                "degraded", "running", f"market feed {self.source} unavailable: {description}"
            ),
        ]

    def _succeeded(self) -> None:
        self._failures = 0
        self._retry_at = self._wait = 0.0
        if self._outage is not None:
            log.info("%s recovered (it failed with %s)", self.source, self._outage)
            self._outage = None
            self._notices.append(_status_change("running", "degraded", "market feed recovered"))

    def _describe(self, error: Exception) -> str:
        if isinstance(error, TimeoutError):
            return f"no answer within {self._timeout:g} s"
        text = " ".join(str(error).split())
        if len(text) > ERROR_TEXT_LIMIT:
            text = text[: ERROR_TEXT_LIMIT - 3] + "..."
        return f"{type(error).__name__}: {text}" if text else type(error).__name__


def open_market(feed: str, symbols: list[str], url: str = "") -> SimulatedMarket | CcxtMarket:
    """The market feed MARKET_FEED names: `simulated`, or `ccxt:<exchange id>` at `url` (empty:
    the exchange's own API)."""
    if feed == "simulated":
        return SimulatedMarket(symbols)
    if feed.startswith(CCXT_PREFIX) and feed[len(CCXT_PREFIX) :]:
        return CcxtMarket(feed[len(CCXT_PREFIX) :], symbols, url=url)
    raise ValueError(f"MARKET_FEED must be simulated or ccxt:<exchange id>, got {feed!r}")


def rebase_urls(api: Any, base: str) -> Any:
    """ccxt's `urls['api']` (a URL, or a dict of them per API section, maybe nested) with each
    URL's scheme and host replaced by `base`, the path kept: `https://api.binance.com/api/v3`
    with base `http://127.0.0.1:9000` becomes `http://127.0.0.1:9000/api/v3`."""
    if isinstance(api, str):
        parts = urlsplit(api)
        return base.rstrip("/") + parts.path + (f"?{parts.query}" if parts.query else "")
    if isinstance(api, dict):
        return {section: rebase_urls(value, base) for section, value in api.items()}
    return api


def _status_change(status: str, previous: str, reason: str) -> Event:
    # The gateway's own notices carry the original SIGMAX engine's fields too.
    return Event(
        "status_change",
        {
            "status": status,
            "component": "market_feed",
            "reason": reason,
            "previous_status": previous,
            "current_status": status,
        },
    )


def _retry_after(headers: Mapping[str, Any] | None) -> float | None:
    """Seconds an HTTP Retry-After header asks for (delta-seconds or an HTTP date), if any."""
    value = next((v for k, v in (headers or {}).items() if str(k).lower() == "retry-after"), None)
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = email.utils.parsedate_to_datetime(str(value)).timestamp() - time.time()
        except (TypeError, ValueError):
            return None
    if not math.isfinite(seconds):
        return None
    return min(max(seconds, 0.0), RETRY_AFTER_MAX)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    return number if math.isfinite(number) else None
