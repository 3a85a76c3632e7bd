"""The handle tests drive the stand-in exchange process with (tests/standins/exchange.py)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp

from tests.helpers import REPOSITORY, free_port

START_TIMEOUT = 10.0


class ExchangeProcess:
    """The stand-in exchange as a subprocess: start, kill, restart on the same port, and its
    admin endpoints (see tests/standins/exchange.py)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        assert self.process is None, "already running"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.standins.exchange", "--port", str(self.port)],
            cwd=REPOSITORY,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            async with asyncio.timeout(START_TIMEOUT):
                while True:
                    if self.process.poll() is not None:
                        _, errors = self.process.communicate()
                        raise RuntimeError(
                            f"the stand-in exchange did not start: {errors.decode()}"
                        )
                    try:
                        await self.state()
                        return
                    except aiohttp.ClientError:
                        await asyncio.sleep(0.05)
        except TimeoutError:
            self.kill()  # not left running when the test gives up on it
            raise

    def kill(self) -> None:
        """SIGKILL: gone at once, its connections cut."""
        if self.process is not None:
            self.process.kill()
            self.process.wait(5)
            if self.process.stderr is not None:
                self.process.stderr.close()
            self.process = None

    async def restart(self) -> None:
        self.kill()
        await self.start()

    async def state(self) -> dict[str, Any]:
        return await self._call("GET", "/_admin/state")

    async def set_prices(self, prices: dict[str, float]) -> dict[str, Any]:
        return await self._call("POST", "/_admin/prices", prices)

    async def set_fault(self, mode: str, **details: Any) -> dict[str, Any]:
        return await self._call("POST", "/_admin/fault", {"mode": mode, **details})

    async def requests(self, path: str) -> int:
        """How many requests for `path` it has seen."""
        return int((await self.state())["requests"].get(path, 0))

    async def _call(self, method: str, path: str, body: Any = None) -> dict[str, Any]:
        timeout = aiohttp.ClientTimeout(total=5)
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.request(method, self.url + path, json=body) as response,
        ):
            response.raise_for_status()
            result: dict[str, Any] = await response.json()
            return result


@asynccontextmanager
async def exchange_standin() -> AsyncIterator[ExchangeProcess]:
    """A stand-in exchange process on a free loopback port, killed afterwards."""
    exchange = ExchangeProcess(free_port())
    await exchange.start()
    try:
        yield exchange
    finally:
        exchange.kill()
