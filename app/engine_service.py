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
import hashlib
import hmac
import itertools
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any, Literal

import orjson
from pydantic import BaseModel, Field, ValidationError
from quart import Blueprint, Quart, current_app
from quart_schema import QuartSchema, validate_headers, validate_request, validate_response
from sigmax_client import SigmaxPublisher, connect_sigmax
from sigmax_client.client import backoff_delay
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
from app.services.market import PriceBook, Ticker, prices_in
from app.services.simulation import Simulation
from config import Config

log = logging.getLogger(__name__)

# The gateway's refusals of a batch that no retry can change; others (a proxy's 502 while it
# restarts, a key being rotated) are retried with the batch's key.
REFUSED_AS_IT_STANDS = frozenset(
    {"INVALID_EVENT", "VALIDATION_ERROR", "BAD_REQUEST", "IDEMPOTENCY_KEY_REUSED"}
)
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
        priced_symbols=sorted(service.market.snapshot_prices()),
        outbox=service.outbox.pending,
    )


_contract: dict[str, Any] = {}


async def contract_document() -> dict[str, Any]:
    """The remote engine contract as an OpenAPI document (the gateway serves it at
    /docs/engine); built once."""
    if not _contract:
        app = Quart("sigmax-engine-contract")
        _with_schema(app)
        app.register_blueprint(engine_bp)
        async with app.app_context():
            _contract.update(app.extensions["QUART_SCHEMA"].openapi_provider.schema())
    return _contract


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
            key = uuid.uuid4().hex
            for attempt in itertools.count():
                try:
                    await self._publisher.publish(batch, idempotency_key=key)
                    break
                except RequestError as error:
                    if error.code in REFUSED_AS_IT_STANDS:  # retrying cannot help
                        log.error("the gateway refused %d events: %s", len(batch), error)
                        break
                    log.warning("the gateway did not take %d events: %s", len(batch), error)
                except SigmaxConnectionError as error:
                    log.warning("gateway unreachable (%s); %d events wait", error, len(batch))
                await asyncio.sleep(backoff_delay(attempt, RETRY_DELAY, MAX_RETRY_DELAY))


class FollowedMarket(PriceBook):
    """The gateway's prices as this engine follows them: none until the first market_update
    (an approval is NO_PRICE until then), never made up."""

    source = "gateway"
    healthy = True

    async def poll(self, now: float) -> list[Ticker]:
        return self.latest()

    def notices(self) -> list[Event]:
        return []

    async def close(self) -> None:
        pass


def _log_end(task: asyncio.Task[None]) -> None:
    """A background task ends only when the service stops: anything else is a bug, said."""
    if not task.cancelled() and task.exception() is not None:
        log.error("engine task ended", exc_info=task.exception())


def _fingerprint(data: EngineCommand) -> str:
    """What makes an action the same action: its command, arguments and caller."""
    canonical = orjson.dumps([data.command, data.args, data.principal], option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(canonical).hexdigest()


class EngineService:
    def __init__(self, config: Config, db: Any) -> None:
        self.config = config
        self.db = db
        symbols = [s for s in (normalize_symbol(s) for s in config.SYMBOLS) if s]
        self.market = FollowedMarket(symbols)
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
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}  # per key: the lock, its users
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
        for task in self._tasks:
            task.add_done_callback(_log_end)

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
        """(status, body) of an action; once per Idempotency-Key. The action runs in a task of
        its own: a caller that gives up (the gateway's ENGINE_TIMEOUT) cancels its wait, not
        the action, whose answer is then kept for the retry."""
        work = asyncio.ensure_future(self._handle_once(data, idempotency_key))
        return await asyncio.shield(work)

    async def _handle_once(
        self, data: EngineCommand, idempotency_key: str | None
    ) -> tuple[int, dict[str, Any]]:
        if idempotency_key is None:
            return await self._carry_out(data)
        fingerprint = _fingerprint(data)
        async with self._key_lock(idempotency_key):
            async with self.db.connection() as connection:
                row = await connection.fetch_first(
                    "SELECT fingerprint, status, body FROM engine_actions "
                    "WHERE idempotency_key = :key",
                    {"key": idempotency_key},
                )
            if row is not None:
                if row["fingerprint"] != fingerprint:
                    return 409, error_body(
                        "IDEMPOTENCY_KEY_REUSED",
                        "Idempotency-Key reused",
                        "The key was used for another action (command, arguments or caller)",
                    )
                return int(row["status"]), orjson.loads(row["body"])
            status, body = await self._carry_out(data)
            if status < 500:  # an outage's answer is not the action's: a retry may succeed
                await self._remember(idempotency_key, fingerprint, status, body)
            return status, body

    @contextlib.asynccontextmanager
    async def _key_lock(self, key: str) -> AsyncIterator[None]:
        """One action at a time per key; the lock lives while anyone holds or awaits it."""
        lock, users = self._locks.get(key, (asyncio.Lock(), 0))
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)

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

    async def _remember(self, key: str, fingerprint: str, status: int, body: Any) -> None:
        now = time.time()
        async with self.db.connection() as connection:
            await connection.execute(
                "INSERT INTO engine_actions (idempotency_key, fingerprint, status, body, at) "
                "VALUES (:key, :fingerprint, :status, :body, :at) "
                "ON CONFLICT (idempotency_key) DO NOTHING",
                {
                    "key": key,
                    "fingerprint": fingerprint,
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
                log.warning("cannot follow the gateway's prices yet: %s", error)
                await asyncio.sleep(backoff_delay(attempt, RETRY_DELAY, MAX_RETRY_DELAY))
                attempt += 1
                continue
            attempt = 0
            try:
                async for event in client.listen():  # reconnects and resumes by itself
                    if event.type == "market_update":
                        self.market.observe(prices_in(event.data), time.time())
            except (SigmaxError, RuntimeError) as error:  # lost for good, e.g. the key refused
                log.warning("stopped following the gateway's prices: %s; starting again", error)
                await asyncio.sleep(RETRY_DELAY)
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

    @app.while_serving  # between the database's connect and close (as the gateway's)
    async def serve() -> AsyncGenerator[None, None]:
        await service.start()
        yield
        await service.stop()

    return app
