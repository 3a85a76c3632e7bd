"""The analysis agent: trend indicators over a symbol's recent prices, combined into bull and
bear scores, a buy/sell/hold decision, a confidence, and a one-sentence reasoning.

Each indicator becomes a signal in [-1, 1] (positive is bullish), weighted into the scores.
RSI is read as trend strength (above 50 is bullish), not as a mean-reversion signal, so the
indicators agree on a steady trend; readings past 70 or under 30 are still named overbought or
oversold in the reasoning.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

Decision = Literal["buy", "sell", "hold"]

MOMENTUM_PERIOD = 10
RSI_PERIOD = 14
SHORT_SMA_PERIOD = 5
LONG_SMA_PERIOD = 20
MIN_PRICES = max(LONG_SMA_PERIOD, RSI_PERIOD + 1, MOMENTUM_PERIOD + 1)

# The reading at which each signal saturates: set beyond the noise of the simulated feed's
# default volatility (0.2% a tick), so only a real trend gives a full signal.
MOMENTUM_FULL_SIGNAL = 0.02
SMA_GAP_FULL_SIGNAL = 0.01
RSI_FULL_SIGNAL = 25.0

SMA_WEIGHT = 0.4
MOMENTUM_WEIGHT = 0.35
RSI_WEIGHT = 0.25
DECISION_MARGIN = 0.15
OVERBOUGHT = 70.0
OVERSOLD = 30.0


@dataclass(frozen=True)
class Analysis:
    """The agent's view of one symbol; scores and confidence are within [0, 1]."""

    symbol: str
    decision: Decision
    confidence: float
    bull_score: float
    bear_score: float
    reasoning: str

    def __post_init__(self) -> None:
        if self.decision not in ("buy", "sell", "hold"):
            raise ValueError(f"decision must be buy, sell or hold, got {self.decision!r}")
        for name in ("confidence", "bull_score", "bear_score"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be within [0, 1], got {value}")

    def as_dict(self) -> dict[str, Any]:
        """The `analysis_update` payload."""
        return {
            "symbol": self.symbol,
            "decision": self.decision,
            "confidence": round(self.confidence, 4),
            "bull_score": round(self.bull_score, 4),
            "bear_score": round(self.bear_score, 4),
            "reasoning": self.reasoning,
        }


# -- indicators: pure functions over prices, oldest first -------------------------------------


def momentum(prices: Sequence[float], period: int) -> float | None:
    """Rate of change over the last `period` steps as a fraction (0.012 is +1.2%); None when
    there are too few prices or the base price is zero."""
    _check_period(period)
    if len(prices) <= period:
        return None
    base = prices[-1 - period]
    if base == 0:
        return None
    return (prices[-1] - base) / base


def sma(prices: Sequence[float], period: int) -> float | None:
    """Mean of the last `period` prices; None when there are too few."""
    _check_period(period)
    count = len(prices)
    if count < period:
        return None
    return math.fsum(prices[i] for i in range(count - period, count)) / period


def rsi(prices: Sequence[float], period: int = 14) -> float | None:
    """Wilder's RSI in [0, 100]: 100 when there are no losses, 50 when flat, None with fewer
    than `period + 1` prices."""
    _check_period(period)
    if len(prices) <= period:
        return None
    changes = [prices[i] - prices[i - 1] for i in range(1, len(prices))]
    average_gain = math.fsum(max(change, 0.0) for change in changes[:period]) / period
    average_loss = math.fsum(max(-change, 0.0) for change in changes[:period]) / period
    for change in changes[period:]:
        average_gain = (average_gain * (period - 1) + max(change, 0.0)) / period
        average_loss = (average_loss * (period - 1) + max(-change, 0.0)) / period
    if average_loss == 0.0:
        return 50.0 if average_gain == 0.0 else 100.0
    return 100.0 - 100.0 / (1.0 + average_gain / average_loss)


def sma_cross(
    prices: Sequence[float],
    short_period: int = SHORT_SMA_PERIOD,
    long_period: int = LONG_SMA_PERIOD,
) -> float | None:
    """Gap between the short and the long SMA as a fraction of the long one: positive when the
    short SMA is above. None when there are too few prices."""
    if short_period >= long_period:
        raise ValueError(f"short_period ({short_period}) must be below long_period ({long_period})")
    short = sma(prices, short_period)
    long = sma(prices, long_period)
    if short is None or long is None or long == 0:
        return None
    return (short - long) / long


def _check_period(period: int) -> None:
    if period < 1:
        raise ValueError(f"period must be at least 1, got {period}")


# -- the agent ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Signal:
    weight: float
    strength: float
    description: str


def analyze(symbol: str, prices: Sequence[float]) -> Analysis:
    """Combine the indicators over `prices` (oldest first) into a decision."""
    if any(not math.isfinite(price) or price <= 0 for price in prices):
        raise ValueError(f"prices of {symbol} must be finite and positive")
    gap = sma_cross(prices)
    change = momentum(prices, MOMENTUM_PERIOD)
    strength = rsi(prices, RSI_PERIOD)
    if len(prices) < MIN_PRICES or gap is None or change is None or strength is None:
        return Analysis(
            symbol,
            "hold",
            0.0,
            0.0,
            0.0,
            f"Not enough data yet: {len(prices)} of {MIN_PRICES} prices needed.",
        )

    signals = [
        _Signal(SMA_WEIGHT, _clamp(gap / SMA_GAP_FULL_SIGNAL), _describe_gap(gap)),
        _Signal(
            MOMENTUM_WEIGHT,
            _clamp(change / MOMENTUM_FULL_SIGNAL),
            f"momentum {change * 100:+.2f}% over {MOMENTUM_PERIOD} ticks",
        ),
        _Signal(RSI_WEIGHT, _clamp((strength - 50.0) / RSI_FULL_SIGNAL), _describe_rsi(strength)),
    ]
    bull = _clamp(math.fsum(s.weight * max(s.strength, 0.0) for s in signals), 0.0)
    bear = _clamp(math.fsum(s.weight * max(-s.strength, 0.0) for s in signals), 0.0)
    margin = bull - bear
    direction = (margin > 0) - (margin < 0)
    agreement = math.fsum(s.weight for s in signals if s.strength * direction > 0)
    confidence = _clamp(abs(margin) * (0.5 + 0.5 * agreement), 0.0)

    decision: Decision = "hold"
    if margin >= DECISION_MARGIN:
        decision = "buy"
    elif margin <= -DECISION_MARGIN:
        decision = "sell"
    return Analysis(
        symbol,
        decision,
        confidence,
        bull,
        bear,
        _reasoning(decision, direction, bull, bear, signals),
    )


def _reasoning(
    decision: Decision, direction: int, bull: float, bear: float, signals: list[_Signal]
) -> str:
    everything = "; ".join(s.description for s in signals)
    if decision == "hold":
        return f"Hold: no clear edge (bull {bull:.2f}, bear {bear:.2f}); {everything}."
    by_pull = sorted(signals, key=lambda s: s.weight * s.strength * direction, reverse=True)
    drivers = "; ".join(s.description for s in by_pull if s.strength * direction > 0)
    against = "; ".join(s.description for s in by_pull if s.strength * direction < 0)
    sentence = f"{decision.capitalize()}: {drivers}"
    return f"{sentence}; despite {against}." if against else f"{sentence}."


def _describe_gap(gap: float) -> str:
    if abs(gap) < 0.00005:
        return "short SMA level with long SMA"
    side = "above" if gap > 0 else "below"
    return f"short SMA {side} long SMA by {abs(gap) * 100:.2f}%"


def _describe_rsi(value: float) -> str:
    if value >= OVERBOUGHT:
        return f"RSI {value:.1f} overbought"
    if value <= OVERSOLD:
        return f"RSI {value:.1f} oversold"
    return f"RSI {value:.1f}"


def _clamp(value: float, low: float = -1.0, high: float = 1.0) -> float:
    return min(max(value, low), high)
