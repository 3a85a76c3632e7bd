"""A stand-in for Binance's public spot REST API, run as a process of its own on a loopback
port: the endpoints ccxt's binance calls for `load_markets` and `fetch_tickers` of spot markets
(GET /api/v3/exchangeInfo and GET /api/v3/ticker/24hr), in Binance's response format (its public
API documentation, and the samples in ccxt's binance.py), and its error answers: 429 and 418 with
Retry-After and Binance's -1003 body, 500 with Binance's -1001 body, a load balancer's plain-text
503, or no answer at all.

A test controls it over HTTP:
- GET /_admin/state: the requests it saw per path (`requests`), the paths it does not serve that
  were asked for (`unexpected`), the prices, the fault;
- POST /_admin/prices {"BTCUSDT": 96000.5, ...}: new last prices;
- POST /_admin/fault {"mode": "ok"} | {"mode": "status", "status": 429, "retry_after": 5}
  | {"mode": "hang"}: how the market endpoints answer from now on (a hanging request is let go,
  with an answer in the new mode, when the mode changes, or after HANG_LIMIT seconds).

    python -m tests.standins.exchange --port 9123
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

from aiohttp import web

HANG_LIMIT = 30.0


@dataclass
class Market:
    base: str
    quote: str
    last: float
    open: float  # 24 hours ago
    volume: float  # base asset traded in 24 hours


def default_markets() -> dict[str, Market]:
    return {
        "BTCUSDT": Market("BTC", "USDT", 95000.0, 94000.0, 12000.5),
        "ETHUSDT": Market("ETH", "USDT", 3500.0, 3450.0, 150000.0),
        "SOLUSDT": Market("SOL", "USDT", 180.0, 175.0, 900000.0),
        "BNBUSDT": Market("BNB", "USDT", 650.0, 640.0, 50000.0),
        "ETHBTC": Market("ETH", "BTC", 0.0368, 0.0367, 30000.0),
    }


class Exchange:
    def __init__(self) -> None:
        self.markets = default_markets()
        self.requests: Counter[str] = Counter()
        self.unexpected: list[str] = []
        self.fault: dict[str, Any] = {"mode": "ok"}
        self.fault_changed = asyncio.Event()

    # -- Binance's endpoints ---------------------------------------------------------------------

    async def exchange_info(self, request: web.Request) -> web.Response:
        if (refused := await self._fault(request)) is not None:
            return refused
        now = _milliseconds()
        return _json(
            {
                "timezone": "UTC",
                "serverTime": now,
                "rateLimits": [
                    {
                        "rateLimitType": "REQUEST_WEIGHT",
                        "interval": "MINUTE",
                        "intervalNum": 1,
                        "limit": 6000,
                    },
                    {
                        "rateLimitType": "ORDERS",
                        "interval": "SECOND",
                        "intervalNum": 10,
                        "limit": 100,
                    },
                    {
                        "rateLimitType": "RAW_REQUESTS",
                        "interval": "MINUTE",
                        "intervalNum": 5,
                        "limit": 61000,
                    },
                ],
                "exchangeFilters": [],
                "symbols": [
                    _symbol_info(symbol, market) for symbol, market in self.markets.items()
                ],
            },
            weight=20,
        )

    async def ticker_24hr(self, request: web.Request) -> web.Response:
        if (refused := await self._fault(request)) is not None:
            return refused
        if "symbols" in request.query:
            try:
                wanted = json.loads(request.query["symbols"])
            except ValueError:
                return _error(400, -1100, "Illegal characters found in parameter 'symbols'.")
            if not isinstance(wanted, list) or not wanted:
                return _error(400, -1100, "Illegal characters found in parameter 'symbols'.")
        elif "symbol" in request.query:
            wanted = [request.query["symbol"]]
        else:
            wanted = list(self.markets)
        if any(symbol not in self.markets for symbol in wanted):
            return _error(400, -1121, "Invalid symbol.")
        tickers = [_ticker(symbol, self.markets[symbol]) for symbol in wanted]
        if "symbol" in request.query:
            return _json(tickers[0], weight=2)
        return _json(tickers, weight=2 * len(tickers))

    async def not_served(self, request: web.Request) -> web.Response:
        self.unexpected.append(f"{request.method} {request.path}")
        return _error(404, -1000, "Not served by the stand-in.")

    async def _fault(self, request: web.Request) -> web.Response | None:
        self.requests[request.path] += 1
        mode = self.fault["mode"]
        if mode == "hang":
            self.fault_changed.clear()
            try:
                await asyncio.wait_for(self.fault_changed.wait(), HANG_LIMIT)
            except TimeoutError:
                pass
            mode = self.fault["mode"]
        if mode != "status":
            return None
        status = int(self.fault["status"])
        headers = {}
        if self.fault.get("retry_after") is not None:
            headers["Retry-After"] = str(self.fault["retry_after"])
        if status in (418, 429):
            message = (
                "Too much request weight used; current limit is 6000 request weight per 1 MINUTE. "
                "Please use WebSocket Streams for live updates to avoid polling the API."
            )
            return _error(status, -1003, message, headers)
        if status == 503:  # in front of Binance: a load balancer's page, not JSON
            return web.Response(
                status=503, text="Service Unavailable", content_type="text/plain", headers=headers
            )
        return _error(
            status,
            -1001,
            "Internal error; unable to process your request. Please try again.",
            headers,
        )

    # -- control ---------------------------------------------------------------------------------

    async def state(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "requests": dict(self.requests),
                "unexpected": self.unexpected,
                "prices": {symbol: market.last for symbol, market in self.markets.items()},
                "fault": self.fault,
            }
        )

    async def set_prices(self, request: web.Request) -> web.Response:
        prices = await request.json()
        unknown = [symbol for symbol in prices if symbol not in self.markets]
        if unknown:
            return web.json_response({"unknown": unknown}, status=400)
        for symbol, price in prices.items():
            self.markets[symbol].last = float(price)
        return await self.state(request)

    async def set_fault(self, request: web.Request) -> web.Response:
        fault = await request.json()
        if fault.get("mode") not in ("ok", "status", "hang"):
            return web.json_response({"error": "mode must be ok, status or hang"}, status=400)
        self.fault = fault
        self.fault_changed.set()  # lets hanging requests go
        return await self.state(request)


def _symbol_info(symbol: str, market: Market) -> dict[str, Any]:
    """One entry of exchangeInfo's `symbols`, as Binance has it for a spot pair."""
    tick = "0.01000000" if market.last >= 1 else "0.00001000"
    return {
        "symbol": symbol,
        "status": "TRADING",
        "baseAsset": market.base,
        "baseAssetPrecision": 8,
        "quoteAsset": market.quote,
        "quotePrecision": 8,
        "quoteAssetPrecision": 8,
        "baseCommissionPrecision": 8,
        "quoteCommissionPrecision": 8,
        "orderTypes": [
            "LIMIT",
            "LIMIT_MAKER",
            "MARKET",
            "STOP_LOSS",
            "STOP_LOSS_LIMIT",
            "TAKE_PROFIT",
            "TAKE_PROFIT_LIMIT",
        ],
        "icebergAllowed": True,
        "ocoAllowed": True,
        "otoAllowed": True,
        "quoteOrderQtyMarketAllowed": True,
        "allowTrailingStop": True,
        "cancelReplaceAllowed": True,
        "isSpotTradingAllowed": True,
        "isMarginTradingAllowed": True,
        "filters": [
            {
                "filterType": "PRICE_FILTER",
                "minPrice": tick,
                "maxPrice": "1000000.00000000",
                "tickSize": tick,
            },
            {
                "filterType": "LOT_SIZE",
                "minQty": "0.00001000",
                "maxQty": "9000.00000000",
                "stepSize": "0.00001000",
            },
            {"filterType": "ICEBERG_PARTS", "limit": 10},
            {
                "filterType": "MARKET_LOT_SIZE",
                "minQty": "0.00000000",
                "maxQty": "100.00000000",
                "stepSize": "0.00000000",
            },
            {
                "filterType": "TRAILING_DELTA",
                "minTrailingAboveDelta": 10,
                "maxTrailingAboveDelta": 2000,
                "minTrailingBelowDelta": 10,
                "maxTrailingBelowDelta": 2000,
            },
            {
                "filterType": "PERCENT_PRICE_BY_SIDE",
                "bidMultiplierUp": "5",
                "bidMultiplierDown": "0.2",
                "askMultiplierUp": "5",
                "askMultiplierDown": "0.2",
                "avgPriceMins": 5,
            },
            {
                "filterType": "NOTIONAL",
                "minNotional": "5.00000000",
                "applyMinToMarket": True,
                "maxNotional": "9000000.00000000",
                "applyMaxToMarket": False,
                "avgPriceMins": 5,
            },
            {"filterType": "MAX_NUM_ORDERS", "maxNumOrders": 200},
            {"filterType": "MAX_NUM_ALGO_ORDERS", "maxNumAlgoOrders": 5},
        ],
        "permissions": [],
        "permissionSets": [["SPOT", "MARGIN"]],
        "defaultSelfTradePreventionMode": "EXPIRE_MAKER",
        "allowedSelfTradePreventionModes": ["EXPIRE_TAKER", "EXPIRE_MAKER", "EXPIRE_BOTH"],
    }


def _ticker(symbol: str, market: Market) -> dict[str, Any]:
    """One 24 hour ticker, as GET /api/v3/ticker/24hr (type FULL) has it: numbers as strings."""
    now = _milliseconds()
    change = market.last - market.open
    quote_volume = market.volume * (market.last + market.open) / 2
    return {
        "symbol": symbol,
        "priceChange": _decimal(change),
        "priceChangePercent": f"{change / market.open * 100:.3f}",
        "weightedAvgPrice": _decimal((market.last + market.open) / 2),
        "prevClosePrice": _decimal(market.open),
        "lastPrice": _decimal(market.last),
        "lastQty": "0.00731000",
        "bidPrice": _decimal(market.last * 0.99999),
        "bidQty": "7.15931000",
        "askPrice": _decimal(market.last),
        "askQty": "0.09592000",
        "openPrice": _decimal(market.open),
        "highPrice": _decimal(max(market.last, market.open) * 1.01),
        "lowPrice": _decimal(min(market.last, market.open) * 0.99),
        "volume": _decimal(market.volume),
        "quoteVolume": _decimal(quote_volume),
        "openTime": now - 86_400_000,
        "closeTime": now,
        "firstId": 5116031635,
        "lastId": 5117964946,
        "count": 1933312,
    }


def _decimal(value: float) -> str:
    return f"{value:.8f}"


def _milliseconds() -> int:
    return int(time.time() * 1000)


def _json(body: Any, *, weight: int) -> web.Response:
    return web.json_response(body, headers={"X-MBX-USED-WEIGHT-1M": str(weight)})


def _error(
    status: int, code: int, message: str, headers: dict[str, str] | None = None
) -> web.Response:
    return web.json_response({"code": code, "msg": message}, status=status, headers=headers)


def make_app() -> web.Application:
    exchange = Exchange()
    app = web.Application()
    app.router.add_get("/api/v3/exchangeInfo", exchange.exchange_info)
    app.router.add_get("/api/v3/ticker/24hr", exchange.ticker_24hr)
    app.router.add_get("/_admin/state", exchange.state)
    app.router.add_post("/_admin/prices", exchange.set_prices)
    app.router.add_post("/_admin/fault", exchange.set_fault)
    app.router.add_route("*", "/{tail:.*}", exchange.not_served)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    options = parser.parse_args()
    web.run_app(make_app(), host=options.host, port=options.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
