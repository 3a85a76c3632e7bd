"""Who asked for a manual proposal, apart from its reason (which stays the user's text)."""
from typing import Any


async def migrate(connection: Any) -> None:
    await connection.execute("ALTER TABLE proposals ADD COLUMN requested_by TEXT")
