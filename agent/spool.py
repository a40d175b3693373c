"""The durable spool and outbox on SQLite (WAL): nothing is deleted before its PUBACK.

Data flow (DESIGN.md §2): drivers hand readings to `add` (memory); `commit`
writes the buffered group in one transaction (the loss window on power cut is
the commit interval); `pack` turns the oldest committed readings into one
signed message and, in the same transaction, stores it in the outbox with its
sequence number and deletes those readings; the uplink sends outbox rows and
calls `ack(seq)` only after the broker acknowledged them. A message is signed
once and re-sent byte-identical from its row until acknowledged.

The spool is bounded by a byte budget. When it is exceeded the *oldest* data
goes first (outbox messages, then readings) and every dropped reading is
counted in `meta`, so health can report it. A full disk is reported as
`SpoolFull` to the caller, which keeps the readings in memory and raises an
alarm; the database stays consistent because every change is one transaction.

Trusts: its own database file. Readings come from drivers already typed.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from agent.seq import SeqCounter
from drivers.base import Reading

_SCHEMA = """
CREATE TABLE IF NOT EXISTS channels (
    id INTEGER PRIMARY KEY,
    sensor TEXT NOT NULL,
    quantity TEXT NOT NULL,
    unit TEXT NOT NULL,
    UNIQUE (sensor, quantity, unit)
);
CREATE TABLE IF NOT EXISTS readings (
    id INTEGER PRIMARY KEY,
    channel INTEGER NOT NULL,
    value REAL NOT NULL,
    t REAL NOT NULL,
    tq INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    readings INTEGER NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
"""

#: build(readings, seq) -> (topic, signed message bytes)
Builder = Callable[[Sequence[Reading], int], tuple[str, bytes]]


class SpoolError(Exception):
    """The spool database cannot be used (corrupt, unreadable, wrong schema)."""


class SpoolFull(SpoolError):
    """The filesystem refused a write (disk full or file size limit); nothing was lost."""


@dataclass(frozen=True, slots=True)
class OutboxRow:
    seq: int
    topic: str
    payload: bytes
    readings: int


@dataclass(frozen=True, slots=True)
class SpoolStats:
    buffered: int  # in memory, not yet committed
    readings: int  # committed, not yet packed
    messages: int  # packed, not yet acknowledged
    bytes_used: int
    dropped_readings: int
    next_seq: int


class Spool:
    """One spool file and its sequence counter. Not thread-safe: one owner (the agent loop)."""

    def __init__(
        self,
        path: Path,
        seq_path: Path,
        *,
        budget_bytes: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._path = path
        self._budget = budget_bytes
        self._clock = clock
        self._buffer: list[Reading] = []
        self.accepted = 0  # readings handed to `add` since this process opened the spool
        self._channels: dict[tuple[str, str, str], int] = {}
        self._channel_rows: dict[int, tuple[str, str, str]] = {}
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            # Debian builds SQLite with SECURE_DELETE, which rewrites every freed page with
            # zeros: a second write of all telemetry. Readings are not secrets (they are
            # sent to the cloud), and flash wear is the budget that matters here.
            self._db.execute("PRAGMA secure_delete=FAST")
            self._db.executescript(_SCHEMA)
            self._load_channels()
            last = self._meta("last_seq", -1)
            self._pending_readings = self._count("readings")
            self._pending_messages = self._count("outbox")
        except sqlite3.DatabaseError as exc:
            raise SpoolError(f"{path}: cannot open spool: {exc}") from exc
        self._seq = SeqCounter(seq_path, floor=last + 1)

    # -- readings ---------------------------------------------------------

    def add(self, readings: Sequence[Reading]) -> None:
        """Accept readings into memory; `commit` makes them durable."""
        self._buffer.extend(readings)
        self.accepted += len(readings)

    def commit(self) -> int:
        """Write the buffered readings in one transaction; return how many were written."""
        if not self._buffer:
            return 0
        group, self._buffer = self._buffer, []
        try:
            with _transaction(self._db):
                rows = [(self._channel(r), r.value, r.time, r.time_quality) for r in group]
                self._db.executemany(
                    "INSERT INTO readings (channel, value, t, tq) VALUES (?, ?, ?, ?)", rows
                )
        except sqlite3.OperationalError as exc:
            self._buffer[:0] = group  # keep them; the caller raises the alarm
            self._forget_uncommitted_channels()
            raise _translate(self._path, exc) from exc
        self._pending_readings += len(group)
        self._enforce_budget()
        return len(group)

    # -- packing ----------------------------------------------------------

    def pack(self, max_readings: int, build: Builder) -> OutboxRow | None:
        """Turn up to `max_readings` of the oldest committed readings into one outbox row."""
        try:
            with _transaction(self._db):
                rows = self._db.execute(
                    "SELECT id, channel, value, t, tq FROM readings ORDER BY id LIMIT ?",
                    (max_readings,),
                ).fetchall()
                if not rows:
                    return None
                readings = [self._reading(*row[1:]) for row in rows]
                seq = self._seq.take()
                topic, payload = build(readings, seq)
                self._db.execute(
                    "INSERT INTO outbox (seq, topic, payload, readings, created) "
                    "VALUES (?, ?, ?, ?, ?)",
                    (seq, topic, payload, len(readings), self._clock()),
                )
                self._db.execute("DELETE FROM readings WHERE id <= ?", (rows[-1][0],))
                self._set_meta("last_seq", seq)
        except sqlite3.OperationalError as exc:
            raise _translate(self._path, exc) from exc
        self._pending_readings -= len(readings)
        self._pending_messages += 1
        self._enforce_budget()
        return OutboxRow(seq, topic, payload, len(readings))

    def pack_ready(self, max_readings: int, build: Builder, *, partial: bool) -> int:
        """Pack every full batch, and with `partial` the remainder too; return messages made."""
        made = 0
        while self._pending_readings >= (1 if partial else max_readings):
            if self.pack(max_readings, build) is None:
                break
            made += 1
        return made

    # -- outbox -----------------------------------------------------------

    def outbox(self, *, after_seq: int = -1, limit: int = 100) -> list[OutboxRow]:
        """Unacknowledged messages with seq > after_seq, oldest first."""
        rows = self._db.execute(
            "SELECT seq, topic, payload, readings FROM outbox WHERE seq > ? ORDER BY seq LIMIT ?",
            (after_seq, limit),
        ).fetchall()
        return [OutboxRow(seq, topic, bytes(payload), n) for seq, topic, payload, n in rows]

    def ack(self, seqs: Sequence[int]) -> int:
        """Delete acknowledged messages in one transaction; return how many were still there.

        Grouping acknowledgements costs nothing in safety: a row whose PUBACK
        arrived but whose delete was not yet committed is only sent once more.
        """
        if not seqs:
            return 0
        try:
            with _transaction(self._db):
                cur = self._db.executemany(
                    "DELETE FROM outbox WHERE seq = ?", [(seq,) for seq in seqs]
                )
        except sqlite3.OperationalError as exc:
            raise _translate(self._path, exc) from exc
        self._pending_messages -= cur.rowcount
        return cur.rowcount

    # -- state ------------------------------------------------------------

    @property
    def pending_readings(self) -> int:
        """Committed readings not yet packed."""
        return self._pending_readings

    @property
    def pending_messages(self) -> int:
        """Packed messages not yet acknowledged."""
        return self._pending_messages

    def stats(self) -> SpoolStats:
        return SpoolStats(
            buffered=len(self._buffer),
            readings=self._pending_readings,
            messages=self._pending_messages,
            bytes_used=self._bytes_used(),
            dropped_readings=self._meta("dropped_readings", 0),
            next_seq=self._seq.peek(),
        )

    def close(self) -> None:
        self._db.close()

    # -- private ----------------------------------------------------------

    def _enforce_budget(self) -> None:
        """Drop the oldest data until the file's live pages fit the budget."""
        while self._bytes_used() > self._budget:
            dropped = self._drop_oldest()
            if dropped == 0:
                return

    def _drop_oldest(self) -> int:
        with _transaction(self._db):
            row = self._db.execute(
                "SELECT seq, readings FROM outbox ORDER BY seq LIMIT 1"
            ).fetchone()
            if row is not None:
                self._db.execute("DELETE FROM outbox WHERE seq = ?", (row[0],))
                dropped = int(row[1])
                self._pending_messages -= 1
            else:
                ids = self._db.execute("SELECT id FROM readings ORDER BY id LIMIT 1000").fetchall()
                if not ids:
                    return 0
                self._db.execute("DELETE FROM readings WHERE id <= ?", (ids[-1][0],))
                dropped = len(ids)
                self._pending_readings -= dropped
            self._set_meta("dropped_readings", self._meta("dropped_readings", 0) + dropped)
        return dropped

    def _bytes_used(self) -> int:
        (pages,) = self._db.execute("PRAGMA page_count").fetchone()
        (free,) = self._db.execute("PRAGMA freelist_count").fetchone()
        (size,) = self._db.execute("PRAGMA page_size").fetchone()
        return int((pages - free) * size)

    def _load_channels(self) -> None:
        for cid, sensor, quantity, unit in self._db.execute(
            "SELECT id, sensor, quantity, unit FROM channels"
        ):
            self._channels[(sensor, quantity, unit)] = cid
            self._channel_rows[cid] = (sensor, quantity, unit)

    def _channel(self, reading: Reading) -> int:
        key = (reading.sensor, reading.quantity, reading.unit)
        cid = self._channels.get(key)
        if cid is None:
            cur = self._db.execute(
                "INSERT INTO channels (sensor, quantity, unit) VALUES (?, ?, ?)", key
            )
            cid = int(cur.lastrowid or 0)
            self._channels[key] = cid
            self._channel_rows[cid] = key
        return cid

    def _forget_uncommitted_channels(self) -> None:
        """After a rolled-back transaction, channel ids created in it no longer exist."""
        self._channels.clear()
        self._channel_rows.clear()
        self._load_channels()

    def _reading(self, channel: int, value: float, t: float, tq: int) -> Reading:
        sensor, quantity, unit = self._channel_rows[channel]
        return Reading(sensor, quantity, value, unit, t, tq)

    def _count(self, table: str) -> int:
        (count,) = self._db.execute(f"SELECT count(*) FROM {table}").fetchone()  # noqa: S608 - fixed table names
        return int(count)

    def _meta(self, key: str, default: int) -> int:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return default if row is None else int(row[0])

    def _set_meta(self, key: str, value: int) -> None:
        self._db.execute(
            "INSERT INTO meta (key, value) VALUES (?, ?) "
            "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            (key, value),
        )


class _transaction:  # noqa: N801 - used as a statement: `with _transaction(db):`
    """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK on any exception."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self._db.execute("COMMIT")
        elif self._db.in_transaction:  # SQLite may already have rolled back (e.g. disk full)
            self._db.execute("ROLLBACK")


def _translate(path: Path, exc: sqlite3.OperationalError) -> SpoolError:
    text = str(exc)
    if "full" in text or "disk I/O" in text:
        return SpoolFull(f"{path}: {text}")
    return SpoolError(f"{path}: {text}")
