"""Garbage collection: what it costs, and nothing left for it by a closed connection."""

from __future__ import annotations

import asyncio
import gc
import weakref

import websockets


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


async def test_every_full_collection_is_timed_and_none_runs_on_a_timer_by_default(
    gateway_factory,
):
    async with gateway_factory() as server:
        assert server.gateway.config.GC_INTERVAL == 0
        gc.disable()  # only the collections made here
        try:
            await asyncio.sleep(0.3)
            before = server.gateway.stats()
            gc.collect(0)
            gc.collect()
            gc.collect()
            after = server.gateway.stats()
        finally:
            gc.enable()
        assert after["gc_full_collections"] - before["gc_full_collections"] == 2
        assert after["gc_pause_max_ms"] > 0 and after["gc_young_pause_max_ms"] > 0


# What a closed connection must not leave in reference cycles: the server's objects for it.
SERVER_SIDE = {"TCPServer", "H11Protocol", "WSStream", "WSConnection", "Connection", "TaskGroup"}


async def test_closed_connections_leave_no_reference_cycles(gateway_factory):
    """Refcounting frees a closed connection at once: no full collection (which stops the
    worker) is needed for it, whether the client closed cleanly or vanished."""
    async with gateway_factory(GC_INTERVAL=0) as server:
        gc.collect()
        gc.disable()  # what the connections leave stays for the collection below to find
        try:
            clients = []
            for _ in range(12):
                ws = await websockets.connect(server.url)
                await ws.recv()  # connected
                await ws.send('{"type": "subscribe", "data": {"topics": ["market"]}}')
                clients.append(ws)
            await server.publish("market_update", [{"symbol": "BTC/USDT", "price": 1.0}])
            for ws in clients[:6]:
                await ws.close()
            for ws in clients[6:]:
                ws.transport.abort()  # gone without a close frame
            async with asyncio.timeout(5):
                while server.gateway.manager.connections:
                    await asyncio.sleep(0.02)
            await asyncio.sleep(0.3)  # Hypercorn ends each connection's task
            clients.clear()
            gc.set_debug(gc.DEBUG_SAVEALL)
            gc.collect()
            left = sorted(
                type(o).__qualname__ for o in gc.garbage if type(o).__qualname__ in SERVER_SIDE
            )
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
            gc.enable()
        assert left == []
