"""A WebSocket echo app served the way the gateway is: Quart on Hypercorn with the settings of
`Config.hypercorn_settings()`. The echo cases of a conformance run (Autobahn|Testsuite or
tests/test_conformance.py) then test the same stack that serves `/api/ws`.

    .venv/bin/python tests/conformance/echo_app.py --port 9001    # ws://127.0.0.1:9001/echo
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from hypercorn.asyncio import serve
from hypercorn.config import Config as HypercornConfig
from quart import Quart, websocket

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # config.py, when run as a script

from config import Config  # noqa: E402

ECHO_PATH = "/echo"


def create_echo_app() -> Quart:
    app = Quart(__name__)

    @app.websocket(ECHO_PATH)
    async def echo() -> None:
        await websocket.accept()
        while True:
            message = await websocket.receive()
            # Quart 0.22 gives None for an empty binary message (`bytes or text` is None).
            await websocket.send(b"" if message is None else message)

    return app


def echo_hypercorn_config(
    sock: socket.socket, config: Config | None = None, **overrides: Any
) -> HypercornConfig:
    """The product's Hypercorn settings, bound to the listening socket `sock`."""
    settings = {
        **(config or Config()).hypercorn_settings(),
        "bind": [f"fd://{sock.detach()}"],
        "graceful_timeout": 1.0,
        **overrides,
    }
    return HypercornConfig.from_mapping(settings)


def listening_socket(port: int = 0) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(128)
    return sock


@asynccontextmanager
async def running_echo(config: Config | None = None, port: int = 0) -> AsyncIterator[int]:
    """Serve the echo app on loopback for the block; yields the port."""
    sock = listening_socket(port)
    port = sock.getsockname()[1]
    stop = asyncio.Event()
    server = asyncio.create_task(
        serve(create_echo_app(), echo_hypercorn_config(sock, config), shutdown_trigger=stop.wait)
    )
    await asyncio.sleep(0)  # the listening socket already accepts: no need to poll
    try:
        yield port
    finally:
        stop.set()
        await asyncio.wait_for(server, 10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=9001)
    args = parser.parse_args()

    async def serve_forever() -> None:
        async with running_echo(Config.from_env(), args.port) as port:
            print(f"echo on ws://127.0.0.1:{port}{ECHO_PATH}", flush=True)
            await asyncio.Event().wait()

    asyncio.run(serve_forever())


if __name__ == "__main__":
    main()
