"""Database access for the trading domain (quart-db; SQLite or PostgreSQL).

Free functions taking the connection first; plain SQL with `:name` parameters that both
backends accept. Times are epoch seconds; rows become the dataclasses below.
"""

from __future__ import annotations

import uuid
from dataclasses import asdict, dataclass
from typing import Any

from app.services.events import utc_timestamp

Connection = Any  # quart_db's ConnectionABC: execute, fetch_first, fetch_all, fetch_val


@dataclass(frozen=True)
class Proposal:
    id: str
    symbol: str
    action: str
    size: float
    reason: str
    confidence: float | None
    source: str
    status: str
    created_at: float
    expires_at: float
    decided_by: str | None = None
    decided_at: float | None = None
    status_reason: str | None = None
    requested_by: str | None = None  # the principal behind a manual proposal

    def created_event(self) -> dict[str, Any]:
        """`proposal_created` data: the spec's fields, and what a strategy needs to act on it
        without pairing it with the analysis behind it."""
        return {
            "proposal_id": self.id,
            "symbol": self.symbol,
            "action": self.action,
            "size": self.size,
            "reason": self.reason,
            "created_at": utc_timestamp(self.created_at),
            "confidence": self.confidence,
            "source": self.source,
            "expires_at": utc_timestamp(self.expires_at),
            "requested_by": self.requested_by,
        }

    def approved_event(self) -> dict[str, Any]:
        """`proposal_approved` data."""
        return {
            "proposal_id": self.id,
            "symbol": self.symbol,
            "action": self.action,
            "size": self.size,
            "approved_by": self.decided_by,
            "approved_at": utc_timestamp(self.decided_at or self.created_at),
        }

    def closed_event(self) -> dict[str, Any]:
        """`proposal_rejected` / `proposal_expired` data: who or what closed it, and why."""
        return {
            "proposal_id": self.id,
            "symbol": self.symbol,
            "action": self.action,
            "size": self.size,
            "status": self.status,
            "reason": self.status_reason,
            "decided_by": self.decided_by,
            "decided_at": utc_timestamp(self.decided_at or self.created_at),
        }

    def as_dict(self) -> dict[str, Any]:
        row = asdict(self)
        row["proposal_id"] = row.pop("id")
        for name in ("created_at", "expires_at", "decided_at"):
            row[name] = utc_timestamp(row[name]) if row[name] is not None else None
        return row


@dataclass(frozen=True)
class Trade:
    order_id: str
    proposal_id: str
    symbol: str
    action: str
    size: float
    filled_price: float
    fee: float
    status: str
    executed_at: float

    def as_event(self) -> dict[str, Any]:
        """`trade_executed` data, as the spec shows it."""
        return {
            "proposal_id": self.proposal_id,
            "symbol": self.symbol,
            "action": self.action,
            "size": self.size,
            "filled_price": self.filled_price,
            "order_id": self.order_id,
            "status": self.status,
            "fee": self.fee,
            "timestamp": utc_timestamp(self.executed_at),
        }


@dataclass(frozen=True)
class Position:
    symbol: str
    size: float
    entry_price: float
    realized_pnl: float


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:16]}"


# -- proposals ---------------------------------------------------------------------------------

PROPOSAL_COLUMNS = (
    "id, symbol, action, size, reason, confidence, source, status, created_at, "
    "expires_at, decided_by, decided_at, status_reason, requested_by"
)


async def insert_proposal(connection: Connection, proposal: Proposal) -> None:
    await connection.execute(
        f"INSERT INTO proposals ({PROPOSAL_COLUMNS}) VALUES (:id, :symbol, :action, :size, "
        ":reason, :confidence, :source, :status, :created_at, :expires_at, :decided_by, "
        ":decided_at, :status_reason, :requested_by)",
        asdict(proposal),
    )


async def select_proposal(connection: Connection, proposal_id: str) -> Proposal | None:
    row = await connection.fetch_first(
        f"SELECT {PROPOSAL_COLUMNS} FROM proposals WHERE id = :id", {"id": proposal_id}
    )
    return Proposal(**dict(row)) if row is not None else None


async def select_proposals(
    connection: Connection,
    *,
    status: str | None = None,
    symbol: str | None = None,
    limit: int = 50,
    offset: int = 0,
) -> list[Proposal]:
    rows = await connection.fetch_all(
        f"SELECT {PROPOSAL_COLUMNS} FROM proposals "
        "WHERE (CAST(:status AS TEXT) IS NULL OR status = :status) "
        "AND (CAST(:symbol AS TEXT) IS NULL OR symbol = :symbol) "
        "ORDER BY created_at DESC, id LIMIT :limit OFFSET :offset",
        {"status": status, "symbol": symbol, "limit": limit, "offset": offset},
    )
    return [Proposal(**dict(row)) for row in rows]


async def count_proposals(
    connection: Connection, *, status: str | None = None, symbol: str | None = None
) -> int:
    return int(
        await connection.fetch_val(
            "SELECT COUNT(*) FROM proposals "
            "WHERE (CAST(:status AS TEXT) IS NULL OR status = :status) "
            "AND (CAST(:symbol AS TEXT) IS NULL OR symbol = :symbol)",
            {"status": status, "symbol": symbol},
        )
    )


async def count_open_proposals(connection: Connection, symbol: str) -> int:
    """Proposals of `symbol` still waiting: pending, or approved and not yet executed."""
    return int(
        await connection.fetch_val(
            "SELECT COUNT(*) FROM proposals WHERE symbol = :symbol "
            "AND (status = 'pending' OR status = 'approved')",
            {"symbol": symbol},
        )
    )


async def transition_proposal(
    connection: Connection,
    proposal_id: str,
    *,
    from_status: str,
    to_status: str,
    by: str | None,
    at: float,
    reason: str | None = None,
    or_from: str | None = None,
) -> Proposal | None:
    """Move a proposal from `from_status` (or `or_from`) to `to_status`, atomically: of many
    concurrent callers exactly one gets the proposal back, the others None."""
    row = await connection.fetch_first(
        "UPDATE proposals SET status = :to_status, "
        "decided_by = COALESCE(:by, decided_by), decided_at = COALESCE(:at, decided_at), "
        "status_reason = :reason "
        "WHERE id = :id AND (status = :from_status OR status = :or_from) "
        f"RETURNING {PROPOSAL_COLUMNS}",
        {
            "id": proposal_id,
            "to_status": to_status,
            "by": by,
            "at": at,
            "reason": reason,
            "from_status": from_status,
            "or_from": or_from or from_status,
        },
    )
    return Proposal(**dict(row)) if row is not None else None


async def select_stale_proposals(connection: Connection, now: float) -> list[str]:
    rows = await connection.fetch_all(
        "SELECT id FROM proposals WHERE status = 'pending' AND expires_at <= :now", {"now": now}
    )
    return [row["id"] for row in rows]


async def select_approved_proposals(connection: Connection) -> list[str]:
    rows = await connection.fetch_all(
        "SELECT id FROM proposals WHERE status = 'approved' ORDER BY decided_at, id"
    )
    return [row["id"] for row in rows]


# -- trades, positions, cash -------------------------------------------------------------------


async def insert_trade(connection: Connection, trade: Trade) -> None:
    await connection.execute(
        "INSERT INTO trades (order_id, proposal_id, symbol, action, size, filled_price, fee, "
        "status, executed_at) VALUES (:order_id, :proposal_id, :symbol, :action, :size, "
        ":filled_price, :fee, :status, :executed_at)",
        asdict(trade),
    )


async def select_trades(connection: Connection, *, limit: int = 50, offset: int = 0) -> list[Trade]:
    rows = await connection.fetch_all(
        "SELECT order_id, proposal_id, symbol, action, size, filled_price, fee, status, "
        "executed_at FROM trades ORDER BY executed_at DESC, order_id LIMIT :limit "
        "OFFSET :offset",
        {"limit": limit, "offset": offset},
    )
    return [Trade(**dict(row)) for row in rows]


async def count_trades(connection: Connection) -> int:
    return int(await connection.fetch_val("SELECT COUNT(*) FROM trades"))


async def select_positions(connection: Connection) -> list[Position]:
    rows = await connection.fetch_all(
        "SELECT symbol, size, entry_price, realized_pnl FROM positions ORDER BY symbol"
    )
    return [Position(**dict(row)) for row in rows]


async def select_position(connection: Connection, symbol: str) -> Position | None:
    row = await connection.fetch_first(
        "SELECT symbol, size, entry_price, realized_pnl FROM positions WHERE symbol = :symbol",
        {"symbol": symbol},
    )
    return Position(**dict(row)) if row is not None else None


async def save_position(connection: Connection, position: Position, at: float) -> None:
    await connection.execute(
        "INSERT INTO positions (symbol, size, entry_price, realized_pnl, updated_at) "
        "VALUES (:symbol, :size, :entry_price, :realized_pnl, :at) ON CONFLICT (symbol) DO "
        "UPDATE SET size = :size, entry_price = :entry_price, realized_pnl = :realized_pnl, "
        "updated_at = :at",
        {**asdict(position), "at": at},
    )


async def record_cash(
    connection: Connection, kind: str, amount: float, reference: str | None, at: float
) -> None:
    await connection.execute(
        "INSERT INTO ledger (id, at, kind, amount, reference) "
        "VALUES (:id, :at, :kind, :amount, :reference)",
        {"id": new_id("cash"), "at": at, "kind": kind, "amount": amount, "reference": reference},
    )


async def cash_balance(connection: Connection) -> float:
    return float(await connection.fetch_val("SELECT COALESCE(SUM(amount), 0) FROM ledger"))


async def deposits(connection: Connection) -> float:
    return float(
        await connection.fetch_val(
            "SELECT COALESCE(SUM(amount), 0) FROM ledger WHERE kind = 'deposit'"
        )
    )


async def ensure_initial_deposit(connection: Connection, amount: float, at: float) -> None:
    """The paper account's starting cash, once (a fixed id makes it idempotent)."""
    await connection.execute(
        "INSERT INTO ledger (id, at, kind, amount, reference) "
        "VALUES ('initial-deposit', :at, 'deposit', :amount, NULL) ON CONFLICT (id) DO NOTHING",
        {"at": at, "amount": amount},
    )


# -- market prices and engine state ------------------------------------------------------------


async def save_prices(connection: Connection, prices: dict[str, float], at: float) -> None:
    for symbol, price in prices.items():
        await connection.execute(
            "INSERT INTO market_prices (symbol, price, updated_at) VALUES (:symbol, :price, :at) "
            "ON CONFLICT (symbol) DO UPDATE SET price = :price, updated_at = :at",
            {"symbol": symbol, "price": price, "at": at},
        )


async def select_prices(connection: Connection) -> dict[str, float]:
    rows = await connection.fetch_all("SELECT symbol, price FROM market_prices")
    return {row["symbol"]: float(row["price"]) for row in rows}


async def get_state(connection: Connection, name: str) -> str | None:
    value = await connection.fetch_val(
        "SELECT value FROM engine_state WHERE name = :name", {"name": name}
    )
    return str(value) if value is not None else None


async def set_state(connection: Connection, name: str, value: str) -> None:
    await connection.execute(
        "INSERT INTO engine_state (name, value) VALUES (:name, :value) "
        "ON CONFLICT (name) DO UPDATE SET value = :value",
        {"name": name, "value": value},
    )


# -- API keys ----------------------------------------------------------------------------------


async def insert_api_key(
    connection: Connection, key_id: str, key_hash: str, scopes: str, label: str, at: float
) -> None:
    await connection.execute(
        "INSERT INTO api_keys (id, key_hash, scopes, label, created_at) "
        "VALUES (:id, :key_hash, :scopes, :label, :at)",
        {"id": key_id, "key_hash": key_hash, "scopes": scopes, "label": label, "at": at},
    )


async def revoke_api_key(connection: Connection, key_id: str, at: float) -> bool:
    row = await connection.fetch_first(
        "UPDATE api_keys SET revoked_at = :at WHERE id = :id AND revoked_at IS NULL RETURNING id",
        {"id": key_id, "at": at},
    )
    return row is not None


async def api_key_state(
    connection: Connection,
) -> tuple[dict[str, tuple[str, str]], bool]:
    """The active keys (hash -> (id, scopes)), and whether any key (active or revoked) is
    stored."""
    rows = await connection.fetch_all("SELECT id, key_hash, scopes, revoked_at FROM api_keys")
    active = {
        row["key_hash"]: (row["id"], row["scopes"]) for row in rows if row["revoked_at"] is None
    }
    return active, bool(rows)


async def delete_revoked_api_keys(connection: Connection) -> int | None:
    """Forget the revoked keys, which opens the gateway; None (nothing done) while a key is
    active. The number forgotten otherwise."""
    async with connection.transaction():
        active = await connection.fetch_val(
            "SELECT COUNT(*) FROM api_keys WHERE revoked_at IS NULL"
        )
        if active:
            return None
        forgotten = await connection.fetch_val("SELECT COUNT(*) FROM api_keys")
        await connection.execute("DELETE FROM api_keys")
    return int(forgotten)


async def select_api_keys(connection: Connection) -> list[dict[str, Any]]:
    rows = await connection.fetch_all(
        "SELECT id, scopes, label, created_at, revoked_at FROM api_keys ORDER BY created_at"
    )
    return [dict(row) for row in rows]
