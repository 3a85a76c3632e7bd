"""The database: quart-db on SQLite (embedded default) or PostgreSQL, and its migrations.

Migrations are their own step (`python -m app migrate`), run before any worker starts: several
workers migrating one SQLite file at once would lock each other out. A worker refuses to start on a
database that is not at the latest migration.

A served worker reaches the database through `Database`, which tells an outage from any other
error: while the server is unreachable every use raises `DatabaseUnavailable` (503, with
Retry-After) instead of the driver's error, the outage is logged once when it begins and once
when it ends.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import asyncpg
from quart import Quart
from quart_db import QuartDB

from app.errors import GatewayError

log = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).resolve().parents[2] / "migrations"
STATE_TABLE = "schema_migration"


class DatabaseNotMigrated(RuntimeError):
    pass


def latest_migration() -> int:
    return max(int(path.stem) for path in MIGRATIONS.glob("[0-9]*.py"))


# How long taking a connection may wait: a server that does not answer is an outage, not a
# request that waits for the driver's own minute.
ACQUIRE_TIMEOUT = 5.0
# Told to clients as Retry-After while the database is unreachable.
RETRY_AFTER = 5.0
# Connection-level failures: the server is down, restarting, or the connection broke. Any other
# error (a constraint, a bad query) is the caller's and passes through as it is.
_OUTAGES: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.TooManyConnectionsError,
)


class DatabaseUnavailable(GatewayError):
    def __init__(self, details: str) -> None:
        super().__init__(
            "DATABASE_UNAVAILABLE",
            "Database unavailable",
            details,
            retry_after=RETRY_AFTER,
        )


def is_outage(error: BaseException) -> bool:
    if isinstance(error, (DatabaseUnavailable, *_OUTAGES)):
        return True
    # asyncpg's InterfaceError also says "connection is closed" or "pool is closing"; its
    # DataError and ClientConfigurationError are the caller's.
    return isinstance(error, asyncpg.InterfaceError) and not isinstance(error, ValueError)


class Database:
    """The served app's database (QuartDB's `connection()`, the one call the services make),
    with outages told apart and followed."""

    def __init__(self, db: QuartDB, backend: str) -> None:
        self._db = db
        self.backend = backend
        self.available: bool | None = None  # unknown until first used
        self.down_since: float | None = None  # time.time() when the outage began
        self.last_error = ""

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[Any]:
        try:
            async with asyncio.timeout(ACQUIRE_TIMEOUT):
                connection = await self._db.acquire()
        except Exception as error:
            if is_outage(error):
                raise self._unavailable(error) from error
            raise
        try:
            yield connection
        except Exception as error:
            if is_outage(error):
                raise self._unavailable(error) from error
            raise
        finally:
            try:
                await self._db.release(connection)
            except Exception as error:
                if not is_outage(error):
                    raise
        self._reachable()

    def _unavailable(self, error: BaseException) -> DatabaseUnavailable:
        if isinstance(error, DatabaseUnavailable):
            return error
        reason = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
        if self.available is not False:
            self.available, self.down_since, self.last_error = False, time.time(), reason
            log.warning(
                "the database is unreachable (%s): requests that need it answer 503 "
                "DATABASE_UNAVAILABLE until it is back; WebSockets, ingest and remote-engine "
                "actions go on",
                reason,
            )
        return DatabaseUnavailable(f"The database is unreachable ({reason}); retry later")

    def _reachable(self) -> None:
        if self.available:
            return
        if self.available is False and self.down_since is not None:
            log.info("the database is reachable again after %.1f s", time.time() - self.down_since)
        self.available, self.down_since, self.last_error = True, None, ""


async def uncut(read: Awaitable[Any]) -> Any:
    """`read`'s result, awaited to its end even when the caller is cancelled meanwhile (then
    the cancellation goes on): a database read or write cut short goes on in aiosqlite's thread
    with its connection opening or open, after the app has closed the database."""
    task = asyncio.ensure_future(read)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        await asyncio.wait([task])
        raise


def attach_database(app: Quart, url: str) -> Database:
    """Connect the app to the database; migrations are not run here."""
    backend = "postgresql" if url.startswith("postgres") else "sqlite"
    db = QuartDB(
        app,
        url=url,
        migrations_folder=None,
        auto_request_connection=False,
        # No floor of idle connections: asyncpg would keep reconnecting it in the background
        # through an outage, with a traceback each time; connections are made when needed.
        backend_options={"min_size": 0} if backend == "postgresql" else None,
    )
    app.before_serving(_check_migrated(db))
    return Database(db, backend)


def _check_migrated(db: QuartDB):  # type: ignore[no-untyped-def]
    async def check_migrated() -> None:
        expected = latest_migration()
        async with db.connection() as connection:
            try:
                version = await connection.fetch_val(f"SELECT version FROM {STATE_TABLE}")
            except Exception:  # the table itself is missing
                version = None
        if version != expected:
            raise DatabaseNotMigrated(
                f"the database is at migration {version}, the code needs {expected}: "
                "run `python -m app migrate` (make run does) before starting the workers"
            )

    return check_migrated


@asynccontextmanager
async def standalone_connection(url: str, *, run_migrations: bool = False) -> AsyncIterator[Any]:
    """A connection outside the served app (CLI, migration step, tests)."""
    app = Quart(__name__)
    db = QuartDB(
        app,
        url=url,
        migrations_folder=str(MIGRATIONS) if run_migrations else None,
        auto_request_connection=False,
    )
    await app.startup()
    try:
        async with db.connection() as connection:
            yield connection
    finally:
        await app.shutdown()


async def migrate(url: str) -> int:
    """Bring the database at `url` to the latest migration; returns its version."""
    async with standalone_connection(url, run_migrations=True) as connection:
        return int(await connection.fetch_val(f"SELECT version FROM {STATE_TABLE}"))
