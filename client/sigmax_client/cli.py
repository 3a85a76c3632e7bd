"""`sigmax-client tail`: print the gateway's events live, one line each, reconnecting and
resuming like any client of this package; `sigmax-client replay`: print archived events, paced.
Status and errors go to stderr, events to stdout."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator, Sequence
from typing import Any

from sigmax_client.client import DEFAULT_URL, SigmaxWebSocketClient
from sigmax_client.events import WSEvent

log = logging.getLogger("sigmax_client.cli")

LINE_LIMIT = 240


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sigmax-client", description="Command-line client of the SIGMAX WebSocket API."
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--url",
        default=os.environ.get("SIGMAX_URL", DEFAULT_URL),
        help="the gateway's WebSocket URL (default: $SIGMAX_URL or %(default)s)",
    )
    common.add_argument(
        "--topics",
        nargs="+",
        action="extend",
        default=[],
        metavar="TOPIC",
        help="topics, space or comma separated (proposals, executions, analysis, "
        "status, market, portfolio, health, alerts, all); default: all "
        "unless --symbols is given",
    )
    common.add_argument(
        "--symbols",
        nargs="+",
        action="extend",
        default=[],
        metavar="SYMBOL",
        help="symbols such as BTC/USDT, space or comma separated",
    )
    common.add_argument(
        "--api-key",
        default=os.environ.get("SIGMAX_API_KEY"),
        help="API key (default: $SIGMAX_API_KEY)",
    )
    common.add_argument(
        "--ca-file",
        default=os.environ.get("SIGMAX_CA_FILE") or None,
        help="trust a wss:// gateway's certificate from this PEM file (a private CA's, or the "
        "gateway's own self-signed one; default: $SIGMAX_CA_FILE, else the system's CAs)",
    )
    common.add_argument(
        "--json", action="store_true", help="one JSON object per line: type, seq, timestamp, data"
    )
    common.add_argument("--count", type=_positive, metavar="N", help="stop after N events")
    common.add_argument("--quiet", action="store_true", help="no status lines on stderr")
    commands = parser.add_subparsers(dest="command", required=True)
    tail = commands.add_parser(
        "tail",
        parents=[common],
        help="print events live, one line each",
        description="Print the gateway's events live, one line each (reconnects and resumes "
        "after the last event seen). Ctrl-C stops.",
    )
    tail.add_argument(
        "--since",
        type=_non_negative,
        metavar="SEQ",
        help="first replay the events after this seq that the gateway still has",
    )
    replay = commands.add_parser(
        "replay",
        parents=[common],
        help="print archived events, paced",
        description="Print archived events in order with their original seq and timestamps, "
        "paced at --speed times their original spacing, then stop. Topics and symbols both "
        "filter (an event of those topics that carries one of those symbols).",
    )
    replay.add_argument(
        "--since", metavar="SEQ|TIME", help="after this seq, or from this RFC 3339 time"
    )
    replay.add_argument("--until", metavar="SEQ|TIME", help="up to this seq or time")
    replay.add_argument(
        "--speed",
        type=_speed,
        default=0.0,
        help="times the original pace (1: as it happened); 0, the default: as fast as read",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="sigmax-client: %(message)s",
        stream=sys.stderr,
    )
    try:
        return asyncio.run(run(args))
    except KeyboardInterrupt:
        return 130


async def run(args: argparse.Namespace) -> int:
    """Print events until interrupted (SIGINT, SIGTERM), `--count` events were printed or (a
    replay) its end."""
    task = asyncio.current_task()
    loop = asyncio.get_running_loop()
    if task is not None:
        for signum in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(signum, task.cancel)
    client = SigmaxWebSocketClient(ca_file=args.ca_file)
    try:
        await client.connect(args.url, api_key=args.api_key)
    except RuntimeError as error:
        log.error("%s", error)
        return 1
    try:
        events = await (tail if args.command == "tail" else replay)(client, args)
        printed = 0
        async for event in events:
            print(json.dumps(event.as_dict()) if args.json else format_event(event), flush=True)
            printed += 1
            if args.count is not None and printed >= args.count:
                break
        return 0
    except asyncio.CancelledError:
        if task is not None:
            task.uncancel()
        return 0
    except ValueError as error:
        log.error("invalid %s: %s", "subscription" if args.command == "tail" else "replay", error)
        return 2
    except RuntimeError as error:
        log.error("%s", error)
        return 1
    except BrokenPipeError:
        # The reader of stdout went away (`| head`): stop quietly, and keep Python's final
        # flush from failing too.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    finally:
        await client.disconnect()


async def tail(client: SigmaxWebSocketClient, args: argparse.Namespace) -> AsyncIterator[WSEvent]:
    """Subscribe, then the live events."""
    topics, symbols = _split(args.topics), _split(args.symbols)
    if not topics and not symbols:
        topics = ["all"]
    confirmed = await client.subscribe(topics, symbols, since=args.since)
    log.info(
        "subscribed to %s%s",
        ", ".join(confirmed.get("topics", []) + confirmed.get("symbols", [])) or "nothing",
        ""
        if args.since is None
        else f" from seq {args.since} ({confirmed.get('replayed', 0)} replayed)",
    )
    return client.listen()


async def replay(client: SigmaxWebSocketClient, args: argparse.Namespace) -> AsyncIterator[WSEvent]:
    """The archived events asked for."""
    log.info(
        "replaying %s from %s to %s at %s",
        ", ".join(_split(args.topics) + _split(args.symbols)) or "all topics",
        args.since or "the oldest",
        args.until or "the newest",
        f"{args.speed:g}x" if args.speed else "full speed",
    )
    return client.replay(
        _position(args.since),
        _position(args.until),
        topics=_split(args.topics),
        symbols=_split(args.symbols),
        speed=args.speed,
    )


def format_event(event: WSEvent) -> str:
    """One readable line: timestamp, seq, type, then the data in brief."""
    seq = f"#{event.seq}" if event.seq is not None else "-"
    line = f"{event.timestamp}  {seq:>8}  {event.type:<17}  {summarize(event.data)}"
    return line if len(line) <= LINE_LIMIT else line[: LINE_LIMIT - 1] + "…"


def summarize(data: Any) -> str:
    """`data` in brief: a dict as `SYMBOL key=value ...`, a list entry by entry."""
    if isinstance(data, dict):
        parts = [str(data["symbol"])] if isinstance(data.get("symbol"), str) else []
        parts += [f"{key}={_value(value)}" for key, value in data.items() if key != "symbol"]
        return " ".join(parts)
    if isinstance(data, list):
        return " | ".join(summarize(entry) for entry in data)
    return _value(data)


def _value(value: Any) -> str:
    if isinstance(value, str):
        return value if value and not any(c.isspace() for c in value) else json.dumps(value)
    return json.dumps(value, separators=(",", ":"), default=str)


def _split(values: list[str]) -> list[str]:
    return [name.strip() for value in values for name in value.split(",") if name.strip()]


def _positive(text: str) -> int:
    number = int(text)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {number}")
    return number


def _position(text: str | None) -> int | str | None:
    """A seq as a number, a time as it was given."""
    return int(text) if text is not None and text.isdigit() else text


def _speed(text: str) -> float:
    speed = float(text)
    if not 0 <= speed <= 1_000_000:
        raise argparse.ArgumentTypeError(f"must be 0 to 1000000, not {text}")
    return speed


def _non_negative(text: str) -> int:
    number = int(text)
    if number < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, not {number}")
    return number
