"""REST against its own OpenAPI document, with schemathesis and every check it has: no 500, every
response documented and conforming to its schema, invalid input refused with a 4xx, valid input
accepted, 405 with Allow for the methods the document does not list.

The document is the app's `/openapi.json`; the requests go to a real Hypercorn serving the
gateway in a thread of its own (schemathesis calls it with blocking `requests`). The example
count and the seed are fixed, so that a CI run is bounded and repeatable.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import requests
import schemathesis
from schemathesis.config import SchemathesisConfig
from schemathesis.engine import events, from_schema

from app import create_app
from app.apidocs.openapi import NOT_RATE_LIMITED
from config import Config
from tests.helpers import running_gateway

SEED = 20251126
# Every check is on unless disabled, as with `st run --checks all`. The examples and coverage
# phases send the documented examples, boundary and invalid values, and methods the document
# does not list; fuzzing adds generated valid and invalid data, up to max-examples per
# operation.
SCHEMATHESIS_CONFIG = {
    "seed": SEED,
    "generation": {"max-examples": 15, "deterministic": True},
    "checks": {
        "enabled": True,
        # Schemathesis's list, and 422: a trading rule may refuse valid data for what the
        # portfolio holds (NOTHING_TO_SELL once a sequence of calls has sold it all).
        "positive_data_acceptance": {
            "expected-statuses": ["2xx", "3xx", "401", "403", "404", "409", "422", "429", "5xx"]
        },
    },
}
# For callers the key check refuses before the input is read: fewer cases, no coverage phase.
REFUSED_CONFIG = {
    **SCHEMATHESIS_CONFIG,
    "generation": {"max-examples": 5, "deterministic": True},
    "phases": {"coverage": {"enabled": False}},
}

ADMIN_KEY = "schemathesis-admin"
READER_KEY = "schemathesis-reader"


def openapi_document() -> dict[str, Any]:
    """The app's /openapi.json, read at collection time: schemathesis makes one test per
    operation from it. The running gateways serve the same document (checked below)."""

    async def fetch() -> dict[str, Any]:
        response = await create_app(Config()).test_client().get("/openapi.json")
        return await response.get_json()

    return asyncio.run(fetch())


DOCUMENT = openapi_document()
schema = schemathesis.openapi.from_dict(
    DOCUMENT, config=SchemathesisConfig.from_dict(SCHEMATHESIS_CONFIG)
)
refused_schema = schemathesis.openapi.from_dict(
    DOCUMENT, config=SchemathesisConfig.from_dict(REFUSED_CONFIG)
)


@contextmanager
def gateway_thread(**settings: Any) -> Iterator[str]:
    """The base URL of a gateway served by a real Hypercorn in a thread with its own loop, with
    market prices and a position in each symbol (so that a proposal to sell has something to
    sell)."""
    ready = threading.Event()
    address: list[str] = []
    failure: list[BaseException] = []
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()

    async def serve() -> None:
        async with running_gateway(**settings) as running:
            await running.gateway.simulation.tick_market()
            engine = running.gateway.trading
            for symbol in running.gateway.market.symbols:
                proposal = await engine.propose(symbol, "buy", 0.01, "position to sell")
                await engine.approve(proposal.id, "schemathesis")
            address.append(f"http://127.0.0.1:{running.port}")
            ready.set()
            await stop.wait()

    def run() -> None:
        try:
            loop.run_until_complete(serve())
        except BaseException as error:  # reported to the test, which would wait otherwise
            failure.append(error)
            ready.set()
        finally:
            loop.close()

    thread = threading.Thread(target=run, name="gateway", daemon=True)
    thread.start()
    ready.wait(30)
    if failure or not address:
        raise RuntimeError("the gateway did not start") from (failure[0] if failure else None)
    try:
        yield address[0]
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(15)


# A rate limit high enough not to answer 429 to schemathesis (it is documented all the same).
GATEWAY_SETTINGS: dict[str, Any] = {"REST_RATE_LIMIT": 100_000}


@pytest.fixture(scope="module")
def open_gateway() -> Iterator[str]:
    with gateway_thread(**GATEWAY_SETTINGS) as base_url:
        yield base_url


@pytest.fixture(scope="module")
def keyed_gateway() -> Iterator[str]:
    with gateway_thread(**GATEWAY_SETTINGS, API_KEYS=(ADMIN_KEY, f"{READER_KEY}:read")) as base_url:
        yield base_url


# Who calls, by gateway and key: allowed everything (the open gateway, the keyed one with a key
# of every scope), and refused (no key: 401; a key that may only read: 403 on the rest).
CALLERS = {
    "open": ("open_gateway", None),
    "admin": ("keyed_gateway", ADMIN_KEY),
}
REFUSED_CALLERS = {
    "no-key": ("keyed_gateway", None),
    "reader": ("keyed_gateway", READER_KEY),
}


def base_url_and_headers(
    request: pytest.FixtureRequest, gateway: str, key: str | None
) -> tuple[str, dict[str, str]]:
    return request.getfixturevalue(gateway), {"X-API-Key": key} if key else {}


@pytest.fixture(scope="module", params=list(CALLERS))
def caller(request: pytest.FixtureRequest) -> tuple[str, dict[str, str]]:
    return base_url_and_headers(request, *CALLERS[request.param])


@pytest.fixture(scope="module", params=list(REFUSED_CALLERS))
def refused_caller(request: pytest.FixtureRequest) -> tuple[str, dict[str, str]]:
    return base_url_and_headers(request, *REFUSED_CALLERS[request.param])


def test_gateways_serve_the_tested_document(open_gateway: str, keyed_gateway: str) -> None:
    for base_url in (open_gateway, keyed_gateway):
        assert requests.get(f"{base_url}/openapi.json", timeout=10).json() == DOCUMENT


@schema.parametrize()
def test_rest_conforms_to_its_openapi_document(
    case: Any, caller: tuple[str, dict[str, str]]
) -> None:
    base_url, headers = caller
    case.call_and_validate(base_url=base_url, headers=headers)


@refused_schema.parametrize()
def test_refusals_conform_to_the_openapi_document(
    case: Any, refused_caller: tuple[str, dict[str, str]]
) -> None:
    base_url, headers = refused_caller
    case.call_and_validate(base_url=base_url, headers=headers)


def test_sequences_of_calls_conform_to_the_openapi_document() -> None:
    """Stateful: proposals created, read, approved and rejected in sequences that follow the
    links schemathesis infers (proposal_id), with the checks that need them (use after free,
    resource availability). Run by schemathesis's engine, as `st run` does: a sequence changes
    the gateway, and the engine knows not to replay one on a gateway in another state. On a
    gateway of its own for the same reason."""
    with gateway_thread(**GATEWAY_SETTINGS) as base_url:
        stateful_only = {
            phase: {"enabled": phase == "stateful"}
            for phase in ("examples", "coverage", "fuzzing", "stateful")
        }
        config = {**SCHEMATHESIS_CONFIG, "base-url": base_url, "phases": stateful_only}
        engine = from_schema(
            schemathesis.openapi.from_dict(DOCUMENT, config=SchemathesisConfig.from_dict(config))
        )
        calls, problems = 0, []
        for event in engine.execute():
            if isinstance(event, events.ScenarioFinished):
                calls += len(event.recorder.interactions)
                problems += [
                    f"{found.failure.title}: {found.failure.message}\n{found.code_sample}"
                    for checks in event.recorder.checks.values()
                    for check in checks
                    if (found := check.failure_info) is not None
                ]
            elif isinstance(event, events.NonFatalError):
                problems.append(f"{event.label}: {event.value!r}")
            elif isinstance(event, events.FatalError):
                problems.append(repr(event.exception))
    assert calls > 0
    assert not problems, "\n\n".join(problems)


# -- what schemathesis found, pinned ------------------------------------------------------------


def test_document_lists_the_errors_operations_share() -> None:
    for path, path_item in DOCUMENT["paths"].items():
        for method, operation in path_item.items():
            label = f"{method.upper()} {path}"
            responses = set(operation["responses"])
            if "requestBody" in operation:  # optional only where no body has a meaning
                assert operation["requestBody"]["required"] is (
                    path != "/api/proposals/{proposal_id}/reject"
                ), label
            if "requestBody" in operation or any(
                p["in"] == "query" for p in operation["parameters"]
            ):
                assert "400" in responses, label
            if "security" in operation:
                assert {"401", "403"} <= responses, label
            if path not in NOT_RATE_LIMITED:
                assert "429" in responses, label
                assert "Retry-After" in operation["responses"]["429"]["headers"], label
    assert {"/metrics", "/asyncapi.json"}.isdisjoint(DOCUMENT["paths"])


HEALTH = {"cpu_percent": 1, "memory_percent": 2.5, "disk_percent": 3, "process_count": 7.0}


@pytest.mark.parametrize(
    "method, path, body, status, named",
    [
        ("get", "/api/trades?offset=30101124387696058368", None, 400, "offset"),  # was a 500
        ("get", "/api/proposals?symbol=", None, 400, "INVALID_SYMBOL"),  # was every proposal
        ("get", "/api/proposals/approve", None, 405, "METHOD_NOT_ALLOWED"),  # was a 404
        (
            "post",
            "/api/proposals",
            {"symbol": "BTC/USDT", "action": "buy", "size": "1"},
            400,
            "size: Input should be a valid number (got '1')",
        ),
        (
            "post",
            "/api/proposals",
            {"symbol": "BTC/USDT", "action": "buy", "size": True},
            400,
            "size: Input should be a valid number (got True)",
        ),
        ("post", "/api/proposals", {"symbol": "BTC/USDT", "action": "buy", "size": 1}, 201, "buy"),
        # JSON Schema's integer: 7.0 is one.
        (
            "post",
            "/api/events",
            {"events": [{"type": "health_update", "data": HEALTH}]},
            202,
            "accepted",
        ),
    ],
)
def test_found_by_schemathesis(
    open_gateway: str, method: str, path: str, body: dict[str, Any] | None, status: int, named: str
) -> None:
    response = requests.request(method, open_gateway + path, json=body, timeout=10)
    assert response.status_code == status, response.text
    assert named in response.text
    if status == 405:
        assert set(response.headers["Allow"].split(", ")) == {"POST", "OPTIONS"}
