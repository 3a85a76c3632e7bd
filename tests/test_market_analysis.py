"""Units: the simulated market feed (random walk, rolling window, persistence) and the analysis
agent (indicators on hand-checked inputs, decisions on known series)."""

from __future__ import annotations

import math

import pytest

from app.services.analysis import (
    MIN_PRICES,
    Analysis,
    analyze,
    momentum,
    rsi,
    sma,
    sma_cross,
)
from app.services.market import (
    DEFAULT_START_PRICE,
    MIN_PRICE,
    STARTING_PRICES,
    SimulatedMarket,
    Ticker,
)

SYMBOLS = ["BTC/USDT", "ETH/USDT", "SOL/USDT"]


def run(market: SimulatedMarket, ticks: int, start: float = 0.0, step: float = 1.0) -> list[Ticker]:
    tickers: list[Ticker] = []
    for i in range(ticks):
        tickers = market.tick(start + i * step)
    return tickers


# -- market ------------------------------------------------------------------------------------


def test_starting_state_before_any_tick() -> None:
    market = SimulatedMarket(["BTC/USDT", "ETH/USDT", "SOL/USDT", "FOO/BAR"], seed=1)
    assert STARTING_PRICES["BTC/USDT"] == 95000
    assert STARTING_PRICES["ETH/USDT"] == 3500
    assert STARTING_PRICES["SOL/USDT"] == 180
    assert [t.as_dict() for t in market.latest()] == [
        {"symbol": "BTC/USDT", "price": 95000.0, "volume_24h": 0.0, "change_24h": 0.0},
        {"symbol": "ETH/USDT", "price": 3500.0, "volume_24h": 0.0, "change_24h": 0.0},
        {"symbol": "SOL/USDT", "price": 180.0, "volume_24h": 0.0, "change_24h": 0.0},
        {"symbol": "FOO/BAR", "price": DEFAULT_START_PRICE, "volume_24h": 0.0, "change_24h": 0.0},
    ]
    assert market.prices("BTC/USDT") == []


def test_symbols_price_and_start_price_override() -> None:
    market = SimulatedMarket(
        ["ETH/USDT", "BTC/USDT", "ETH/USDT"], seed=1, start_prices={"ETH/USDT": 4000.0}
    )
    assert market.symbols == ["ETH/USDT", "BTC/USDT"]
    market.symbols.append("XRP/USDT")  # a copy: the market's own list is not exposed
    assert market.symbols == ["ETH/USDT", "BTC/USDT"]
    assert market.price("ETH/USDT") == 4000.0
    assert market.price("DOGE/USDT") is None
    tickers = market.tick(0.0)
    assert [market.price(t.symbol) for t in tickers] == [t.price for t in tickers]


def test_seeded_runs_are_reproducible() -> None:
    first = SimulatedMarket(SYMBOLS, seed=42)
    second = SimulatedMarket(SYMBOLS, seed=42)
    other = SimulatedMarket(SYMBOLS, seed=43)
    for offset in range(300):
        now = 1_700_000_000.0 + offset
        assert first.tick(now) == second.tick(now)
        other.tick(now)
    assert first.history("BTC/USDT") == second.history("BTC/USDT")
    assert first.snapshot_prices() != other.snapshot_prices()


def test_prices_stay_positive_over_10k_ticks() -> None:
    calm = SimulatedMarket(SYMBOLS, seed=7)
    # A drift of -volatility^2/2 a step sinks this one below MIN_PRICE: the floor must hold.
    wild = SimulatedMarket(["DOGE/USDT"], seed=7, volatility=0.1)
    for now in range(10_000):
        for ticker in calm.tick(float(now)) + wild.tick(float(now)):
            assert ticker.price > 0 and math.isfinite(ticker.price)
            assert ticker.volume_24h > 0
    wild_price = wild.price("DOGE/USDT")
    assert wild_price is not None and MIN_PRICE <= wild_price < 1e-6
    assert wild.latest()[0].as_dict()["price"] > 0
    assert len(calm.prices("BTC/USDT")) == 10_000


def test_walk_moves_by_about_the_volatility() -> None:
    market = SimulatedMarket(["BTC/USDT"], seed=3, volatility=0.002)
    run(market, 5000)
    closes = market.prices("BTC/USDT")
    returns = [math.log(b / a) for a, b in zip(closes, closes[1:], strict=False)]
    mean = math.fsum(returns) / len(returns)
    deviation = math.sqrt(math.fsum((r - mean) ** 2 for r in returns) / (len(returns) - 1))
    assert deviation == pytest.approx(0.002, rel=0.05)
    assert abs(mean) < 0.0002


def test_window_trims_by_time() -> None:
    market = SimulatedMarket(SYMBOLS, seed=5, window_seconds=10.0)
    run(market, 30)  # t = 0 .. 29
    for symbol in SYMBOLS:
        history = market.history(symbol)
        assert [point.at for point in history] == [float(t) for t in range(19, 30)]
    # A gap longer than the window leaves only the newest point.
    market.tick(100.0)
    assert [point.at for point in market.history("BTC/USDT")] == [100.0]
    ticker = market.latest()[0]
    assert ticker.change_24h == 0.0
    assert ticker.volume_24h == pytest.approx(market.history("BTC/USDT")[0].volume)


def test_window_trims_by_count() -> None:
    market = SimulatedMarket(SYMBOLS, seed=5, history_limit=50)
    run(market, 120)
    history = market.history("ETH/USDT")
    assert [point.at for point in history] == [float(t) for t in range(70, 120)]
    ticker = market.latest()[1]
    assert ticker.volume_24h == pytest.approx(math.fsum(point.volume for point in history))
    assert ticker.change_24h == pytest.approx((history[-1].price / history[0].price - 1) * 100)


def test_default_history_cap_is_ten_thousand() -> None:
    market = SimulatedMarket(["SOL/USDT"], seed=5)
    run(market, 10_050, step=0.001)
    assert len(market.history("SOL/USDT")) == 10_000


def test_volume_and_change_come_from_the_recorded_history() -> None:
    market = SimulatedMarket(SYMBOLS, seed=11, window_seconds=30.0)
    for now in range(200):
        tickers = market.tick(now * 0.7)
        for ticker in tickers:
            history = market.history(ticker.symbol)
            assert all(point.at >= now * 0.7 - 30.0 for point in history)
            assert ticker.price == history[-1].price
            assert ticker.volume_24h == pytest.approx(
                math.fsum(point.volume for point in history), rel=1e-9
            )
            expected = (
                0.0
                if len(history) == 1
                else (history[-1].price - history[0].price) / history[0].price * 100
            )
            assert ticker.change_24h == pytest.approx(expected, abs=1e-9)
    assert market.latest() == tickers


def test_first_tick_has_zero_change_and_its_own_volume() -> None:
    market = SimulatedMarket(["BTC/USDT"], seed=2)
    [ticker] = market.tick(1000.0)
    [point] = market.history("BTC/USDT")
    assert ticker.change_24h == 0.0
    assert ticker.volume_24h == point.volume > 0
    # Volume is quote volume: about one BTC's worth at this price.
    assert 0.05 * 95000 < point.volume < 20 * 95000


def test_clock_stepping_back_keeps_history_ordered() -> None:
    market = SimulatedMarket(["BTC/USDT"], seed=2, window_seconds=5.0)
    for now in (10.0, 11.0, 9.0, 12.0):
        market.tick(now)
    assert [point.at for point in market.history("BTC/USDT")] == [10.0, 11.0, 11.0, 12.0]


def test_prices_returns_recent_closes_oldest_first() -> None:
    market = SimulatedMarket(SYMBOLS, seed=9)
    run(market, 25)
    closes = [point.price for point in market.history("SOL/USDT")]
    assert market.prices("SOL/USDT") == closes
    assert market.prices("SOL/USDT", 3) == closes[-3:]
    assert market.prices("SOL/USDT", 100) == closes
    assert market.prices("SOL/USDT", 0) == []
    assert market.prices("NOPE/USDT") == []
    assert closes[-1] == market.price("SOL/USDT")


def test_snapshot_and_restore_round_trip() -> None:
    before = SimulatedMarket(SYMBOLS, seed=21)
    run(before, 50)
    saved = before.snapshot_prices()
    assert set(saved) == set(SYMBOLS)

    after = SimulatedMarket(SYMBOLS, seed=99)
    after.restore({**saved, "XRP/USDT": 2.0, "SOL/USDT": -1.0})
    expected = {**saved, "SOL/USDT": STARTING_PRICES["SOL/USDT"]}
    assert after.snapshot_prices() == expected
    assert [t.price for t in after.latest()] == [expected[s] for s in SYMBOLS]
    assert after.price("XRP/USDT") is None

    # A restored market walks on from the saved prices exactly like one started there.
    restored = SimulatedMarket(SYMBOLS, seed=5)
    restored.restore(saved)
    started_there = SimulatedMarket(SYMBOLS, seed=5, start_prices=saved)
    assert run(restored, 20) == run(started_there, 20)


def test_restore_starts_a_fresh_history() -> None:
    market = SimulatedMarket(["BTC/USDT"], seed=4)
    run(market, 10)
    market.restore({"BTC/USDT": 50000.0})
    assert market.prices("BTC/USDT") == []
    assert market.latest() == [Ticker("BTC/USDT", 50000.0, 0.0, 0.0)]
    [ticker] = market.tick(20.0)
    assert ticker.change_24h == 0.0
    assert len(market.history("BTC/USDT")) == 1


def test_ticker_as_dict_rounds() -> None:
    assert Ticker("BTC/USDT", 95012.3456789, 1234.5678, 1.23456).as_dict() == {
        "symbol": "BTC/USDT",
        "price": 95012.346,
        "volume_24h": 1234.57,
        "change_24h": 1.23,
    }
    assert Ticker("DOGE/USDT", 0.123456789123, 10.0, -0.005).as_dict()["price"] == 0.12345679


@pytest.mark.parametrize(
    "kwargs",
    [
        {"volatility": -0.1},
        {"window_seconds": 0.0},
        {"history_limit": 0},
        {"start_prices": {"BTC/USDT": 0.0}},
        {"volatility": math.nan},
    ],
)
def test_invalid_market_arguments(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        SimulatedMarket(["BTC/USDT"], **kwargs)


# -- indicators --------------------------------------------------------------------------------


def test_sma() -> None:
    assert sma([1.0, 2.0, 3.0, 4.0, 5.0], 3) == 4.0
    assert sma([1.0, 2.0, 3.0, 4.0, 5.0], 5) == 3.0
    assert sma([2.0], 1) == 2.0
    assert sma([1.0, 2.0], 3) is None
    with pytest.raises(ValueError):
        sma([1.0], 0)


def test_momentum() -> None:
    assert momentum([100.0, 105.0, 110.0], 2) == pytest.approx(0.10)
    assert momentum([100.0, 105.0, 110.0], 1) == pytest.approx(5 / 105)
    assert momentum([50.0, 200.0, 40.0], 2) == pytest.approx(-0.2)
    assert momentum([100.0, 110.0], 2) is None
    assert momentum([0.0, 1.0], 1) is None
    with pytest.raises(ValueError):
        momentum([1.0, 2.0], 0)


def test_rsi_by_hand() -> None:
    # Changes +1, -0.5, +1 | +0.5. Seed averages: gain 2/3, loss 1/6; Wilder step:
    # gain (2/3*2 + 0.5)/3 = 11/18, loss (1/6*2 + 0)/3 = 2/18; RS 5.5.
    assert rsi([10.0, 11.0, 10.5, 11.5, 12.0], 3) == pytest.approx(100 - 100 / 6.5)
    # Changes +1, +1 | -1: gain (1 + 0)/2 = 0.5, loss (0 + 1)/2 = 0.5; RS 1.
    assert rsi([1.0, 2.0, 3.0, 2.0], 2) == pytest.approx(50.0)


def test_rsi_on_wilders_textbook_series() -> None:
    # The series of the common RSI worked example: 9 gains summing 3.34, 4 losses 1.40.
    closes = [
        44.34,
        44.09,
        44.15,
        43.61,
        44.33,
        44.83,
        45.10,
        45.42,
        45.84,
        46.08,
        45.89,
        46.03,
        45.61,
        46.28,
        46.28,
    ]
    assert rsi(closes) == pytest.approx(100 - 100 / (1 + 3.34 / 1.40))
    assert rsi(closes) == pytest.approx(70.46, abs=0.01)
    assert rsi([*closes, 46.00]) == pytest.approx(66.25, abs=0.01)


def test_rsi_edges() -> None:
    rising = [float(p) for p in range(1, 20)]
    assert rsi(rising) == 100.0
    assert rsi(rising[::-1]) == 0.0
    assert rsi([7.0] * 20) == 50.0
    assert rsi([float(p) for p in range(14)]) is None
    assert rsi([float(p) for p in range(15)]) == 100.0
    with pytest.raises(ValueError):
        rsi(rising, 0)


def test_sma_cross() -> None:
    ramp = [float(p) for p in range(1, 21)]
    # short SMA of 16..20 is 18, long SMA of 1..20 is 10.5.
    assert sma_cross(ramp) == pytest.approx((18 - 10.5) / 10.5)
    assert sma_cross(ramp[::-1]) == pytest.approx((3 - 10.5) / 10.5)
    assert sma_cross([5.0] * 20) == 0.0
    assert sma_cross(ramp[:-1]) is None
    assert sma_cross([1.0, 2.0, 4.0], 1, 3) == pytest.approx((4 - 7 / 3) / (7 / 3))
    with pytest.raises(ValueError):
        sma_cross(ramp, 20, 5)


# -- analyze -----------------------------------------------------------------------------------


def rising(count: int = 60, rate: float = 0.003) -> list[float]:
    return [100.0 * (1 + rate) ** i for i in range(count)]


def test_rising_series_is_a_confident_buy() -> None:
    analysis = analyze("BTC/USDT", rising())
    assert analysis.decision == "buy"
    assert analysis.confidence >= 0.9
    assert analysis.bull_score > 0.9 and analysis.bear_score == 0.0


def test_rising_series_with_pullbacks_is_still_a_buy() -> None:
    prices = [100.0]
    for i in range(60):
        prices.append(prices[-1] * (0.996 if i % 3 == 2 else 1.005))
    analysis = analyze("ETH/USDT", prices)
    assert analysis.decision == "buy"
    assert analysis.confidence >= 0.7


def test_falling_series_is_a_confident_sell() -> None:
    analysis = analyze("SOL/USDT", rising()[::-1])
    assert analysis.decision == "sell"
    assert analysis.confidence >= 0.9
    assert analysis.bear_score > 0.9 and analysis.bull_score == 0.0
    assert "momentum -" in analysis.reasoning
    assert "below long SMA" in analysis.reasoning


def test_flat_series_is_a_hold() -> None:
    analysis = analyze("BTC/USDT", [250.0] * 40)
    assert analysis == Analysis("BTC/USDT", "hold", 0.0, 0.0, 0.0, analysis.reasoning)
    assert "RSI 50.0" in analysis.reasoning


def test_sideways_chop_is_a_hold() -> None:
    analysis = analyze("BTC/USDT", [100.0 + 0.05 * (i % 2) for i in range(60)])
    assert analysis.decision == "hold"
    assert analysis.confidence < 0.15
    assert "Hold" in analysis.reasoning


@pytest.mark.parametrize("count", [0, 1, MIN_PRICES - 1])
def test_too_few_prices_is_a_hold_with_no_confidence(count: int) -> None:
    analysis = analyze("BTC/USDT", rising(count))
    assert (analysis.decision, analysis.confidence) == ("hold", 0.0)
    assert (analysis.bull_score, analysis.bear_score) == (0.0, 0.0)
    assert "not enough data yet" in analysis.reasoning.lower()


def test_minimum_prices_is_enough() -> None:
    assert analyze("BTC/USDT", rising(MIN_PRICES)).decision == "buy"


def test_reasoning_names_the_indicators_and_their_values() -> None:
    analysis = analyze("BTC/USDT", rising())
    reasoning = analysis.reasoning
    gap = sma_cross(rising())
    change = momentum(rising(), 10)
    assert gap is not None and change is not None
    assert "RSI 100.0 overbought" in reasoning
    assert f"short SMA above long SMA by {gap * 100:.2f}%" in reasoning
    assert f"momentum +{change * 100:.2f}% over 10 ticks" in reasoning
    assert reasoning.startswith("Buy: ") and reasoning.endswith(".")
    assert ". " not in reasoning  # one sentence


def test_mixed_signals_name_what_disagreed() -> None:
    # A long climb, then a few sharp drops: the short SMA is still above the long one and RSI
    # still high, while momentum over 10 ticks has just turned negative.
    climb = rising(50, 0.01)
    prices = climb + [climb[-1] * 0.985**i for i in range(1, 5)]
    analysis = analyze("BTC/USDT", prices)
    assert analysis.decision == "buy"
    assert analysis.reasoning.startswith("Buy: short SMA above long SMA")
    assert "; despite momentum -" in analysis.reasoning
    assert 0.0 < analysis.bear_score < analysis.bull_score
    # Disagreement costs confidence: below the bare margin.
    assert analysis.confidence < analysis.bull_score - analysis.bear_score


def test_scores_stay_in_range_on_random_walks() -> None:
    market = SimulatedMarket(SYMBOLS, seed=17, volatility=0.01)
    decisions: set[str] = set()
    for now in range(2000):
        market.tick(float(now))
        for symbol in SYMBOLS:
            analysis = analyze(symbol, market.prices(symbol, 200))
            data = analysis.as_dict()
            assert list(data) == [
                "symbol",
                "decision",
                "confidence",
                "bull_score",
                "bear_score",
                "reasoning",
            ]
            for key in ("confidence", "bull_score", "bear_score"):
                assert 0.0 <= data[key] <= 1.0
                assert data[key] == round(data[key], 4)
            margin = analysis.bull_score - analysis.bear_score
            assert (analysis.decision == "buy") == (margin >= 0.15)
            assert (analysis.decision == "sell") == (margin <= -0.15)
            assert analysis.confidence <= abs(margin) + 1e-12
            decisions.add(analysis.decision)
    assert decisions == {"buy", "sell", "hold"}


def test_analysis_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        analyze("BTC/USDT", [*rising(30), 0.0])
    with pytest.raises(ValueError):
        analyze("BTC/USDT", [*rising(30), math.inf])
    with pytest.raises(ValueError):
        Analysis("BTC/USDT", "buy", 1.5, 0.5, 0.0, "too sure")
