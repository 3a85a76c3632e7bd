"""The in-memory event bus: seq, history, idempotency keys."""

from __future__ import annotations

import asyncio
import gc

import orjson
import pytest

from app.services.bus import IdempotencyConflict, MemoryBus
from app.services.events import Event


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

    async def test_history_holds_nothing_a_collection_must_scan(self):
        """The resume history keeps frames and routing atoms, not parsed payloads: after one
        collection the garbage collector no longer tracks any of it. Replays read the same."""
        bus = MemoryBus(history_size=100, history_max_age=60)
        market = [{"symbol": "BTC/USDT", "price": 1.0}, {"symbol": "ETH/USDT", "price": 2.0}]
        await bus.publish([Event("market_update", market), Event("alert", {"level": "info"})])
        gc.collect()  # untracks the symbols tuple inside each entry,
        gc.collect()  # then the entry
        assert not any(gc.is_tracked(entry) for entry in bus._history)
        replayed, recovered = await bus.history(0, 2)
        assert recovered and [e.seq for e in replayed] == [1, 2]
        assert replayed[0].symbols == ("BTC/USDT", "ETH/USDT")
        assert replayed[0].conflation_key == ("market_update", None)
        assert '"price":1.0' in replayed[0].frame
        view = orjson.loads(replayed[0].view_for(frozenset({"ETH/USDT"})))
        assert view["data"] == [market[1]] and view["seq"] == 1

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
