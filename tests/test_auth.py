"""API keys: open without keys, scopes, refusals."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import time
from typing import Any

import pytest
import websockets

from app.services.auth import ApiKeys
from app.services.database import migrate
from tests.helpers import Client, RunningGateway, running_gateway


class TestApiKeys:
    async def test_open_when_no_keys(self):
        principal = await ApiKeys(()).authenticate(None)
        assert principal is not None and principal.can("trade")

    async def test_scopes_and_refusals(self):
        keys = ApiKeys(("r:read", "all-of-them"))
        reader = await keys.authenticate("r")
        assert reader is not None and reader.can("read") and not reader.can("trade")
        admin = await keys.authenticate("all-of-them")
        assert admin is not None and admin.can("publish")
        assert await keys.authenticate("x") is None
        assert await keys.authenticate(None) is None
        assert await keys.authenticate("") is None

    def test_unknown_scope_is_refused_without_echoing_the_key(self):
        with pytest.raises(ValueError) as refused:
            ApiKeys(("s3cret:fly",))
        assert "s3cret" not in str(refused.value)


def keys_cli(database_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    """`python -m app keys ...` against `database_url`, as an operator runs it."""
    return subprocess.run(
        [sys.executable, "-m", "app", "keys", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "DATABASE_URL": database_url},
        timeout=60,
        check=False,
    )


async def closed_for_authentication(client: Client, timeout: float = 5.0) -> str:
    """The error the gateway sent before closing `client` with 1008: its `error` text."""
    while True:
        message = await client.recv(timeout)
        if message["type"] == "error":
            break
    assert message["data"]["code"] == "AUTHENTICATION_FAILED", message
    with pytest.raises(websockets.ConnectionClosed) as closed:
        await asyncio.wait_for(client.ws.recv(), timeout)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008
    return str(message["data"]["error"])


async def rest_status(server: RunningGateway, key: str | None = None) -> tuple[int, Any]:
    headers = {"X-API-Key": key} if key else {}
    response = await server.app.test_client().get("/api/status", headers=headers)
    return response.status_code, await response.get_json()


async def test_the_gateway_switches_between_open_and_keyed_only_when_told_and_says_so(
    tmp_path, caplog
):
    """Creating the first key closes the keyless WebSockets already open (1008, "Missing API
    key") within the refresh interval; revoking a key closes its WebSockets ("Invalid API key");
    revoking the last key leaves the gateway keyed; only `keys open` opens it; each switch is a
    WARNING."""
    url = f"sqlite:///{tmp_path}/keys.db"
    await migrate(url)
    caplog.set_level(logging.INFO, logger="app.services.auth")
    async with running_gateway(DATABASE_URL=url, API_KEY_REFRESH_INTERVAL=0.2) as server:
        assert (await rest_status(server))[0] == 200
        async with server.client() as keyless:
            await keyless.greeting()
            created = keys_cli(url, "create", "--scopes", "read")
            assert created.returncode == 0, created.stderr
            key_id, key = created.stdout.split()
            assert await closed_for_authentication(keyless) == "Missing API key"
        status, body = await rest_status(server)
        assert status == 401 and body["error"] == "Missing API key"
        status, body = await rest_status(server, "sgx_not-a-key")
        assert status == 401 and body["error"] == "Invalid API key"

        async with server.client(f"?api_key={key}") as keyed:
            await keyed.greeting()
            revoked = keys_cli(url, "revoke", key_id)
            assert revoked.returncode == 0 and "stays keyed" in revoked.stderr
            assert await closed_for_authentication(keyed) == "Invalid API key"
        await asyncio.sleep(0.5)  # past the refresh interval: still keyed
        assert (await rest_status(server))[0] == 401
        async with server.client() as keyless:
            assert (await keyless.recv())["data"]["error"] == "Missing API key"

        other = keys_cli(url, "create").stdout.split()[0]
        refused = keys_cli(url, "open")
        assert refused.returncode == 1 and "revoke them first" in refused.stderr
        assert keys_cli(url, "revoke", other).returncode == 0
        opened = keys_cli(url, "open")
        assert opened.returncode == 0 and "open to every client" in opened.stdout
        async with asyncio.timeout(5):
            while (await rest_status(server))[0] != 200:
                await asyncio.sleep(0.05)

    records = [r for r in caplog.records if r.name == "app.services.auth"]
    switches = [r.getMessage() for r in records]
    assert [m.split(":")[0] for m in switches] == [
        "the gateway is open",
        "the gateway is keyed",
        "the gateway is open",
    ]
    assert {r.levelno for r in records} == {logging.WARNING}


async def test_a_key_without_read_receives_no_stream_event(gateway_factory):
    """Scopes hold on the WebSocket as on REST: a publish-only key connects and publishes, but
    may not subscribe, replay nor ask the status, and gets nothing of the stream."""
    keys = ("pk:publish", "tk:trade", "rk:read")
    async with gateway_factory(API_KEYS=keys) as server:
        async with server.client(additional_headers={"X-API-Key": "pk"}) as publisher:
            connected = await publisher.recv()
            assert connected["type"] == "connected"
            for type_, data in (
                ("subscribe", {"topics": ["all"], "since": 0}),
                ("replay", {"since": 0}),
                ("get_status", None),
            ):
                refused = await publisher.request(type_, data)
                assert refused["type"] == "error", refused
                assert refused["data"]["code"] == "FORBIDDEN_SUBSCRIPTION", refused
    async with gateway_factory(API_KEYS=keys) as server:
        async with (
            server.client(additional_headers={"X-API-Key": "rk"}) as reader,
            server.client(additional_headers={"X-API-Key": "tk"}) as trader,
            server.client(additional_headers={"X-API-Key": "pk"}) as publisher,
        ):
            await reader.greeting()
            assert (await reader.request("subscribe", {"topics": ["all"]}))["type"] == "subscribed"
            assert (await trader.recv())["type"] == "connected"
            assert (await publisher.recv())["type"] == "connected"
            await server.publish("alert", {"level": "info", "message": "for readers"})
            assert (await reader.next_of("alert"))["data"]["message"] == "for readers"
            await trader.no_message(0.5)  # no system_status greeting, no event
            await publisher.no_message(0.1)


def test_a_flood_of_refusals_writes_a_line_per_interval(caplog):
    """4,000 refused requests from one address write one line, then one that counts the rest;
    another line (another address or reason) is written at once."""
    from app.logs import Throttled

    logger = logging.getLogger("app.test_throttled")
    throttled = Throttled(logger, interval=0.2)
    with caplog.at_level(logging.INFO, logger="app.test_throttled"):
        for _ in range(4000):
            throttled.info("refused GET /api/status from %s: %s", "10.0.0.1", "no API key")
        throttled.info("refused GET /api/status from %s: %s", "10.0.0.2", "no API key")
        time.sleep(0.25)
        throttled.info("refused GET /api/status from %s: %s", "10.0.0.1", "no API key")
    assert caplog.messages == [
        "refused GET /api/status from 10.0.0.1: no API key",
        "refused GET /api/status from 10.0.0.2: no API key",
        "refused GET /api/status from 10.0.0.1: no API key (and 3999 more times in the last 0.2 s)",
    ]
