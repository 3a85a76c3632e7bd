"""Connection lifecycle: heartbeat, timeout, limits, API keys, slow consumers."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import socket
import time
import urllib.error
import urllib.request
from contextlib import AsyncExitStack

import pytest
import websockets

from app.services.commands import COMMANDS, Command, NoArguments
from tests.helpers import (
    connect_when_up,
    free_port,
    migrate_with_cli,
    start_host,
    stop_host,
)


async def test_server_pings_on_the_heartbeat_interval(gateway_factory):
    async with gateway_factory(WS_HEARTBEAT_INTERVAL=0.2, WS_CONNECTION_TIMEOUT=30) as server:
        async with server.client() as client:
            await client.greeting()
            ping = await client.recv(timeout=2)
            assert ping["type"] == "ping"
            assert ping["connection_id"]
            await client.send({"type": "pong"})
            assert (await client.recv(timeout=2))["type"] == "ping"


async def test_clients_that_connect_together_are_not_all_pinged_at_once(gateway_factory):
    """Each connection's first ping is due 1 to 1.25 heartbeat intervals after it opened, at
    random: 40 clients connected in the same instant are pinged (and answer) spread over a
    quarter of an interval, not in one burst every interval."""
    interval = 1000.0  # the heartbeat loop stays idle: the rounds below are driven by hand
    async with gateway_factory(
        WS_HEARTBEAT_INTERVAL=interval, WS_CONNECTION_TIMEOUT=10 * interval
    ) as server:
        async with contextlib.AsyncExitStack() as stack:
            for _ in range(40):
                client = await stack.enter_async_context(server.client())
                await client.greeting()
            manager = server.gateway.manager
            opened = time.monotonic()

            def pinged_by(offset: float) -> int:
                """Connections pinged once a heartbeat round has run at `opened + offset`."""
                manager.heartbeat(opened + offset)
                # A ping sets last_ping to the round's time; before, it is at most 0.25 interval
                # after the connection opened.
                return sum(
                    c.last_ping > opened + 0.5 * interval for c in manager.connections.values()
                )

            assert pinged_by(0.99 * interval) == 0
            halfway = pinged_by(1.125 * interval)
            assert 4 <= halfway <= 36  # a burst would be 0 or 40
            assert pinged_by(1.26 * interval) == 40


async def test_silent_client_is_closed_after_the_timeout(gateway_factory):
    async with gateway_factory(WS_HEARTBEAT_INTERVAL=0.1, WS_CONNECTION_TIMEOUT=0.6) as server:
        async with server.client() as silent, server.client() as lively:
            await silent.greeting()
            await lively.greeting()
            deadline = asyncio.get_running_loop().time() + 1.5
            while asyncio.get_running_loop().time() < deadline:  # answers every ping
                message = await lively.recv(timeout=2)
                if message["type"] == "ping":
                    await lively.send({"type": "pong"})
            messages = []
            with pytest.raises(websockets.ConnectionClosed):
                while True:
                    messages.append(await silent.recv(timeout=2))
            assert messages[-1]["type"] == "error"
            assert messages[-1]["data"]["code"] == "CONNECTION_TIMEOUT"
            assert silent.ws.close_code == 1001
            assert (await lively.request("ping"))["type"] == "pong"
            assert server.gateway.manager.counters["timeouts"] == 1


async def test_connection_limit_refuses_with_1013_and_spares_the_others(gateway_factory):
    async with gateway_factory(WS_MAX_CONNECTIONS=2) as server:
        async with server.client() as first, server.client() as second:
            await first.greeting()
            await second.greeting()
            async with server.client() as third:
                error = await third.recv()
                assert error["type"] == "error"
                assert error["data"]["code"] == "MAX_CONNECTIONS_EXCEEDED"
                await third.ws.wait_closed()
                assert third.ws.close_code == 1013
            assert (await first.request("ping"))["type"] == "pong"
            assert (await second.request("ping"))["type"] == "pong"
        async with server.client() as again:  # room again once the others left
            await again.greeting()
        stats = server.gateway.manager.get_stats()
        assert stats["connections_rejected"] == 1


KEYS = ("reader-key:read", "bot-key:read+trade", "admin-key")


@pytest.mark.parametrize(
    "query, headers",
    [
        ("", {}),
        ("?api_key=wrong", {}),
        ("", {"X-API-Key": "wrong"}),
        ("?api_key=reader-ke", {}),
    ],
)
async def test_missing_or_wrong_key_is_refused_with_1008(gateway_factory, query, headers):
    async with gateway_factory(API_KEYS=KEYS) as server:
        async with server.client(query, additional_headers=headers) as client:
            error = await client.recv()
            assert error["data"]["code"] == "AUTHENTICATION_FAILED"
            assert error["data"]["error"] == (
                "Invalid API key" if query or headers else "Missing API key"
            )
            assert "wrong" not in error["data"]["details"]
            await client.ws.wait_closed()
            assert client.ws.close_code == 1008
        assert server.gateway.manager.get_stats()["active_connections"] == 0


@pytest.mark.parametrize(
    "query, headers",
    [
        ("?api_key=reader-key", {}),
        ("", {"X-API-Key": "bot-key"}),
    ],
)
async def test_valid_key_by_query_or_header_connects(gateway_factory, query, headers):
    async with gateway_factory(API_KEYS=KEYS) as server:
        async with server.client(query, additional_headers=headers) as client:
            await client.greeting()
            assert (await client.request("ping"))["type"] == "pong"


async def test_command_needs_the_scope_of_its_key(gateway_factory, monkeypatch):
    async with gateway_factory(API_KEYS=KEYS) as server:
        calls = []

        async def pause(gateway, principal, arguments):
            calls.append(principal)
            return {"paused": True}

        monkeypatch.setitem(COMMANDS, "pause", Command("pause", "trade", NoArguments, pause))
        async with server.client("?api_key=reader-key") as reader:
            await reader.greeting()
            error = await reader.request("command", {"command": "pause"})
            assert error["data"]["code"] == "FORBIDDEN_COMMAND"
            assert "trade" in error["data"]["details"]
        async with server.client("?api_key=admin-key") as admin:
            await admin.greeting()
            result = await admin.request("command", {"command": "pause"})
            assert result["data"]["result"] == {"paused": True}
        assert len(calls) == 1


async def test_foreign_browser_origin_is_refused(server):
    with pytest.raises(websockets.InvalidStatus) as refused:
        async with server.client(origin="http://evil.example"):
            pass
    assert refused.value.response.status_code == 403
    async with server.client(origin="http://localhost:5173") as allowed:
        await allowed.greeting()


def stalled_socket(port: int) -> socket.socket:
    """A client socket with a tiny receive buffer, so that a client that stops reading
    pushes back on the server quickly."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    return sock


async def test_a_stalled_client_does_not_slow_the_others(gateway_factory):
    async with (
        gateway_factory(
            WS_SEND_QUEUE_SIZE=50, WS_CLOSE_TIMEOUT=30, WS_MAX_CONNECTIONS=200
        ) as server,
        AsyncExitStack() as stack,
    ):
        manager = server.gateway.manager
        readers = [
            await stack.enter_async_context(server.subscribed(["alerts"])) for _ in range(100)
        ]
        # No permessage-deflate: repeated payloads would compress to nothing and never stall.
        stalled = await stack.enter_async_context(
            server.client(
                sock=stalled_socket(server.port), max_queue=1, close_timeout=0.5, compression=None
            )
        )
        await stalled.greeting()
        await stalled.request("subscribe", {"topics": ["alerts"]})

        received = [0] * len(readers)

        async def read(i: int) -> None:
            while True:
                event = await readers[i].recv_event(timeout=10)
                received[i] += 1
                assert event["seq"] == received[i]  # in order, nothing lost, nothing twice

        tasks = [asyncio.create_task(read(i)) for i in range(len(readers))]
        published = 0
        payload = "x" * 2000
        # Bounded: at most 4000 events, until the stalled client has been cut off.
        while published < 4000 and manager.counters["slow_consumer_closes"] == 0:
            for _ in range(20):
                published += 1
                await server.publish("alert", {"n": published, "pad": payload})
            await asyncio.sleep(0.005)
        assert manager.counters["slow_consumer_closes"] == 1
        for _ in range(200):
            if all(count == published for count in received) or any(t.done() for t in tasks):
                break
            await asyncio.sleep(0.05)
        assert received == [published] * len(readers)
        for task in tasks:
            task.cancel()

        # The stalled client, once it reads again, finds the reason and a 1008 close.
        last = None
        with pytest.raises(websockets.ConnectionClosed):
            while True:
                last = await stalled.recv(timeout=10)
        assert last is not None and last["data"]["code"] == "SLOW_CONSUMER"
        assert stalled.ws.close_code == 1008


async def test_fast_path_is_taken_when_enabled(server):
    async with server.subscribed(["alerts"]):
        stats = server.gateway.manager.get_stats()
        expected = 1 if server.gateway.config.WS_FAST_PATH else 0
        assert stats["fast_path_connections"] == expected


@pytest.mark.parametrize("compression", ["deflate", None])
async def test_clients_with_and_without_permessage_deflate(server, compression):
    async with server.client(compression=compression) as client:
        negotiated = [type(e).__name__ for e in client.ws.protocol.extensions]
        assert negotiated == (["PerMessageDeflate"] if compression else [])
        await client.greeting()
        await client.request("subscribe", {"topics": ["alerts"]})
        big = {"pad": "y" * 70_000}  # 64-bit length frame
        for n in range(3):
            await server.publish("alert", {"n": n, **(big if n == 1 else {})})
        events = [await client.recv_event() for _ in range(3)]
        assert [e["data"]["n"] for e in events] == [0, 1, 2]
        assert events[1]["data"]["pad"] == big["pad"]
        assert (await client.request("ping"))["type"] == "pong"


async def test_a_stalled_client_is_dropped_after_the_close_timeout(gateway_factory):
    async with gateway_factory(WS_SEND_QUEUE_SIZE=20, WS_CLOSE_TIMEOUT=0.5) as server:
        manager = server.gateway.manager
        async with server.client(
            sock=stalled_socket(server.port), max_queue=1, close_timeout=0.5, compression=None
        ) as stalled:
            await stalled.greeting()
            await stalled.request("subscribe", {"topics": ["alerts"]})
            for n in range(4000):  # bounded; stops once the client is cut off
                await server.publish("alert", {"n": n, "pad": "z" * 2000})
                if n % 50 == 0:
                    await asyncio.sleep(0.001)
                if manager.counters["slow_consumer_closes"]:
                    break
            assert manager.counters["slow_consumer_closes"] == 1
            for _ in range(100):
                if not manager.connections:
                    break
                await asyncio.sleep(0.05)
            assert manager.connections == {}


async def test_sigterm_tells_clients_and_closes_with_1001(tmp_path):
    env = {
        "DATABASE_URL": f"sqlite:///{tmp_path}/shutdown.db",
        "SIMULATION": "false",
        "LOG_LEVEL": "WARNING",
    }
    migrate_with_cli(env)
    port = free_port()
    host = start_host(port, 1, env)
    try:
        client = await connect_when_up(port)
        await client.greeting()
        host.send_signal(signal.SIGTERM)
        notice = await client.next_of("status_change", timeout=5)
        assert notice["data"]["status"] == "shutting_down"
        await asyncio.wait_for(client.ws.wait_closed(), 5)
        assert client.ws.close_code == 1001
        assert host.wait(timeout=10) == 0
    finally:
        stop_host(host)


async def test_connections_per_api_key_are_limited(gateway_factory):
    async with gateway_factory(
        API_KEYS=("bot-key:read", "other:read"), WS_MAX_CONNECTIONS_PER_KEY=2
    ) as server:
        async with (
            server.client("?api_key=bot-key") as first,
            server.client("?api_key=bot-key") as second,
        ):
            await first.greeting()
            await second.greeting()
            async with server.client("?api_key=bot-key") as third:
                error = await third.recv()
                assert error["data"]["code"] == "MAX_CONNECTIONS_EXCEEDED"
                assert "API key" in error["data"]["details"]
                await third.ws.wait_closed()
                assert third.ws.close_code == 1013
            async with server.client("?api_key=other") as other:
                await other.greeting()


def http(port: int, method: str, path: str, headers: dict[str, str]) -> int:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}",
        method=method,
        headers=headers,
        data=b"{}" if method == "POST" else None,
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


async def test_api_keys_never_reach_the_logs(tmp_path):
    """A host logging at DEBUG, served keys right and wrong by query and header, on WebSocket
    and REST, through refusals of every kind: no key appears in its output."""
    keys = {
        "reader": "secret-reader-7f3a",
        "trader": "secret-trader-9c1d",
        "wrong": "secret-wrong-5e2b",
    }
    env = {
        "DATABASE_URL": f"sqlite:///{tmp_path}/keys.db",
        "SIMULATION": "false",
        "LOG_LEVEL": "DEBUG",
        "WS_MAX_CONNECTIONS_PER_KEY": "1",
        "API_KEYS": f"{keys['reader']}:read,{keys['trader']}",
    }
    migrate_with_cli(env)
    port = free_port()
    log_path = tmp_path / "host.log"
    with log_path.open("wb") as log:
        host = start_host(port, 1, env, log)
    try:
        await (await connect_when_up(port)).ws.close()  # refused: no key; the host is up
        url = f"ws://127.0.0.1:{port}/api/ws"
        for query, headers in (
            (f"?api_key={keys['reader']}", {}),
            ("", {"X-API-Key": keys["trader"]}),
            (f"?api_key={keys['wrong']}", {}),
            ("", {"X-API-Key": keys["wrong"]}),
        ):
            async with websockets.connect(url + query, additional_headers=headers) as ws:
                first = json.loads(await ws.recv())
                if first["type"] == "connected":
                    await ws.send(json.dumps({"type": "command", "data": {"command": "pause"}}))
                    await ws.recv()
                    async with websockets.connect(url + query, additional_headers=headers) as again:
                        await again.wait_closed()  # over the per-key limit
                assert all(key not in json.dumps(first) for key in keys.values())
        for method, path, key in (
            ("GET", "/api/status", keys["wrong"]),
            ("POST", "/api/pause", keys["reader"]),
            ("GET", "/api/status", keys["trader"]),
            ("POST", "/api/events", keys["wrong"]),
        ):
            assert await asyncio.to_thread(http, port, method, path, {"X-API-Key": key}) in (
                200,
                400,
                401,
                403,
            )
    finally:
        host.send_signal(signal.SIGTERM)
        host.wait(timeout=15)
        stop_host(host)
    output = log_path.read_text()
    # The refusals are logged, by address and principal, without the key.
    # The same refusal twice within 10 s: written once (anyone can make the gateway refuse).
    assert output.count("refused a WebSocket from 127.0.0.1: wrong API key") == 1
    assert "refused a WebSocket of key#1 from 127.0.0.1" in output
    assert "refused GET /api/status from 127.0.0.1: wrong API key" in output
    for key in keys.values():
        assert key not in output
