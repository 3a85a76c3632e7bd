"""A stand-in remote engine: a process that speaks the gateway's engine contract (`POST
/commands`, `GET /health`) and misbehaves on request, for tests/test_remote_engine.py.

    python -m tests.standins.engine --port P

Admin endpoints: `POST /_mode {"mode": ..., "delay": s, "status": n, "body": {...}}` and
`GET /_requests` (every /commands request seen: command, Idempotency-Key, X-API-Key, and whether
it was carried out). Modes:
- `ok`: carries the action out (once per Idempotency-Key) and answers 200 {success, result};
- `refuse`: answers `status` with `body` ({error, code, details});
- `slow`: waits `delay` seconds, then as `ok`;
- `hang`: accepts and never answers (/health hangs too);
- `drop_first`: carries a new key's action out, then cuts the connection without an answer;
  a retry with the same key gets the remembered answer;
- `garbage`: answers 200 with a result that does not match the contract.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

from aiohttp import web

STATE: dict[str, Any] = {"mode": "ok", "delay": 0.0, "status": 409, "body": {}}
REQUESTS: list[dict[str, Any]] = []
ANSWERS: dict[str, dict[str, Any]] = {}  # by Idempotency-Key: what the action answered


def result_of(command: str, args: dict[str, Any], principal: str) -> dict[str, Any]:
    """A contract-shaped result for each action."""
    now = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())
    proposal = {
        "proposal_id": args.get("proposal_id", "prop_standin"),
        "symbol": args.get("symbol", "BTC/USDT"),
        "action": args.get("action", "buy"),
        "size": args.get("size") or 0.01,
        "reason": args.get("reason") or "stand-in",
        "confidence": None,
        "source": "manual",
        "status": {"approve_proposal": "executed", "reject_proposal": "rejected"}.get(
            command, "pending"
        ),
        "created_at": now,
        "expires_at": now,
        "decided_by": principal,
        "decided_at": now,
        "status_reason": None,
        "requested_by": principal,
    }
    if command in ("pause", "resume"):
        return {"status": "paused" if command == "pause" else "running", "changed": True}
    if command == "analyze":
        return {"symbol": args["symbol"], "decision": "hold", "confidence": 0.5}
    if command == "approve_proposal":
        return {"proposal": proposal, "trade": None}
    return {"proposal": proposal}


async def commands(request: web.Request) -> web.StreamResponse:
    body = await request.json()
    key = request.headers.get("Idempotency-Key", "")
    seen: dict[str, Any] = {
        "command": body.get("command"),
        "args": body.get("args"),
        "principal": body.get("principal"),
        "request_id": body.get("request_id"),
        "idempotency_key": key,
        "api_key": request.headers.get("X-API-Key"),
        "carried_out": False,
    }
    REQUESTS.append(seen)
    mode = STATE["mode"]
    if mode == "hang":
        await asyncio.Event().wait()
    if mode == "slow":
        await asyncio.sleep(STATE["delay"])
    if mode == "refuse":
        return web.json_response(STATE["body"], status=STATE["status"])
    if mode == "garbage":
        return web.json_response({"success": True, "result": {"unexpected": 1}})
    if key not in ANSWERS:
        seen["carried_out"] = True
        ANSWERS[key] = {
            "success": True,
            "result": result_of(seen["command"], seen["args"] or {}, seen["principal"]),
        }
        if mode == "drop_first":
            assert request.transport is not None
            request.transport.abort()  # carried out, but the answer is lost
            raise web.HTTPInternalServerError()
    return web.json_response(ANSWERS[key])


async def health(request: web.Request) -> web.Response:
    if STATE["mode"] == "hang":
        await asyncio.Event().wait()
    return web.json_response({"status": "ok"})


async def set_mode(request: web.Request) -> web.Response:
    STATE.update(await request.json())
    return web.json_response(STATE)


async def requests_seen(request: web.Request) -> web.Response:
    return web.json_response(REQUESTS)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    app = web.Application()
    app.add_routes(
        [
            web.post("/commands", commands),
            web.get("/health", health),
            web.post("/_mode", set_mode),
            web.get("/_requests", requests_seen),
        ]
    )
    web.run_app(app, host="127.0.0.1", port=args.port, print=None, handle_signals=True)


if __name__ == "__main__":
    main()
