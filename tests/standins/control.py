"""The handles tests drive their stand-in processes with: any server module of theirs, and the
stand-in exchange (tests/standins/exchange.py)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp

from tests.helpers import REPOSITORY, free_port

START_TIMEOUT = 20.0


class StandinProcess:
    """A server of the tests' own as a subprocess (`python -m MODULE --port P`) on a fixed
    loopback port: started (once `ready_path` answers 200), killed, started again."""

    ready_path = "/health"

    def __init__(self, module: str, port: int, env: dict[str, str] | None = None) -> None:
        self.argv = ["-m", *module.split(), "--port", str(port)]
        self.port = port
        self.env = env or {}
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        assert self.process is None, "already running"
        self.process = process = subprocess.Popen(
            [sys.executable, *self.argv],
            cwd=REPOSITORY,
            env={**os.environ, **self.env},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            async with asyncio.timeout(START_TIMEOUT), aiohttp.ClientSession() as session:
                while True:
                    if process.poll() is not None:
                        _, errors = process.communicate()
                        raise RuntimeError(f"{self.argv} did not start: {errors.decode()}")
                    try:
                        async with session.get(self.url + self.ready_path) as response:
                            if response.status == 200:
                                return
                    except aiohttp.ClientError:
                        pass
                    await asyncio.sleep(0.05)
        except BaseException:
            self.kill()  # not left running when the test gives up on it
            raise

    def kill(self) -> None:
        """SIGKILL: gone at once, its connections cut."""
        if self.process is not None:
            self.process.kill()
            self.process.wait(10)
            if self.process.stderr is not None:
                self.process.stderr.close()
            self.process = None

    async def restart(self) -> None:
        self.kill()
        await self.start()


@asynccontextmanager
async def standin(module: str, env: dict[str, str] | None = None) -> AsyncIterator[StandinProcess]:
    """`python -m module` on a free loopback port, killed afterwards."""
    process = StandinProcess(module, free_port(), env)
    await process.start()
    try:
        yield process
    finally:
        process.kill()


class ExchangeProcess(StandinProcess):
    """The stand-in exchange, with its admin endpoints (see tests/standins/exchange.py)."""

    ready_path = "/_admin/state"

    def __init__(self, port: int) -> None:
        super().__init__("tests.standins.exchange", port)

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
