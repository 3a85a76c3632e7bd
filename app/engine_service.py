"""The paper engine as a standalone engine service (`python -m app engine`): the reference of the
remote engine contract, and what the gateway's remote mode is tested against.

It speaks the contract the gateway calls with ENGINE_URL (`POST /commands`, `GET /health`; its
OpenAPI document is /openapi.json here, and /docs/engine on the gateway), follows the gateway's
`market` topic for its prices (paper trading on whatever feed the gateway has, live included),
runs the analysis agent, and publishes its events to the gateway's `POST /api/events` from an
outbox, in order, each batch with an Idempotency-Key kept across retries, so a gateway restart
loses nothing. An action seen again with the same Idempotency-Key answers what it answered the
first time and is carried out once.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
import uuid
from typing import Any, Literal

import orjson
from pydantic import BaseModel, Field, ValidationError
from quart import Blueprint, Quart, current_app
from quart_schema import QuartSchema, validate_headers, validate_request, validate_response
from sigmax_client import SigmaxPublisher, connect_sigmax
from sigmax_client.errors import RequestError, SigmaxConnectionError, SigmaxError

from app.errors import (
    GatewayError,
    describe_validation_error,
    error_body,
    quoted,
    register_error_handlers,
)
from app.logs import configure_logging
from app.models import ErrorResponse
from app.services.commands import ACTIONS, COMMANDS
from app.services.database import attach_database
from app.services.engine import TradingEngine
from app.services.engines import Caller, PaperEngine
from app.services.events import SERVER_VERSION, Event, normalize_symbol
from app.services.gateway import producer_intervals, risk_rules
from app.services.market import SimulatedMarket, prices_in
from app.services.simulation import Simulation
from config import Config

log = logging.getLogger(__name__)

OUTBOX_LIMIT = 100_000  # events waiting for the gateway; beyond it the engine's actions wait
BATCH_LIMIT = 500
ACTION_MEMORY = 24 * 3600.0  # seconds an action's answer is kept for retries of it
RETRY_DELAY, MAX_RETRY_DELAY = 0.5, 10.0

engine_bp = Blueprint("engine", __name__)


# -- the contract ---------------------------------------------------------------------------------


class EngineCommand(BaseModel):
    """One user action, as the gateway sends it."""

    command: Literal[ACTIONS] = Field(description="one of the gateway's action commands")  # type: ignore[valid-type]
    args: dict[str, Any] = Field(
        default_factory=dict, description="the command's arguments, as the gateway checked them"
    )
    request_id: str | int | None = Field(
        default=None, description="the client's request_id, for the engine's logs"
    )
    principal: str = Field(
        default="anonymous", description="who asked: the API key's label, or anonymous"
    )


class EngineReply(BaseModel):
    success: Literal[True]
    result: dict[str, Any] = Field(
        description="approve_proposal, reject_proposal: {proposal, trade}; create_proposal: "
        "{proposal}; pause, resume: {status, changed}; analyze: the analysis_update data (the "
        "gateway's CommandResultData)"
    )


class EngineHeaders(BaseModel):
    idempotency_key: str | None = Field(
        None,
        max_length=300,
        description="Unique per user action, the same on every retry: the action is carried "
        "out once and a retry answers the first answer (the gateway always sends one)",
    )
    x_api_key: str | None = Field(None, description="ENGINE_API_KEY, when the engine has one")


class EngineHealth(BaseModel):
    status: Literal["ok"]
    version: str
    paused: bool
    priced_symbols: list[str] = Field(description="symbols with a price from the gateway")
    outbox: int = Field(description="events waiting to be published to the gateway")


@engine_bp.post("/commands")
@validate_request(EngineCommand)
@validate_headers(EngineHeaders)
@validate_response(EngineReply, 200)
@validate_response(ErrorResponse, 400)
@validate_response(ErrorResponse, 401)
@validate_response(ErrorResponse, 404)
@validate_response(ErrorResponse, 409)
@validate_response(ErrorResponse, 422)
@validate_response(ErrorResponse, 503)
async def post_command(data: EngineCommand, headers: EngineHeaders) -> tuple[dict[str, Any], int]:
    """Carry out one user action. 200 `{success: true, result}`, or an error status with
    `{error, code, details}`, which the gateway relays to the caller with that code."""
    service: EngineService = current_app.extensions["engine_service"]
    expected = service.config.ENGINE_API_KEY
    if expected and not hmac.compare_digest((headers.x_api_key or "").encode(), expected.encode()):
        raise GatewayError("AUTHENTICATION_FAILED", "Invalid API key", "X-API-Key is not ours")
    status, body = await service.handle(data, headers.idempotency_key)
    return body, status


@engine_bp.get("/health")
@validate_response(EngineHealth)
async def get_health() -> EngineHealth:
    """The engine answers: the gateway probes it for its circuit breaker."""
    service: EngineService = current_app.extensions["engine_service"]
    return EngineHealth(
        status="ok",
        version=SERVER_VERSION,
        paused=service.trading.paused,
        priced_symbols=sorted(service.market.snapshot_prices()) if service.priced else [],
        outbox=service.outbox.pending,
    )


async def contract_document() -> dict[str, Any]:
    """The remote engine contract as an OpenAPI document (the gateway serves it at
    /docs/engine)."""
    app = Quart("sigmax-engine-contract")
    _with_schema(app)
    app.register_blueprint(engine_bp)
    async with app.app_context():
        return app.extensions["QUART_SCHEMA"].openapi_provider.schema()  # type: ignore[no-any-return]


def _with_schema(app: Quart) -> None:
    QuartSchema(
        app,
        info={
            "title": "SIGMAX remote engine contract",
            "version": SERVER_VERSION,
            "description": "What a trading engine serves for the gateway's ENGINE_URL. The "
            "engine publishes its events to the gateway's POST /api/events with a key of "
            "scope publish.",
        },
    )


# -- the service ------------------------------------------------------------------------------


class Outbox:
    """Events on their way to the gateway's ingest endpoint, in order; a batch is retried with
    the same Idempotency-Key until the gateway takes it."""

    def __init__(self, publisher: Any) -> None:
        self._publisher = publisher
        self._queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(OUTBOX_LIMIT)

    @property
    def pending(self) -> int:
        return self._queue.qsize()

    async def publish(self, events: list[Event]) -> None:
        for event in events:
            item: dict[str, Any] = {"type": event.type, "data": event.data}
            if event.symbol is not None:
                item["symbol"] = event.symbol
            await self._queue.put(item)

    async def run(self) -> None:
        while True:
            batch = [await self._queue.get()]
            while not self._queue.empty() and len(batch) < BATCH_LIMIT:
                batch.append(self._queue.get_nowait())
            key, attempt = uuid.uuid4().hex, 0
            while True:
                try:
                    await self._publisher.publish(batch, idempotency_key=key)
                    break
                except SigmaxConnectionError as error:
                    attempt += 1
                    log.warning("gateway unreachable (%s); %d events wait", error, len(batch))
                    await asyncio.sleep(min(MAX_RETRY_DELAY, RETRY_DELAY * 2**attempt))
                except RequestError as error:  # refused as it stands: retrying cannot help
                    log.error("the gateway refused %d events: %s", len(batch), error)
                    break


class EngineService:
    def __init__(self, config: Config, db: Any) -> None:
        self.config = config
        self.db = db
        symbols = [s for s in (normalize_symbol(s) for s in config.SYMBOLS) if s]
        self.market = SimulatedMarket(symbols)
        self.priced = False
        self.outbox = Outbox(
            SigmaxPublisher(config.GATEWAY_URL, config.GATEWAY_API_KEY or None, attempts=3)
        )
        self.trading = TradingEngine(db, self.market, self.outbox.publish, risk_rules(config))
        self.simulation = Simulation(
            market=self.market,
            engine=self.trading,
            db=db,
            publish=self.outbox.publish,
            system_status=dict,
            intervals=producer_intervals(config),
        )
        self.engine = PaperEngine(self.trading, self.simulation)
        self._locks: dict[str, asyncio.Lock] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = asyncio.Event()

    async def start(self) -> None:
        await self.engine.start()
        self._stopping = asyncio.Event()
        self._tasks = [
            asyncio.create_task(self.outbox.run()),
            asyncio.create_task(self._follow_prices()),
            *(
                asyncio.create_task(loop())
                for loop in self.simulation.loops(self._stopping, only=("analysis", "portfolio"))
            ),
        ]

    async def stop(self) -> None:
        self._stopping.set()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def handle(
        self, data: EngineCommand, idempotency_key: str | None
    ) -> tuple[int, dict[str, Any]]:
        """(status, body) of an action; once per Idempotency-Key."""
        if idempotency_key is None:
            return await self._carry_out(data)
        lock = self._locks.setdefault(idempotency_key, asyncio.Lock())
        try:
            async with lock:
                async with self.db.connection() as connection:
                    row = await connection.fetch_first(
                        "SELECT command, status, body FROM engine_actions "
                        "WHERE idempotency_key = :key",
                        {"key": idempotency_key},
                    )
                if row is not None:
                    if row["command"] != data.command:
                        return 409, error_body(
                            "IDEMPOTENCY_KEY_REUSED",
                            "Idempotency-Key reused",
                            f"The key was used for {row['command']}, not {data.command}",
                        )
                    return int(row["status"]), orjson.loads(row["body"])
                status, body = await self._carry_out(data)
                if status < 500:  # an outage's answer is not the action's: a retry may succeed
                    await self._remember(idempotency_key, data.command, status, body)
                return status, body
        finally:
            if not lock.locked():
                self._locks.pop(idempotency_key, None)

    async def _carry_out(self, data: EngineCommand) -> tuple[int, dict[str, Any]]:
        command = COMMANDS[data.command]
        try:
            args = command.arguments.model_validate(data.args)
        except ValidationError as error:
            return 400, error_body(
                "VALIDATION_ERROR",
                "Invalid command arguments",
                f"Command {quoted(data.command)}: {describe_validation_error(error)}",
            )
        caller = Caller(data.principal, data.request_id)
        try:
            result = await self.engine.perform(data.command, args, caller)
        except GatewayError as error:
            log.info("%s by %s refused: %s", data.command, data.principal, error.code)
            return error.status, error.body()
        log.info("%s by %s carried out", data.command, data.principal)
        return 200, {"success": True, "result": result}

    async def _remember(self, key: str, command: str, status: int, body: Any) -> None:
        now = time.time()
        async with self.db.connection() as connection:
            await connection.execute(
                "INSERT INTO engine_actions (idempotency_key, command, status, body, at) "
                "VALUES (:key, :command, :status, :body, :at)",
                {
                    "key": key,
                    "command": command,
                    "status": status,
                    "body": orjson.dumps(body).decode(),
                    "at": now,
                },
            )
            await connection.execute(
                "DELETE FROM engine_actions WHERE at < :cutoff", {"cutoff": now - ACTION_MEMORY}
            )

    async def _follow_prices(self) -> None:
        """The gateway's `market` topic is this engine's price feed."""
        url = self.config.GATEWAY_URL.replace("http", "ws", 1).rstrip("/") + "/api/ws"
        attempt = 0
        while True:
            try:
                client = await connect_sigmax(
                    url, ["market"], api_key=self.config.GATEWAY_API_KEY or None
                )
            except (SigmaxError, OSError) as error:
                attempt += 1
                log.warning("cannot follow the gateway's prices yet: %s", error)
                await asyncio.sleep(min(MAX_RETRY_DELAY, RETRY_DELAY * 2**attempt))
                continue
            try:
                async for event in client.listen():  # reconnects and resumes by itself
                    if event.type == "market_update":
                        self.market.observe(prices_in(event.data), time.time())
                        self.priced = True
            finally:
                await client.disconnect()


def create_engine_app(config: Config | None = None) -> Quart:
    config = config or Config.from_env()
    app = Quart(__name__)
    _with_schema(app)
    app.register_blueprint(engine_bp)
    db = attach_database(app, config.DATABASE_URL)
    service = EngineService(config, db)
    app.extensions["engine_service"] = service

    register_error_handlers(app)
    configure_logging(config.LOG_LEVEL)

    @app.before_serving
    async def start() -> None:
        await service.start()

    @app.after_serving
    async def stop() -> None:
        await service.stop()

    return app
