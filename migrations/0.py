"""The trading domain: proposals, trades, positions, the cash ledger, API keys, last prices.

Portable SQL for SQLite and PostgreSQL: text ids, DOUBLE PRECISION amounts, epoch-second times.
"""
from typing import Any


async def migrate(connection: Any) -> None:
    await connection.execute(
        """CREATE TABLE proposals (
               id TEXT PRIMARY KEY,
               symbol TEXT NOT NULL,
               action TEXT NOT NULL CHECK (action IN ('buy', 'sell')),
               size DOUBLE PRECISION NOT NULL CHECK (size > 0),
               reason TEXT NOT NULL,
               confidence DOUBLE PRECISION,
               source TEXT NOT NULL,
               status TEXT NOT NULL,
               created_at DOUBLE PRECISION NOT NULL,
               expires_at DOUBLE PRECISION NOT NULL,
               decided_by TEXT,
               decided_at DOUBLE PRECISION,
               status_reason TEXT
           )"""
    )
    await connection.execute("CREATE INDEX proposals_status ON proposals (status, created_at)")
    await connection.execute("CREATE INDEX proposals_symbol ON proposals (symbol, created_at)")
    await connection.execute(
        """CREATE TABLE trades (
               order_id TEXT PRIMARY KEY,
               proposal_id TEXT NOT NULL UNIQUE REFERENCES proposals (id),
               symbol TEXT NOT NULL,
               action TEXT NOT NULL,
               size DOUBLE PRECISION NOT NULL,
               filled_price DOUBLE PRECISION NOT NULL,
               fee DOUBLE PRECISION NOT NULL,
               status TEXT NOT NULL,
               executed_at DOUBLE PRECISION NOT NULL
           )"""
    )
    await connection.execute("CREATE INDEX trades_executed ON trades (executed_at)")
    await connection.execute(
        """CREATE TABLE positions (
               symbol TEXT PRIMARY KEY,
               size DOUBLE PRECISION NOT NULL,
               entry_price DOUBLE PRECISION NOT NULL,
               realized_pnl DOUBLE PRECISION NOT NULL,
               updated_at DOUBLE PRECISION NOT NULL
           )"""
    )
    # Cash is the sum of the ledger: every deposit, trade and fee is a row, never an update.
    await connection.execute(
        """CREATE TABLE ledger (
               id TEXT PRIMARY KEY,
               at DOUBLE PRECISION NOT NULL,
               kind TEXT NOT NULL,
               amount DOUBLE PRECISION NOT NULL,
               reference TEXT
           )"""
    )
    await connection.execute(
        """CREATE TABLE api_keys (
               id TEXT PRIMARY KEY,
               key_hash TEXT NOT NULL UNIQUE,
               scopes TEXT NOT NULL,
               label TEXT NOT NULL,
               created_at DOUBLE PRECISION NOT NULL,
               revoked_at DOUBLE PRECISION
           )"""
    )
    await connection.execute(
        """CREATE TABLE market_prices (
               symbol TEXT PRIMARY KEY,
               price DOUBLE PRECISION NOT NULL,
               updated_at DOUBLE PRECISION NOT NULL
           )"""
    )
    await connection.execute(
        """CREATE TABLE engine_state (
               name TEXT PRIMARY KEY,
               value TEXT NOT NULL
           )"""
    )


async def valid_migration(connection: Any) -> bool:
    return await connection.fetch_val("SELECT COUNT(*) FROM proposals") == 0
