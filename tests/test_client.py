"""The client package (`client/`, `sigmax_client`) against a real gateway in a real Hypercorn on
loopback: the spec's examples, request/reply matching, errors, reconnect and resume across
restarts and worker changes, dead connections, back-pressure, clean shutdown, and the CLI."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import sys
import textwrap
import tomllib
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import websockets
from websockets.asyncio.server import ServerConnection
from websockets.asyncio.server import serve as serve_websocket

from app.services.database import migrate
from app.services.events import Event
from tests.helpers import (
    RunningGateway,
    free_port,
    own_redis,
    reader_paused,
    running_gateway,
)

# The package under test is this repository's client/, installed or not.
CLIENT_DIR = Path(__file__).resolve().parents[1] / "client"
sys.path.insert(0, str(CLIENT_DIR))

from sigmax_client import (  # noqa: E402
    DEFAULT_URL,
    RESYNC_REQUIRED,
    AuthenticationError,
    InvalidSubscriptionError,
    RequestError,
    SigmaxWebSocketClient,
    WSEvent,
    backoff_delay,
    connect_sigmax,
)
from sigmax_client.cli import main as cli_main  # noqa: E402

pytestmark = pytest.mark.timeout(60)

# Short reconnect delays: the tests restart gateways and cut connections.
FAST = {"reconnect_delay": 0.05, "max_reconnect_delay": 0.5}

PROPOSAL = {
    "proposal_id": "prop_123",
    "symbol": "BTC/USDT",
    "action": "buy",
    "size": 0.001,
    "reason": "Agent consensus: strong buy signal",
    "created_at": "2025-12-21T10:30:00.000Z",
}
TRADE = {
    "proposal_id": "prop_123",
    "symbol": "BTC/USDT",
    "action": "buy",
    "size": 0.001,
    "filled_price": 95000.0,
    "order_id": "order_456",
    "status": "filled",
    "fee": 0.095,
    "timestamp": "2025-12-21T10:31:00.000Z",
}
ANALYSIS = {
    "symbol": "BTC/USDT",
    "decision": "buy",
    "confidence": 0.75,
    "bull_score": 0.8,
    "bear_score": 0.4,
    "reasoning": "Strong upward momentum with increasing volume",
}
MARKET = [
    {"symbol": "BTC/USDT", "price": 95000.0, "volume_24h": 1000000, "change_24h": 2.5},
    {"symbol": "ETH/USDT", "price": 3500.0, "volume_24h": 500000, "change_24h": 1.8},
]
PORTFOLIO = {
    "total_value": 100000.0,
    "available_cash": 50000.0,
    "positions": [
        {
            "symbol": "BTC/USDT",
            "size": 0.5,
            "entry_price": 90000.0,
            "current_price": 95000.0,
            "value": 47500.0,
            "pnl": 2500.0,
            "pnl_percent": 5.56,
        }
    ],
    "total_pnl": 5000.0,
    "total_pnl_percent": 5.0,
}
HEALTH = {"cpu_percent": 45.2, "memory_percent": 62.1, "disk_percent": 35.0, "process_count": 150}


# -- helpers ------------------------------------------------------------------------------------


async def until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


async def publish_alerts(
    server: RunningGateway, count: int, *, start: int = 0, symbol: str | None = None, pad: str = ""
) -> list[int]:
    """Publish `count` alerts; their seqs."""
    seqs = []
    for n in range(start, start + count):
        data = {"level": "info", "message": f"alert {n}", "n": n}
        if pad:
            data["pad"] = pad
        seqs.append((await server.publish("alert", data, symbol=symbol)).seq)
    return seqs


class Collector:
    """Consumes `client.listen()` in a task and keeps every event."""

    def __init__(self, client: SigmaxWebSocketClient, delay: float = 0.0) -> None:
        self.events: list[WSEvent] = []
        self._delay = delay
        self.task = asyncio.create_task(self._collect(client))

    async def _collect(self, client: SigmaxWebSocketClient) -> None:
        async for event in client.listen():
            self.events.append(event)
            if self._delay:
                await asyncio.sleep(self._delay)

    @property
    def seqs(self) -> list[int]:
        return [e.seq for e in self.events if e.seq is not None]

    async def wait_for(self, count: int, timeout: float = 10.0) -> None:
        """Until `count` stream events arrived (raising if the listener failed)."""
        async with asyncio.timeout(timeout):
            while len(self.seqs) < count:
                if self.task.done():
                    self.task.result()
                    raise AssertionError(f"listen() ended after {len(self.seqs)} events")
                await asyncio.sleep(0.01)


@pytest.fixture
async def clients() -> AsyncIterator[Callable[..., SigmaxWebSocketClient]]:
    """`clients(**options)`: a new client, disconnected at the end of the test."""
    made: list[SigmaxWebSocketClient] = []

    def make(**options: Any) -> SigmaxWebSocketClient:
        client = SigmaxWebSocketClient(**options)
        made.append(client)
        return client

    yield make
    for client in made:
        await client.disconnect()


@dataclass
class _Link:
    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter
    flowing: asyncio.Event = field(default_factory=asyncio.Event)


class TcpProxy:
    """A loopback TCP proxy to a gateway that a test can freeze (the connections stay open
    and nothing goes through: a dead peer), cut, refuse, or point at another gateway."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.refusing = False
        self.connections = 0
        self.port = 0
        self._server: asyncio.Server | None = None
        self._links: list[_Link] = []
        self._tasks: set[asyncio.Task[Any]] = set()

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/api/ws"

    async def __aenter__(self) -> TcpProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._server is not None
        self._server.close()
        self.cut()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def freeze(self) -> None:
        for link in self._links:
            link.flowing.clear()

    def cut(self) -> None:
        for link in self._links:
            link.client.transport.abort()
            link.upstream.transport.abort()
        self._links.clear()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            if self.refusing:
                writer.transport.abort()
                return
            try:
                up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
            except OSError:
                writer.transport.abort()
                return
            self.connections += 1
            link = _Link(writer, up_writer)
            link.flowing.set()
            self._links.append(link)
            await asyncio.gather(
                self._pump(reader, up_writer, link), self._pump(up_reader, writer, link)
            )
        finally:
            self._tasks.discard(task)

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, link: _Link
    ) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                await link.flowing.wait()
                writer.write(data)
                await writer.drain()
        writer.transport.abort()


@asynccontextmanager
async def fake_gateway(script: Callable[[ServerConnection], Awaitable[None]]) -> AsyncIterator[str]:
    """A WebSocket server of the test's own that greets like the gateway, then runs `script`."""

    async def handler(ws: ServerConnection) -> None:
        await ws.send(
            json.dumps(
                {
                    "type": "connected",
                    "data": {"connection_id": "fake", "last_seq": 0},
                    "timestamp": "2025-12-21T10:30:00.000Z",
                    "connection_id": "fake",
                }
            )
        )
        with contextlib.suppress(websockets.ConnectionClosed):
            await script(ws)

    async with serve_websocket(handler, "127.0.0.1", 0) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        yield f"ws://127.0.0.1:{port}/api/ws"


def client_side_tasks(tasks: set[asyncio.Task[Any]]) -> list[asyncio.Task[Any]]:
    """The tasks running code of this package or of the websockets library (the gateway is
    Hypercorn and wsproto, so none of these are the gateway's)."""
    roots = (str(CLIENT_DIR), str(Path(websockets.__file__).parent))
    found = []
    for task in tasks:
        code = getattr(task.get_coro(), "cr_code", None)
        if task.get_name().startswith("sigmax-client") or (
            code is not None and code.co_filename.startswith(roots)
        ):
            found.append(task)
    return found


# -- the spec's examples, run unchanged but for their import line ------------------------------

SPEC_URL = "ws://localhost:8000/api/ws"

BASIC_USAGE = """
import asyncio
from ui.api.clients.websocket_client import SigmaxWebSocketClient

async def main():
    # Create client
    client = SigmaxWebSocketClient()

    # Connect
    await client.connect("ws://localhost:8000/api/ws")

    # Subscribe to topics
    await client.subscribe(
        topics=["proposals", "executions"],
        symbols=["BTC/USDT", "ETH/USDT"]
    )

    # Listen for events
    async for event in client.listen():
        print(f"Event: {event.type}")
        print(f"Data: {event.data}")
        print(f"Timestamp: {event.timestamp}")

asyncio.run(main())
"""

EVENT_CALLBACKS = """
def handle_proposal(event):
    if event.type == "proposal_created":
        print(f"New proposal: {event.data['proposal_id']}")
        print(f"Symbol: {event.data['symbol']}")
        print(f"Action: {event.data['action']}")

client = SigmaxWebSocketClient()
client.on_event(handle_proposal)

await client.connect("ws://localhost:8000/api/ws")
await client.subscribe(topics=["proposals"])
"""

QUICK_CONNECT = """
from ui.api.clients.websocket_client import connect_sigmax

# One-line connect with subscriptions
client = await connect_sigmax(
    url="ws://localhost:8000/api/ws",
    topics=["proposals", "executions"],
    symbols=["BTC/USDT"]
)

async for event in client.listen():
    print(event.type, event.data)
"""

MONITOR_TRADING = """
import asyncio
from ui.api.clients.websocket_client import connect_sigmax

async def monitor_trading():
    client = await connect_sigmax(
        topics=["proposals", "executions", "analysis"]
    )

    async for event in client.listen():
        if event.type == "proposal_created":
            print(f"New Proposal: {event.data['symbol']} - {event.data['action']}")

        elif event.type == "trade_executed":
            print(f"Trade Executed: {event.data['symbol']} @ {event.data['filled_price']}")

        elif event.type == "analysis_update":
            print(f"📊 Analysis: {event.data['symbol']} - {event.data['decision']} (conf: {event.data['confidence']})")

asyncio.run(monitor_trading())
"""  # noqa: E501

TRACK_BTC = """
async def track_btc():
    client = await connect_sigmax(
        symbols=["BTC/USDT"],
        topics=["market", "analysis"]
    )

    async for event in client.listen():
        if event.type == "market_update":
            for market in event.data:
                if market['symbol'] == 'BTC/USDT':
                    print(f"BTC Price: ${market['price']:,.2f}")

        elif event.type == "analysis_update":
            print(f"BTC Analysis: {event.data['decision']} - {event.data['reasoning']}")

asyncio.run(track_btc())
"""

PORTFOLIO_DASHBOARD = """
async def portfolio_dashboard():
    client = await connect_sigmax(
        topics=["portfolio", "executions", "health"]
    )

    async for event in client.listen():
        if event.type == "portfolio_update":
            data = event.data
            print(f"\\n💼 Portfolio Update")
            print(f"   Total Value: ${data['total_value']:,.2f}")
            print(f"   Cash: ${data['available_cash']:,.2f}")
            print(f"   P&L: ${data['total_pnl']:,.2f} ({data['total_pnl_percent']:.2f}%)")

            for pos in data['positions']:
                print(f"   {pos['symbol']}: {pos['size']} @ ${pos['current_price']:,.2f} (P&L: ${pos['pnl']:,.2f})")

        elif event.type == "trade_executed":
            print(f"\\n🔔 Trade: {event.data['action']} {event.data['size']} {event.data['symbol']} @ ${event.data['filled_price']:,.2f}")

        elif event.type == "health_update":
            health = event.data
            print(f"\\nSystem Health: CPU {health['cpu_percent']:.1f}% | Memory {health['memory_percent']:.1f}%")

asyncio.run(portfolio_dashboard())
"""  # noqa: E501

CLIENT_SETTINGS = """
client = SigmaxWebSocketClient(
    auto_reconnect=True,
    max_reconnect_delay=60.0,
    ping_interval=30.0,
    ping_timeout=10.0
)
"""

CLIENT_ERROR_HANDLING = """
try:
    client = SigmaxWebSocketClient()
    await client.connect("ws://localhost:8000/api/ws")
    await client.subscribe(topics=["proposals"])

except RuntimeError as e:
    print(f"Connection error: {e}")

except ValueError as e:
    print(f"Invalid subscription: {e}")

except Exception as e:
    print(f"Unexpected error: {e}")
"""

SUBSCRIBE_NEEDED_TOPICS = """
# Bad: Subscribe to everything
await client.subscribe(topics=["all"])

# Good: Subscribe to specific topics
await client.subscribe(topics=["proposals", "executions"])
"""

SYMBOL_SUBSCRIPTIONS = """
# Good: Only get updates for trading symbols
await client.subscribe(symbols=["BTC/USDT", "ETH/USDT"])
"""

RECONNECTION = """
client = SigmaxWebSocketClient(
    auto_reconnect=True,
    max_reconnect_delay=60.0
)

# Client will automatically reconnect and restore subscriptions
"""

CALLBACKS_FOR_ACTIONS = """
def on_proposal(event):
    if event.type == "proposal_created":
        # Take immediate action
        approve_proposal(event.data['proposal_id'])

client.on_event(on_proposal)
"""

MONITOR_CONNECTION_HEALTH = """
async def main():
    client = SigmaxWebSocketClient()
    await client.connect("ws://localhost:8000/api/ws")

    while True:
        if not client.is_connected():
            logger.warning("Connection lost, waiting for reconnect...")
            await asyncio.sleep(5)

        await asyncio.sleep(1)
"""

CLEAN_DISCONNECT = """
try:
    async for event in client.listen():
        # Process events
        pass
finally:
    # Always disconnect cleanly
    await client.disconnect()
"""


class Output:
    """Stands in for `print` and for a logger in an example: keeps what it is given."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def print(self, *args: Any, **_: Any) -> None:
        self.lines.extend(" ".join(str(a) for a in args).split("\n"))

    def warning(self, message: str, *args: Any) -> None:
        self.lines.append(message % args if args else message)

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


def spec_example(source: str, output: Output, **names: Any) -> Callable[[], Awaitable[Any]]:
    """The example as a coroutine function: its text unchanged but for the import line (from
    `sigmax_client`), with top-level `await` allowed (as in a notebook) and `asyncio.run(f())`
    as `await f()` (the test runs inside an event loop already). Returns the example's names."""
    lines = []
    for line in textwrap.dedent(source).strip("\n").splitlines():
        line = line.replace(
            "from ui.api.clients.websocket_client import", "from sigmax_client import"
        )
        run = re.fullmatch(r"asyncio\.run\((\w+)\(\)\)", line)
        lines.append(f"await {run.group(1)}()" if run else line)
    code = "async def example():\n" + textwrap.indent("\n".join(lines), "    ")
    code += "\n    return locals()\n"
    # The names the spec's earlier snippets imported, as a notebook would still have them.
    namespace: dict[str, Any] = {
        "asyncio": asyncio,
        "SigmaxWebSocketClient": SigmaxWebSocketClient,
        "connect_sigmax": connect_sigmax,
        "print": output.print,
        **names,
    }
    exec(compile(code, "<spec example>", "exec"), namespace)
    example: Callable[[], Awaitable[Any]] = namespace["example"]
    return example


@pytest.fixture
async def spec_clients(
    monkeypatch: pytest.MonkeyPatch,
) -> AsyncIterator[Callable[[str], list[SigmaxWebSocketClient]]]:
    """`spec_clients(url)`: from then on the spec's address (localhost:8000) reaches `url`;
    returns the clients that connect, which are disconnected at the end of the test."""
    made: list[SigmaxWebSocketClient] = []
    connect = SigmaxWebSocketClient.connect

    def redirect(url: str) -> list[SigmaxWebSocketClient]:
        async def connect_to_test_gateway(
            self: SigmaxWebSocketClient, target: str = DEFAULT_URL, api_key: str | None = None
        ) -> None:
            made.append(self)
            await connect(self, url if target == SPEC_URL else target, api_key)

        monkeypatch.setattr(SigmaxWebSocketClient, "connect", connect_to_test_gateway)
        return made

    yield redirect
    for client in made:
        await client.disconnect()


SPEC_RUNS = [
    pytest.param(
        BASIC_USAGE,
        [("proposal_created", PROPOSAL), ("trade_executed", TRADE)],
        ["Event: proposal_created", f"Data: {PROPOSAL}", "Event: trade_executed", f"Data: {TRADE}"],
        id="basic-usage",
    ),
    pytest.param(
        EVENT_CALLBACKS,
        [("proposal_created", PROPOSAL)],
        ["New proposal: prop_123", "Symbol: BTC/USDT", "Action: buy"],
        id="event-callbacks",
    ),
    pytest.param(
        QUICK_CONNECT,
        [("proposal_created", PROPOSAL)],
        [f"proposal_created {PROPOSAL}"],
        id="quick-connect",
    ),
    pytest.param(
        MONITOR_TRADING,
        [("proposal_created", PROPOSAL), ("trade_executed", TRADE), ("analysis_update", ANALYSIS)],
        [
            "New Proposal: BTC/USDT - buy",
            "Trade Executed: BTC/USDT @ 95000.0",
            "📊 Analysis: BTC/USDT - buy (conf: 0.75)",
        ],
        id="monitor-trading",
    ),
    pytest.param(
        TRACK_BTC,
        [("market_update", MARKET), ("analysis_update", ANALYSIS)],
        [
            "BTC Price: $95,000.00",
            "BTC Analysis: buy - Strong upward momentum with increasing volume",
        ],
        id="track-btc",
    ),
    pytest.param(
        PORTFOLIO_DASHBOARD,
        [("portfolio_update", PORTFOLIO), ("trade_executed", TRADE), ("health_update", HEALTH)],
        [
            "💼 Portfolio Update",
            "   Total Value: $100,000.00",
            "   Cash: $50,000.00",
            "   P&L: $5,000.00 (5.00%)",
            "   BTC/USDT: 0.5 @ $95,000.00 (P&L: $2,500.00)",
            "🔔 Trade: buy 0.001 BTC/USDT @ $95,000.00",
            "System Health: CPU 45.2% | Memory 62.1%",
        ],
        id="portfolio-dashboard",
    ),
]


@pytest.mark.parametrize(("source", "events", "expected"), SPEC_RUNS)
async def test_spec_example_runs_unchanged(server, spec_clients, source, events, expected):
    made = spec_clients(server.url)
    output = Output()
    example = asyncio.create_task(spec_example(source, output)())
    await until(lambda: bool(made) and all(c.topics or c.symbols for c in made))
    for type_, data in events:
        await server.publish(
            type_, data, symbol=data.get("symbol") if isinstance(data, dict) else None
        )
    await until(lambda: all(line in output.lines for line in expected))
    for client in made:
        await client.disconnect()
    await asyncio.wait_for(example, 5)  # listen() ended, so the example returned


async def test_spec_client_settings():
    for source in (CLIENT_SETTINGS, RECONNECTION):
        client = (await spec_example(source, Output())())["client"]
        assert client.auto_reconnect is True
        assert client.max_reconnect_delay == 60.0
        assert (client.ping_interval, client.ping_timeout) == (30.0, 10.0)
        assert not client.is_connected()


async def test_spec_client_error_handling(server, spec_clients):
    output = Output()
    spec_clients(f"ws://127.0.0.1:{free_port()}/api/ws")
    await spec_example(CLIENT_ERROR_HANDLING, output)()
    assert len(output.lines) == 1
    assert output.lines[0].startswith("Connection error: cannot connect to ws://127.0.0.1:")

    output = Output()
    made = spec_clients(server.url)
    await spec_example(CLIENT_ERROR_HANDLING, output)()
    assert output.lines == []
    assert made[-1].topics == ("proposals",)


async def test_spec_best_practices_subscriptions_and_callbacks(server, clients):
    client = clients()
    await client.connect(server.url)
    await spec_example(SUBSCRIBE_NEEDED_TOPICS, Output(), client=client)()
    await spec_example(SYMBOL_SUBSCRIPTIONS, Output(), client=client)()
    assert client.topics == ("all", "proposals", "executions")
    assert client.symbols == ("BTC/USDT", "ETH/USDT")
    approved: list[str] = []
    await spec_example(
        CALLBACKS_FOR_ACTIONS, Output(), client=client, approve_proposal=approved.append
    )()
    await server.publish("proposal_created", PROPOSAL, symbol="BTC/USDT")
    await until(lambda: approved == ["prop_123"])
    await asyncio.sleep(0.1)
    assert approved == ["prop_123"]  # once, though `all` and the symbol both match


async def test_spec_monitor_connection_health(gateway_factory, spec_clients):
    output = Output()
    async with gateway_factory() as server:
        made = spec_clients(server.url)
        names = await spec_example(MONITOR_CONNECTION_HEALTH, output, logger=output)()
        monitor = asyncio.create_task(names["main"]())
        await until(lambda: bool(made) and made[0].is_connected())
        await asyncio.sleep(1.2)
        assert output.lines == []
    # The gateway is gone: the example's loop sees it within its 1 s tick.
    await until(lambda: "Connection lost, waiting for reconnect..." in output.lines, timeout=3)
    monitor.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await monitor


async def test_spec_clean_disconnect_in_finally(server, clients):
    client = clients()
    await client.connect(server.url)
    await client.subscribe(topics=["alerts"])
    example = asyncio.create_task(spec_example(CLEAN_DISCONNECT, Output(), client=client)())
    await publish_alerts(server, 3)
    await until(lambda: client.last_seq == 3 and client.buffered_events == 0)
    example.cancel()  # the application stops: the example's finally disconnects
    with pytest.raises(asyncio.CancelledError):
        await example
    assert not client.is_connected()
    assert client_side_tasks(asyncio.all_tasks()) == []


# -- the API ------------------------------------------------------------------------------------


async def test_the_client_offers_no_compression(server, clients):
    """The gateway sends every event uncompressed: permessage-deflate would only cost each
    connection its zlib state (42 KB on the gateway, benchmarks/README.md)."""
    client = clients()
    await client.connect(server.url)
    assert client._ws is not None
    assert client._ws.request.headers.get("Sec-WebSocket-Extensions") is None
    assert client._ws.response.headers.get("Sec-WebSocket-Extensions") is None


async def test_events_have_type_data_timestamp_and_seq(server, clients):
    client = clients()
    await client.connect(server.url)
    assert client.is_connected()
    confirmed = await client.subscribe(topics=["proposals"], symbols=["btc/usdt"])
    assert confirmed["symbols"] == ["BTC/USDT"]
    assert (client.topics, client.symbols) == (("proposals",), ("BTC/USDT",))
    published = [
        await server.publish("proposal_created", PROPOSAL, symbol="BTC/USDT"),
        await server.publish("alert", {"level": "info", "message": "x"}, symbol="BTC/USDT"),
    ]
    events = []
    async for event in client.listen():
        events.append(event)
        if len(events) == 2:
            break
    assert [(e.type, e.data, e.seq) for e in events] == [(p.type, p.data, p.seq) for p in published]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", events[0].timestamp)
    assert events[0].time is not None and events[0].time.tzinfo is not None
    assert client.last_seq == published[-1].seq


async def test_sync_and_async_callbacks_get_every_event_in_order(server, clients, caplog):
    client = clients()
    sync_seen: list[int | None] = []
    async_seen: list[int | None] = []

    def broken(event: WSEvent) -> None:
        raise RuntimeError("a bug in the application's callback")

    client.on_event(lambda event: sync_seen.append(event.seq))

    @client.on_event
    async def on_async(event: WSEvent) -> None:
        await asyncio.sleep(0)
        async_seen.append(event.seq)

    client.on_event(broken)
    await client.connect(server.url)
    await client.subscribe(topics=["alerts"])
    published = await publish_alerts(server, 20)
    await until(lambda: len(sync_seen) == 20 and len(async_seen) == 20)
    assert sync_seen == async_seen == published
    assert "event callback" in caplog.text and "a bug in the application" in caplog.text
    with pytest.raises(TypeError):
        client.on_event("not callable")  # type: ignore[arg-type]


async def test_connect_sigmax_connects_and_subscribes(server):
    client = await connect_sigmax(
        server.url, topics=["alerts"], symbols=["ETH/USDT"], ping_interval=5.0
    )
    try:
        assert client.is_connected() and client.ping_interval == 5.0
        assert await client.get_subscriptions() == {
            "topics": ["alerts"],
            "symbols": ["ETH/USDT"],
            "count": 2,
        }
        published = await publish_alerts(server, 2)
        seqs = []
        async for event in client.listen():
            seqs.append(event.seq)
            if len(seqs) == 2:
                break
        assert seqs == published
    finally:
        await client.disconnect()
    defaults = connect_sigmax.__kwdefaults__ or {}
    assert connect_sigmax.__defaults__ == ("ws://localhost:8000/api/ws", None, None)
    assert defaults["api_key"] is None
    with pytest.raises(ValueError):
        await connect_sigmax(server.url, topics=["nope"])


async def test_unsubscribe_and_get_subscriptions(server, clients):
    client = clients()
    await client.connect(server.url)
    await client.subscribe(topics=["alerts", "proposals"], symbols=["BTC/USDT"])
    reply = await client.unsubscribe(topics=["alerts"])
    assert reply["topics"] == ["alerts"]
    assert client.topics == ("proposals",)
    assert await client.get_subscriptions() == {
        "topics": ["proposals"],
        "symbols": ["BTC/USDT"],
        "count": 2,
    }
    await server.publish("alert", {"level": "info", "message": "not for us"})
    proposal = await server.publish("proposal_created", PROPOSAL)
    async for event in client.listen():
        assert (event.type, event.seq) == ("proposal_created", proposal.seq)
        break


async def test_get_status_and_commands_get_their_own_reply_under_a_flood(gateway_factory, clients):
    settings = {
        "WS_SEND_QUEUE_SIZE": 100_000,
        "WS_COMMAND_RATE": 10_000,
        "WS_COMMAND_BURST": 10_000,
    }
    async with gateway_factory(**settings) as server:
        client = clients(request_timeout=20)
        await client.connect(server.url)
        await client.subscribe(topics=["all"])
        collector = Collector(client)
        published: list[int] = []

        async def flood() -> None:
            # Decoys: stream events of the very types the replies have.
            kinds = ("system_status", "health_update", "portfolio_update", "alert")
            for batch in range(20):
                events = [Event(kinds[n % 4], {"decoy": batch * 200 + n}) for n in range(200)]
                await server.gateway.bus.publish(events)
                published.extend(e.seq for e in events)
                await asyncio.sleep(0)

        async def ask(rounds: int) -> int:
            for _ in range(rounds):
                status = await client.get_status()
                assert "uptime_seconds" in status and "decoy" not in status
                health = await client.command("get_health")
                assert "cpu_percent" in health and "decoy" not in health
                portfolio = await client.command("get_portfolio")
                assert "available_cash" in portfolio and "decoy" not in portfolio
                assert (await client.get_subscriptions())["topics"] == ["all"]
            return rounds

        assert await asyncio.gather(flood(), ask(25), ask(25)) == [None, 25, 25]
        await collector.wait_for(len(published))
        assert collector.seqs == published


async def test_a_request_inside_the_listen_loop_does_not_deadlock(server, clients):
    client = clients(queue_size=3)
    await client.connect(server.url)
    await client.subscribe(topics=["alerts"])
    published = await publish_alerts(server, 100)
    seen = []
    async for event in client.listen():
        seen.append(event.seq)
        if len(seen) == 1:
            # The reply is behind 99 unread events and the buffer holds 3: it still comes.
            assert (await client.get_status())["last_seq"] == published[-1]
        if len(seen) == len(published):
            break
    assert seen == published


async def test_a_slow_application_gets_back_pressure_not_an_unbounded_queue(server, clients):
    client = clients(queue_size=10)
    await client.connect(server.url)
    await client.subscribe(topics=["alerts"])
    published = await publish_alerts(server, 300)
    await until(lambda: client.buffered_events == 10)
    await asyncio.sleep(0.2)
    assert client.buffered_events == 10  # the reader waits; the rest stays in the sockets
    seen = []
    async for event in client.listen():
        seen.append(event.seq)
        if len(seen) == len(published):
            break
    assert seen == published


async def test_callbacks_alone_never_stall_the_client(server, clients):
    client = clients(queue_size=5)
    seen: list[int | None] = []
    client.on_event(lambda event: seen.append(event.seq))
    await client.connect(server.url)
    await client.subscribe(topics=["alerts"])
    published = await publish_alerts(server, 100)
    await until(lambda: len(seen) == 100)
    assert seen == published
    assert (await client.get_status())["status"] == "running"


async def test_an_async_callback_may_await_a_command(server, clients):
    client = clients(queue_size=2)
    results: list[Any] = []

    @client.on_event
    async def on_alert(event: WSEvent) -> None:
        if event.data["n"] % 10 == 0:  # e.g. approve a proposal the moment it arrives
            results.append(await client.command("get_health"))

    await client.connect(server.url)
    await client.subscribe(topics=["alerts"])
    await publish_alerts(server, 100)
    await until(lambda: len(results) == 10)
    assert all("cpu_percent" in result for result in results)


async def test_invalid_subscriptions_raise_value_error(server, clients):
    client = clients()
    await client.connect(server.url)
    with pytest.raises(ValueError, match="INVALID_TOPIC") as raised:
        await client.subscribe(topics=["proposals", "nope"])
    assert isinstance(raised.value, InvalidSubscriptionError)
    # Not a RuntimeError: the spec's `except RuntimeError` before `except ValueError` works.
    assert not isinstance(raised.value, RuntimeError)
    assert raised.value.code == "INVALID_TOPIC" and "nope" in (raised.value.details or "")
    with pytest.raises(ValueError, match="INVALID_SYMBOL"):
        await client.subscribe(symbols=["BTCUSDT"])
    with pytest.raises(ValueError, match="INVALID_SYMBOL"):
        await client.unsubscribe(symbols=["not a symbol"])
    assert (client.topics, client.symbols) == ((), ())
    assert (await client.get_subscriptions())["count"] == 0
    await client.subscribe(topics="proposals")
    assert client.topics == ("proposals",)


async def test_command_errors_are_runtime_errors_with_the_gateway_code(server, clients):
    client = clients()
    await client.connect(server.url)
    with pytest.raises(RuntimeError, match="MESSAGE_PROCESSING_ERROR") as raised:
        await client.command("no_such_command")
    assert isinstance(raised.value, RequestError)
    with pytest.raises(RequestError, match="symbol"):
        await client.command("analyze")
    assert "available_cash" in await client.command("get_portfolio")


async def test_connection_refused_raises_runtime_error(server, clients):
    client = clients()
    url = f"ws://127.0.0.1:{free_port()}/api/ws"
    with pytest.raises(RuntimeError, match="cannot connect to ws://127.0.0.1"):
        await client.connect(url)
    assert not client.is_connected()
    with pytest.raises(RuntimeError):
        await client.get_status()
    with pytest.raises(RuntimeError):
        client.listen()
    with pytest.raises(RuntimeError, match="cannot connect"):
        await connect_sigmax(url, topics=["alerts"])
    with pytest.raises(RuntimeError, match="cannot connect"):  # an HTTP page, not the gateway
        await client.connect(server.url.replace("/api/ws", "/api/health"))
    await client.connect(server.url)  # the same client connects once the gateway is there
    assert client.is_connected()
    with pytest.raises(RuntimeError, match="already connected"):
        await client.connect(server.url)


async def test_api_keys(gateway_factory, clients):
    async with gateway_factory(API_KEYS=("sekret",)) as server:
        client = clients()
        for key in ("wrong", None):
            with pytest.raises(AuthenticationError) as raised:
                await client.connect(server.url, api_key=key)
            assert isinstance(raised.value, RuntimeError)
            assert raised.value.code == "AUTHENTICATION_FAILED"
        await client.connect(server.url, api_key="sekret")
        assert (await client.get_status())["status"] == "running"
        await client.disconnect()


async def test_disconnect_ends_listen_and_leaves_no_task(server):
    before = asyncio.all_tasks()
    client = await connect_sigmax(server.url, topics=["alerts"], ping_interval=0.05)
    callback_seen: list[WSEvent] = []

    async def remember(event: WSEvent) -> None:
        callback_seen.append(event)

    client.on_event(remember)
    collector = Collector(client)
    await publish_alerts(server, 5)
    await collector.wait_for(5)
    await until(lambda: len(callback_seen) == 5)
    await asyncio.sleep(0.2)  # heartbeats go out and come back
    await client.disconnect()
    await asyncio.wait_for(collector.task, 2)  # listen() ended, without an error
    assert not client.is_connected()
    new_tasks = asyncio.all_tasks() - before - {asyncio.current_task()}
    assert client_side_tasks(new_tasks) == []
    await until(lambda: not server.gateway.manager.connections)  # the gateway saw it close
    with pytest.raises(RuntimeError, match="disconnected"):
        await client.get_status()
    assert [e async for e in client.listen()] == []
    await client.disconnect()  # twice is harmless


async def test_disconnect_while_reconnecting_leaves_no_task(gateway_factory):
    before = asyncio.all_tasks()
    async with gateway_factory() as server:
        client = await connect_sigmax(server.url, topics=["alerts"], **FAST)
        status = asyncio.create_task(client.get_status())
        assert (await status)["status"] == "running"
    await until(lambda: not client.is_connected())
    waiting = asyncio.create_task(client.get_status())  # waits for a connection
    await asyncio.sleep(0.3)
    await client.disconnect()
    with pytest.raises(RuntimeError, match="disconnected"):
        await waiting
    assert client_side_tasks(asyncio.all_tasks() - before) == []


async def test_without_auto_reconnect_listen_raises_when_the_connection_is_lost(
    gateway_factory, clients
):
    async with gateway_factory() as server:
        client = clients(auto_reconnect=False)
        await client.connect(server.url)
        await client.subscribe(topics=["alerts"])
        collector = Collector(client)
        published = await publish_alerts(server, 3)
        await collector.wait_for(3)
    with pytest.raises(RuntimeError, match="connection to .* lost"):
        await asyncio.wait_for(collector.task, 5)
    assert collector.seqs == published
    assert not client.is_connected()
    with pytest.raises(RuntimeError, match="lost"):
        await client.get_status()


# -- reconnect and resume -----------------------------------------------------------------------


async def test_resumes_across_a_restart_without_gap_or_duplicate(redis_prefix, tmp_path, clients):
    redis_url, prefix = redis_prefix
    database = f"sqlite:///{tmp_path}/gateway.db"
    await migrate(database)
    settings = {"REDIS_URL": redis_url, "REDIS_PREFIX": prefix, "DATABASE_URL": database}
    port = free_port()
    client = clients(queue_size=10, **FAST)
    published: list[int] = []
    async with running_gateway(port=port, **settings) as first:
        await client.connect(first.url)
        await client.subscribe(topics=["alerts"], symbols=["BTC/USDT"])
        collector = Collector(client, delay=0.002)  # slow: events are in flight at the stop
        published += await publish_alerts(first, 300, pad="x" * 500)
        await collector.wait_for(20)
    assert len(collector.seqs) < len(published)  # stopped mid-stream
    async with running_gateway(port=port, **settings) as second:
        # Published before the client is back: it gets them replayed.
        published += await publish_alerts(second, 100, start=300, symbol="BTC/USDT")
        await until(lambda: client.reconnects == 1 and client.is_connected(), timeout=15)
        published += await publish_alerts(second, 100, start=400)
        await collector.wait_for(len(published), timeout=30)
        assert await client.get_subscriptions() == {
            "topics": ["alerts"],
            "symbols": ["BTC/USDT"],
            "count": 2,
        }
    assert collector.seqs == published
    assert published == list(range(published[0], published[0] + 500))
    assert client.duplicates_dropped == 0
    assert RESYNC_REQUIRED not in [e.type for e in collector.events]


async def test_resumes_on_another_worker(redis_prefix, tmp_path, clients):
    redis_url, prefix = redis_prefix
    database = f"sqlite:///{tmp_path}/gateway.db"
    await migrate(database)
    settings = {"REDIS_URL": redis_url, "REDIS_PREFIX": prefix, "DATABASE_URL": database}
    async with (
        running_gateway(**settings) as one,
        running_gateway(**settings) as other,
        TcpProxy(one.port) as balancer,
    ):
        client = clients(**FAST)
        await client.connect(balancer.url)
        await client.subscribe(topics=["alerts"])
        collector = Collector(client)
        published = await publish_alerts(one, 50)
        await collector.wait_for(50)
        balancer.target_port = other.port  # the next connection lands on the other worker
        balancer.cut()
        published += await publish_alerts(one, 50, start=50)
        await until(lambda: client.reconnects == 1 and client.is_connected())
        published += await publish_alerts(other, 50, start=100)
        await collector.wait_for(150)
        assert collector.seqs == published
        assert balancer.connections == 2


async def forget_archived(server: RunningGateway, where: str) -> None:
    """Delete archived events (as the archive's retention does), once every one is written."""
    await until_archived(server)
    async with server.gateway.db.connection() as connection:
        await connection.execute(f"DELETE FROM events WHERE {where}")


async def until_archived(server: RunningGateway) -> None:
    head = server.gateway.bus.head
    async with asyncio.timeout(10):
        while await server.gateway.archive.head() < head:
            await asyncio.sleep(0.05)


async def away_while_published(server, proxy, client) -> tuple[Collector, list[int], list[int]]:
    """The client gets 3 events, then is cut off (reconnects refused) while 20 are published:
    more than the hot history of 5 keeps."""
    await client.connect(proxy.url)
    await client.subscribe(topics=["alerts"])
    collector = Collector(client)
    first = await publish_alerts(server, 3)
    await collector.wait_for(3)
    proxy.refusing = True
    proxy.cut()
    return collector, first, await publish_alerts(server, 20, start=3)


async def test_the_archive_resumes_past_the_hot_history(gateway_factory, clients):
    async with gateway_factory(EVENT_HISTORY_SIZE=5) as server, TcpProxy(server.port) as proxy:
        client = clients(**FAST)
        collector, first, missed = await away_while_published(server, proxy, client)
        await until_archived(server)
        proxy.refusing = False
        await until(lambda: client.reconnects == 1 and client.is_connected())
        after = await publish_alerts(server, 3, start=23)
        await collector.wait_for(3 + 20 + 3)
    assert collector.seqs == first + missed + after
    assert {e.type for e in collector.events} == {"alert"}


async def test_resync_required_when_history_no_longer_reaches_back(gateway_factory, clients):
    async with gateway_factory(EVENT_HISTORY_SIZE=5) as server, TcpProxy(server.port) as proxy:
        client = clients(**FAST)
        collector, first, missed = await away_while_published(server, proxy, client)
        await forget_archived(server, "TRUE")  # nor has the archive kept them
        proxy.refusing = False
        await until(lambda: client.reconnects == 1 and client.is_connected())
        after = await publish_alerts(server, 3, start=23)
        await collector.wait_for(3 + 5 + 3)
    assert collector.seqs == first + missed[-5:] + after
    types = [e.type for e in collector.events]
    assert types == ["alert"] * 3 + [RESYNC_REQUIRED] + ["alert"] * 8
    resync = collector.events[3]
    assert resync.seq is None
    assert resync.data["since"] == first[-1] and resync.data["replayed"] == 5
    assert resync.data["topics"] == ["alerts"] and "reload" in resync.data["reason"]


async def test_a_restarted_gateway_numbers_on_and_is_resumed_from_the_archive(tmp_path, clients):
    database = f"sqlite:///{tmp_path}/gateway.db"
    await migrate(database)
    port = free_port()
    client = clients(**FAST)
    async with running_gateway(port=port, DATABASE_URL=database) as first:
        await client.connect(first.url)
        await client.subscribe(topics=["alerts"])
        collector = Collector(client)
        before = await publish_alerts(first, 10)
        await collector.wait_for(10)
    # A new in-memory stream, numbered on after the archive's newest seq.
    async with running_gateway(port=port, DATABASE_URL=database) as second:
        early = await publish_alerts(second, 2)  # before the client is back
        await until(lambda: client.reconnects == 1 and client.is_connected(), timeout=10)
        after = await publish_alerts(second, 3)
        await collector.wait_for(15)
    assert early == [11, 12] and after == [13, 14, 15]
    assert collector.seqs == before + early + after
    notices = [e for e in collector.events if e.seq is None]
    assert [e.type for e in notices if e.type != "status_change"] == []
    # Each gateway said it was shutting down before it closed the connection.
    assert {e.data["status"] for e in notices if e.type == "status_change"} == {"shutting_down"}


async def test_a_restarted_gateway_already_past_the_clients_seq_is_not_mistaken(tmp_path, clients):
    """The old gateway's last events never reached the archive (as when it is killed): the new
    one's seq 2.. are other events than the old one's, and the stream id tells."""
    database = f"sqlite:///{tmp_path}/gateway.db"
    await migrate(database)
    port = free_port()
    client = clients(**FAST)
    async with running_gateway(port=port, DATABASE_URL=database) as first:
        await client.connect(first.url)
        await client.subscribe(topics=["alerts"])
        collector = Collector(client)
        before = await publish_alerts(first, 3)
        await collector.wait_for(3)
        await forget_archived(first, "seq > 1")
    async with running_gateway(port=port, DATABASE_URL=database) as second:
        early = await publish_alerts(second, 10)  # before the client is back
        await until(lambda: client.reconnects == 1 and client.is_connected(), timeout=10)
        after = await publish_alerts(second, 2)
        await collector.wait_for(3 + 2)
    assert before == [1, 2, 3] and early == list(range(2, 12)) and after == [12, 13]
    events = [e for e in collector.events if e.type != "status_change"]
    assert [e.type for e in events] == ["alert"] * 3 + [RESYNC_REQUIRED] + ["alert"] * 2
    assert [e.seq for e in events if e.seq is not None] == [1, 2, 3, 12, 13]


async def reset_redis(server: RunningGateway, url: str) -> str:
    """Empty Redis (FLUSHALL) under a running gateway; the new stream's id once it moved."""
    import redis.asyncio as aioredis

    old = server.gateway.bus.stream_id
    admin = aioredis.from_url(url)
    await admin.flushall()
    await admin.aclose()
    await until(lambda: server.gateway.bus.stream_id != old, timeout=10)
    return server.gateway.bus.stream_id


@pytest.mark.parametrize("missed", [False, True], ids=["nothing-missed", "events-missed"])
async def test_a_stream_reset_moves_the_client_to_the_new_stream(tmp_path, clients, missed):
    """Redis loses its data: the client follows the new stream, resumes in it after a cut,
    and tells the application to resync only when events were missed."""

    database = f"sqlite:///{tmp_path}/gateway.db"
    await migrate(database)
    async with own_redis() as redis:
        url = f"redis://127.0.0.1:{redis.port}/0"
        async with (
            running_gateway(REDIS_URL=url, DATABASE_URL=database) as server,
            TcpProxy(server.port) as proxy,
        ):
            client = clients(**FAST)
            await client.connect(proxy.url)
            await client.subscribe(topics=["alerts"])
            collector = Collector(client)
            before = await publish_alerts(server, 3)
            await collector.wait_for(3)
            if missed:  # published, then lost with Redis before this worker read them
                async with reader_paused(server):
                    before += await publish_alerts(server, 2, start=3)
                    stream = await reset_redis(server, url)
            else:
                stream = await reset_redis(server, url)
            after = await publish_alerts(server, 2, start=5)
            proxy.cut()
            await until(lambda: client.reconnects == 1 and client.is_connected())
            after += await publish_alerts(server, 2, start=7)
            await until(lambda: len([e for e in collector.events if e.seq]) == 7)
            assert server.gateway.bus.stream_id == stream
    alerts = [e for e in collector.events if e.type == "alert"]
    assert [e.seq for e in alerts] == before[:3] + after
    assert after == list(range(before[-1] + 1, before[-1] + 5))  # no seq used twice
    resyncs = [e for e in collector.events if e.type == RESYNC_REQUIRED]
    assert len(resyncs) == (1 if missed else 0)  # the resume after the cut recovered
    if missed:
        assert resyncs[0].data["since"] == before[2] and "reload" in resyncs[0].data["reason"]
    assert client.duplicates_dropped == 0


async def test_a_slow_consumer_closed_by_the_gateway_resumes_without_loss(gateway_factory, clients):
    async with gateway_factory(WS_SEND_QUEUE_SIZE=10) as server:
        client = clients(queue_size=5, **FAST)
        await client.connect(server.url)
        await client.subscribe(topics=["alerts"])
        # More than loopback's socket buffers hold (several MB): the gateway's queue fills.
        published = await publish_alerts(server, 1000, pad="x" * 16_000)
        seen: list[int] = []
        notices: list[WSEvent] = []
        async with asyncio.timeout(20):
            async for event in client.listen():
                if event.seq is None:
                    notices.append(event)
                    continue
                seen.append(event.seq)
                if len(seen) == len(published):
                    break
        assert seen == published
        assert client.reconnects >= 1
        assert server.gateway.manager.counters["slow_consumer_closes"] >= 1
        assert all(n.type == "error" and n.data["code"] == "SLOW_CONSUMER" for n in notices)


async def test_duplicates_are_dropped_as_a_safety_net(clients):
    async def script(ws: ServerConnection) -> None:
        async for raw in ws:
            message = json.loads(raw)
            if message["type"] == "subscribe":
                await ws.send(
                    json.dumps(
                        {
                            "type": "subscribed",
                            "data": {"topics": ["alerts"], "symbols": []},
                            "request_id": message["request_id"],
                        }
                    )
                )
                for seq in (1, 2, 2, 3, 1, 4):
                    await ws.send(
                        json.dumps(
                            {
                                "type": "alert",
                                "data": {"n": seq},
                                "seq": seq,
                                "timestamp": "2025-12-21T10:30:00.000Z",
                            }
                        )
                    )

    async with fake_gateway(script) as url:
        client = clients()
        await client.connect(url)
        await client.subscribe(topics=["alerts"])
        collector = Collector(client)
        await collector.wait_for(4)
        assert collector.seqs == [1, 2, 3, 4]
        assert client.duplicates_dropped == 2


# -- heartbeat ----------------------------------------------------------------------------------


async def test_answers_the_gateways_ping(clients):
    received: list[dict[str, Any]] = []

    async def script(ws: ServerConnection) -> None:
        await ws.send(json.dumps({"type": "ping", "data": {}, "connection_id": "fake"}))
        received.append(json.loads(await ws.recv()))
        async for _ in ws:
            pass

    async with fake_gateway(script) as url:
        client = clients()
        await client.connect(url)
        await until(lambda: bool(received))
    assert received == [{"type": "pong"}]


async def test_the_gateway_keeps_a_client_that_answers_its_pings(gateway_factory, clients):
    async with gateway_factory(WS_HEARTBEAT_INTERVAL=0.1, WS_CONNECTION_TIMEOUT=0.5) as server:
        client = clients(ping_interval=30.0)  # only the pong answers are traffic
        await client.connect(server.url)
        await asyncio.sleep(1.5)
        assert client.is_connected() and client.reconnects == 0
        assert server.gateway.manager.counters["timeouts"] == 0


async def test_a_gateway_that_never_answers_is_declared_dead(clients, caplog):
    connections: list[ServerConnection] = []

    async def script(ws: ServerConnection) -> None:
        connections.append(ws)
        async for _ in ws:
            pass  # reads everything, answers nothing

    async with fake_gateway(script) as url:
        client = clients(ping_interval=0.2, ping_timeout=0.2, **FAST)
        await client.connect(url)
        await until(lambda: len(connections) >= 2 and client.is_connected(), timeout=5)
    assert "no reply to a ping within 0.2 s" in caplog.text


async def test_a_frozen_connection_is_detected_and_resumed(gateway_factory, clients):
    async with gateway_factory() as server, TcpProxy(server.port) as proxy:
        client = clients(ping_interval=0.2, ping_timeout=0.3, **FAST)
        await client.connect(proxy.url)
        await client.subscribe(topics=["alerts"])
        collector = Collector(client)
        published = await publish_alerts(server, 5)
        await collector.wait_for(5)
        proxy.freeze()  # open, but nothing goes through any more
        published += await publish_alerts(server, 5, start=5)
        await until(lambda: client.reconnects == 1 and client.is_connected(), timeout=5)
        published += await publish_alerts(server, 5, start=10)
        await collector.wait_for(15)
        assert collector.seqs == published
        assert proxy.connections == 2


def test_backoff_grows_exponentially_with_jitter_up_to_the_cap():
    assert backoff_delay(0, 0.5, 60.0, rand=lambda: 0.0) == 0.25
    assert backoff_delay(0, 0.5, 60.0, rand=lambda: 1.0) == 0.5
    assert backoff_delay(3, 0.5, 60.0, rand=lambda: 1.0) == 4.0
    assert backoff_delay(1000, 0.5, 60.0, rand=lambda: 1.0) == 60.0
    delays = {backoff_delay(4, 0.5, 60.0) for _ in range(50)}
    assert len(delays) > 40 and all(4.0 <= d <= 8.0 for d in delays)


# -- the package and the CLI --------------------------------------------------------------------


def test_the_distribution_depends_on_websockets_only_and_is_typed():
    project = tomllib.loads((CLIENT_DIR / "pyproject.toml").read_text())["project"]
    assert project["name"] == "sigmax-client"
    assert [re.split(r"[<>=!~ ]", d)[0] for d in project["dependencies"]] == ["websockets"]
    assert project["scripts"] == {"sigmax-client": "sigmax_client.cli:main"}
    assert (CLIENT_DIR / "sigmax_client" / "py.typed").is_file()
    with pytest.raises(SystemExit) as done:
        cli_main(["tail", "--help"])
    assert done.value.code == 0


def cli_environment() -> dict[str, str]:
    path = os.pathsep.join(filter(None, [str(CLIENT_DIR), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1"}


async def run_cli(*args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "sigmax_client",
        *args,
        env=cli_environment(),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def read_line(stream: asyncio.StreamReader | None, timeout: float = 10.0) -> str:
    assert stream is not None
    line = await asyncio.wait_for(stream.readline(), timeout)
    assert line, "the stream ended"
    return line.decode().rstrip("\n")


async def read_until(
    stream: asyncio.StreamReader | None, text: str, timeout: float = 15.0
) -> list[str]:
    lines: list[str] = []
    async with asyncio.timeout(timeout):
        while not lines or text not in lines[-1]:
            lines.append(await read_line(stream, timeout))
    return lines


@asynccontextmanager
async def cli(*args: str) -> AsyncIterator[asyncio.subprocess.Process]:
    """The CLI running until the block ends, then stopped with Ctrl-C; it must exit cleanly."""
    process = await run_cli(*args)
    try:
        yield process
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGINT)
        try:
            code = await asyncio.wait_for(process.wait(), 10)
        except TimeoutError:
            process.kill()
            await process.wait()
            raise
    assert code == 0
    assert process.stderr is not None
    assert "Traceback" not in (await process.stderr.read()).decode()


async def test_cli_tail_prints_a_readable_line_per_event(server):
    async with cli(
        "tail", "--url", server.url, "--topics", "alerts,proposals", "--symbols", "BTC/USDT"
    ) as process:
        status = await read_until(process.stderr, "subscribed to")
        assert status[-1] == "sigmax-client: subscribed to alerts, proposals, BTC/USDT"
        alert = await server.publish(
            "alert", {"level": "warning", "message": "drawdown near limit"}, symbol="BTC/USDT"
        )
        proposal = await server.publish("proposal_created", PROPOSAL, symbol="BTC/USDT")
        market = await server.publish("market_update", MARKET)
        lines = [await read_line(process.stdout) for _ in range(3)]
    stamp = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z"
    assert re.fullmatch(
        stamp + rf"\s+#{alert.seq}\s+alert\s+level=warning "
        r'message="drawdown near limit"',
        lines[0],
    ), lines[0]
    assert re.fullmatch(
        stamp + rf"\s+#{proposal.seq}\s+proposal_created\s+BTC/USDT "
        r"proposal_id=prop_123 action=buy size=0.001 "
        r'reason="Agent consensus: strong buy signal" '
        r"created_at=2025-12-21T10:30:00.000Z",
        lines[1],
    ), lines[1]
    # Subscribed to the symbol only: the market update carries that symbol's entry.
    assert lines[2].endswith(
        f"#{market.seq}  market_update      BTC/USDT price=95000.0 "
        "volume_24h=1000000 change_24h=2.5"
    ), lines[2]


async def test_cli_json_lines_since_and_count(server):
    published = await publish_alerts(server, 3)
    process = await run_cli(
        "tail", "--url", server.url, "--topics", "alerts", "--since", "0", "--json", "--count", "3"
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 20)
    assert process.returncode == 0, stderr.decode()
    events = [json.loads(line) for line in stdout.decode().splitlines()]
    assert [e["seq"] for e in events] == published
    assert [e["type"] for e in events] == ["alert"] * 3
    assert events[0]["data"] == {"level": "info", "message": "alert 0", "n": 0}
    assert "from seq 0 (3 replayed)" in stderr.decode()


async def test_cli_reconnects_across_a_restart(tmp_path):
    database = f"sqlite:///{tmp_path}/gateway.db"
    await migrate(database)
    port = free_port()
    async with contextlib.AsyncExitStack() as first_gateway:
        first = await first_gateway.enter_async_context(
            running_gateway(port=port, DATABASE_URL=database)
        )
        async with cli("tail", "--url", first.url, "--topics", "alerts", "--json") as process:
            await read_until(process.stderr, "subscribed to")
            await publish_alerts(first, 2)
            events = [json.loads(await read_line(process.stdout)) for _ in range(2)]
            await first_gateway.aclose()
            # A new gateway on the same port, with a new (in-memory) stream numbered on after
            # the archive: the CLI comes back, resumes, and prints the new events.
            async with running_gateway(port=port, DATABASE_URL=database) as second:
                await read_until(process.stderr, "resubscribed to alerts from seq 2")
                await publish_alerts(second, 2)
                while len([e for e in events if e["type"] != "status_change"]) < 4:
                    events.append(json.loads(await read_line(process.stdout)))
    kinds = [(e["type"], e["seq"]) for e in events if e["type"] != "status_change"]
    assert kinds == [("alert", 1), ("alert", 2), ("alert", 3), ("alert", 4)]


async def test_cli_reports_what_went_wrong_without_a_traceback(server):
    process = await run_cli("tail", "--url", f"ws://127.0.0.1:{free_port()}/api/ws")
    _, stderr = await asyncio.wait_for(process.communicate(), 20)
    assert process.returncode == 1
    assert "sigmax-client: cannot connect to ws://127.0.0.1:" in stderr.decode()
    assert "Traceback" not in stderr.decode()

    process = await run_cli("tail", "--url", server.url, "--topics", "nope")
    _, stderr = await asyncio.wait_for(process.communicate(), 20)
    assert process.returncode == 2
    assert "invalid subscription: Invalid subscription topic [INVALID_TOPIC]" in stderr.decode()
    assert "Traceback" not in stderr.decode()


async def test_replay_iterates_archived_events_and_goes_on_after_a_lost_connection(
    gateway_factory, clients
):
    async with gateway_factory() as server, TcpProxy(server.port) as proxy:
        published = []
        for n in range(200):  # 5 ms apart: a replay at speed 1 takes a second
            published += await publish_alerts(server, 1, start=n)
            await asyncio.sleep(0.005)
        await server.publish("market_update", [{"symbol": "BTC/USDT", "price": 1.0}])
        await until_archived(server)
        client = clients(**FAST)
        await client.connect(proxy.url)
        seqs = []
        async for event in client.replay(since=published[99], topics="alerts", speed=1):
            seqs.append(event.seq)
            if len(seqs) == 30:
                proxy.cut()  # the client reconnects; the replay goes on after seq 130
        assert seqs == published[100:]
        assert client.reconnects == 1
        with pytest.raises(ValueError, match="INVALID_POSITION"):
            async for _ in client.replay(since="yesterday"):
                pass


async def test_cli_replay_prints_archived_events(server):
    await publish_alerts(server, 5)
    await until_archived(server)
    process = await run_cli(
        "replay", "--url", server.url, "--since", "2", "--topics", "alerts", "--json"
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 20)
    assert process.returncode == 0, stderr.decode()
    assert [json.loads(line)["seq"] for line in stdout.decode().splitlines()] == [3, 4, 5]
    assert "replaying alerts from 2 to the newest at full speed" in stderr.decode()

    process = await run_cli("replay", "--url", server.url, "--until", "soon")
    _, stderr = await asyncio.wait_for(process.communicate(), 20)
    assert process.returncode == 2
    assert "invalid replay: Invalid until [INVALID_POSITION]" in stderr.decode()
