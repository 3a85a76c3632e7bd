#!/usr/bin/env python3
"""The reference the fan-out benchmark compares the gateway with: a plain `websockets` (>= 14,
asyncio API) server that fans out with `websockets.asyncio.server.broadcast()`.

It speaks the subset of the gateway protocol the benchmark uses, with the gateway's routing:

  ws://HOST:PORT/api/ws           `connected` then `system_status` on connect; `subscribe` with
                                  `topics` and `symbols` -> `subscribed` (echoing `request_id`);
                                  client `ping` -> `pong`; client `pong` ignored; a heartbeat
                                  `ping` event to every connection every --heartbeat seconds
  GET  http://HOST:PORT/api/health     readiness (answered during the WebSocket handshake)
  POST http://HOST:PORT+1/api/events   {"events": [{"type", "topic"?, "symbol"?, "data"}]} -> 202
  GET  http://HOST:PORT+1/api/health   readiness of the publish side

websockets' HTTP parser accepts only GET, hence the publish endpoint on the next port (a minimal
HTTP/1.1 keep-alive server on asyncio streams).

Routing, as in the gateway: an event goes to the subscribers of its topic (default: its type's
topic, e.g. market_update -> market), of `all`, and of `symbol:X` for its `symbol` and for the
`symbol` of each entry of a market_update list; every subscriber once (union). Each event is
serialized once with json and written to every recipient with broadcast(). No per-connection
queue, task or backpressure: the practical ceiling of a Python fan-out, not a product.
Benchmark use only; binds to loopback.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import uuid
from datetime import UTC, datetime
from http import HTTPStatus

from websockets.asyncio.server import ServerConnection, broadcast, serve
from websockets.exceptions import ConnectionClosed

TOPICS = ("all", "proposals", "executions", "analysis", "status", "market", "portfolio",
          "health", "alerts")
EVENT_TOPICS = {
    "analysis_update": "analysis", "proposal_created": "proposals",
    "proposal_approved": "proposals", "proposal_rejected": "proposals",
    "proposal_expired": "proposals", "trade_executed": "executions",
    "status_change": "status", "system_status": "status", "market_update": "market",
    "portfolio_update": "portfolio", "health_update": "health", "alert": "alerts",
}
LIST_TYPES = frozenset({"market_update"})

dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
subscribers: dict[str, set[ServerConnection]] = {}
connections: set[ServerConnection] = set()
state = {"seq": 0, "events": 0, "deliveries": 0}


def timestamp() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def reply(type_: str, data: object, connection_id: str | None, request_id: object = None) -> str:
    message = {"type": type_, "data": data, "timestamp": timestamp(),
               "connection_id": connection_id}
    if request_id is not None:
        message["request_id"] = request_id
    return dumps(message)


def status() -> dict:
    return {"status": "running", "connections": len(connections), "last_seq": state["seq"],
            "available_topics": list(TOPICS)}


async def handler(ws: ServerConnection) -> None:
    if ws.request is None or ws.request.path.split("?", 1)[0] != "/api/ws":
        await ws.close(1008, "unknown path")
        return
    cid = str(uuid.uuid4())
    keys: set[str] = set()
    connections.add(ws)
    try:
        await ws.send(reply("connected", {"message": "Connected", "connection_id": cid,
                                          "available_topics": list(TOPICS),
                                          "last_seq": state["seq"]}, cid))
        await ws.send(reply("system_status", status(), cid))
        async for raw in ws:
            try:
                msg = json.loads(raw)
                kind = msg.get("type")
            except (ValueError, AttributeError):
                await ws.send(reply("error", {"error": "Invalid JSON",
                                              "code": "MESSAGE_PROCESSING_ERROR"}, cid))
                continue
            request_id = msg.get("request_id")
            if kind in ("subscribe", "unsubscribe"):
                data = msg.get("data") or {}
                topics = [str(t).strip().lower() for t in data.get("topics") or []]
                symbols = [str(s).strip().upper() for s in data.get("symbols") or []]
                for key in topics + ["symbol:" + s for s in symbols]:
                    if kind == "subscribe":
                        subscribers.setdefault(key, set()).add(ws)
                        keys.add(key)
                    else:
                        members = subscribers.get(key)
                        if members is not None:
                            members.discard(ws)
                        keys.discard(key)
                await ws.send(reply(kind + "d", {"topics": topics, "symbols": symbols}, cid,
                                    request_id))
            elif kind == "ping":
                await ws.send(reply("pong", {}, cid, request_id))
            elif kind == "pong":
                pass
            else:
                await ws.send(reply("error", {"error": "Unknown message type",
                                              "code": "MESSAGE_PROCESSING_ERROR"}, cid,
                                    request_id))
    except ConnectionClosed:
        pass
    finally:
        connections.discard(ws)
        for key in keys:
            members = subscribers.get(key)
            if members is not None:
                members.discard(ws)
                if not members:
                    del subscribers[key]


def recipients(event: dict) -> set[ServerConnection] | tuple:
    type_ = event.get("type")
    topic = event.get("topic") or EVENT_TOPICS.get(type_)
    keys = ["all", topic]
    symbol = event.get("symbol")
    if symbol:
        keys.append("symbol:" + str(symbol).upper())
    data = event.get("data")
    if type_ in LIST_TYPES and isinstance(data, list):
        for entry in data:
            if isinstance(entry, dict) and isinstance(entry.get("symbol"), str):
                keys.append("symbol:" + entry["symbol"])
    sets = [s for s in (subscribers.get(k) for k in dict.fromkeys(keys)) if s]
    if not sets:
        return ()
    if len(sets) == 1:
        return sets[0]
    return set().union(*sets)


def publish(events: list) -> int:
    if not isinstance(events, list):
        raise TypeError("events must be a list")
    for event in events:
        if not isinstance(event, dict) or event.get("type") not in EVENT_TOPICS:
            raise ValueError(f"invalid event {str(event)[:80]}")
    ts = timestamp()
    for event in events:
        state["seq"] += 1
        targets = recipients(event)
        if targets:
            # serialized once, the same frame for every recipient
            frame = dumps({"type": event["type"], "data": event.get("data"), "timestamp": ts,
                           "connection_id": None, "seq": state["seq"]})
            broadcast(targets, frame)
            state["deliveries"] += len(targets)
    state["events"] += len(events)
    return len(events)


def health() -> dict:
    return {"status": "ok", "server": "reference", "connections": len(connections), **state}


def process_request(connection: ServerConnection, request):
    """Answer GET /api/health on the WebSocket port (anything else goes on to the handshake)."""
    if request.path.split("?", 1)[0] == "/api/health":
        response = connection.respond(HTTPStatus.OK, dumps(health()) + "\n")
        response.headers["Content-Type"] = "application/json"
        return response
    return None


async def http_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Minimal HTTP/1.1 with keep-alive: POST /api/events, GET /api/health."""
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            parts = lines[0].split(" ")
            if len(parts) < 3:
                break
            method, path = parts[0], parts[1].split("?", 1)[0]
            length = 0
            close = False
            for line in lines[1:]:
                name, _, value = line.partition(":")
                name = name.strip().lower()
                if name == "content-length":
                    length = int(value.strip())
                elif name == "connection" and value.strip().lower() == "close":
                    close = True
            if length > 64 * 1024 * 1024:
                break
            body = await reader.readexactly(length) if length else b""
            if method == "POST" and path == "/api/events":
                try:
                    code, out = "202 Accepted", {"accepted": publish(json.loads(body)["events"])}
                except (ValueError, KeyError, TypeError) as error:
                    code, out = "400 Bad Request", {"error": str(error)[:200]}
            elif method == "GET" and path == "/api/health":
                code, out = "200 OK", health()
            else:
                code, out = "404 Not Found", {"error": "not found"}
            payload = dumps(out).encode()
            writer.write(b"HTTP/1.1 %s\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (code.encode(), len(payload), payload))
            await writer.drain()
            if close:
                break
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError, ValueError):
        pass
    finally:
        writer.close()


async def heartbeat(interval: float) -> None:
    while True:
        await asyncio.sleep(interval)
        if connections:
            broadcast(connections, reply("ping", {}, None))


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765, help="WebSocket port; publish on +1")
    parser.add_argument("--heartbeat", type=float, default=30.0)
    args = parser.parse_args()
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        sys.exit("the reference server binds to loopback only")
    stop = asyncio.get_running_loop().create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, lambda: stop.done() or stop.set_result(None))
    publisher = await asyncio.start_server(http_client, args.host, args.port + 1, backlog=1024)
    beat = asyncio.create_task(heartbeat(args.heartbeat))
    async with serve(handler, args.host, args.port, process_request=process_request,
                     compression=None, ping_interval=None, backlog=4096, max_size=1 << 20):
        async with publisher:
            await stop
    beat.cancel()


if __name__ == "__main__":
    asyncio.run(main())
