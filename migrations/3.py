"""The event archive: every stream event, by its deployment-wide seq (app/services/archive.py).
`symbols` are the routing symbols, space-separated; `data` the event's data as JSON."""
from typing import Any


async def migrate(connection: Any) -> None:
    await connection.execute(
        """CREATE TABLE events (
               seq BIGINT PRIMARY KEY,
               stream_id TEXT NOT NULL,
               type TEXT NOT NULL,
               topic TEXT NOT NULL,
               symbol TEXT,
               symbols TEXT NOT NULL,
               created_at DOUBLE PRECISION NOT NULL,
               data TEXT NOT NULL
           )"""
    )
    await connection.execute("CREATE INDEX events_created ON events (created_at)")
    await connection.execute("CREATE INDEX events_topic ON events (topic, seq)")
