"""Administration commands.

python -m app migrate                              bring the database to the latest migration
python -m app keys create --scopes read+trade [--label NAME]   prints the new key once
python -m app keys revoke KEY_ID                   the gateway stays keyed, also after the last key
python -m app keys list
python -m app keys open                            forget the revoked keys: the gateway opens to
                                                   every client (refused while a key is active)
python -m app engine [--host HOST] [--port 8100]    the paper engine as a standalone engine service
python -m app supervise                            serve: WORKERS processes under supervisord
python -m app rolling-restart                      restart the supervised workers one at a time
python -m app serve-worker                         one supervised worker (supervisord runs it)
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
import xmlrpc.client

from app import supervision
from app.services import store
from app.services.auth import hash_key, new_key, parse_scopes
from app.services.database import migrate, standalone_connection
from config import Config


async def _with_connection(url: str, work):  # type: ignore[no-untyped-def]
    async with standalone_connection(url) as connection:
        return await work(connection)


async def _create_key(url: str, scopes: str, label: str) -> str:
    key = new_key()
    key_id = store.new_id("key")
    scope_set = parse_scopes(scopes)

    async def insert(connection) -> None:  # type: ignore[no-untyped-def]
        await store.insert_api_key(
            connection, key_id, hash_key(key), "+".join(sorted(scope_set)), label, time.time()
        )

    await _with_connection(url, insert)
    return f"{key_id} {key}"


ENGINE_PORT = 8100  # beside the gateway's 8000


def _serve_engine(config: Config, host: str, port: int) -> int:
    """Migrate the engine's database, then serve it (one process) until SIGINT or SIGTERM."""
    import signal

    from hypercorn.asyncio import serve
    from hypercorn.config import Config as HypercornConfig

    from app.engine_service import create_engine_app

    asyncio.run(migrate(config.DATABASE_URL))
    settings = HypercornConfig()
    settings.bind = [f"{host}:{port}"]
    settings.accesslog = None

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        await serve(create_engine_app(config), settings, shutdown_trigger=stop.wait)

    asyncio.run(run())
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m app",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("migrate", help="bring the database to the latest migration")
    keys = commands.add_parser("keys", help="API keys stored in the database")
    key_commands = keys.add_subparsers(dest="action", required=True)
    create = key_commands.add_parser("create", help="create a key and print it once")
    create.add_argument("--scopes", default="read", help="read, trade, publish joined by +")
    create.add_argument("--label", default="", help="who or what the key is for")
    revoke = key_commands.add_parser("revoke", help="revoke a key by its id")
    revoke.add_argument("key_id")
    key_commands.add_parser("list", help="list keys (ids, scopes, labels; never the keys)")
    key_commands.add_parser(
        "open",
        help="forget the revoked keys, which opens the gateway to every client "
        "(refused while a key is active)",
    )
    engine = commands.add_parser(
        "engine", help="serve the paper engine as a remote engine (the gateway's ENGINE_URL)"
    )
    engine.add_argument("--host", default=None, help="default: HOST")
    engine.add_argument("--port", type=int, default=ENGINE_PORT, help=f"default: {ENGINE_PORT}")
    commands.add_parser(
        "supervise",
        help="serve the gateway: WORKERS processes of their own on one socket, under supervisord "
        "(each restarted alone when it dies)",
    )
    commands.add_parser(
        "serve-worker",
        help="one supervised worker (deploy/supervisord.conf runs WORKERS of them): Hypercorn "
        "on a socket of its own, SO_REUSEPORT on HOST:PORT",
    )
    commands.add_parser(
        "rolling-restart",
        help="restart the supervised workers one at a time, each once the one before is healthy",
    )
    args = parser.parse_args(argv)
    config = Config.from_env()
    url = config.DATABASE_URL

    if args.command == "supervise":
        supervision.supervise(config)
    if args.command == "serve-worker":
        supervision.serve_worker(config)
    if args.command == "rolling-restart":
        try:
            supervision.rolling_restart(config)
        except (OSError, TimeoutError, xmlrpc.client.Fault) as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("interrupted: every worker it had stopped is started again", file=sys.stderr)
            return 130
        return 0

    if args.command == "engine":
        return _serve_engine(config, args.host or config.HOST, args.port)

    if args.command == "migrate":
        version = asyncio.run(migrate(url))
        print(f"database at migration {version}")
    elif args.action == "create":
        try:
            print(asyncio.run(_create_key(url, args.scopes, args.label)))
        except ValueError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        print("store the key now: only its hash is kept", file=sys.stderr)
    elif args.action == "revoke":
        revoked = asyncio.run(
            _with_connection(url, lambda c: store.revoke_api_key(c, args.key_id, time.time()))
        )
        print("revoked" if revoked else f"no active key {args.key_id}")
        if revoked and not asyncio.run(_with_connection(url, store.api_key_state))[0]:
            print(
                "that was the last active key: the gateway stays keyed and admits no client "
                "until a key is created (`keys create`); `keys open` opens it to everyone",
                file=sys.stderr,
            )
        return 0 if revoked else 1
    elif args.action == "open":
        forgotten = asyncio.run(_with_connection(url, store.delete_revoked_api_keys))
        if forgotten is None:
            print("error: keys are active; revoke them first (`keys list`)", file=sys.stderr)
            return 1
        print(
            f"forgot {forgotten} revoked keys: the gateway is open to every client that can "
            "reach it" + (" (API_KEYS, if set, still keys it)" if config.API_KEYS else ""),
        )
    else:
        for row in asyncio.run(_with_connection(url, store.select_api_keys)):
            state = "revoked" if row["revoked_at"] else "active"
            print(f"{row['id']}  {row['scopes']:<20} {state:<8} {row['label']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
