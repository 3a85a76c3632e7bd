"""The operations a client runs: as a WebSocket `command`, and (the same functions) from the REST
views. Each command has a name, the API-key scope it needs, the pydantic model of its arguments
(the REST body's model where REST has one) and the message type that answers it.

A user action (`result` set) is carried out by the engine (`gateway.engine.perform`): the
paper engine in this process, or a remote one. To add a read: an async function `(gateway,
caller, arguments) -> result` and a line in COMMANDS; an action: a line in COMMANDS (with the
model of its result) and its entry in `PaperEngine.ACTIONS`.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

from app.errors import GatewayError, quoted
from app.models import (
    TRADED_SYMBOL,
    AnalysisData,
    Decision,
    DecisionResult,
    EngineState,
    NewProposal,
    ProposalResult,
)
from app.services import metrics
from app.services.engines import Caller
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
    symbol: str = Field(
        min_length=1, max_length=50, examples=["BTC/USDT"], json_schema_extra={TRADED_SYMBOL: True}
    )


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


async def get_status(gateway: Gateway, caller: Caller, _: NoArguments) -> dict[str, Any]:
    return gateway.system_status()


async def get_portfolio(gateway: Gateway, caller: Caller, _: NoArguments) -> dict[str, Any]:
    return await gateway.engine.portfolio()


async def get_health(gateway: Gateway, caller: Caller, _: NoArguments) -> dict[str, Any]:
    return health_snapshot()


@dataclass(frozen=True)
class Command:
    name: str
    scope: str
    arguments: type[BaseModel]
    # A read the gateway answers itself; None for a user action, which the engine carries out.
    read: Callable[[Gateway, Caller, Any], Awaitable[Any]] | None = None
    # What answers it: `command_result`, or (as the original SIGMAX server does, and as the
    # spec's client waiting for `system_status` expects) the event it asks for.
    reply: str = "command_result"
    # The model of a user action's result: what a remote engine must answer (checked).
    result: Any = None

    @property
    def action(self) -> bool:
        return self.read is None

    async def run(self, gateway: Gateway, caller: Caller, args: BaseModel) -> Any:
        started = time.perf_counter()
        outcome = "error"
        try:
            result = await self._run(gateway, caller, args)
            outcome = "ok"
            return result
        except GatewayError as error:
            outcome = error.code
            raise
        finally:
            metrics.COMMAND_SECONDS.labels(self.name, outcome).observe(
                time.perf_counter() - started
            )

    async def _run(self, gateway: Gateway, caller: Caller, args: BaseModel) -> Any:
        if self.read is not None:
            return await self.read(gateway, caller, args)
        if isinstance(args, SymbolRef | NewProposal):
            args = args.model_copy(update={"symbol": parse_symbol(args.symbol)})
        return await gateway.engine.perform(self.name, args, caller)


COMMANDS: dict[str, Command] = {
    command.name: command
    for command in (
        Command("get_status", "read", NoArguments, get_status, reply="system_status"),
        Command("get_portfolio", "read", NoArguments, get_portfolio, reply="portfolio_update"),
        Command("get_health", "read", NoArguments, get_health, reply="health_update"),
        Command("approve_proposal", "trade", ProposalRef, result=DecisionResult),
        Command("reject_proposal", "trade", ProposalDecision, result=DecisionResult),
        Command("create_proposal", "trade", NewProposal, result=ProposalResult),
        Command("pause", "trade", NoArguments, result=EngineState),
        Command("resume", "trade", NoArguments, result=EngineState),
        Command("analyze", "trade", SymbolRef, result=AnalysisData),
    )
}
ACTIONS = tuple(name for name, command in COMMANDS.items() if command.action)
