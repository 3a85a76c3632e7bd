"""The trading domain end to end, on real SQLite and real PostgreSQL: proposals, approvals,
executions, the portfolio, restarts, the approval race, risk refusals, REST errors."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import pytest

from app.services.database import latest_migration, migrate, standalone_connection
from tests.helpers import running_gateway

PROPOSAL_FIELDS = {
    "proposal_id",
    "symbol",
    "action",
    "size",
    "reason",
    "created_at",
    "confidence",
    "source",
    "expires_at",
    "requested_by",
}
APPROVED_FIELDS = {"proposal_id", "symbol", "action", "size", "approved_by", "approved_at"}
TRADE_FIELDS = {
    "proposal_id",
    "symbol",
    "action",
    "size",
    "filled_price",
    "order_id",
    "status",
    "fee",
    "timestamp",
}
PORTFOLIO_FIELDS = {"total_value", "available_cash", "positions", "total_pnl", "total_pnl_percent"}
POSITION_FIELDS = {"symbol", "size", "entry_price", "current_price", "value", "pnl", "pnl_percent"}


async def started(database_url: str, **settings):
    """A gateway on `database_url` whose market has ticked once, so prices exist."""
    context = running_gateway(DATABASE_URL=database_url, **settings)
    server = await context.__aenter__()
    await server.gateway.simulation.tick_market()
    return context, server


async def post(server, path, body=None, **headers):
    response = await server.app.test_client().post(path, json=body, headers=headers)
    return response.status_code, await response.get_json()


async def get(server, path, **headers):
    response = await server.app.test_client().get(path, headers=headers)
    return response.status_code, await response.get_json()


async def test_migrations_from_empty_are_idempotent(database_url):
    assert await migrate(database_url) == latest_migration()
    async with standalone_connection(database_url) as connection:
        for table in ("proposals", "trades", "positions", "ledger", "api_keys"):
            assert await connection.fetch_val(f"SELECT COUNT(*) FROM {table}") == 0


async def test_a_worker_refuses_an_unmigrated_database(tmp_path):
    with pytest.raises(Exception, match="python -m app migrate"):
        async with running_gateway(DATABASE_URL=f"sqlite:///{tmp_path}/empty.db"):
            pass


async def test_full_lifecycle_over_websocket_and_rest(database_url):
    context, server = await started(database_url)
    try:
        async with server.subscribed(["proposals", "executions", "portfolio"]) as client:
            status, created = await post(
                server, "/api/proposals", {"symbol": "btc/usdt", "action": "buy", "size": 0.1}
            )
            assert status == 201 and created["status"] == "pending"
            event = await client.next_of("proposal_created")
            assert set(event["data"]) == PROPOSAL_FIELDS
            assert event["data"]["proposal_id"] == created["proposal_id"]
            assert (event["data"]["symbol"], event["data"]["size"]) == ("BTC/USDT", 0.1)
            # The user's reason as written; who asked, in a field of its own.
            assert (
                event["data"]["reason"],
                event["data"]["requested_by"],
                event["data"]["source"],
            ) == ("Manual proposal", "anonymous", "manual")
            assert created["requested_by"] == "anonymous"

            result = await client.command("approve_proposal", proposal_id=created["proposal_id"])
            assert result["type"] == "command_result"
            trade = result["data"]["result"]["trade"]
            approved = await client.next_of("proposal_approved")
            assert set(approved["data"]) == APPROVED_FIELDS
            executed = await client.next_of("trade_executed")
            assert set(executed["data"]) == TRADE_FIELDS
            assert executed["data"] == trade
            assert executed["data"]["status"] == "filled"
            price = server.gateway.market.price("BTC/USDT")
            assert executed["data"]["filled_price"] == pytest.approx(price * 1.0005)
            assert executed["data"]["fee"] == pytest.approx(0.1 * price * 1.0005 * 0.001)
            portfolio = (await client.next_of("portfolio_update"))["data"]
            assert set(portfolio) == PORTFOLIO_FIELDS
            [position] = portfolio["positions"]
            assert set(position) == POSITION_FIELDS
            assert position["symbol"] == "BTC/USDT" and position["size"] == 0.1
            cost = 0.1 * trade["filled_price"] + trade["fee"]
            assert portfolio["available_cash"] == pytest.approx(100_000 - cost, abs=0.01)

            status, sell = await post(
                server, "/api/proposals", {"symbol": "BTC/USDT", "action": "sell", "size": 0.1}
            )
            assert status == 201
            status, decided = await post(server, f"/api/proposals/{sell['proposal_id']}/approve")
            assert status == 200 and decided["proposal"]["status"] == "executed"
            assert decided["trade"]["action"] == "sell"

        status, portfolio = await get(server, "/api/portfolio")
        assert status == 200 and portfolio["positions"] == []
        status, trades = await get(server, "/api/trades")
        assert trades["total"] == 2
        assert [t["action"] for t in trades["items"]] == ["sell", "buy"]
        status, executed = await get(server, "/api/proposals?status=executed&symbol=BTC/USDT")
        assert status == 200, executed
        assert executed["total"] == 2
        status, market = await get(server, "/api/market")
        assert {m["symbol"] for m in market["symbols"]} == {"BTC/USDT", "ETH/USDT", "SOL/USDT"}
    finally:
        await context.__aexit__(None, None, None)


async def test_state_survives_a_restart(database_url):
    context, server = await started(database_url)
    try:
        _, bought = await post(
            server, "/api/proposals", {"symbol": "ETH/USDT", "action": "buy", "size": 2}
        )
        await post(server, f"/api/proposals/{bought['proposal_id']}/approve")
        _, waiting = await post(
            server, "/api/proposals", {"symbol": "SOL/USDT", "action": "buy", "size": 3}
        )
        await post(server, "/api/pause")
        _, before = await get(server, "/api/portfolio")
        _, trades_before = await get(server, "/api/trades")
        last_price = server.gateway.market.price("ETH/USDT")
    finally:
        await context.__aexit__(None, None, None)

    async with running_gateway(DATABASE_URL=database_url) as again:
        assert again.gateway.market.price("ETH/USDT") == last_price
        _, after = await get(again, "/api/portfolio")
        assert after == before
        _, trades_after = await get(again, "/api/trades")
        assert trades_after == trades_before
        _, pending = await get(again, f"/api/proposals/{waiting['proposal_id']}")
        assert pending["status"] == "pending"
        _, status = await get(again, "/api/status")
        assert status["status"] == "paused"


async def test_concurrent_approvals_execute_exactly_once(database_url):
    """Two gateways (workers) on one database; approvals by REST and WebSocket at once."""
    first_context, first = await started(database_url)
    second_context, second = await started(database_url)
    try:
        _, proposal = await post(
            first, "/api/proposals", {"symbol": "BTC/USDT", "action": "buy", "size": 0.05}
        )
        proposal_id = proposal["proposal_id"]
        clients = []
        async with first.client() as a, second.client() as b:
            for client in (a, b):
                await client.greeting()
                clients.append(client)

            async def by_rest(server):
                status, body = await post(server, f"/api/proposals/{proposal_id}/approve")
                return status == 200, body

            async def by_websocket(client):
                reply = await client.command("approve_proposal", proposal_id=proposal_id)
                return reply["type"] == "command_result", reply["data"]

            attempts = [by_rest(first) for _ in range(6)] + [by_rest(second) for _ in range(6)]
            attempts += [by_websocket(a), by_websocket(b)]
            outcomes = await asyncio.gather(*attempts)
        winners = [body for ok, body in outcomes if ok]
        losers = [body for ok, body in outcomes if not ok]
        assert len(winners) == 1
        assert len(losers) == 13
        assert all(body["code"] == "PROPOSAL_ALREADY_DECIDED" for body in losers)
        assert {body["proposal_status"] for body in losers} <= {"approved", "executed"}
        _, trades = await get(first, "/api/trades")
        assert trades["total"] == 1
        _, portfolio = await get(second, "/api/portfolio")
        trade = trades["items"][0]
        assert portfolio["available_cash"] == pytest.approx(
            100_000 - 0.05 * trade["filled_price"] - trade["fee"], abs=0.01
        )
    finally:
        await second_context.__aexit__(None, None, None)
        await first_context.__aexit__(None, None, None)


async def test_risk_rules_refuse_what_cannot_be_paid_or_sold(database_url):
    context, server = await started(database_url)
    try:
        async with server.subscribed(["alerts", "proposals"]) as client:
            _, huge = await post(
                server, "/api/proposals", {"symbol": "BTC/USDT", "action": "buy", "size": 100}
            )
            status, decided = await post(server, f"/api/proposals/{huge['proposal_id']}/approve")
            assert status == 200 and decided["trade"] is None
            assert decided["proposal"]["status"] == "rejected"
            assert "cash" in decided["proposal"]["status_reason"]
            rejected = await client.next_of("proposal_rejected")
            assert rejected["data"]["proposal_id"] == huge["proposal_id"]
            alert = await client.next_of("alert")
            assert alert["data"]["code"] == "INSUFFICIENT_CASH"
            assert alert["data"]["proposal_id"] == huge["proposal_id"]

            _, short = await post(
                server, "/api/proposals", {"symbol": "ETH/USDT", "action": "sell", "size": 1}
            )
            _, decided = await post(server, f"/api/proposals/{short['proposal_id']}/approve")
            assert decided["proposal"]["status"] == "rejected"
            assert (await client.next_of("alert"))["data"]["code"] == "INSUFFICIENT_POSITION"

            status, body = await post(
                server, "/api/proposals", {"symbol": "ETH/USDT", "action": "sell"}
            )
            assert (status, body["code"]) == (422, "NOTHING_TO_SELL")
        _, trades = await get(server, "/api/trades")
        assert trades["total"] == 0
    finally:
        await context.__aexit__(None, None, None)


async def test_pause_holds_executions_until_resume(database_url):
    context, server = await started(database_url)
    try:
        async with server.subscribed(["status", "proposals", "executions"]) as client:
            _, proposal = await post(
                server, "/api/proposals", {"symbol": "SOL/USDT", "action": "buy", "size": 1}
            )
            paused = await client.command("pause")
            assert paused["data"]["result"] == {"status": "paused", "changed": True}
            change = await client.next_of("status_change")
            assert change["data"]["status"] == "paused"
            assert (change["data"]["previous_status"], change["data"]["current_status"]) == (
                "running",
                "paused",
            )  # the original engine's fields too
            # No new proposals while paused, manual ones included.
            status, refused = await post(
                server, "/api/proposals", {"symbol": "SOL/USDT", "action": "buy", "size": 1}
            )
            assert (status, refused["code"]) == (409, "ENGINE_PAUSED")
            _, decided = await post(server, f"/api/proposals/{proposal['proposal_id']}/approve")
            assert decided["proposal"]["status"] == "approved" and decided["trade"] is None
            await client.next_of("proposal_approved")
            status, state = await post(server, "/api/resume")
            assert state == {"status": "running", "changed": True}
            assert (await client.next_of("status_change"))["data"]["status"] == "running"
            executed = await client.next_of("trade_executed")
            assert executed["data"]["proposal_id"] == proposal["proposal_id"]
    finally:
        await context.__aexit__(None, None, None)


async def test_reject_bulk_and_expiry(database_url):
    context, server = await started(database_url, PROPOSAL_TTL=0.2)
    try:
        ids = []
        for _ in range(3):
            _, body = await post(
                server, "/api/proposals", {"symbol": "BTC/USDT", "action": "buy", "size": 0.01}
            )
            ids.append(body["proposal_id"])
        status, result = await post(
            server,
            "/api/proposals/reject",
            {"proposal_ids": ids[:2] + ["prop_missing"], "reason": "not today"},
        )
        assert status == 200
        assert (result["succeeded"], result["failed"]) == (2, 1)
        assert result["results"][2]["error"]["code"] == "PROPOSAL_NOT_FOUND"
        _, rejected = await get(server, f"/api/proposals/{ids[0]}")
        assert (rejected["status"], rejected["status_reason"]) == ("rejected", "not today")
        _, again = await post(server, "/api/proposals/approve", {"proposal_ids": [ids[0]]})
        assert again["results"][0]["status"] == "rejected"
        assert again["results"][0]["error"]["code"] == "PROPOSAL_ALREADY_DECIDED"
        await asyncio.sleep(0.3)
        expired = await server.gateway.trading.expire_stale()
        assert [p.id for p in expired] == [ids[2]]
        status, body = await post(server, f"/api/proposals/{ids[2]}/approve")
        assert (status, body["code"], body["proposal_status"]) == (
            409,
            "PROPOSAL_ALREADY_DECIDED",
            "expired",
        )
    finally:
        await context.__aexit__(None, None, None)


@pytest.mark.parametrize(
    "method, path, body, status, code",
    [
        ("post", "/api/proposals/prop_nope/approve", None, 404, "PROPOSAL_NOT_FOUND"),
        ("get", "/api/proposals/prop_nope", None, 404, "PROPOSAL_NOT_FOUND"),
        (
            "post",
            "/api/proposals",
            {"symbol": "BTC/USDT", "action": "hold"},
            400,
            "VALIDATION_ERROR",
        ),
        (
            "post",
            "/api/proposals",
            {"symbol": "BTC/USDT", "action": "buy", "size": -1},
            400,
            "VALIDATION_ERROR",
        ),
        (
            "post",
            "/api/proposals",
            {"symbol": "BTC/USDT", "action": "buy", "size": True},
            400,
            "VALIDATION_ERROR",
        ),
        (
            "post",
            "/api/proposals",
            {"symbol": "DOGE/EUR", "action": "buy", "size": 1},
            400,
            "UNKNOWN_SYMBOL",
        ),
        (
            "post",
            "/api/proposals",
            {"symbol": "BTCUSDT", "action": "buy", "size": 1},
            400,
            "INVALID_SYMBOL",
        ),
        (
            "post",
            "/api/proposals",
            {"symbol": "BTC/USDT", "action": "buy", "size": 5e-324},
            400,
            "INVALID_SIZE",
        ),
        ("get", "/api/proposals?limit=0", None, 400, "VALIDATION_ERROR"),
        ("get", "/api/proposals?status=lost", None, 400, "VALIDATION_ERROR"),
        ("post", "/api/proposals/approve", {"proposal_ids": []}, 400, "VALIDATION_ERROR"),
        ("get", "/api/nowhere", None, 404, "NOT_FOUND"),
        ("delete", "/api/portfolio", None, 405, "METHOD_NOT_ALLOWED"),
    ],
)
async def test_rest_errors_are_json(server, method, path, body, status, code):
    await server.gateway.simulation.tick_market()
    client = server.app.test_client()
    response = (
        await getattr(client, method)(path, json=body)
        if body is not None
        else await getattr(client, method)(path)
    )
    assert response.status_code == status
    payload = await response.get_json()
    assert payload["code"] == code
    assert set(payload) == {"error", "code", "details"}


async def test_approving_twice_is_a_conflict(server):
    await server.gateway.simulation.tick_market()
    _, proposal = await post(
        server, "/api/proposals", {"symbol": "BTC/USDT", "action": "buy", "size": 0.01}
    )
    assert (await post(server, f"/api/proposals/{proposal['proposal_id']}/approve"))[0] == 200
    status, body = await post(server, f"/api/proposals/{proposal['proposal_id']}/approve")
    assert (status, body["code"], body["proposal_status"]) == (
        409,
        "PROPOSAL_ALREADY_DECIDED",
        "executed",
    )


async def test_state_changes_need_the_trade_scope(gateway_factory):
    keys = ("reader:read", "trader:read+trade")
    async with gateway_factory(API_KEYS=keys) as server:
        await server.gateway.simulation.tick_market()
        body = {"symbol": "BTC/USDT", "action": "buy", "size": 0.01}
        assert (await post(server, "/api/proposals", body))[0] == 401
        assert (await post(server, "/api/proposals", body, **{"X-API-Key": "reader"}))[0] == 403
        status, proposal = await post(server, "/api/proposals", body, **{"X-API-Key": "trader"})
        assert status == 201
        for path in (
            f"/api/proposals/{proposal['proposal_id']}/approve",
            f"/api/proposals/{proposal['proposal_id']}/reject",
            "/api/pause",
            "/api/resume",
            "/api/proposals/approve",
        ):
            assert (
                await post(
                    server,
                    path,
                    {"proposal_ids": ["x"]}
                    if path.endswith("approve") and "prop_" not in path
                    else None,
                    **{"X-API-Key": "reader"},
                )
            )[0] == 403
        async with server.client("?api_key=reader") as reader:
            await reader.greeting()
            for name, args in (
                ("approve_proposal", {"proposal_id": proposal["proposal_id"]}),
                ("reject_proposal", {"proposal_id": proposal["proposal_id"]}),
                ("pause", {}),
                ("resume", {}),
                ("analyze", {"symbol": "BTC/USDT"}),
            ):
                reply = await reader.command(name, **args)
                assert reply["data"]["code"] == "FORBIDDEN_COMMAND", name
            assert (await reader.command("get_portfolio"))["type"] == "portfolio_update"
        _, still = await get(
            server, f"/api/proposals/{proposal['proposal_id']}", **{"X-API-Key": "reader"}
        )
        assert still["status"] == "pending"


async def test_websocket_read_commands_and_analyze(server):
    await server.gateway.simulation.tick_market()
    async with server.subscribed(["analysis"]) as client:
        portfolio = await client.command("get_portfolio")
        assert portfolio["type"] == "portfolio_update"
        assert set(portfolio["data"]) == PORTFOLIO_FIELDS
        health = await client.command("get_health")
        assert health["type"] == "health_update"
        assert set(health["data"]) == {
            "cpu_percent",
            "memory_percent",
            "disk_percent",
            "process_count",
        }
        analysis = await client.command("analyze", symbol="eth/usdt")
        assert analysis["data"]["result"]["symbol"] == "ETH/USDT"
        event = await client.next_of("analysis_update")
        assert set(event["data"]) == {
            "symbol",
            "decision",
            "confidence",
            "bull_score",
            "bear_score",
            "reasoning",
        }
        unknown = await client.command("analyze", symbol="XYZ/USDT")
        assert unknown["data"]["code"] == "INVALID_SYMBOL"
        wrong_type = await client.command("approve_proposal", proposal_id=7)
        assert wrong_type["data"]["code"] == "MESSAGE_PROCESSING_ERROR"


async def test_rest_analyze_runs_the_engines_analysis(database_url):
    context, server = await started(database_url)
    try:
        async with server.subscribed(["analysis"]) as client:
            status, analysis = await post(server, "/api/analyze", {"symbol": "btc/usdt"})
            assert (status, analysis["symbol"]) == (200, "BTC/USDT")
            event = await client.next_of("analysis_update")
            assert event["data"]["decision"] == analysis["decision"]
        status, body = await post(server, "/api/analyze", {"symbol": "XYZ/USDT"})
        assert (status, body["code"]) == (400, "INVALID_SYMBOL")
        status, body = await post(server, "/api/analyze", {"symbol": "BTCUSDT"})
        assert (status, body["code"]) == (400, "INVALID_SYMBOL")
    finally:
        await context.__aexit__(None, None, None)


async def test_commands_are_rate_limited_per_connection(gateway_factory):
    async with gateway_factory(WS_COMMAND_RATE=0.5, WS_COMMAND_BURST=2) as server:
        async with server.client() as client, server.client() as other:
            await client.greeting()
            await other.greeting()
            replies = [await client.command("get_status") for _ in range(3)]
            assert [r["type"] for r in replies] == ["system_status", "system_status", "error"]
            assert replies[2]["data"]["code"] == "RATE_LIMITED"
            assert "retry in" in replies[2]["data"]["details"]
            assert (await other.command("get_status"))["type"] == "system_status"
            assert (await client.request("ping"))["type"] == "pong"  # only commands count


async def test_periodic_topics_arrive_at_their_cadence():
    intervals = dict(
        MARKET_INTERVAL=0.1,
        ANALYSIS_INTERVAL=0.2,
        PORTFOLIO_INTERVAL=0.3,
        STATUS_INTERVAL=0.4,
        HEALTH_INTERVAL=0.5,
    )
    async with running_gateway(SIMULATION=True, **intervals) as server:
        async with server.subscribed(["all"]) as client:
            seen: dict[str, list[int]] = {}
            async with asyncio.timeout(10):
                while not all(
                    len(seen.get(t, [])) >= 2
                    for t in (
                        "market_update",
                        "analysis_update",
                        "portfolio_update",
                        "system_status",
                        "health_update",
                    )
                ):
                    event = await client.recv_event()
                    if "seq" in event:
                        seen.setdefault(event["type"], []).append(event["seq"])
            for seqs in seen.values():
                assert seqs == sorted(seqs)
            # the fastest topic arrives more often than the slowest
            assert len(seen["market_update"]) > len(seen["health_update"])


def run_cli(database_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "app", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "DATABASE_URL": database_url},
        timeout=60,
        check=False,
    )


async def test_api_keys_from_the_cli_are_hashed_scoped_and_revocable(tmp_path):
    url = f"sqlite:///{tmp_path}/keys.db"
    assert run_cli(url, "migrate").returncode == 0
    created = run_cli(url, "keys", "create", "--scopes", "read", "--label", "dashboard")
    assert created.returncode == 0, created.stderr
    key_id, key = created.stdout.split()
    async with standalone_connection(url) as connection:
        stored = await connection.fetch_val("SELECT key_hash FROM api_keys")
    assert key not in stored
    listed = run_cli(url, "keys", "list")
    assert key_id in listed.stdout and key not in listed.stdout
    async with running_gateway(DATABASE_URL=url, API_KEY_REFRESH_INTERVAL=0.2) as server:
        async with server.client() as anonymous:
            assert (await anonymous.recv())["data"]["code"] == "AUTHENTICATION_FAILED"
        async with server.client(f"?api_key={key}") as client:
            await client.greeting()
            assert (await client.command("pause"))["data"]["code"] == "FORBIDDEN_COMMAND"
        assert run_cli(url, "keys", "revoke", key_id).returncode == 0
        await asyncio.sleep(0.5)  # read again within API_KEY_REFRESH_INTERVAL
        async with server.client(f"?api_key={key}") as revoked:
            assert (await revoked.recv())["data"]["code"] == "AUTHENTICATION_FAILED"
    bad = run_cli(url, "keys", "create", "--scopes", "admin")
    assert bad.returncode == 2 and "unknown scopes" in bad.stderr


async def test_confident_analyses_become_proposals_sized_by_the_risk_rule(database_url):
    context, server = await started(database_url)
    try:
        engine = server.gateway.trading
        price = server.gateway.market.price("BTC/USDT")
        assert await engine.consider("BTC/USDT", "buy", 0.5, "weak") is None
        assert await engine.consider("BTC/USDT", "sell", 0.9, "nothing held") is None
        assert await engine.consider("BTC/USDT", "hold", 0.9, "no action") is None
        proposal = await engine.consider("BTC/USDT", "buy", 0.9, "RSI 28 oversold")
        assert proposal is not None and proposal.source == "agent"
        assert proposal.size == pytest.approx(0.02 * 100_000 / price, rel=1e-6)
        assert "RSI 28 oversold" in proposal.reason
        # one open proposal per symbol at most
        assert await engine.consider("BTC/USDT", "buy", 0.95, "again") is None
        assert await engine.consider("ETH/USDT", "buy", 0.95, "other symbol") is not None
    finally:
        await context.__aexit__(None, None, None)


def test_the_paper_engine_carries_out_every_action_command():
    from app.services.commands import ACTIONS
    from app.services.engines import PaperEngine

    assert set(PaperEngine.ACTIONS) == set(ACTIONS)
