"""The paper-trading engine: proposals (created -> approved -> executed, or rejected/expired),
execution at the market price with fee and slippage, risk rules, and the portfolio.

Every state change is one database transaction whose first statement claims the proposal
(`transition_proposal`), so concurrent approvals from any worker execute a proposal once.
Events are published after the commit.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from app.errors import GatewayError, quoted
from app.services import store
from app.services.events import Event
from app.services.market import round_price
from app.services.store import Position, Proposal, Trade

Publish = Callable[[list[Event]], Awaitable[object]]
EPSILON = 1e-9


class PriceSource(Protocol):
    @property
    def symbols(self) -> list[str]: ...

    def price(self, symbol: str) -> float | None: ...


@dataclass(frozen=True)
class RiskRules:
    """The engine's settings (their defaults and meaning: config.py)."""

    fee_rate: float
    slippage: float
    risk_per_trade: float
    max_position_share: float
    max_drawdown: float
    proposal_ttl: float
    confidence_threshold: float
    auto_approve: bool
    initial_cash: float


class ProposalDecided(GatewayError):
    """409: the proposal is no longer open; `status` says what it became."""

    def __init__(self, status: str, details: str) -> None:
        super().__init__(
            "PROPOSAL_ALREADY_DECIDED",
            f"Proposal already {status}",
            details,
            proposal_status=status,
        )


class TradingEngine:
    def __init__(self, db: Any, market: PriceSource, publish: Publish, rules: RiskRules) -> None:
        self._db = db
        self._market = market
        self._publish = publish
        self.rules = rules
        self.paused = False
        self.counters = {
            "proposals_created": 0,
            "proposals_approved": 0,
            "proposals_rejected": 0,
            "proposals_expired": 0,
            "trades_executed": 0,
            "risk_refusals": 0,
        }
        self._peak_value = 0.0
        self._breaches: set[str] = set()

    async def load(self) -> None:
        """Restore what survives a restart: the paused flag and the starting cash."""
        async with self._db.connection() as connection:
            await store.ensure_initial_deposit(connection, self.rules.initial_cash, time.time())
            self.paused = await store.get_state(connection, "paused") == "1"

    # -- proposals --------------------------------------------------------------------------

    async def propose(
        self,
        symbol: str,
        action: str,
        size: float | None,
        reason: str,
        *,
        confidence: float | None = None,
        source: str = "manual",
        requested_by: str | None = None,
    ) -> Proposal:
        """Create a proposal; without `size`, the risk rule sizes it. Refused while paused:
        a paused engine makes no new proposals, the agent's nor anyone's."""
        if self.paused:
            raise GatewayError(
                "ENGINE_PAUSED",
                "Trading is paused",
                "No new proposals while the engine is paused; resume it first",
            )
        if symbol not in self._market.symbols:
            raise GatewayError(
                "UNKNOWN_SYMBOL",
                "Unknown symbol",
                f"{quoted(symbol)} is not traded; symbols: {', '.join(self._market.symbols)}",
            )
        price = await self._price(symbol)
        if size is None:
            size = self._risk_size(await self.portfolio(), symbol, action, price)
            if size <= 0:
                raise GatewayError(
                    "NOTHING_TO_SELL", "Nothing to sell", f"There is no {symbol} position to sell"
                )
        size = round(size, 8)
        if size <= 0:
            raise GatewayError("INVALID_SIZE", "Size too small", "The smallest size is 0.00000001")
        now = time.time()
        proposal = Proposal(
            id=store.new_id("prop"),
            symbol=symbol,
            action=action,
            size=size,
            reason=reason,
            confidence=confidence,
            source=source,
            status="pending",
            created_at=now,
            expires_at=now + self.rules.proposal_ttl,
            requested_by=requested_by,
        )
        async with self._db.connection() as connection:
            await store.insert_proposal(connection, proposal)
        self.counters["proposals_created"] += 1
        await self._publish([Event("proposal_created", proposal.created_event(), symbol=symbol)])
        if self.rules.auto_approve:
            return (await self.approve(proposal.id, "auto"))[0]
        return proposal

    async def proposal(self, proposal_id: str) -> Proposal:
        async with self._db.connection() as connection:
            proposal = await store.select_proposal(connection, proposal_id)
        if proposal is None:
            raise GatewayError(
                "PROPOSAL_NOT_FOUND", "Proposal not found", f"No proposal {quoted(proposal_id)}"
            )
        return proposal

    async def proposals(
        self, *, status: str | None, symbol: str | None, limit: int, offset: int
    ) -> tuple[list[Proposal], int]:
        """A page of proposals, newest first, and how many match in all."""
        async with self._db.connection() as connection:
            items = await store.select_proposals(
                connection, status=status, symbol=symbol, limit=limit, offset=offset
            )
            total = await store.count_proposals(connection, status=status, symbol=symbol)
        return items, total

    async def trades(self, *, limit: int, offset: int) -> tuple[list[Trade], int]:
        """A page of executed trades, newest first, and how many there are."""
        async with self._db.connection() as connection:
            trades = await store.select_trades(connection, limit=limit, offset=offset)
            total = await store.count_trades(connection)
        return trades, total

    async def consider(
        self, symbol: str, decision: str, confidence: float, reasoning: str
    ) -> Proposal | None:
        """Turn a confident analysis into a proposal, one open proposal per symbol at most."""
        if self.paused or decision not in ("buy", "sell"):
            return None
        if confidence < self.rules.confidence_threshold:
            return None
        async with self._db.connection() as connection:
            if await store.count_open_proposals(connection, symbol):
                return None
        price = await self._price(symbol)
        snapshot = await self.portfolio()
        size = self._risk_size(snapshot, symbol, decision, price)
        held_value = _position(snapshot, symbol, "value")
        at_limit = held_value >= self.rules.max_position_share * snapshot["total_value"]
        if size <= 0 or (decision == "buy" and at_limit):
            return None
        return await self.propose(
            symbol,
            decision,
            size,
            f"Agent {decision} signal ({confidence:.2f}): {reasoning}",
            confidence=confidence,
            source="agent",
        )

    async def approve(self, proposal_id: str, by: str) -> tuple[Proposal, Trade | None]:
        """Approve and, unless paused, execute. Exactly one of concurrent approvals wins; the
        others get 409 with the state the proposal is in."""
        now = time.time()
        events: list[Event] = []
        trade: Trade | None = None
        async with self._db.connection() as connection:
            async with connection.transaction():
                proposal = await store.transition_proposal(
                    connection,
                    proposal_id,
                    from_status="pending",
                    to_status="approved",
                    by=by,
                    at=now,
                )
                if proposal is None:
                    raise await self._not_open(connection, proposal_id, "approve")
                events.append(
                    Event("proposal_approved", proposal.approved_event(), symbol=proposal.symbol)
                )
                if not self.paused:
                    proposal, trade, more = await self._execute(connection, proposal, now)
                    events += more
        self.counters["proposals_approved"] += 1
        await self._publish(events)
        if trade is not None:
            await self.publish_portfolio()
        return proposal, trade

    async def reject(self, proposal_id: str, by: str, reason: str | None = None) -> Proposal:
        now = time.time()
        async with self._db.connection() as connection:
            async with connection.transaction():
                proposal = await store.transition_proposal(
                    connection,
                    proposal_id,
                    from_status="pending",
                    or_from="approved",
                    to_status="rejected",
                    by=by,
                    at=now,
                    reason=reason or f"rejected by {by}",
                )
                if proposal is None:
                    raise await self._not_open(connection, proposal_id, "reject")
        self.counters["proposals_rejected"] += 1
        await self._publish(
            [Event("proposal_rejected", proposal.closed_event(), symbol=proposal.symbol)]
        )
        return proposal

    async def expire_stale(self, now: float | None = None) -> list[Proposal]:
        now = time.time() if now is None else now
        expired: list[Proposal] = []
        async with self._db.connection() as connection:
            for proposal_id in await store.select_stale_proposals(connection, now):
                proposal = await store.transition_proposal(
                    connection,
                    proposal_id,
                    from_status="pending",
                    to_status="expired",
                    by="system",
                    at=now,
                    reason=f"not approved within {self.rules.proposal_ttl:g} s",
                )
                if proposal is not None:
                    expired.append(proposal)
        if expired:
            self.counters["proposals_expired"] += len(expired)
            await self._publish(
                [Event("proposal_expired", p.closed_event(), symbol=p.symbol) for p in expired]
            )
        return expired

    async def _not_open(self, connection: Any, proposal_id: str, verb: str) -> GatewayError:
        existing = await store.select_proposal(connection, proposal_id)
        if existing is None:
            return GatewayError(
                "PROPOSAL_NOT_FOUND", "Proposal not found", f"No proposal {quoted(proposal_id)}"
            )
        return ProposalDecided(
            existing.status,
            f"Cannot {verb} {quoted(proposal_id)}: it is {existing.status}"
            + (f" ({existing.status_reason})" if existing.status_reason else ""),
        )

    # -- execution --------------------------------------------------------------------------

    async def _execute(
        self, connection: Any, proposal: Proposal, now: float
    ) -> tuple[Proposal, Trade | None, list[Event]]:
        """Fill an approved proposal inside the caller's transaction, or refuse it by the risk
        rules (then it is rejected with the reason, and an alert says why)."""
        price = await self._price(proposal.symbol)
        slip = self.rules.slippage if proposal.action == "buy" else -self.rules.slippage
        filled = round(price * (1 + slip), 8)
        notional = proposal.size * filled
        fee = round(notional * self.rules.fee_rate, 8)
        position = await store.select_position(connection, proposal.symbol) or Position(
            proposal.symbol, 0.0, 0.0, 0.0
        )
        refusal = None
        if proposal.action == "buy":
            cash = await store.cash_balance(connection)
            if notional + fee > cash + EPSILON:
                refusal = (
                    "INSUFFICIENT_CASH",
                    f"Buying {proposal.size} {proposal.symbol} costs "
                    f"{notional + fee:.2f} with fees; cash is {cash:.2f}",
                )
        elif proposal.size > position.size + EPSILON:
            refusal = (
                "INSUFFICIENT_POSITION",
                f"Selling {proposal.size} {proposal.symbol}; the position is {position.size}",
            )
        if refusal is not None:
            code, details = refusal
            rejected = await store.transition_proposal(
                connection,
                proposal.id,
                from_status="approved",
                to_status="rejected",
                by="risk",
                at=now,
                reason=details,
            )
            assert rejected is not None
            self.counters["risk_refusals"] += 1
            return (
                rejected,
                None,
                [
                    Event("proposal_rejected", rejected.closed_event(), symbol=proposal.symbol),
                    alert(
                        "medium",
                        code,
                        details,
                        action_required=False,
                        symbol=proposal.symbol,
                        proposal_id=proposal.id,
                    ),
                ],
            )
        executed = await store.transition_proposal(
            connection, proposal.id, from_status="approved", to_status="executed", by=None, at=now
        )
        assert executed is not None
        trade = Trade(
            order_id=store.new_id("order"),
            proposal_id=proposal.id,
            symbol=proposal.symbol,
            action=proposal.action,
            size=proposal.size,
            filled_price=filled,
            fee=fee,
            status="filled",
            executed_at=now,
        )
        await store.insert_trade(connection, trade)
        sign = -1 if proposal.action == "buy" else 1
        await store.record_cash(connection, "trade", sign * notional, trade.order_id, now)
        await store.record_cash(connection, "fee", -fee, trade.order_id, now)
        await store.save_position(connection, _after_fill(position, trade), now)
        self.counters["trades_executed"] += 1
        return executed, trade, [Event("trade_executed", trade.as_event(), symbol=trade.symbol)]

    async def execute_approved(self) -> int:
        """Execute what was approved while paused (on resume)."""
        async with self._db.connection() as connection:
            pending = await store.select_approved_proposals(connection)
        executed = 0
        for proposal_id in pending:
            events: list[Event] = []
            now = time.time()
            async with self._db.connection() as connection:
                async with connection.transaction():
                    proposal = await store.select_proposal(connection, proposal_id)
                    if proposal is None or proposal.status != "approved":
                        continue
                    _, trade, events = await self._execute(connection, proposal, now)
            executed += trade is not None
            await self._publish(events)
        if executed:
            await self.publish_portfolio()
        return executed

    # -- pause and resume -------------------------------------------------------------------

    async def set_paused(self, paused: bool, by: str) -> bool:
        """Pause or resume; returns whether anything changed."""
        if paused == self.paused:
            return False
        async with self._db.connection() as connection:
            await store.set_state(connection, "paused", "1" if paused else "0")
        self.paused = paused
        current, previous = ("paused", "running") if paused else ("running", "paused")
        await self._publish(
            [
                Event(
                    "status_change",
                    {
                        "status": current,
                        "previous": previous,
                        "changed_by": by,
                        # the original SIGMAX engine's fields
                        "previous_status": previous,
                        "current_status": current,
                        "reason": f"{'paused' if paused else 'resumed'} by {by}",
                    },
                )
            ]
        )
        if not paused:
            await self.execute_approved()
        return True

    # -- portfolio --------------------------------------------------------------------------

    async def portfolio(self) -> dict[str, Any]:
        """The spec's portfolio_update data."""
        async with self._db.connection() as connection:
            cash = await store.cash_balance(connection)
            invested = await store.deposits(connection)
            positions = await store.select_positions(connection)
        rows = []
        total = cash
        for position in positions:
            if abs(position.size) <= EPSILON:
                continue
            price = round_price(self._market.price(position.symbol) or position.entry_price)
            value = position.size * price
            pnl = (price - position.entry_price) * position.size
            total += value
            rows.append(
                {
                    "symbol": position.symbol,
                    "size": position.size,
                    "entry_price": round_price(position.entry_price),
                    "current_price": price,
                    "value": round(value, 2),
                    "pnl": round(pnl, 2),
                    "pnl_percent": _percent(price / position.entry_price - 1)
                    if position.entry_price
                    else 0.0,
                }
            )
        total_pnl = total - invested
        return {
            "total_value": round(total, 2),
            "available_cash": round(cash, 2),
            "positions": rows,
            "total_pnl": round(total_pnl, 2),
            "total_pnl_percent": _percent(total_pnl / invested) if invested else 0.0,
        }

    async def publish_portfolio(self) -> dict[str, Any]:
        snapshot = await self.portfolio()
        await self._publish([Event("portfolio_update", snapshot), *self._breach_alerts(snapshot)])
        return snapshot

    def _breach_alerts(self, snapshot: dict[str, Any]) -> list[Event]:
        """An alert when a limit is first crossed, not on every snapshot while it stays so."""
        total = snapshot["total_value"]
        self._peak_value = max(self._peak_value, total)
        alerts = []
        breached = set()
        for row in snapshot["positions"]:
            if total > 0 and row["value"] / total > self.rules.max_position_share:
                breached.add(f"position:{row['symbol']}")
                if f"position:{row['symbol']}" not in self._breaches:
                    alerts.append(
                        alert(
                            "high",
                            "POSITION_LIMIT",
                            f"{row['symbol']} is {100 * row['value'] / total:.1f}% of the "
                            f"portfolio (limit {100 * self.rules.max_position_share:.0f}%)",
                            action_required=True,
                            symbol=row["symbol"],
                        )
                    )
        if (
            self._peak_value
            and (self._peak_value - total) / self._peak_value > self.rules.max_drawdown
        ):
            breached.add("drawdown")
            if "drawdown" not in self._breaches:
                alerts.append(
                    alert(
                        "critical",
                        "DRAWDOWN_LIMIT",
                        f"Portfolio is {100 * (1 - total / self._peak_value):.1f}% below its peak "
                        f"of {self._peak_value:.2f} (limit {100 * self.rules.max_drawdown:.0f}%)",
                        action_required=True,
                    )
                )
        self._breaches = breached
        return alerts

    # -- helpers ----------------------------------------------------------------------------

    async def _price(self, symbol: str) -> float:
        price = self._market.price(symbol)
        if price is None:
            async with self._db.connection() as connection:
                price = (await store.select_prices(connection)).get(symbol)
        if price is None:
            raise GatewayError(
                "NO_PRICE",
                "No market price yet",
                f"There is no price for {symbol} yet; retry shortly",
            )
        return price

    def _risk_size(self, snapshot: dict[str, Any], symbol: str, action: str, price: float) -> float:
        """Size a trade at `risk_per_trade` of the portfolio's value; a sell never exceeds the
        position."""
        size = self.rules.risk_per_trade * snapshot["total_value"] / price
        if action == "sell":
            size = min(size, _position(snapshot, symbol, "size"))
        return round(size, 8)


def _position(snapshot: dict[str, Any], symbol: str, field: str) -> float:
    """A field of the snapshot's position in `symbol` (0 without one)."""
    return next((p[field] for p in snapshot["positions"] if p["symbol"] == symbol), 0.0)


def _after_fill(position: Position, trade: Trade) -> Position:
    if trade.action == "buy":
        size = position.size + trade.size
        entry = (position.size * position.entry_price + trade.size * trade.filled_price) / size
        return Position(position.symbol, round(size, 10), entry, position.realized_pnl)
    realized = position.realized_pnl + (trade.filled_price - position.entry_price) * trade.size
    size = round(position.size - trade.size, 10)
    return Position(
        position.symbol, size, position.entry_price if size > EPSILON else 0.0, realized
    )


def _percent(fraction: float) -> float:
    return round(100 * fraction, 2) + 0.0  # + 0.0 turns -0.0 into 0.0


# `severity` is the original SIGMAX engine's field; `level` is kept for clients of earlier
# versions of the gateway.
LEVEL_OF_SEVERITY = {"low": "info", "medium": "warning", "high": "warning", "critical": "critical"}


def alert(
    severity: str, code: str, message: str, *, action_required: bool, **context: Any
) -> Event:
    return Event(
        "alert",
        {
            "severity": severity,
            "level": LEVEL_OF_SEVERITY[severity],
            "code": code,
            "message": message,
            "action_required": action_required,
            **context,
        },
        symbol=context.get("symbol"),
    )
