"""The live market feed (app/services/market_feed.py) through ccxt against a stand-in exchange
process (tests/standins/exchange.py, Binance's public spot API on a loopback port): prices,
outages (429 with Retry-After, 500, 503, no answer, the process killed), backoff, recovery; the
producer that publishes what the feed says; a gateway whose clients get the exchange's prices.
And what the simulated market shares with it (observe, poll, the PriceBook)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from types import SimpleNamespace
from typing import Any

import pytest

from app.services.database import migrate, standalone_connection
from app.services.events import Event
from app.services.market import MarketPoint, PriceBook, SimulatedMarket, Ticker
from app.services.market_feed import CcxtMarket, open_market, rebase_urls
from app.services.simulation import Simulation
from tests.helpers import running_gateway
from tests.standins.control import ExchangeProcess, exchange_standin

SYMBOLS = ["BTC/USDT", "ETH/USDT", "SOL/USDT"]
EXCHANGE_INFO = "/api/v3/exchangeInfo"
TICKERS = "/api/v3/ticker/24hr"
# The stand-in's starting BTCUSDT: last, 24 h ago, base volume (tests/standins/exchange.py).
BTC_LAST, BTC_OPEN, BTC_VOLUME = 95000.0, 94000.0, 12000.5


@pytest.fixture
async def exchange() -> AsyncIterator[ExchangeProcess]:
    async with exchange_standin() as running:
        yield running


@asynccontextmanager
async def live_feed(exchange: ExchangeProcess, **options: Any) -> AsyncIterator[CcxtMarket]:
    """The feed on the stand-in. Its backoff runs on the clock the test passes to poll(), so
    which polls reach the exchange is exact; ccxt's rate limiter and the timeout run on real
    time (binance's limiter spaces ticker requests 0.8 s apart, inside the timeout)."""
    settings: dict[str, Any] = {"timeout": 1.5, "backoff_base": 1.0, "backoff_max": 8.0}
    market = CcxtMarket("binance", SYMBOLS, url=exchange.url, **{**settings, **options})
    try:
        yield market
    finally:
        await market.close()


def by_symbol(tickers: list[Ticker]) -> dict[str, float]:
    return {ticker.symbol: ticker.price for ticker in tickers}


# -- prices ------------------------------------------------------------------------------------


async def test_the_exchanges_prices_become_tickers(exchange: ExchangeProcess) -> None:
    async with live_feed(exchange) as market:
        assert (market.source, market.healthy, market.symbols) == ("ccxt:binance", True, SYMBOLS)
        assert market.latest() == [] and market.price("BTC/USDT") is None  # nothing known yet

        tickers = await market.poll(1000.0)

        assert by_symbol(tickers) == {"BTC/USDT": 95000.0, "ETH/USDT": 3500.0, "SOL/USDT": 180.0}
        btc = tickers[0]
        # Binance's 24 h quote volume and percent change, as ccxt parses them.
        assert btc.volume_24h == pytest.approx(BTC_VOLUME * (BTC_LAST + BTC_OPEN) / 2)
        assert btc.change_24h == pytest.approx(round((BTC_LAST / BTC_OPEN - 1) * 100, 3))
        assert btc.as_dict()["price"] == 95000.0
        assert market.latest() == tickers
        assert market.price("BTC/USDT") == 95000.0
        assert market.history("BTC/USDT") == [MarketPoint(1000.0, 95000.0, 0.0)]
        assert market.snapshot_prices() == by_symbol(tickers)
        assert market.notices() == []
        state = await exchange.state()
        # Spot only: the markets and the tickers, nothing of futures, margin or wallets.
        assert state["requests"] == {EXCHANGE_INFO: 1, TICKERS: 1}
        assert state["unexpected"] == []


async def test_price_changes_show_up_and_build_a_history(exchange: ExchangeProcess) -> None:
    async with live_feed(exchange) as market:
        await market.poll(1000.0)
        await exchange.set_prices({"BTCUSDT": 96000.5, "SOLUSDT": 170.25})

        tickers = await market.poll(1002.0)

        assert by_symbol(tickers) == {"BTC/USDT": 96000.5, "ETH/USDT": 3500.0, "SOL/USDT": 170.25}
        assert market.price("BTC/USDT") == 96000.5
        assert tickers[0].change_24h == pytest.approx(round((96000.5 / BTC_OPEN - 1) * 100, 3))
        assert market.prices("BTC/USDT") == [95000.0, 96000.5]
        assert market.prices("SOL/USDT", 1) == [170.25]
        # The markets are loaded once; each poll is one ticker request for all symbols.
        assert (await exchange.state())["requests"] == {EXCHANGE_INFO: 1, TICKERS: 2}


async def test_polls_are_spaced_by_ccxts_rate_limiter(exchange: ExchangeProcess) -> None:
    async with live_feed(exchange, timeout=5.0) as market:
        await market.poll(0.0)
        started = time.monotonic()
        for now in (1.0, 2.0, 3.0):
            assert await market.poll(now)
        # binance's weight of a ticker request for some symbols: 16 x its 50 ms rate limit
        assert time.monotonic() - started >= 3 * 0.7
        assert market.healthy


async def test_symbols_the_exchange_does_not_list_are_announced_once(
    exchange: ExchangeProcess,
) -> None:
    market = CcxtMarket("binance", ["BTC/USDT", "NOPE/USDT"], url=exchange.url, timeout=2.0)
    try:
        assert by_symbol(await market.poll(0.0)) == {"BTC/USDT": 95000.0}
        [notice] = market.notices()
        assert notice.type == "alert"
        assert notice.data["code"] == "MARKET_SYMBOLS_UNLISTED"
        assert notice.data["symbols"] == ["NOPE/USDT"]
        assert market.price("NOPE/USDT") is None and market.healthy
        assert await market.poll(1.0) and market.notices() == []
    finally:
        await market.close()


# -- outages -----------------------------------------------------------------------------------

OUTAGES = [
    pytest.param("status", {"status": 429}, "medium", "DDoSProtection", id="429"),
    pytest.param("status", {"status": 500}, "high", "OperationFailed", id="500-binance-1001"),
    pytest.param("status", {"status": 503}, "high", "ExchangeNotAvailable", id="503-text"),
    pytest.param("hang", {}, "high", ("TimeoutError", "RequestTimeout"), id="no-answer"),
]


@pytest.mark.parametrize(("mode", "details", "severity", "error"), OUTAGES)
async def test_an_outage_backs_off_keeps_prices_and_is_announced_once(
    exchange: ExchangeProcess, mode: str, details: dict[str, Any], severity: str, error: Any
) -> None:
    async with live_feed(exchange) as market:
        last = await market.poll(0.0)
        await exchange.set_fault(mode, **details)
        before = await exchange.requests(TICKERS)

        # A poll every 0.5 s for 5 s. Backoff 1, 2, 4 s: tries at 0.5, 1.5 and 3.5 only.
        notices: list[Event] = []
        for step in range(1, 11):
            assert await market.poll(step * 0.5) == []
            notices += market.notices()
            assert not market.healthy
        assert await exchange.requests(TICKERS) - before == 3

        # The last prices stay: the engine fills at them, the REST view shows them.
        assert market.price("BTC/USDT") == 95000.0
        assert market.latest() == last
        # One alert and one degraded notice for the whole outage.
        assert [notice.type for notice in notices] == ["alert", "status_change"]
        alert, degraded = notices
        assert alert.data["code"] == "MARKET_FEED_UNAVAILABLE"
        assert alert.data["severity"] == severity
        assert alert.data["error"] in ((error,) if isinstance(error, str) else error)
        assert alert.data["source"] == "ccxt:binance"
        assert alert.data["retry_in"] == 1.0
        assert degraded.data["status"] == "degraded"
        assert degraded.data["component"] == "market_feed"
        assert degraded.data["current_status"] == "degraded"
        assert "ccxt:binance" in degraded.data["reason"]

        await exchange.set_fault("ok")
        await exchange.set_prices({"BTCUSDT": 97000.0})
        # Still backing off (next try at 7.5): no request yet.
        assert await market.poll(7.0) == []
        assert await exchange.requests(TICKERS) - before == 3

        tickers = await market.poll(7.5)

        assert by_symbol(tickers)["BTC/USDT"] == 97000.0
        assert market.healthy
        [recovered] = market.notices()
        assert recovered.type == "status_change"
        assert recovered.data["status"] == "running"
        assert recovered.data["reason"] == "market feed recovered"
        # Back to one request per poll.
        assert await market.poll(8.0)
        assert market.notices() == []


async def test_retry_after_is_waited_for(exchange: ExchangeProcess) -> None:
    async with live_feed(exchange) as market:
        await market.poll(0.0)
        await exchange.set_fault("status", status=429, retry_after=5)

        assert await market.poll(1.0) == []
        alert, _ = market.notices()
        assert alert.data["retry_in"] == 5.0  # not the 1 s backoff: what the exchange asked
        before = await exchange.requests(TICKERS)
        for now in (2.0, 3.0, 4.0, 5.9):
            assert await market.poll(now) == []
        assert await exchange.requests(TICKERS) == before

        await exchange.set_fault("ok")
        assert await market.poll(6.0)
        assert market.healthy


async def test_a_killed_exchange_is_waited_for_and_its_restart_recovers(
    exchange: ExchangeProcess,
) -> None:
    async with live_feed(exchange) as market:
        await market.poll(0.0)
        exchange.kill()

        assert await market.poll(1.0) == []
        assert await market.poll(2.0) == []  # the second try, still down
        notices = market.notices()
        assert [n.type for n in notices] == ["alert", "status_change"]
        assert notices[0].data["error"] == "ExchangeNotAvailable"
        assert market.price("BTC/USDT") == 95000.0 and not market.healthy

        await exchange.restart()  # same port, a new process: fresh counts, starting prices
        await exchange.set_prices({"BTCUSDT": 91000.0})
        tickers = await market.poll(10.0)

        assert by_symbol(tickers)["BTC/USDT"] == 91000.0
        assert market.healthy
        assert [n.data["status"] for n in market.notices()] == ["running"]
        # ccxt kept the markets: the new process only saw the ticker request.
        assert (await exchange.state())["requests"] == {TICKERS: 1}


async def test_an_exchange_down_at_start_is_waited_for(exchange: ExchangeProcess) -> None:
    exchange.kill()
    async with live_feed(exchange) as market:
        assert await market.poll(0.0) == []  # the markets cannot load
        assert not market.healthy and market.latest() == []
        assert [n.type for n in market.notices()] == ["alert", "status_change"]

        await exchange.start()
        tickers = await market.poll(1.0)

        assert by_symbol(tickers)["BTC/USDT"] == 95000.0
        assert (await exchange.state())["requests"] == {EXCHANGE_INFO: 1, TICKERS: 1}
        assert [n.data["status"] for n in market.notices()] == ["running"]


async def test_a_closed_feed_polls_nothing(exchange: ExchangeProcess) -> None:
    async with live_feed(exchange) as market:
        await market.poll(0.0)
        await market.close()
        assert await market.poll(100.0) == []
        assert market.price("BTC/USDT") == 95000.0  # what it knew stays readable
        await market.close()  # twice is fine
    assert (await exchange.state())["requests"][TICKERS] == 1


# -- the producer and the gateway ----------------------------------------------------------------


async def test_the_market_producer_publishes_the_feeds_prices_and_notices(
    exchange: ExchangeProcess, tmp_path: Any
) -> None:
    url = f"sqlite:///{tmp_path}/feed.db"
    await migrate(url)
    published: list[Event] = []

    async def publish(events: list[Event]) -> None:
        published.extend(events)

    async with live_feed(exchange, backoff_base=0.1, backoff_max=0.1) as market:
        simulation = Simulation(
            market=market,
            engine=None,  # type: ignore[arg-type]  # the market producer does not use it
            db=SimpleNamespace(connection=lambda: standalone_connection(url)),
            publish=publish,
            system_status=dict,
            intervals={},
        )
        await simulation.tick_market()
        [update] = published
        assert update.type == "market_update"
        assert update.data[0] == {
            "symbol": "BTC/USDT",
            "price": 95000.0,
            "volume_24h": round(BTC_VOLUME * (BTC_LAST + BTC_OPEN) / 2, 2),
            "change_24h": 1.06,
        }

        published.clear()
        await exchange.set_fault("status", status=503)
        await simulation.tick_market()
        # No market_update while failing: the outage's two notices only.
        assert [event.type for event in published] == ["alert", "status_change"]

        published.clear()
        await exchange.set_fault("ok")
        await exchange.set_prices({"ETHUSDT": 3600.0})
        await asyncio.sleep(0.15)  # past the 0.1 s backoff
        await simulation.tick_market()
        assert [event.type for event in published] == ["status_change", "market_update"]
        assert published[0].data["status"] == "running"
        assert published[1].data[1]["price"] == 3600.0
        async with standalone_connection(url) as connection:
            rows = await connection.fetch_all("SELECT symbol, price FROM market_prices")
        assert {row["symbol"]: row["price"] for row in rows}["ETH/USDT"] == 3600.0


async def test_a_gateway_streams_the_exchanges_prices(exchange: ExchangeProcess) -> None:
    """End to end: a gateway with MARKET_FEED=ccxt:binance at the stand-in; a client subscribed
    to `market` gets its prices, and approvals fill at them."""
    settings = dict(
        SIMULATION=True,
        MARKET_FEED="ccxt:binance",
        MARKET_FEED_URL=exchange.url,
        MARKET_INTERVAL=0.1,
        ANALYSIS_INTERVAL=600.0,
        PORTFOLIO_INTERVAL=600.0,
        STATUS_INTERVAL=600.0,
        HEALTH_INTERVAL=600.0,
    )
    async with running_gateway(**settings) as server:
        assert server.gateway.market.source == "ccxt:binance", (
            "gateway.py does not build its market with open_market(MARKET_FEED, ...)"
        )
        async with server.subscribed(["market"]) as client:
            first = await client.next_of("market_update")
            assert {e["symbol"]: e["price"] for e in first["data"]} == {
                "BTC/USDT": 95000.0,
                "ETH/USDT": 3500.0,
                "SOL/USDT": 180.0,
            }
            await exchange.set_prices({"BTCUSDT": 96500.0})
            async with asyncio.timeout(10):
                while True:
                    update = await client.next_of("market_update")
                    if update["data"][0]["price"] == 96500.0:
                        break

        response = await server.app.test_client().post(
            "/api/proposals", json={"symbol": "BTC/USDT", "action": "buy", "size": 0.01}
        )
        proposal = await response.get_json()
        response = await server.app.test_client().post(
            f"/api/proposals/{proposal['proposal_id']}/approve"
        )
        decided = await response.get_json()
        assert response.status_code == 200, decided
        trade = decided["trade"]
        assert trade["filled_price"] == pytest.approx(96500.0 * (1 + 0.0005))
    assert (await exchange.state())["unexpected"] == []


# -- what the simulated market shares with the live feed ---------------------------------------


async def test_open_market_builds_the_feed_the_settings_name() -> None:
    simulated = open_market("simulated", SYMBOLS)
    assert isinstance(simulated, SimulatedMarket)
    assert (simulated.source, simulated.healthy) == ("simulated", True)
    live = open_market("ccxt:binance", SYMBOLS, "http://127.0.0.1:9")
    assert isinstance(live, CcxtMarket) and live.source == "ccxt:binance"
    await live.close()
    with pytest.raises(ValueError, match="no exchange"):
        CcxtMarket("nosuchexchange", SYMBOLS)
    with pytest.raises(ValueError, match="MARKET_FEED"):
        open_market("random", SYMBOLS)


def test_the_url_replaces_scheme_and_host_of_every_api_section() -> None:
    api = {
        "public": "https://api.binance.com/api/v3",
        "fapiPublic": "https://fapi.binance.com/fapi/v1",
        "nested": {"rest": "https://api.{hostname}/v5?x=1"},
    }
    assert rebase_urls(api, "http://127.0.0.1:9000/") == {
        "public": "http://127.0.0.1:9000/api/v3",
        "fapiPublic": "http://127.0.0.1:9000/fapi/v1",
        "nested": {"rest": "http://127.0.0.1:9000/v5?x=1"},
    }
    assert rebase_urls("https://api.kraken.com/0", "http://proxy/kraken") == "http://proxy/kraken/0"


async def test_the_simulated_markets_poll_is_its_tick() -> None:
    polled = SimulatedMarket(SYMBOLS, seed=3)
    ticked = SimulatedMarket(SYMBOLS, seed=3)
    assert await polled.poll(1.0) == ticked.tick(1.0)
    assert polled.notices() == []
    await polled.close()


def test_observe_extends_the_history_and_restore_clears_it() -> None:
    market = SimulatedMarket(["BTC/USDT", "ETH/USDT"], seed=1)
    market.tick(1.0)
    ticked = market.price("BTC/USDT")
    market.observe({"BTC/USDT": 90000.0, "ETH/USDT": 3000.0, "DOGE/USDT": 1.0}, 2.0)
    assert market.prices("BTC/USDT") == [ticked, 90000.0]
    assert market.price("ETH/USDT") == 3000.0
    assert market.price("DOGE/USDT") is None  # not one of its symbols
    market.observe({"BTC/USDT": float("nan"), "ETH/USDT": -1.0}, 3.0)  # not prices
    assert market.prices("BTC/USDT") == [ticked, 90000.0]
    assert market.history("BTC/USDT")[-1] == MarketPoint(2.0, 90000.0, 0.0)
    market.restore({"BTC/USDT": 80000.0})
    assert market.prices("BTC/USDT") == [] and market.price("BTC/USDT") == 80000.0


def test_a_price_book_has_no_price_until_one_is_given() -> None:
    book = PriceBook(["BTC/USDT", "ETH/USDT"])
    assert book.latest() == [] and book.snapshot_prices() == {}
    book.restore({"ETH/USDT": 3000.0})
    assert book.latest() == [Ticker("ETH/USDT", 3000.0, 0.0, 0.0)]
    book.observe({"BTC/USDT": 100.0}, 5.0)
    book.observe({"BTC/USDT": 110.0}, 4.0)  # a clock that stepped back keeps the order
    assert [point.at for point in book.history("BTC/USDT")] == [5.0, 5.0]
    assert [t.symbol for t in book.latest()] == ["BTC/USDT", "ETH/USDT"]  # the book's order
    assert book.latest()[0].change_24h == pytest.approx(10.0)
