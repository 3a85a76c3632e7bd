"""Connection units: the subscription index and the slow-consumer policy of one connection's
queue (conflation, bounds, close)."""

from __future__ import annotations

import asyncio
import json

import pytest

from app.services.connections import Connection, SubscriptionIndex
from app.services.events import Event
from app.services.transport import AsgiWriter


class RecordingSend:
    """An ASGI send that records frames; `blocked` holds every send until released."""

    def __init__(self) -> None:
        self.frames: list[dict] = []
        self.closed: dict | None = None
        self.blocked = asyncio.Event()
        self.blocked.set()

    async def __call__(self, message: dict) -> None:
        await self.blocked.wait()
        if message["type"] == "websocket.close":
            self.closed = message
        else:
            self.frames.append(json.loads(message["text"]))


def connection(queue_size: int = 100, send: RecordingSend | None = None) -> Connection:
    return Connection(AsgiWriter(send or RecordingSend()), queue_size=queue_size, close_timeout=5)


def stamped(seq: int, type_: str, data, **routing) -> Event:
    event = Event(type_, data, **routing)
    event.stamp(seq)
    return event


def recipients(index: SubscriptionIndex, event: Event) -> tuple[set, set]:
    whole, by_symbol = index.recipients(event)
    return set(whole), set(by_symbol)


class TestSubscriptionIndex:
    def test_union_of_all_topic_and_symbol_once_each(self):
        index = SubscriptionIndex()
        a, b, c, d = (connection() for _ in range(4))
        index.add(a, ["all"])
        index.add(b, ["analysis", "symbol:BTC/USDT"])
        index.add(c, ["symbol:BTC/USDT"])
        index.add(d, ["market"])
        event = stamped(1, "analysis_update", {}, symbol="BTC/USDT")
        assert recipients(index, event) == ({a, b}, {c})
        other = stamped(2, "analysis_update", {}, symbol="ETH/USDT")
        assert recipients(index, other) == ({a, b}, set())

    def test_market_list_routes_by_entry_symbols(self):
        index = SubscriptionIndex()
        eth = connection()
        index.add(eth, ["symbol:ETH/USDT"])
        event = stamped(1, "market_update", [{"symbol": "BTC/USDT"}, {"symbol": "ETH/USDT"}])
        assert recipients(index, event) == (set(), {eth})
        assert json.loads(eth.frame_for(event))["data"] == [{"symbol": "ETH/USDT"}]

    def test_remove_forgets_empty_keys(self):
        index = SubscriptionIndex()
        a = connection()
        index.add(a, ["market", "symbol:BTC/USDT"])
        assert a.symbols == {"BTC/USDT"}
        index.remove(a, ["market", "symbol:BTC/USDT"])
        assert index.by_key == {}
        assert a.keys == set() and a.symbols == frozenset()


class TestSlowConsumerPolicy:
    async def test_snapshots_are_conflated_to_the_newest_per_type_and_symbol(self):
        conn = connection(queue_size=4)
        for seq in range(1, 9):
            symbol = "BTC/USDT" if seq % 2 else "ETH/USDT"
            event = stamped(seq, "market_update", [{"symbol": symbol, "price": seq}])
            conn.deliver(event, event.frame, event.wire)
        assert not conn.closing
        assert conn.queue_depth <= 4
        assert conn.conflated > 0
        kept = [json.loads(frame)["seq"] for frame, _ in conn._pending]
        assert kept[-2:] == [7, 8]  # the newest of each symbol survives

    async def test_events_that_must_not_be_lost_close_the_connection(self):
        send = RecordingSend()
        conn = connection(queue_size=3, send=send)
        for seq in range(1, 5):
            event = stamped(seq, "trade_executed", {"n": seq})
            conn.deliver(event, event.frame, event.wire)
        assert conn.closing
        assert conn.close_code == 1008 and conn.close_reason == "SLOW_CONSUMER"
        await asyncio.wait_for(conn.closed(), 2)
        assert [f["data"]["code"] for f in send.frames] == ["SLOW_CONSUMER"]
        assert send.closed is not None and send.closed["code"] == 1008

    async def test_snapshots_make_room_for_events_that_must_not_be_lost(self):
        conn = connection(queue_size=3)
        for seq in (1, 2, 3):
            event = stamped(seq, "portfolio_update", {"v": seq})
            conn.deliver(event, event.frame, event.wire)
        trade = stamped(4, "trade_executed", {"n": 4})
        conn.deliver(trade, trade.frame, trade.wire)
        assert not conn.closing
        assert [json.loads(f)["seq"] for f, _ in conn._pending] == [3, 4]

    async def test_writer_sends_in_order_then_closes(self):
        send = RecordingSend()
        conn = connection(send=send)
        conn.attach()
        for seq in range(1, 4):
            event = stamped(seq, "alert", {"n": seq})
            conn.deliver(event, event.frame, event.wire)
        await asyncio.sleep(0.01)
        conn.close(1001, "bye")
        await asyncio.wait_for(conn.closed(), 2)
        assert [f["seq"] for f in send.frames] == [1, 2, 3]
        assert send.closed == {"type": "websocket.close", "code": 1001, "reason": "bye"}

    async def test_close_of_a_blocked_writer_gives_up_after_the_timeout(self):
        send = RecordingSend()
        send.blocked.clear()  # the client never reads

        async def handler() -> None:
            conn.attach()
            await asyncio.sleep(10)  # stands for the handler waiting on the client

        conn = Connection(AsgiWriter(send), queue_size=10, close_timeout=0.1)
        task = asyncio.create_task(handler())
        await asyncio.sleep(0)
        event = stamped(1, "alert", {})
        conn.deliver(event, event.frame, event.wire)
        await asyncio.sleep(0.01)
        conn.close(1008, "SLOW_CONSUMER")
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, 2)
        assert send.closed is None
