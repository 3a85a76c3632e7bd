"""A remote trading engine (ENGINE_URL): every user action is `POST {ENGINE_URL}/commands`, the
engine's events come back through `POST /api/events`, and reads answer from the read model.

A caller never waits longer than ENGINE_TIMEOUT: an attempt that cannot connect is retried
(with the same Idempotency-Key) within that budget, an engine that does not answer in time is
`ENGINE_UNAVAILABLE`. A circuit breaker keeps a dead engine from costing anything per call:
after BREAKER_THRESHOLD failures in a row calls fail at once, and a probe of `GET
{ENGINE_URL}/health` every PROBE_INTERVAL closes it again when the engine is back.
(pybreaker's asyncio support needs Tornado, aiobreaker has had no release since 2021, and the
breaker's state is also what `/api/health` and the clients' `status_change` notices report.)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

import aiohttp
import orjson
from pydantic import BaseModel, TypeAdapter, ValidationError
from tenacity import (
    AsyncRetrying,
    retry_if_exception_type,
    stop_after_attempt,
    stop_before_delay,
    wait_random_exponential,
)

from app.errors import GatewayError, describe_validation_error, excerpt
from app.services.engines import Caller
from app.services.events import ErrorCode
from app.services.read_model import ReadModel

log = logging.getLogger(__name__)

BREAKER_THRESHOLD = 2  # failures in a row (calls or probes) that open the breaker
PROBE_INTERVAL = 2.0
PROBE_TIMEOUT = 1.0
ATTEMPTS = 3  # per action, when the engine cannot be connected to
CLOSE_TIMEOUT = 2.0  # seconds a stopping worker waits for its read model's queue
GATEWAY_STATUSES = (502, 503, 504)  # a proxy's answer while the engine is away: retried
# Fields of an engine's error body that are not relayed as they are (they are GatewayError's).
RELAYED_APART = frozenset({"error", "code", "details", "http_status", "retry_after"})


class _Unreachable(Exception):
    """No answer that can be relayed; retried within the budget."""


class _TimedOut(Exception):
    """The budget is spent."""


class RemoteEngine:
    mode = "remote"

    def __init__(
        self,
        url: str,
        *,
        api_key: str,
        timeout: float,
        read_model: ReadModel,
        result_models: dict[str, Any],
        on_reachability: Callable[[bool, str], None] = lambda reachable, reason: None,
    ) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.read_model = read_model
        self.on_reachability = on_reachability
        self.last_error = ""
        self._headers = {"X-API-Key": api_key} if api_key else {}
        self._results = {name: TypeAdapter(model) for name, model in result_models.items()}
        self._reachable: bool | None = None
        self._failures = 0
        self._session: aiohttp.ClientSession | None = None
        self._tasks: list[asyncio.Task[None]] = []

    # -- state ------------------------------------------------------------------------------

    @property
    def reachable(self) -> bool | None:
        return self._reachable

    @property
    def paused(self) -> bool:
        return self.read_model.paused

    @property
    def counters(self) -> dict[str, int]:
        return self.read_model.counters

    async def load(self) -> None:
        await self.read_model.load()

    async def start(self) -> None:
        await self.load()
        self._session = aiohttp.ClientSession(json_serialize=lambda v: orjson.dumps(v).decode())
        await self._probe()  # the state is known before the first client
        self._tasks = [
            asyncio.create_task(self._watch()),
            asyncio.create_task(self.read_model.run()),
        ]

    async def close(self) -> None:
        with contextlib.suppress(TimeoutError):  # what the stream already gave is written
            await asyncio.wait_for(self.read_model.written(), CLOSE_TIMEOUT)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        if self._session is not None:
            await self._session.close()
            self._session = None

    # -- reads: the read model -------------------------------------------------------------

    async def portfolio(self) -> dict[str, Any]:
        return self.read_model.portfolio()

    async def proposal(self, proposal_id: str) -> dict[str, Any]:
        return await self.read_model.proposal(proposal_id)

    async def proposals(
        self, *, status: str | None, symbol: str | None, limit: int, offset: int
    ) -> tuple[list[dict[str, Any]], int]:
        return await self.read_model.proposals(
            status=status, symbol=symbol, limit=limit, offset=offset
        )

    async def trades(self, *, limit: int, offset: int) -> tuple[list[dict[str, Any]], int]:
        return await self.read_model.trades(limit=limit, offset=offset)

    # -- actions ----------------------------------------------------------------------------

    async def perform(self, command: str, args: BaseModel, caller: Caller) -> dict[str, Any]:
        if self._reachable is False:
            raise self._unavailable(f"it is unreachable ({self.last_error})")
        body = {
            "command": command,
            "args": args.model_dump(mode="json"),
            "request_id": caller.request_id,
            "principal": caller.principal,
        }
        headers = {**self._headers, "Idempotency-Key": caller.idempotency_key}
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        try:
            async for attempt in AsyncRetrying(
                # stop_before_delay: no sleep that would end past the budget
                stop=stop_after_attempt(ATTEMPTS) | stop_before_delay(self.timeout),
                wait=wait_random_exponential(multiplier=0.1, max=1.0),
                retry=retry_if_exception_type(_Unreachable),
                reraise=True,
            ):
                with attempt:
                    status, reply = await self._post(body, headers, deadline - loop.time())
        except (_Unreachable, _TimedOut) as failure:
            self._failed(str(failure))
            raise self._unavailable(str(failure)) from None
        self._succeeded()
        return self._outcome(command, status, reply)

    async def _post(
        self, body: dict[str, Any], headers: dict[str, str], remaining: float
    ) -> tuple[int, Any]:
        if remaining <= 0.01 or self._session is None:
            raise _TimedOut(f"no answer within ENGINE_TIMEOUT={self.timeout:g} s")
        try:
            async with self._session.post(
                f"{self.url}/commands",
                json=body,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=remaining),
            ) as response:
                status, raw = response.status, await response.read()
                retry_after = response.headers.get("Retry-After", "")
        except TimeoutError:
            raise _TimedOut(f"no answer within ENGINE_TIMEOUT={self.timeout:g} s") from None
        except aiohttp.ClientError as error:
            raise _Unreachable(f"{type(error).__name__}: {error}") from None
        try:
            reply = orjson.loads(raw)
        except orjson.JSONDecodeError:
            reply = None
        if status in GATEWAY_STATUSES and not (isinstance(reply, dict) and "code" in reply):
            raise _Unreachable(f"HTTP {status} from {self.url}")
        if isinstance(reply, dict) and retry_after.isdigit():
            reply.setdefault("retry_after", int(retry_after))
        return status, reply

    def _outcome(self, command: str, status: int, reply: Any) -> dict[str, Any]:
        """The engine's answer as the caller's: its result, or its refusal with its code."""
        if not isinstance(reply, dict):
            raise self._bad_answer(f"HTTP {status} with a body that is not a JSON object")
        if status != 200:
            if not isinstance(reply.get("code"), str):
                raise self._bad_answer(f"HTTP {status} without {{error, code, details}}")
            if status in (401, 403):  # our ENGINE_API_KEY, not the caller's key
                raise self._bad_answer(f"HTTP {status} {reply['code']}: check ENGINE_API_KEY")
            retry_after = reply.get("retry_after")
            extra = {k: v for k, v in reply.items() if k not in RELAYED_APART}
            raise GatewayError(
                reply["code"],
                str(reply.get("error") or reply["code"]),
                str(reply.get("details") or ""),
                http_status=status,
                retry_after=float(retry_after) if isinstance(retry_after, int | float) else None,
                **extra,
            )
        result = reply.get("result")
        if reply.get("success") is not True:
            raise self._bad_answer(f"200 without success: true ({excerpt(repr(reply), 120)})")
        try:
            self._results[command].validate_python(result)
        except ValidationError as error:
            raise self._bad_answer(
                f"the {command} result does not match the contract: "
                f"{describe_validation_error(error)}"
            ) from None
        return result  # type: ignore[return-value]  # validated above

    def _unavailable(self, why: str) -> GatewayError:
        return GatewayError(
            ErrorCode.ENGINE_UNAVAILABLE,
            "Trading engine unavailable",
            f"The trading engine did not carry the action out: {why}. "
            "An action that timed out may still be carried out: check before trying again",
            retry_after=PROBE_INTERVAL,
        )

    def _bad_answer(self, why: str) -> GatewayError:
        log.error("engine %s answered outside the contract: %s", self.url, why)
        return GatewayError(ErrorCode.ENGINE_ERROR, "Invalid answer from the trading engine", why)

    # -- reachability -----------------------------------------------------------------------

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(PROBE_INTERVAL)
            try:
                await self._probe()
            except Exception:  # a bug: logged, and the probe goes on
                log.exception("engine probe failed")

    async def _probe(self) -> None:
        assert self._session is not None
        try:
            async with self._session.get(
                f"{self.url}/health",
                headers=self._headers,
                timeout=aiohttp.ClientTimeout(total=min(PROBE_TIMEOUT, self.timeout)),
            ) as response:
                healthy = response.status == 200
                why = f"GET /health answered {response.status}"
        except TimeoutError:
            healthy, why = False, f"GET /health gave no answer within {PROBE_TIMEOUT:g} s"
        except aiohttp.ClientError as error:
            healthy, why = False, f"{type(error).__name__}: {error}"
        if healthy:
            self._succeeded()
        else:
            self._failed(why, at_once=self._reachable is None)

    def _succeeded(self) -> None:
        self._failures = 0
        if self._reachable is not True:
            self._set_reachable(True, "the engine answers again")

    def _failed(self, why: str, *, at_once: bool = False) -> None:
        self.last_error = why
        self._failures += 1
        if self._reachable is not False and (at_once or self._failures >= BREAKER_THRESHOLD):
            self._set_reachable(False, why)

    def _set_reachable(self, reachable: bool, why: str) -> None:
        first = self._reachable is None
        self._reachable = reachable
        if reachable:
            log.log(logging.INFO if first else logging.WARNING, "engine %s reachable", self.url)
        else:
            log.warning("engine %s unreachable: %s", self.url, why)
        if not first:
            self.on_reachability(reachable, why)
