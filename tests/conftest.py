"""Fixtures (the helpers they use are in tests/helpers.py)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from functools import partial
from typing import Any

import pytest

from app.services.database import migrate
from tests.helpers import (
    REDIS_URL,
    WRITE_PATHS,
    RunningGateway,
    fresh_postgres,
    running_gateway,
    unavailable,
)


@pytest.fixture(params=WRITE_PATHS)
async def server(request: pytest.FixtureRequest) -> AsyncIterator[RunningGateway]:
    async with running_gateway(WS_FAST_PATH=request.param) as running:
        yield running


@pytest.fixture(params=WRITE_PATHS)
def gateway_factory(request: pytest.FixtureRequest) -> Callable[..., Any]:
    """`async with gateway_factory(WS_MAX_CONNECTIONS=2) as server:`, for other settings."""
    return partial(running_gateway, WS_FAST_PATH=request.param)


@pytest.fixture(params=["sqlite", "postgresql"])
async def database_url(request: pytest.FixtureRequest, tmp_path: Any) -> AsyncIterator[str]:
    """A fresh, migrated database of each kind."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path}/trading.db"
        await migrate(url)
        yield url
    else:
        async with fresh_postgres() as url:
            await migrate(url)
            yield url


@pytest.fixture
async def redis_prefix() -> AsyncIterator[tuple[str, str]]:
    """(REDIS_URL, a key prefix of its own) on the machine's Redis; its keys are removed after."""
    import redis.asyncio as aioredis
    from redis.exceptions import RedisError

    client = aioredis.from_url(REDIS_URL, socket_connect_timeout=3)
    try:
        await client.ping()
    except (RedisError, OSError) as error:
        await client.aclose()
        unavailable("Redis at " + REDIS_URL, error)
    prefix = f"sigmax-test-{uuid.uuid4().hex[:10]}"
    try:
        yield REDIS_URL, prefix
    finally:
        keys = [key async for key in client.scan_iter(f"{prefix}:*")]
        if keys:
            await client.delete(*keys)
        await client.aclose()
