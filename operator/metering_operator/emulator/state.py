"""Durable emulator state in SQLite (``<state-dir>/emulator.sqlite3``).

Everything AWS would remember lives here, so a restarted (or killed) emulator still knows its
registrations, metering records, issued credentials, minted registration tokens, clock offset
and runtime configuration. Every write commits at once (WAL mode): a SIGKILL loses nothing
that was answered. The server is single-threaded (one asyncio loop), so one connection is enough.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS credentials (
    access_key_id TEXT PRIMARY KEY,
    secret_access_key TEXT NOT NULL,
    session_token TEXT NOT NULL,
    expiration REAL NOT NULL,
    identity TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS registrations (
    product_code TEXT NOT NULL,
    caller_key TEXT NOT NULL,
    first_at REAL NOT NULL,
    last_at REAL NOT NULL,
    calls INTEGER NOT NULL,
    key_version INTEGER NOT NULL,
    nonce TEXT,
    deregistered_at REAL,
    identity TEXT NOT NULL,
    PRIMARY KEY (product_code, caller_key)
);
CREATE TABLE IF NOT EXISTS meter_entitlements (
    product_code TEXT NOT NULL,
    caller_key TEXT NOT NULL,
    first_at REAL NOT NULL,
    PRIMARY KEY (product_code, caller_key)
);
CREATE TABLE IF NOT EXISTS meter_records (
    record_id TEXT PRIMARY KEY,
    product_code TEXT NOT NULL,
    caller_key TEXT NOT NULL,
    dimension TEXT NOT NULL,
    hour REAL NOT NULL,
    quantity TEXT NOT NULL,
    decimal INTEGER NOT NULL,
    allocations TEXT,
    timestamp REAL NOT NULL,
    created_at REAL NOT NULL,
    identity TEXT NOT NULL,
    UNIQUE (product_code, caller_key, dimension, hour)
);
CREATE TABLE IF NOT EXISTS client_tokens (
    scope TEXT NOT NULL,
    token TEXT NOT NULL,
    request_hash TEXT NOT NULL,
    response TEXT NOT NULL,
    PRIMARY KEY (scope, token)
);
CREATE TABLE IF NOT EXISTS batch_records (
    record_id TEXT PRIMARY KEY,
    product_code TEXT NOT NULL,
    customer_key TEXT NOT NULL,
    license_arn TEXT NOT NULL,
    dimension TEXT NOT NULL,
    hour REAL NOT NULL,
    quantity TEXT NOT NULL,
    decimal INTEGER NOT NULL,
    allocations TEXT,
    timestamp REAL NOT NULL,
    created_at REAL NOT NULL,
    caller TEXT NOT NULL,
    UNIQUE (product_code, customer_key, license_arn, dimension, hour)
);
CREATE TABLE IF NOT EXISTS license_checkouts (
    token TEXT PRIMARY KEY,
    license_arn TEXT NOT NULL,
    account TEXT NOT NULL,
    caller_key TEXT NOT NULL,
    checkout_type TEXT NOT NULL,
    entitlements TEXT NOT NULL,
    node_id TEXT,
    beneficiary TEXT,
    issued_at REAL NOT NULL,
    expiration REAL,
    extended INTEGER NOT NULL DEFAULT 0,
    checked_in_at REAL,
    identity TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS checkouts_live ON license_checkouts (license_arn, checked_in_at, expiration);
CREATE TABLE IF NOT EXISTS registration_tokens (token TEXT PRIMARY KEY, data TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    operation TEXT NOT NULL,
    error_code TEXT,
    product_code TEXT,
    data TEXT NOT NULL,
    logged_at REAL
);
"""
# State directories written before the event log had retention lack its column.
_MIGRATIONS = (("events", "logged_at", "ALTER TABLE events ADD COLUMN logged_at REAL"),)
_EVENTS_INDEX = "CREATE INDEX IF NOT EXISTS events_logged_at ON events (logged_at)"
#: The most events one ``GET /_emulator/events`` page returns, and its default size.
EVENTS_PAGE_MAX = 1000
EVENTS_PAGE_DEFAULT = 100


@dataclass(frozen=True)
class MeterRecord:
    record_id: str
    product_code: str
    caller_key: str
    dimension: str
    hour: float
    quantity: str
    decimal: bool
    allocations: list[dict[str, Any]] | None
    timestamp: float
    created_at: float
    identity: dict[str, Any]


@dataclass(frozen=True)
class Checkout:
    """One CheckoutLicense: the seats it holds until checked in or (PROVISIONAL) expired."""

    token: str
    license_arn: str
    account: str
    caller_key: str
    checkout_type: str  # PROVISIONAL | PERPETUAL
    entitlements: list[dict[str, Any]]  # [{"Name", "Unit", "Value"?}] as granted
    node_id: str | None
    beneficiary: str | None
    issued_at: float
    expiration: float | None  # None: never (a PERPETUAL checkout of a license without an end)
    extended: int
    checked_in_at: float | None
    identity: dict[str, Any]

    def active(self, now: float) -> bool:
        """Holding its seats at ``now``: not checked in, and perpetual or not yet expired."""
        if self.checked_in_at is not None:
            return False
        return self.checkout_type == "PERPETUAL" or (self.expiration is not None and now < self.expiration)

    def state(self, now: float) -> str:
        if self.checked_in_at is not None:
            return "CheckedIn"
        return "Active" if self.active(now) else "Expired"


class State:
    def __init__(self, state_dir: Path) -> None:
        state_dir.mkdir(parents=True, exist_ok=True)
        self.path = state_dir / "emulator.sqlite3"
        self.db = sqlite3.connect(self.path, isolation_level=None)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(SCHEMA)
        for table, column, ddl in _MIGRATIONS:
            columns = {row["name"] for row in self.db.execute(f"PRAGMA table_info({table})")}
            if column not in columns:
                self.db.execute(ddl)
        self.db.execute(_EVENTS_INDEX)

    def close(self) -> None:
        self.db.close()

    # -- key/value -------------------------------------------------------------------------
    def get_kv(self, key: str, default: Any = None) -> Any:
        row = self.db.execute("SELECT value FROM kv WHERE key = ?", (key,)).fetchone()
        return default if row is None else json.loads(row["value"])

    def set_kv(self, key: str, value: Any) -> None:
        self.db.execute(
            "INSERT INTO kv (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            (key, json.dumps(value)),
        )

    # -- credentials -----------------------------------------------------------------------
    def add_credentials(
        self, access_key_id: str, secret: str, session_token: str, expiration: float, identity: dict[str, Any]
    ) -> None:
        self.db.execute(
            "INSERT INTO credentials VALUES (?, ?, ?, ?, ?)",
            (access_key_id, secret, session_token, expiration, json.dumps(identity)),
        )

    def credentials(self, access_key_id: str) -> sqlite3.Row | None:
        row: sqlite3.Row | None = self.db.execute(
            "SELECT * FROM credentials WHERE access_key_id = ?", (access_key_id,)
        ).fetchone()
        return row

    def all_credentials(self) -> list[dict[str, Any]]:
        rows = self.db.execute("SELECT * FROM credentials ORDER BY rowid").fetchall()
        return [
            {
                "accessKeyId": r["access_key_id"],
                "expiration": r["expiration"],
                "identity": json.loads(r["identity"]),
            }
            for r in rows
        ]

    # -- registrations ---------------------------------------------------------------------
    def registration(self, product_code: str, caller_key: str) -> sqlite3.Row | None:
        row: sqlite3.Row | None = self.db.execute(
            "SELECT * FROM registrations WHERE product_code = ? AND caller_key = ?",
            (product_code, caller_key),
        ).fetchone()
        return row

    def add_registration(
        self,
        product_code: str,
        caller_key: str,
        now: float,
        key_version: int,
        nonce: str | None,
        identity: dict[str, Any],
    ) -> None:
        self.db.execute(
            "INSERT INTO registrations VALUES (?, ?, ?, ?, 1, ?, ?, NULL, ?)",
            (product_code, caller_key, now, now, key_version, nonce, json.dumps(identity)),
        )

    def touch_registration(self, product_code: str, caller_key: str, now: float) -> None:
        self.db.execute(
            "UPDATE registrations SET last_at = ?, calls = calls + 1"
            " WHERE product_code = ? AND caller_key = ?",
            (now, product_code, caller_key),
        )

    def deregister(self, pod_uid: str, product_code: str | None, now: float) -> int:
        sql = "UPDATE registrations SET deregistered_at = ? WHERE caller_key = ? AND deregistered_at IS NULL"
        params: list[Any] = [now, f"pod:{pod_uid}"]
        if product_code:
            sql += " AND product_code = ?"
            params.append(product_code)
        return self.db.execute(sql, params).rowcount

    def _rows(self, table: str, product_code: str | None, order_by: str) -> list[sqlite3.Row]:
        """All rows of ``table`` (one product's, when given), oldest first."""
        sql = f"SELECT * FROM {table}"  # table and order are constants of this module
        params: tuple[Any, ...] = ()
        if product_code:
            sql += " WHERE product_code = ?"
            params = (product_code,)
        return self.db.execute(f"{sql} ORDER BY {order_by}, rowid", params).fetchall()

    def registrations(self, product_code: str | None = None) -> list[dict[str, Any]]:
        return [
            {
                "productCode": r["product_code"],
                "callerKey": r["caller_key"],
                "firstAt": r["first_at"],
                "lastAt": r["last_at"],
                "calls": r["calls"],
                "publicKeyVersion": r["key_version"],
                "nonce": r["nonce"],
                "deregisteredAt": r["deregistered_at"],
                "identity": json.loads(r["identity"]),
            }
            for r in self._rows("registrations", product_code, "first_at")
        ]

    # -- MeterUsage ------------------------------------------------------------------------
    def meter_entitled(self, product_code: str, caller_key: str) -> bool:
        row = self.db.execute(
            "SELECT 1 FROM meter_entitlements WHERE product_code = ? AND caller_key = ?",
            (product_code, caller_key),
        ).fetchone()
        return row is not None

    def add_meter_entitlement(self, product_code: str, caller_key: str, now: float) -> None:
        self.db.execute(
            "INSERT OR IGNORE INTO meter_entitlements VALUES (?, ?, ?)", (product_code, caller_key, now)
        )

    def meter_record(
        self, product_code: str, caller_key: str, dimension: str, hour: float
    ) -> MeterRecord | None:
        row = self.db.execute(
            "SELECT * FROM meter_records"
            " WHERE product_code = ? AND caller_key = ? AND dimension = ? AND hour = ?",
            (product_code, caller_key, dimension, hour),
        ).fetchone()
        return None if row is None else _meter_record(row)

    def add_meter_record(self, rec: MeterRecord) -> None:
        self.db.execute(
            "INSERT INTO meter_records VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                rec.record_id,
                rec.product_code,
                rec.caller_key,
                rec.dimension,
                rec.hour,
                rec.quantity,
                int(rec.decimal),
                None if rec.allocations is None else json.dumps(rec.allocations),
                rec.timestamp,
                rec.created_at,
                json.dumps(rec.identity),
            ),
        )

    def meter_records(self, product_code: str | None = None) -> list[MeterRecord]:
        return [_meter_record(r) for r in self._rows("meter_records", product_code, "created_at")]

    def client_token(self, scope: str, token: str) -> sqlite3.Row | None:
        row: sqlite3.Row | None = self.db.execute(
            "SELECT * FROM client_tokens WHERE scope = ? AND token = ?", (scope, token)
        ).fetchone()
        return row

    def add_client_token(self, scope: str, token: str, request_hash: str, response: dict[str, Any]) -> None:
        self.db.execute(
            "INSERT OR REPLACE INTO client_tokens VALUES (?, ?, ?, ?)",
            (scope, token, request_hash, json.dumps(response)),
        )

    # -- BatchMeterUsage -------------------------------------------------------------------
    def batch_record(
        self, product_code: str, customer_key: str, license_arn: str, dimension: str, hour: float
    ) -> sqlite3.Row | None:
        row: sqlite3.Row | None = self.db.execute(
            "SELECT * FROM batch_records WHERE product_code = ? AND customer_key = ? AND license_arn = ?"
            " AND dimension = ? AND hour = ?",
            (product_code, customer_key, license_arn, dimension, hour),
        ).fetchone()
        return row

    def add_batch_record(self, values: dict[str, Any]) -> None:
        self.db.execute(
            "INSERT INTO batch_records VALUES (:record_id, :product_code, :customer_key, :license_arn,"
            " :dimension,"
            " :hour, :quantity, :decimal, :allocations, :timestamp, :created_at, :caller)",
            values,
        )

    def batch_records(self, product_code: str | None = None) -> list[dict[str, Any]]:
        return [
            {
                "meteringRecordId": r["record_id"],
                "productCode": r["product_code"],
                "customer": r["customer_key"],
                "licenseArn": r["license_arn"] or None,
                "dimension": r["dimension"],
                "hour": r["hour"],
                "quantity": r["quantity"],
                "decimal": bool(r["decimal"]),
                "allocations": json.loads(r["allocations"]) if r["allocations"] else None,
                "timestamp": r["timestamp"],
                "createdAt": r["created_at"],
                "caller": json.loads(r["caller"]),
            }
            for r in self._rows("batch_records", product_code, "created_at")
        ]

    # -- License Manager checkouts ----------------------------------------------------------
    def add_checkout(self, checkout: Checkout) -> None:
        self.db.execute(
            "INSERT INTO license_checkouts VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                checkout.token,
                checkout.license_arn,
                checkout.account,
                checkout.caller_key,
                checkout.checkout_type,
                json.dumps(checkout.entitlements),
                checkout.node_id,
                checkout.beneficiary,
                checkout.issued_at,
                checkout.expiration,
                checkout.extended,
                checkout.checked_in_at,
                json.dumps(checkout.identity),
            ),
        )

    def checkout(self, token: str) -> Checkout | None:
        row = self.db.execute("SELECT * FROM license_checkouts WHERE token = ?", (token,)).fetchone()
        return None if row is None else _checkout(row)

    def checkouts(self, license_arn: str | None = None, *, active_at: float | None = None) -> list[Checkout]:
        """Checkouts (of one license), oldest first; with ``active_at``, only those holding seats then."""
        sql = "SELECT * FROM license_checkouts WHERE 1 = 1"
        params: list[Any] = []
        if license_arn:
            sql += " AND license_arn = ?"
            params.append(license_arn)
        if active_at is not None:
            # Checkout.active, in SQL: seat counts must not read every expired checkout ever made.
            sql += " AND checked_in_at IS NULL AND (checkout_type = 'PERPETUAL' OR expiration > ?)"
            params.append(active_at)
        return [_checkout(r) for r in self.db.execute(sql + " ORDER BY issued_at, rowid", params)]

    def extend_checkout(self, token: str, expiration: float) -> None:
        self.db.execute(
            "UPDATE license_checkouts SET expiration = ?, extended = extended + 1 WHERE token = ?",
            (expiration, token),
        )

    def check_in(self, token: str, now: float) -> None:
        self.db.execute("UPDATE license_checkouts SET checked_in_at = ? WHERE token = ?", (now, token))

    # -- registration tokens ---------------------------------------------------------------
    def add_registration_token(self, token: str, data: dict[str, Any]) -> None:
        self.db.execute("INSERT INTO registration_tokens VALUES (?, ?)", (token, json.dumps(data)))

    def registration_token(self, token: str) -> dict[str, Any] | None:
        row = self.db.execute("SELECT data FROM registration_tokens WHERE token = ?", (token,)).fetchone()
        return None if row is None else dict(json.loads(row["data"]))

    # -- events ----------------------------------------------------------------------------
    def add_event(
        self,
        operation: str,
        error_code: str | None,
        product_code: str | None,
        data: dict[str, Any],
        *,
        logged_at: float,
        max_events: int,
        max_age_seconds: float,
    ) -> None:
        """Append one call; then drop the oldest beyond ``max_events`` and those older than the age.

        ``logged_at`` is wall-clock time: retention must not depend on the settable clock.
        """
        cursor = self.db.execute(
            "INSERT INTO events (operation, error_code, product_code, data, logged_at)"
            " VALUES (?, ?, ?, ?, ?)",
            (operation, error_code, product_code, json.dumps(data, default=str), logged_at),
        )
        newest = int(cursor.lastrowid or 0)
        # Both deletes use an index (seq is the primary key), so they cost little per call.
        self.db.execute("DELETE FROM events WHERE seq <= ?", (newest - max_events,))
        self.db.execute("DELETE FROM events WHERE logged_at < ?", (logged_at - max_age_seconds,))

    def recent_events(self, limit: int) -> list[dict[str, Any]]:
        """The newest ``limit`` events, newest first."""
        rows = self.db.execute("SELECT seq, data FROM events ORDER BY seq DESC LIMIT ?", (limit,))
        return [{"seq": r["seq"], **json.loads(r["data"])} for r in rows]

    def event_count(self) -> int:
        return int(self.db.execute("SELECT COUNT(*) FROM events").fetchone()[0])

    def events(
        self,
        operation: str | None = None,
        error_code: str | None = None,
        since: int = 0,
        limit: int = EVENTS_PAGE_DEFAULT,
    ) -> list[dict[str, Any]]:
        sql = "SELECT seq, data FROM events WHERE seq > ?"
        params: list[Any] = [since]
        if operation:
            sql += " AND operation = ?"
            params.append(operation)
        if error_code:
            sql += " AND error_code = ?"
            params.append(error_code)
        sql += " ORDER BY seq LIMIT ?"
        params.append(limit)
        return [{"seq": r["seq"], **json.loads(r["data"])} for r in self.db.execute(sql, params)]


def _checkout(row: sqlite3.Row) -> Checkout:
    return Checkout(
        token=row["token"],
        license_arn=row["license_arn"],
        account=row["account"],
        caller_key=row["caller_key"],
        checkout_type=row["checkout_type"],
        entitlements=json.loads(row["entitlements"]),
        node_id=row["node_id"],
        beneficiary=row["beneficiary"],
        issued_at=row["issued_at"],
        expiration=row["expiration"],
        extended=row["extended"],
        checked_in_at=row["checked_in_at"],
        identity=json.loads(row["identity"]),
    )


def _meter_record(row: sqlite3.Row) -> MeterRecord:
    return MeterRecord(
        record_id=row["record_id"],
        product_code=row["product_code"],
        caller_key=row["caller_key"],
        dimension=row["dimension"],
        hour=row["hour"],
        quantity=row["quantity"],
        decimal=bool(row["decimal"]),
        allocations=json.loads(row["allocations"]) if row["allocations"] else None,
        timestamp=row["timestamp"],
        created_at=row["created_at"],
        identity=json.loads(row["identity"]),
    )
