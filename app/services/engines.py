"""The trading engine behind the gateway, as the commands and REST views see it: the built-in
paper engine (`PaperEngine`, the default) or a remote one (`RemoteEngine`, with ENGINE_URL).

Every user action (approve, reject, pause, resume, analyze, a manual proposal) is one
`perform(command, args, caller)`; reads (proposals, trades, portfolio) answer JSON-shaped dicts,
the same from either engine.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol
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
        trading, principal = self.trading, caller.principal
        if command == "approve_proposal":
            proposal, trade = await trading.approve(args.proposal_id, principal)
            return {
                "proposal": proposal.as_dict(),
                "trade": trade.as_event() if trade is not None else None,
            }
        if command == "reject_proposal":
            proposal = await trading.reject(args.proposal_id, principal, args.reason)
            return {"proposal": proposal.as_dict()}
        if command == "create_proposal":
            proposal = await trading.propose(
                args.symbol, args.action, args.size, args.reason, requested_by=principal
            )
            return {"proposal": proposal.as_dict()}
        if command in ("pause", "resume"):
            paused = command == "pause"
            changed = await trading.set_paused(paused, principal)
            return {"status": "paused" if paused else "running", "changed": changed}
        if command == "analyze":
            if args.symbol not in self.simulation.market.symbols:
                raise GatewayError(
                    ErrorCode.INVALID_SYMBOL,
                    "Unknown symbol",
                    f"{quoted(args.symbol)} is not one of "
                    f"{', '.join(self.simulation.market.symbols)}",
                )
            return (await self.simulation.analyze(args.symbol)).as_dict()
        raise GatewayError(
            "UNKNOWN_COMMAND", "Unknown command", f"The engine has no command {quoted(command)}"
        )

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
