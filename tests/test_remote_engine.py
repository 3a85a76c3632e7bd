"""The gateway in front of a remote engine (ENGINE_URL), against real separate processes: the
standalone paper engine (`python -m app engine`), and a stand-in engine that refuses, hangs,
answers slowly, dies and comes back, and loses an answer (tests/standins/engine.py)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import aiohttp
import pytest

from app.services.database import migrate
from app.services.remote_engine import BREAKER_THRESHOLD, PROBE_INTERVAL
from tests.helpers import (
    RunningGateway,
    free_port,
    fresh_postgres,
    running_gateway,
)
from tests.standins.control import StandinProcess, standin

ENGINE_KEY = "engine-secret"


async def http(
    method: str, url: str, body: Any = None, headers: dict[str, str] | None = None
) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as session:
        async with session.request(
            method, url, json=body, headers=headers, timeout=aiohttp.ClientTimeout(total=15)
        ) as response:
            return response.status, await response.json()


def rest(server: RunningGateway, path: str) -> str:
    return f"http://127.0.0.1:{server.port}{path}"


async def eventually(check: Callable[[], Awaitable[Any]], within: float = 10.0) -> Any:
    """The first truthy result of `check`, polled until `within` seconds have passed."""
    async with asyncio.timeout(within):
        while True:
            result = await check()
            if result:
                return result
            await asyncio.sleep(0.05)


# -- the standalone paper engine ------------------------------------------------------------------


@asynccontextmanager
async def paper_engine_deployment(
    database_url: str, tmp_path: Any
) -> AsyncIterator[tuple[StandinProcess, Callable[[], Any]]]:
    """The standalone paper engine following a gateway on a fixed port; yields the engine and
    a factory of gateways on that port (a gateway can be stopped and started again)."""
    gateway_port = free_port()
    env = {
        "DATABASE_URL": f"sqlite:///{tmp_path}/engine.db",
        "GATEWAY_URL": f"http://127.0.0.1:{gateway_port}",
        "ENGINE_API_KEY": ENGINE_KEY,
        "ANALYSIS_INTERVAL": "3600",  # the agent stays quiet: the test makes the proposals
        "PORTFOLIO_INTERVAL": "0.3",
        "LOG_LEVEL": "WARNING",
    }
    async with standin("app engine", env) as engine:

        def gateway() -> Any:
            return running_gateway(
                port=gateway_port,
                DATABASE_URL=database_url,
                ENGINE_URL=engine.url,
                ENGINE_API_KEY=ENGINE_KEY,
                SIMULATION=True,  # the gateway's market feed: the engine's prices
                MARKET_INTERVAL=0.2,
            )

        yield engine, gateway


async def priced(server: RunningGateway) -> None:
    """Wait until the engine follows the gateway's prices (an analysis needs them)."""

    async def has_prices() -> bool:
        status, health = await http("GET", server.gateway.engine.url + "/health")  # type: ignore[attr-defined]
        return status == 200 and len(health["priced_symbols"]) == 3

    await eventually(has_prices)


async def test_every_command_round_trips_through_the_standalone_paper_engine(
    database_url, tmp_path
):
    async with paper_engine_deployment(database_url, tmp_path) as (engine, gateway):
        async with gateway() as server:
            await priced(server)
            async with server.subscribed(["all"]) as client:
                status = await client.request("get_status")
                assert status["data"]["engine"] == {"mode": "remote", "reachable": True}
                _, health = await http("GET", rest(server, "/api/health"))
                assert health["engine_reachable"] is True

                # WebSocket: a manual proposal, carried out by the engine, its event back
                created = await client.command(
                    "create_proposal", symbol="btc/usdt", action="buy", size=0.01
                )
                assert created["type"] == "command_result", created
                proposal = created["data"]["result"]["proposal"]
                assert (proposal["symbol"], proposal["status"]) == ("BTC/USDT", "pending")
                assert proposal["requested_by"] == "anonymous"
                event = await client.next_of("proposal_created")
                assert event["data"]["proposal_id"] == proposal["proposal_id"]
                assert event["seq"] > 0

                # REST: approve it; the trade and the proposal's end come back as events
                status, decided = await http(
                    "POST", rest(server, f"/api/proposals/{proposal['proposal_id']}/approve")
                )
                assert status == 200, decided
                assert decided["proposal"]["status"] == "executed"
                assert decided["trade"]["proposal_id"] == proposal["proposal_id"]
                assert (await client.next_of("trade_executed"))["data"]["order_id"] == decided[
                    "trade"
                ]["order_id"]

                # the engine's refusal keeps its code (REST 409, WebSocket error)
                again = await client.command(
                    "approve_proposal", proposal_id=proposal["proposal_id"]
                )
                assert again["type"] == "error"
                assert again["data"]["code"] == "PROPOSAL_ALREADY_DECIDED"
                assert again["data"]["proposal_status"] == "executed"
                status, body = await http(
                    "POST", rest(server, f"/api/proposals/{proposal['proposal_id']}/reject")
                )
                assert (status, body["code"]) == (409, "PROPOSAL_ALREADY_DECIDED")
                missing = await client.command("reject_proposal", proposal_id="prop_nothing")
                assert missing["data"]["code"] == "PROPOSAL_NOT_FOUND"

                # REST manual proposals, then a bulk approve and a WebSocket reject
                ids = []
                for _ in range(3):
                    status, made = await http(
                        "POST",
                        rest(server, "/api/proposals"),
                        {"symbol": "ETH/USDT", "action": "buy", "size": 0.1},
                    )
                    assert status == 201, made
                    ids.append(made["proposal_id"])
                status, bulk = await http(
                    "POST",
                    rest(server, "/api/proposals/approve"),
                    {"proposal_ids": [ids[0], ids[1], "prop_nothing"]},
                )
                assert status == 200
                assert [(r["ok"], r["status"]) for r in bulk["results"]] == [
                    (True, "executed"),
                    (True, "executed"),
                    (False, None),
                ]
                assert bulk["results"][2]["error"]["code"] == "PROPOSAL_NOT_FOUND"
                rejected = await client.command(
                    "reject_proposal", proposal_id=ids[2], reason="too late"
                )
                assert rejected["data"]["result"]["proposal"]["status"] == "rejected"
                status, bulk = await http(
                    "POST", rest(server, "/api/proposals/reject"), {"proposal_ids": [ids[2]]}
                )
                assert bulk["results"][0]["error"]["code"] == "PROPOSAL_ALREADY_DECIDED"

                # pause and resume, over both; a paused engine refuses new proposals
                paused = await client.command("pause")
                assert paused["data"]["result"] == {"status": "paused", "changed": True}
                change = await client.next_of("status_change")
                assert change["data"]["status"] == "paused"
                status, body = await http(
                    "POST", rest(server, "/api/proposals"), {"symbol": "BTC/USDT", "action": "buy"}
                )
                assert (status, body["code"]) == (409, "ENGINE_PAUSED")
                status, body = await http("GET", rest(server, "/api/status"))
                assert body["status"] == "paused"
                status, body = await http("POST", rest(server, "/api/resume"))
                assert (status, body) == (200, {"status": "running", "changed": True})

                # analyze: the engine's agent, on the prices it follows from the gateway
                analysis = await client.command("analyze", symbol="SOL/USDT")
                assert analysis["type"] == "command_result", analysis
                assert analysis["data"]["result"]["symbol"] == "SOL/USDT"
                assert (await client.next_of("analysis_update"))["data"]["symbol"] == "SOL/USDT"

            # the read model has what the engine's events said
            async def executed_trades() -> Any:
                _, page = await http("GET", rest(server, "/api/trades"))
                return page if page["total"] == 3 else None

            trades = await eventually(executed_trades)
            assert {t["proposal_id"] for t in trades["items"]} == {
                proposal["proposal_id"],
                *ids[:2],
            }

            async def portfolio_with_positions() -> Any:
                status, body = await http("GET", rest(server, "/api/portfolio"))
                return body if status == 200 and len(body["positions"]) == 2 else None

            portfolio = await eventually(portfolio_with_positions)
            _, rejected_page = await http("GET", rest(server, "/api/proposals?status=rejected"))
            assert [p["proposal_id"] for p in rejected_page["items"]] == [ids[2]]
            assert rejected_page["items"][0]["status_reason"] == "too late"

        # the gateway restarts: its read model answers from its database at once
        async with gateway() as server:
            _, trades_after = await http("GET", rest(server, "/api/trades"))
            assert trades_after == trades
            status, portfolio_after = await http("GET", rest(server, "/api/portfolio"))
            assert status == 200
            # the engine goes on valuing the positions: their symbols and sizes are the same
            held = [(p["symbol"], p["size"]) for p in portfolio["positions"]]
            assert [(p["symbol"], p["size"]) for p in portfolio_after["positions"]] == held
            _, one = await http("GET", rest(server, f"/api/proposals/{ids[2]}"))
            assert one["status"] == "rejected"
            _, status_after = await http("GET", rest(server, "/api/status"))
            assert status_after["status"] == "running"


async def test_the_standalone_engine_carries_an_action_out_once_per_idempotency_key(tmp_path):
    env = {
        "DATABASE_URL": f"sqlite:///{tmp_path}/engine.db",
        "GATEWAY_URL": f"http://127.0.0.1:{free_port()}",  # no gateway: the outbox waits
        "ENGINE_API_KEY": ENGINE_KEY,
        "LOG_LEVEL": "WARNING",
    }
    async with standin("app engine", env) as engine:
        command = {"command": "pause", "args": {}, "request_id": "r1", "principal": "ops"}
        key = {"X-API-Key": ENGINE_KEY, "Idempotency-Key": uuid.uuid4().hex}
        first = await http("POST", engine.url + "/commands", command, key)
        assert first == (200, {"success": True, "result": {"status": "paused", "changed": True}})
        # the same action again (a retry): the first answer, not a second pause
        assert await http("POST", engine.url + "/commands", command, key) == first
        # another action: carried out (nothing changes: it is paused already)
        other = {**key, "Idempotency-Key": uuid.uuid4().hex}
        assert (await http("POST", engine.url + "/commands", command, other))[1]["result"] == {
            "status": "paused",
            "changed": False,
        }
        status, body = await http(
            "POST", engine.url + "/commands", {**command, "command": "resume"}, key
        )
        assert (status, body["code"]) == (409, "IDEMPOTENCY_KEY_REUSED")
        # the same key for the same command by someone else is another action too
        status, body = await http(
            "POST", engine.url + "/commands", {**command, "principal": "someone"}, key
        )
        assert (status, body["code"]) == (409, "IDEMPOTENCY_KEY_REUSED")
        status, body = await http("POST", engine.url + "/commands", command, {"X-API-Key": "no"})
        assert (status, body["code"]) == (401, "AUTHENTICATION_FAILED")
        status, body = await http(
            "POST",
            engine.url + "/commands",
            {"command": "approve_proposal", "args": {"proposal_id": 5}},
            {"X-API-Key": ENGINE_KEY},
        )
        assert (status, body["code"]) == (400, "VALIDATION_ERROR")
        assert "proposal_id" in body["details"]
        # its contract is served by the gateway for engine authors
        async with running_gateway() as server:
            status, contract = await http("GET", rest(server, "/docs/engine"))
            assert status == 200
            assert set(contract["paths"]) == {"/commands", "/health"}
            _, own = await http("GET", engine.url + "/openapi.json")
            assert own["paths"].keys() == contract["paths"].keys()


# -- a stand-in engine that misbehaves ------------------------------------------------------------


@asynccontextmanager
async def standin_deployment(
    gateway: Callable[..., Any] = running_gateway, **settings: Any
) -> AsyncIterator[tuple[StandinProcess, Any]]:
    async with standin("tests.standins.engine") as engine:
        async with gateway(ENGINE_URL=engine.url, ENGINE_API_KEY=ENGINE_KEY, **settings) as server:
            yield engine, server


async def set_mode(engine: StandinProcess, mode: str, **state: Any) -> None:
    status, _ = await http("POST", engine.url + "/_mode", {"mode": mode, **state})
    assert status == 200


async def seen(engine: StandinProcess) -> list[dict[str, Any]]:
    return (await http("GET", engine.url + "/_requests"))[1]


async def test_actions_reach_the_engine_with_the_callers_identity(gateway_factory):
    keys = ("trader-key:read+trade",)
    async with standin_deployment(gateway_factory, API_KEYS=keys) as (engine, server):
        async with server.client("?api_key=trader-key") as client:
            await client.greeting()
            reply = await client.command("approve_proposal", proposal_id="prop_1")
            assert reply["type"] == "command_result", reply
            assert reply["data"]["result"]["proposal"]["proposal_id"] == "prop_1"
        status, _ = await http(
            "POST",
            rest(server, "/api/pause"),
            headers={"X-API-Key": "trader-key", "Idempotency-Key": "pause-1"},
        )
        assert status == 200
        status, _ = await http(
            "POST",
            rest(server, "/api/proposals/approve"),
            {"proposal_ids": ["prop_a", "prop_b"]},
            headers={"X-API-Key": "trader-key"},
        )
        assert status == 200
        requests = await seen(engine)
        assert [r["command"] for r in requests] == [
            "approve_proposal",
            "pause",
            "approve_proposal",
            "approve_proposal",
        ]
        first = requests[0]
        assert first["args"] == {"proposal_id": "prop_1"}
        assert first["api_key"] == ENGINE_KEY
        assert first["request_id"] == "r1"
        principal = first["principal"]
        assert principal not in ("", "anonymous") and "trader-key" not in principal
        assert all(r["principal"] == principal for r in requests)
        # the client's Idempotency-Key, per caller; one key per proposal of a bulk call
        assert requests[1]["idempotency_key"] == f"{principal}:pause-1"
        action_keys = [r["idempotency_key"] for r in requests]
        assert len(set(action_keys)) == len(action_keys)


async def test_an_engine_refusal_reaches_the_caller_with_its_code_and_status():
    async with standin_deployment() as (engine, server):
        refusal = {"error": "Risk limit", "code": "RISK_LIMIT", "details": "max exposure 5%"}
        await set_mode(engine, "refuse", status=422, body=refusal)
        async with server.client() as client:
            await client.greeting()
            reply = await client.command("approve_proposal", proposal_id="prop_1")
            assert reply["type"] == "error"
            assert reply["data"] == refusal
            assert reply["request_id"] == "r1"
        assert await http("POST", rest(server, "/api/proposals/prop_1/approve")) == (422, refusal)
        # fields of the gateway's own error machinery are not taken from the engine
        await set_mode(engine, "refuse", status=503, body={**refusal, "http_status": 200})
        status, body = await http("POST", rest(server, "/api/pause"))
        assert (status, body["code"]) == (503, "RISK_LIMIT")
        await set_mode(engine, "refuse", status=401, body={**refusal, "code": "AUTH"})
        status, body = await http("POST", rest(server, "/api/pause"))
        assert (status, body["code"]) == (502, "ENGINE_ERROR")  # our key, not the caller's
        assert "ENGINE_API_KEY" in body["details"]
        # an engine refusal is an answer: the engine is reachable
        assert server.gateway.engine.reachable is True

        await set_mode(engine, "garbage")
        status, body = await http("POST", rest(server, "/api/pause"))
        assert (status, body["code"]) == (502, "ENGINE_ERROR")
        assert "does not match the contract" in body["details"]

        await set_mode(engine, "slow", delay=0.5)
        assert (await http("POST", rest(server, "/api/resume")))[0] == 200


async def test_a_hanging_engine_never_hangs_a_caller_and_then_costs_nothing_per_call():
    async with standin_deployment(ENGINE_TIMEOUT=1.0) as (engine, server):
        await set_mode(engine, "hang")
        async with server.client() as client:
            await client.greeting()
            for _ in range(BREAKER_THRESHOLD):
                started = time.monotonic()
                reply = await client.command("pause")
                assert reply["type"] == "error"
                assert reply["data"]["code"] == "ENGINE_UNAVAILABLE"
                assert "ENGINE_TIMEOUT=1" in reply["data"]["details"]
                # bounded by ENGINE_TIMEOUT (the reply's own 5 s read would fail first)
                assert time.monotonic() - started < 5
            # the breaker is open: the engine is not asked any more
            notice = await client.next_of("status_change")
            assert notice["data"]["status"] == "degraded"
            assert notice["data"]["component"] == "engine"
            asked = len(await seen(engine))
            status, body = await http("POST", rest(server, "/api/pause"))
            assert (status, body["code"]) == (503, "ENGINE_UNAVAILABLE")
            reply = await client.command("resume")
            assert reply["data"]["code"] == "ENGINE_UNAVAILABLE"
            assert len(await seen(engine)) == asked
            _, health = await http("GET", rest(server, "/api/health"))
            assert health["engine_reachable"] is False
            assert health["status"] == "ok"  # the stream is served: no reason to drain it
            _, status_now = await http("GET", rest(server, "/api/status"))
            assert status_now["status"] == "degraded"
            assert status_now["engine"] == {"mode": "remote", "reachable": False}

            # the engine answers again: the probe closes the breaker, clients are told
            await set_mode(engine, "ok")
            notice = await client.next_of("status_change", timeout=PROBE_INTERVAL * 3)
            assert notice["data"]["status"] == "running"
            reply = await client.command("pause")
            assert reply["type"] == "command_result"


async def test_an_engine_that_dies_and_comes_back():
    async with standin_deployment() as (engine, server):
        async with server.client() as client:
            await client.greeting()
            engine.kill()
            reply = await client.command("pause")
            assert reply["data"]["code"] == "ENGINE_UNAVAILABLE"
            notice = await client.next_of("status_change", timeout=PROBE_INTERVAL * 3)
            assert notice["data"]["status"] == "degraded"
            _, health = await http("GET", rest(server, "/api/health"))
            assert health["engine_reachable"] is False

            await engine.start()  # on the same port
            notice = await client.next_of("status_change", timeout=PROBE_INTERVAL * 3)
            assert notice["data"]["status"] == "running"
            _, health = await http("GET", rest(server, "/api/health"))
            assert health["engine_reachable"] is True
            assert (await client.command("pause"))["type"] == "command_result"


async def test_a_lost_answer_is_retried_with_the_same_key_and_carried_out_once():
    async with standin_deployment() as (engine, server):
        await set_mode(engine, "drop_first")
        async with server.client() as client:
            await client.greeting()
            reply = await client.command("approve_proposal", proposal_id="prop_1")
            assert reply["type"] == "command_result", reply
        requests = await seen(engine)
        assert len(requests) == 2
        assert requests[0]["idempotency_key"] == requests[1]["idempotency_key"]
        assert [r["carried_out"] for r in requests] == [True, False]


async def test_reads_answer_from_the_read_model_while_the_engine_is_away(database_url):
    """The engine's events (here published as an original engine would) build the read model;
    it answers with no engine at all, and after a restart."""
    port = free_port()
    settings = {"DATABASE_URL": database_url, "ENGINE_URL": f"http://127.0.0.1:{free_port()}"}
    events = [
        {"type": "proposal_created", "data": {"proposal_id": "p1", "symbol": "BTC/USDT"}},
        {"type": "proposal_approved", "data": {"proposal_id": "p1", "approved_by": "ops"}},
        {
            "type": "trade_executed",
            "data": {"proposal_id": "p1", "order_id": "o1", "symbol": "BTC/USDT", "size": 1},
        },
        {"type": "portfolio_update", "data": {"total_value": 10.0, "positions": []}},
        # a proposal the read model first hears of when it ends, and one with a null field
        {"type": "proposal_expired", "data": {"proposal_id": "p0"}},
        {"type": "proposal_created", "data": {"proposal_id": "p2", "reason": None}},
        {
            "type": "status_change",
            "data": {"previous_status": "running", "current_status": "paused"},
        },
    ]
    async with running_gateway(port=port, **settings) as server:
        assert server.gateway.engine.reachable is False
        status, body = await http("GET", rest(server, "/api/portfolio"))
        assert (status, body["code"]) == (503, "NO_PORTFOLIO")
        status, _ = await http("POST", rest(server, "/api/events"), {"events": events})
        assert status == 202

        async def executed() -> Any:
            _, proposal = await http("GET", rest(server, "/api/proposals/p1"))
            return proposal if proposal.get("status") == "executed" else None

        proposal = await eventually(executed)
        assert proposal["decided_by"] == "ops"
        assert proposal["expires_at"] is None  # the engine did not say

        async def all_three() -> Any:
            status, page = await http("GET", rest(server, "/api/proposals"))
            assert status == 200, page
            return page if page["total"] == 3 else None

        listed = {p["proposal_id"]: p for p in (await eventually(all_three))["items"]}
        assert listed["p0"]["status"] == "expired"
        assert listed["p0"]["created_at"]  # when the gateway first heard of it
        assert listed["p2"]["reason"] == ""
    async with running_gateway(port=port, **settings) as server:
        assert (await http("GET", rest(server, "/api/proposals/p1")))[1] == proposal
        _, trades = await http("GET", rest(server, "/api/trades"))
        assert [t["order_id"] for t in trades["items"]] == ["o1"]
        status, portfolio = await http("GET", rest(server, "/api/portfolio"))
        assert (status, portfolio["total_value"], portfolio["positions"]) == (200, 10.0, [])
        assert server.gateway.engine.paused is True  # the original engine's status_change


@pytest.mark.parametrize("command", ["pause", "analyze"])
async def test_a_wrong_argument_is_refused_before_the_engine(command):
    async with standin_deployment() as (engine, server):
        async with server.client() as client:
            await client.greeting()
            reply = await client.command(command, symbol="not a symbol", extra=1)
            assert reply["data"]["code"] == "MESSAGE_PROCESSING_ERROR"
        assert await seen(engine) == []


async def test_workers_on_one_stream_build_one_read_model(redis_prefix):
    """Three workers on one Redis stream and one PostgreSQL database each apply every event:
    the rows are those of one application, whatever the interleaving."""

    url, prefix = redis_prefix
    async with fresh_postgres() as database_url, AsyncExitStack() as stack:
        await migrate(database_url)
        servers = [
            await stack.enter_async_context(
                running_gateway(
                    REDIS_URL=url,
                    REDIS_PREFIX=prefix,
                    DATABASE_URL=database_url,
                    ENGINE_URL=f"http://127.0.0.1:{free_port()}",
                )
            )
            for _ in range(3)
        ]
        count = 40
        events = []
        for n in range(count):
            proposal = {"proposal_id": f"p{n}", "symbol": "BTC/USDT", "action": "buy", "size": 1}
            events.append({"type": "proposal_created", "data": proposal})
            if n % 2:
                events.append({"type": "proposal_approved", "data": {"proposal_id": f"p{n}"}})
                trade = {"proposal_id": f"p{n}", "order_id": f"o{n}", "symbol": "BTC/USDT"}
                events.append({"type": "trade_executed", "data": trade})
            else:
                closed = {"proposal_id": f"p{n}", "status": "rejected", "reason": f"r{n}"}
                events.append({"type": "proposal_rejected", "data": closed})
        # the events arrive at different workers, as an engine behind a load balancer sends them
        for position in range(0, len(events), 10):
            server = servers[position // 10 % 3]
            status, _ = await http(
                "POST", rest(server, "/api/events"), {"events": events[position : position + 10]}
            )
            assert status == 202

        async def all_applied() -> bool:
            return all(s.gateway.engine.read_model.applied == len(events) for s in servers)

        await eventually(all_applied)
        for server in servers:
            _, executed = await http(
                "GET", rest(server, "/api/proposals?status=executed&limit=500")
            )
            _, rejected = await http(
                "GET", rest(server, "/api/proposals?status=rejected&limit=500")
            )
            _, trades = await http("GET", rest(server, "/api/trades?limit=500"))
            assert (executed["total"], rejected["total"], trades["total"]) == (20, 20, 20)
            assert {p["status_reason"] for p in rejected["items"]} == {
                f"r{n}" for n in range(0, count, 2)
            }


async def test_an_action_whose_caller_gave_up_is_carried_out_once(tmp_path, monkeypatch):
    """The gateway stops waiting at ENGINE_TIMEOUT and retries with the same key: the engine
    service finishes the first call's action and answers the retry with it, once."""
    from hypercorn.asyncio import serve
    from hypercorn.config import Config as HypercornConfig

    from app.engine_service import create_engine_app
    from app.services.engines import PaperEngine
    from config import Config
    from tests.helpers import free_socket

    database_url = f"sqlite:///{tmp_path}/engine.db"
    await migrate(database_url)
    original = PaperEngine.perform

    async def slow_after_the_commit(self, command, args, caller):
        result = await original(self, command, args, caller)
        await asyncio.sleep(0.6)  # the caller gives up meanwhile
        return result

    monkeypatch.setattr(PaperEngine, "perform", slow_after_the_commit)
    app = create_engine_app(
        Config(DATABASE_URL=database_url, GATEWAY_URL=f"http://127.0.0.1:{free_port()}")
    )
    sock = free_socket()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    settings = HypercornConfig.from_mapping({"bind": [f"fd://{sock.detach()}"]})
    stop = asyncio.Event()
    server = asyncio.create_task(serve(app, settings, shutdown_trigger=stop.wait))
    try:
        await eventually(lambda: _answers(url + "/health"))
        service = app.extensions["engine_service"]
        service.market.observe({"BTC/USDT": 95000.0}, time.time())
        command = {
            "command": "create_proposal",
            "args": {"symbol": "BTC/USDT", "action": "buy", "size": 0.01},
        }
        headers = {"Idempotency-Key": "one-action"}
        async with aiohttp.ClientSession() as session:
            with pytest.raises(TimeoutError):
                async with session.post(
                    url + "/commands",
                    json=command,
                    headers=headers,
                    timeout=aiohttp.ClientTimeout(total=0.2),
                ) as response:
                    await response.read()
        status, retried = await http("POST", url + "/commands", command, headers)
        assert status == 200, retried
        again = await http("POST", url + "/commands", command, headers)
        assert again == (200, retried)
        proposals, total = await service.trading.proposals(
            status=None, symbol=None, limit=10, offset=0
        )
        assert total == 1
        assert proposals[0].id == retried["result"]["proposal"]["proposal_id"]
    finally:
        stop.set()
        await asyncio.wait_for(server, 10)


async def _answers(url: str) -> bool:
    try:
        return (await http("GET", url))[0] == 200
    except aiohttp.ClientError:
        return False


async def test_a_stopping_worker_writes_what_its_read_model_was_given(tmp_path):
    database_url = f"sqlite:///{tmp_path}/gateway.db"
    await migrate(database_url)
    settings = {"DATABASE_URL": database_url, "ENGINE_URL": f"http://127.0.0.1:{free_port()}"}
    events = [
        {"type": "proposal_created", "data": {"proposal_id": f"p{n}", "symbol": "BTC/USDT"}}
        for n in range(200)
    ]
    async with running_gateway(**settings) as server:
        status, _ = await http("POST", rest(server, "/api/events"), {"events": events})
        assert status == 202
    async with running_gateway(**settings) as server:  # stopped at once, started again
        _, page = await http("GET", rest(server, "/api/proposals?limit=1"))
        assert page["total"] == 200
