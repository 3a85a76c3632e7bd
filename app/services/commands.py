"""The operations a client runs: as a WebSocket `command`, and (the same functions) from the REST
views. Each command has a name, the API-key scope it needs, the pydantic model of its arguments
(the REST body's model where REST has one) and the message type that answers it.

To add a command: an async function `(gateway, principal, arguments) -> result` and a line in
COMMANDS.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

from app.errors import GatewayError, quoted
from app.models import Decision
from app.services.events import ErrorCode, normalize_symbol
from app.services.health import health_snapshot

if TYPE_CHECKING:
    from app.services.gateway import Gateway


class NoArguments(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class ProposalRef(NoArguments):
    proposal_id: str


class ProposalDecision(Decision):
    """A decision on one proposal: its id and, for a rejection, the REST body's reason."""

    proposal_id: str


class SymbolRef(NoArguments):
    symbol: str = Field(min_length=1, max_length=50, examples=["BTC/USDT"])


def parse_symbol(raw: str) -> str:
    """`btc/usdt` -> `BTC/USDT`; GatewayError INVALID_SYMBOL when it is not BASE/QUOTE."""
    symbol = normalize_symbol(raw)
    if symbol is None:
        raise GatewayError(
            ErrorCode.INVALID_SYMBOL,
            "Invalid symbol format",
            f"Symbol {quoted(raw)} is not BASE/QUOTE (for example BTC/USDT)",
        )
    return symbol


async def get_status(gateway: Gateway, principal: str, _: NoArguments) -> dict[str, Any]:
    return gateway.system_status()


async def get_portfolio(gateway: Gateway, principal: str, _: NoArguments) -> dict[str, Any]:
    return await gateway.engine.portfolio()


async def get_health(gateway: Gateway, principal: str, _: NoArguments) -> dict[str, Any]:
    return health_snapshot()


async def approve_proposal(gateway: Gateway, principal: str, args: ProposalRef) -> dict[str, Any]:
    proposal, trade = await gateway.engine.approve(args.proposal_id, principal)
    return {
        "proposal": proposal.as_dict(),
        "trade": trade.as_event() if trade is not None else None,
    }


async def reject_proposal(
    gateway: Gateway, principal: str, args: ProposalDecision
) -> dict[str, Any]:
    proposal = await gateway.engine.reject(args.proposal_id, principal, args.reason)
    return {"proposal": proposal.as_dict()}


async def pause(gateway: Gateway, principal: str, _: NoArguments) -> dict[str, Any]:
    return {"status": "paused", "changed": await gateway.engine.set_paused(True, principal)}


async def resume(gateway: Gateway, principal: str, _: NoArguments) -> dict[str, Any]:
    return {"status": "running", "changed": await gateway.engine.set_paused(False, principal)}


async def analyze(gateway: Gateway, principal: str, args: SymbolRef) -> dict[str, Any]:
    symbol = normalize_symbol(args.symbol)
    if symbol not in gateway.market.symbols:
        raise GatewayError(
            ErrorCode.INVALID_SYMBOL,
            "Unknown symbol",
            f"{quoted(args.symbol)} is not one of {', '.join(gateway.market.symbols)}",
        )
    return (await gateway.simulation.analyze(symbol)).as_dict()


@dataclass(frozen=True)
class Command:
    name: str
    scope: str
    arguments: type[BaseModel]
    run: Callable[[Gateway, str, Any], Awaitable[Any]]
    # What answers it: `command_result`, or (as the original SIGMAX server does, and as the
    # spec's client waiting for `system_status` expects) the event it asks for.
    reply: str = "command_result"


COMMANDS: dict[str, Command] = {
    command.name: command
    for command in (
        Command("get_status", "read", NoArguments, get_status, reply="system_status"),
        Command("get_portfolio", "read", NoArguments, get_portfolio, reply="portfolio_update"),
        Command("get_health", "read", NoArguments, get_health, reply="health_update"),
        Command("approve_proposal", "trade", ProposalRef, approve_proposal),
        Command("reject_proposal", "trade", ProposalDecision, reject_proposal),
        Command("pause", "trade", NoArguments, pause),
        Command("resume", "trade", NoArguments, resume),
        Command("analyze", "trade", SymbolRef, analyze),
    )
}
