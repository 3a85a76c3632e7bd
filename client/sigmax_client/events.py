"""`WSEvent`: one event from the gateway, as `listen()` yields it and callbacks receive it."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

RESYNC_REQUIRED = "resync_required"


@dataclass(frozen=True, slots=True)
class WSEvent:
    """An event: `type` (`proposal_created`, `market_update`, ...), its `data`, the gateway's
    `timestamp` (UTC ISO 8601), and `seq`, its place in the gateway's stream (None for notices
    outside the stream, such as `status_change` on shutdown, and for `resync_required`)."""

    type: str
    data: Any
    timestamp: str
    seq: int | None = None
    connection_id: str | None = None

    @classmethod
    def from_message(cls, message: dict[str, Any]) -> WSEvent:
        seq = message.get("seq")
        timestamp = message.get("timestamp")
        connection_id = message.get("connection_id")
        return cls(
            type=str(message.get("type")),
            data=message.get("data"),
            timestamp=timestamp if isinstance(timestamp, str) else utc_now(),
            seq=seq if isinstance(seq, int) and not isinstance(seq, bool) else None,
            connection_id=connection_id if isinstance(connection_id, str) else None,
        )

    @property
    def time(self) -> datetime | None:
        """`timestamp` as an aware datetime (None if the gateway sent something else)."""
        try:
            return datetime.fromisoformat(self.timestamp)
        except ValueError:
            return None

    def as_dict(self) -> dict[str, Any]:
        return {"type": self.type, "data": self.data, "timestamp": self.timestamp, "seq": self.seq}


def utc_now() -> str:
    """Now as the gateway writes timestamps: UTC, milliseconds, `Z`."""
    now = datetime.now(UTC).isoformat(timespec="milliseconds")
    return now.replace("+00:00", "Z")
