"""The database: quart-db on SQLite (embedded default) or PostgreSQL, and its migrations.

Migrations are their own step (`python -m app migrate`), run before any worker starts: several
workers migrating one SQLite file at once would lock each other out. A worker refuses to start on a
database that is not at the latest migration.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from quart import Quart
from quart_db import QuartDB

MIGRATIONS = Path(__file__).resolve().parents[2] / "migrations"
STATE_TABLE = "schema_migration"


class DatabaseNotMigrated(RuntimeError):
    pass


def latest_migration() -> int:
    return max(int(path.stem) for path in MIGRATIONS.glob("[0-9]*.py"))


def attach_database(app: Quart, url: str) -> QuartDB:
    """Connect the app to the database; migrations are not run here."""
    db = QuartDB(app, url=url, migrations_folder=None, auto_request_connection=False)
    app.before_serving(_check_migrated(db))
    return db


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
