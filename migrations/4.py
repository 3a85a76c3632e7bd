"""Idempotency keys of ingest (`POST /api/events` with an Idempotency-Key), kept beside Redis's
copy so that a retry after Redis lost its data is still answered with the first result
(app/services/idempotency.py)."""
from typing import Any


async def migrate(connection: Any) -> None:
    await connection.execute(
        """CREATE TABLE published_batches (
               idempotency_key TEXT PRIMARY KEY,
               fingerprint TEXT NOT NULL,
               first_seq BIGINT NOT NULL,
               last_seq BIGINT NOT NULL,
               published_at DOUBLE PRECISION NOT NULL
           )"""
    )
    await connection.execute(
        "CREATE INDEX published_batches_time ON published_batches (published_at)"
    )
