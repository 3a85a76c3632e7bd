"""Units: subscription index, slow-consumer policy, bus history, configuration, API keys."""
from __future__ import annotations

import asyncio
import json
import weakref

import pytest

from app.services.auth import ApiKeys
from app.services.bus import IdempotencyConflict, MemoryBus
from app.services.connections import Connection, SubscriptionIndex
from app.services.events import Event
from config import Config


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
    return Connection(send or RecordingSend(), queue_size=queue_size, close_timeout=5)


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

        conn = Connection(send, queue_size=10, close_timeout=0.1)
        task = asyncio.create_task(handler())
        await asyncio.sleep(0)
        event = stamped(1, "alert", {})
        conn.deliver(event, event.frame, event.wire)
        await asyncio.sleep(0.01)
        conn.close(1008, "SLOW_CONSUMER")
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, 2)
        assert send.closed is None


class TestMemoryBus:
    async def test_seq_history_and_delivery(self):
        bus = MemoryBus(history_size=3, history_max_age=60)
        delivered: list[int] = []
        bus.add_listener(lambda events: delivered.extend(e.seq for e in events))
        await bus.publish([Event("alert", {"n": n}) for n in range(5)])
        assert delivered == [1, 2, 3, 4, 5]
        assert bus.head == 5
        events, recovered = await bus.history(2, 5)
        assert ([e.seq for e in events], recovered) == ([3, 4, 5], True)
        events, recovered = await bus.history(2, 4)  # up to the head a resume read
        assert ([e.seq for e in events], recovered) == ([3, 4], True)
        events, recovered = await bus.history(0, 5)
        assert ([e.seq for e in events], recovered) == ([3, 4, 5], False)
        assert await bus.history(5, 5) == ([], True)
        assert await bus.history(6, 6) == ([], True)
        assert await bus.history(6, 5) == ([], False)  # beyond the stream

    async def test_an_idempotency_key_publishes_once(self):
        bus = MemoryBus(history_size=10, history_max_age=60)
        delivered: list[int] = []
        bus.add_listener(lambda events: delivered.extend(e.seq for e in events))
        batch = [{"n": 1}, {"n": 2}]
        first = await bus.publish([Event("alert", data) for data in batch], "key-1")
        again = await bus.publish([Event("alert", data) for data in batch], "key-1")
        assert (first.first_seq, first.last_seq, first.repeated) == (1, 2, False)
        assert (again.first_seq, again.last_seq, again.repeated) == (1, 2, True)
        assert delivered == [1, 2]
        with pytest.raises(IdempotencyConflict):
            await bus.publish([Event("alert", {"n": 3})], "key-1")
        other = await bus.publish([Event("alert", data) for data in batch], "key-2")
        assert (other.first_seq, other.last_seq) == (3, 4)

    async def test_idempotency_keys_are_bounded_like_the_history(self):
        bus = MemoryBus(history_size=2, history_max_age=60)
        for key in ("a", "b", "c"):
            await bus.publish([Event("alert", {})], key)
        assert (await bus.publish([Event("alert", {})], "c")).repeated
        assert not (await bus.publish([Event("alert", {})], "a")).repeated

    async def test_history_expires_by_age(self):
        bus = MemoryBus(history_size=100, history_max_age=0.05)
        await bus.publish([Event("alert", {})])
        await asyncio.sleep(0.1)
        await bus.publish([Event("alert", {})])
        events, recovered = await bus.history(0, 2)
        assert [e.seq for e in events] == [2]
        assert recovered is False


class TestConfig:
    def test_defaults_are_the_specs(self):
        config = Config.from_env({})
        assert config.WS_MAX_CONNECTIONS == 1000
        assert config.WS_HEARTBEAT_INTERVAL == 30
        assert config.WS_CONNECTION_TIMEOUT == 60
        assert config.REDIS_URL == ""

    def test_environment_overrides_with_types(self):
        config = Config.from_env({"WS_MAX_CONNECTIONS": "5", "WS_HEARTBEAT_INTERVAL": "2.5",
                                  "CORS_ORIGINS": "http://a, http://b",
                                  "REDIS_URL": "redis://127.0.0.1:6379"})
        assert config.WS_MAX_CONNECTIONS == 5
        assert config.WS_HEARTBEAT_INTERVAL == 2.5
        assert config.CORS_ORIGINS == ("http://a", "http://b")
        assert config.REDIS_URL == "redis://127.0.0.1:6379"

    @pytest.mark.parametrize("env", [{"WS_MAX_CONNECTIONS": "many"},
                                     {"WS_MAX_CONNECTIONS": "0"},
                                     {"WS_CONNECTION_TIMEOUT": "-1"}])
    def test_bad_values_are_refused_by_name(self, env):
        with pytest.raises(ValueError, match=next(iter(env))):
            Config.from_env(env)


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


class _SelfReferencing:
    def __init__(self) -> None:
        self.me = self


async def test_full_collections_run_on_the_timer_and_free_cycles(gateway_factory):
    async with gateway_factory(GC_INTERVAL=0.05) as server:
        garbage = _SelfReferencing()
        alive = weakref.ref(garbage)
        del garbage  # a cycle: only a collection frees it
        async with asyncio.timeout(5):
            while server.gateway.garbage.collections < 2 or alive() is not None:
                await asyncio.sleep(0.02)
        stats = server.gateway.stats()
        assert stats["gc_full_collections"] >= 2
        assert 0 < stats["gc_pause_max_ms"] < 5000


async def test_no_timer_collections_with_gc_interval_zero(gateway_factory):
    async with gateway_factory(GC_INTERVAL=0) as server:
        await asyncio.sleep(0.2)
        assert server.gateway.stats()["gc_full_collections"] == 0


def test_a_negative_gc_interval_is_refused():
    with pytest.raises(ValueError, match="GC_INTERVAL"):
        Config(GC_INTERVAL=-1)
