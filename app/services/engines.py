"""The trading engine behind the gateway, as the commands and REST views see it: the built-in
paper engine (`PaperEngine`, the default) or a remote one (`RemoteEngine`, with ENGINE_URL).

Every user action (approve, reject, pause, resume, analyze, a manual proposal) is one
`perform(command, args, caller)`; reads (proposals, trades, portfolio) answer JSON-shaped dicts,
the same from either engine.
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, Protocol
from uuid import uuid4

from app.errors import GatewayError, quoted
from app.services.engine import TradingEngine
from app.services.events import ErrorCode
from app.services.simulation import Simulation


@dataclass(frozen=True)
class Caller:
    """Who asks, and the key of this one user action: the same on every retry of it, so an
    engine that sees it twice acts once."""

    principal: str
    request_id: str | int | None = None
    idempotency_key: str = field(default_factory=lambda: uuid4().hex)

    @classmethod
    def with_client_key(cls, principal: str, client_key: str | None) -> Caller:
        """A caller whose retries carry their own key (REST's Idempotency-Key): kept apart
        from other callers' keys by the principal; a new key without one."""
        if client_key is None:
            return cls(principal)
        return cls(principal, idempotency_key=f"{principal}:{client_key}")

    def for_item(self, item: str) -> Caller:
        """The caller of one item of a bulk action: a key of its own, derived from the call's
        (the same on a retry of the call); hashed, as an item id may be any text."""
        digest = hashlib.sha256(item.encode()).hexdigest()[:32]
        return replace(self, idempotency_key=f"{self.idempotency_key}:{digest}")


class Engine(Protocol):
    mode: str  # "paper" or "remote"

    @property
    def reachable(self) -> bool | None: ...  # None: nothing to reach (the paper engine)

    @property
    def paused(self) -> bool: ...

    @property
    def counters(self) -> dict[str, int]: ...

    async def start(self) -> None: ...

    async def load(self) -> None: ...  # what survives a restart; again when made leader

    async def close(self) -> None: ...

    async def perform(self, command: str, args: Any, caller: Caller) -> dict[str, Any]: ...

    async def portfolio(self) -> dict[str, Any]: ...

    async def proposal(self, proposal_id: str) -> dict[str, Any]: ...

    async def proposals(
        self, *, status: str | None, symbol: str | None, limit: int, offset: int
    ) -> tuple[list[dict[str, Any]], int]: ...

    async def trades(self, *, limit: int, offset: int) -> tuple[list[dict[str, Any]], int]: ...


class PaperEngine:
    """The built-in paper engine: the trading core and the analysis agent in this process."""

    mode = "paper"
    reachable = None

    def __init__(self, trading: TradingEngine, simulation: Simulation) -> None:
        self.trading = trading
        self.simulation = simulation

    @property
    def paused(self) -> bool:
        return self.trading.paused

    @property
    def counters(self) -> dict[str, int]:
        return self.trading.counters

    async def start(self) -> None:
        await self.trading.load()

    async def load(self) -> None:
        await self.trading.load()

    async def close(self) -> None:
        pass

    async def perform(self, command: str, args: Any, caller: Caller) -> dict[str, Any]:
        action = self.ACTIONS.get(command)
        if action is None:
            raise GatewayError(
                "UNKNOWN_COMMAND", "Unknown command", f"The engine has no command {quoted(command)}"
            )
        return await action(self, args, caller.principal)

    async def _approve(self, args: Any, principal: str) -> dict[str, Any]:
        proposal, trade = await self.trading.approve(args.proposal_id, principal)
        return {
            "proposal": proposal.as_dict(),
            "trade": trade.as_event() if trade is not None else None,
        }

    async def _reject(self, args: Any, principal: str) -> dict[str, Any]:
        proposal = await self.trading.reject(args.proposal_id, principal, args.reason)
        return {"proposal": proposal.as_dict()}

    async def _propose(self, args: Any, principal: str) -> dict[str, Any]:
        proposal = await self.trading.propose(
            args.symbol, args.action, args.size, args.reason, requested_by=principal
        )
        return {"proposal": proposal.as_dict()}

    async def _pause(self, args: Any, principal: str) -> dict[str, Any]:
        return {"status": "paused", "changed": await self.trading.set_paused(True, principal)}

    async def _resume(self, args: Any, principal: str) -> dict[str, Any]:
        return {"status": "running", "changed": await self.trading.set_paused(False, principal)}

    async def _analyze(self, args: Any, principal: str) -> dict[str, Any]:
        symbols = self.simulation.market.symbols
        if args.symbol not in symbols:
            raise GatewayError(
                ErrorCode.INVALID_SYMBOL,
                "Unknown symbol",
                f"{quoted(args.symbol)} is not one of {', '.join(symbols)}",
            )
        return (await self.simulation.analyze(args.symbol)).as_dict()

    # Each action command (commands.ACTIONS; a test checks they agree) and what carries it out.
    ACTIONS: ClassVar[dict[str, Callable[[PaperEngine, Any, str], Awaitable[dict[str, Any]]]]] = {
        "approve_proposal": _approve,
        "reject_proposal": _reject,
        "create_proposal": _propose,
        "pause": _pause,
        "resume": _resume,
        "analyze": _analyze,
    }

    async def portfolio(self) -> dict[str, Any]:
        return await self.trading.portfolio()

    async def proposal(self, proposal_id: str) -> dict[str, Any]:
        return (await self.trading.proposal(proposal_id)).as_dict()

    async def proposals(
        self, *, status: str | None, symbol: str | None, limit: int, offset: int
    ) -> tuple[list[dict[str, Any]], int]:
        items, total = await self.trading.proposals(
            status=status, symbol=symbol, limit=limit, offset=offset
        )
        return [p.as_dict() for p in items], total

    async def trades(self, *, limit: int, offset: int) -> tuple[list[dict[str, Any]], int]:
        items, total = await self.trading.trades(limit=limit, offset=offset)
        return [t.as_event() for t in items], total
