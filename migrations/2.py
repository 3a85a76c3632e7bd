"""The remote engine: the gateway's read model of it (proposals, trades and snapshots built from
the engine's events, each row with the stream position of the last event applied to it), and
the standalone paper engine's record of the actions it carried out, by Idempotency-Key."""
from typing import Any


async def migrate(connection: Any) -> None:
    await connection.execute(
        """CREATE TABLE engine_proposals (
               id TEXT PRIMARY KEY,
               status TEXT NOT NULL,
               symbol TEXT NOT NULL,
               created_at DOUBLE PRECISION NOT NULL,
               stream_id TEXT NOT NULL,
               seq BIGINT NOT NULL,
               data TEXT NOT NULL
           )"""
    )
    await connection.execute(
        "CREATE INDEX engine_proposals_status ON engine_proposals (status, created_at)"
    )
    await connection.execute(
        "CREATE INDEX engine_proposals_symbol ON engine_proposals (symbol, created_at)"
    )
    await connection.execute(
        """CREATE TABLE engine_trades (
               order_id TEXT PRIMARY KEY,
               executed_at DOUBLE PRECISION NOT NULL,
               stream_id TEXT NOT NULL,
               seq BIGINT NOT NULL,
               data TEXT NOT NULL
           )"""
    )
    await connection.execute("CREATE INDEX engine_trades_executed ON engine_trades (executed_at)")
    await connection.execute(
        """CREATE TABLE engine_snapshots (
               name TEXT PRIMARY KEY,
               stream_id TEXT NOT NULL,
               seq BIGINT NOT NULL,
               data TEXT NOT NULL
           )"""
    )
    await connection.execute(
        """CREATE TABLE engine_actions (
               idempotency_key TEXT PRIMARY KEY,
               fingerprint TEXT NOT NULL,
               status INTEGER NOT NULL,
               body TEXT NOT NULL,
               at DOUBLE PRECISION NOT NULL
           )"""
    )
    await connection.execute("CREATE INDEX engine_actions_at ON engine_actions (at)")
